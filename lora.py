"""LoRA: trainable low-rank adapters on frozen (4-bit or plain) linear layers, in PEFT's file format.

LoRA (Hu et al., arXiv:2106.09685 §4.1) freezes a pretrained weight W [O, I] and learns a low-rank update:

    y = W x + b + s * B A dropout(x)        A [R, I], B [O, R], R << min(I, O)
    s = alpha / R                           (LoRA §4.1: "scale by alpha/r", so changing R needs no new lr)
    s = alpha / sqrt(R)                     (rsLoRA, Kalajdzievski arXiv:2312.03732: keeps the update's size
                                             rank-stable, so large ranks actually learn faster)

B starts at zero, so training starts exactly at the pretrained model (LoRA §4.1); A starts random (the
paper says Gaussian; its reference code loralib and PEFT use Kaiming-uniform with a = sqrt(5), as here).
Dropout is on the adapter branch only (QLoRA arXiv:2305.14314 Appendix B: r 64, alpha 16, dropout 0.1
for models up to 13B, 0.05 above).
QLoRA §4 finds LoRA must sit on *every* linear layer of the block, not only q/v, to match 16-bit
fine-tuning; that is `targets="all-linear"` here (every linear but the output head `lm_head`).

Dtypes: A and B are float32 master weights (what the optimizer updates and what is saved), but the two
adapter matmuls run in the dtype of the incoming activations (bf16 in QLoRA's "BFloat16 computation data
type"): each call casts A and B down and autograd casts their gradients back up to float32.
The frozen base is either `nf4.Linear4bit` (which saves only its packed 4-bit weight for backward and
dequantizes it again there) or a plain `nn.Linear`.

Merging (LoRA §4.1 "No additional inference latency"): W' = W + s * B A, summed in float32 and cast once.
Merging into the original 16-bit W differs from merging into the dequantized NF4 weight the adapter was
trained against by the quantization error; `merge_lora` here merges into whatever base the model holds.

Files: `save_adapter` / `load_adapter` read and write PEFT's layout (`adapter_config.json`,
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`), so adapters go to and from
PEFT, transformers, vLLM. Deliberately left out: several adapters per model, DoRA, bias training,
per-module ranks (`rank_pattern`), `modules_to_save`, embedding LoRA. Loading any of them is an error.

Shapes (in the trailing comments): B batch, T tokens, I in_features, O out_features, R rank. (The matrices
A and B of the maths above are `lora_A.weight` (R, I) and `lora_B.weight` (O, R) in the code.)
"""
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nf4 import Linear4bit

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT adapters (torch pickle), read-only
KEY_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel) .model (the transformer)
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose adapter_config.json field set we write
LINEAR_TYPES = (nn.Linear, Linear4bit)


def lora_scaling(r, alpha, use_rslora=False):
    """The adapter's multiplier s: alpha / r (LoRA §4.1), or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """`base(x) + scaling * lora_B(lora_A(dropout(x)))` around a frozen `nn.Linear` or `Linear4bit`.

    The base stays a submodule (`self.base`) but state-dict hooks drop the `base.` from its keys, so the
    wrapped layer's keys are the checkpoint's own (`q_proj.weight`, `q_proj.weight.absmax`, ...) next to
    `q_proj.lora_A.weight` / `q_proj.lora_B.weight`: a base checkpoint loads into a LoRA model unchanged.
    """

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or nf4.Linear4bit, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base.weight.device  # a Linear4bit's packed weight is a buffer, still `.weight`
        # float32 masters whatever the base's dtype: bf16 would round away most small Adam updates
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        # PEFT's (and LoRA's reference code's) init: A ~ U(-1/sqrt(I), 1/sqrt(I)), B = 0, so B A = 0 at step 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # wrapping an eval-mode model must not switch its dropout on
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    def forward(self, x):  # x (B, T, I) -> (B, T, O)
        y = self.base(x)
        # Casting the fp32 masters to x's dtype inside the graph: ToCopyBackward returns fp32 gradients.
        a = self.lora_A.weight.to(x.dtype)  # (R, I)
        b = self.lora_B.weight.to(x.dtype)  # (O, R)
        return y + self.scaling * F.linear(F.linear(self.dropout(x), a), b)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, use_rslora={self.use_rslora}"


def _drop_base_prefix(module, state_dict, prefix, local_metadata):
    # This module's keys are the last ones in the (ordered) dict; re-insert them base-first, renamed.
    mine = [k for k in state_dict if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in mine]
    inner = prefix + "base."
    for k, v in items:
        if k.startswith(inner):
            state_dict[prefix + k[len(inner):]] = v
    for k, v in items:
        if not k.startswith(inner):
            state_dict[k] = v


def _add_base_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for k in [k for k in state_dict if k.startswith(prefix)]:
        if not k[len(prefix):].startswith(("lora_A.", "lora_B.", "base.")):
            state_dict[prefix + "base." + k[len(prefix):]] = state_dict.pop(k)


# ---------------------------------------------------------------------------------------------------
# Choosing the layers: PEFT's `target_modules` semantics, shared by add_lora and load_adapter.

def _linear_layers(module, prefix=""):
    """(name, module) for every linear layer (or LoRALinear) not inside a LoRALinear, plus the others.

    Returns two dicts: linears and non-linear modules, keyed by full module name."""
    linears, others = {}, {}
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, (LoRALinear, *LINEAR_TYPES)):
            linears[full] = child  # don't descend: a LoRALinear's base/lora_A/lora_B are not targets
        else:
            others[full] = child
            sub_linears, sub_others = _linear_layers(child, full + ".")
            linears.update(sub_linears)
            others.update(sub_others)
    return linears, others


def _select(model, targets, exclude=None, every_target_must_match=True):
    """Module names chosen by PEFT's rules: "all-linear" = every linear but the output head `lm_head`;
    a list = names equal to an entry or ending in "." + entry (a module-name boundary: "proj" does not
    match "q_proj"); any other string = a regex that must match the whole name. `exclude` likewise."""
    linears, others = _linear_layers(model)

    def matches(name, spec):
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)

    if isinstance(targets, str) and targets.lower() == "all-linear":
        chosen = [n for n in linears if n != "lm_head" and not n.endswith(".lm_head")]
    else:
        if not isinstance(targets, (str, list, tuple, set)) or not targets:
            raise ValueError(f"targets must be 'all-linear', a list of module names, or a regex; got {targets!r}")
        chosen = [n for n in [*linears, *others] if matches(n, targets)]
        if every_target_must_match and not isinstance(targets, str):
            unmatched = [t for t in targets if not any(matches(n, [t]) for n in chosen)]
            if unmatched:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise ValueError(f"LoRA targets {unmatched} match no module; linear layers here: {suffixes}")
        not_linear = [n for n in chosen if n not in linears]
        if not_linear:
            raise ValueError(f"LoRA targets must be linear layers; these are not linear: {not_linear[:5]}")
    if exclude:
        chosen = [n for n in chosen if not matches(n, exclude)]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of the model")
    return {n: linears[n] for n in chosen}


def _count_parameters(model):
    """Parameters as the model sees them: a 4-bit weight (a buffer, 2 values per byte) counts in * out."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.in_features * m.out_features
        for p in m.parameters(recurse=False):
            if id(p) not in seen:  # tied weights once
                seen.add(id(p))
                total += p.numel()
    return total


def _freeze_all_but_lora(model):
    adapters = {id(p) for m in _lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model, r=64, alpha=16, dropout=0.1, targets="all-linear", use_rslora=False):
    """Wrap the target linear layers of `model` in LoRALinear (in place) and freeze everything else.

    Defaults are QLoRA's (§4, Appendix B: r 64, alpha 16, dropout 0.1, all linear layers). `targets`
    follows PEFT's `target_modules`: "all-linear", a list of names or name suffixes (`["q_proj", "v_proj"]`),
    or a full-name regex; a list entry that matches nothing is an error. Returns the trainable count."""
    chosen = _select(model, targets)
    wrapped = [n for n, m in chosen.items() if isinstance(m, LoRALinear)]
    if wrapped:
        raise ValueError(f"{wrapped[:3]} already have a LoRA adapter; add_lora once per model")
    for name, layer in chosen.items():
        model.set_submodule(name, LoRALinear(layer, r, alpha, dropout, use_rslora))
    trainable = _freeze_all_but_lora(model)
    total = _count_parameters(model)
    print(f"LoRA r={r} alpha={alpha} on {len(chosen)} linear layers: {trainable:,} trainable parameters "
          f"({100 * trainable / total:.3f}% of {total:,})")
    return trainable


# ---------------------------------------------------------------------------------------------------
# PEFT's files.

# Fields of adapter_config.json whose non-default values change what the adapter computes (or which
# modules it owns) in ways this file does not implement. Anything else PEFT writes is init-time or
# bookkeeping and is ignored on load.
_UNSUPPORTED = {
    "use_dora": "DoRA (magnitude vectors)",
    "modules_to_save": "fully trained extra modules",
    "lora_bias": "a bias on lora_B",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "layers_to_transform": "a layer subset",
    "layers_pattern": "a layer subset",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on bare parameters",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA pooling",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA singular values",
}


def adapter_config(directory):
    """Read and validate `directory/adapter_config.json` (a PEFT LoRA config) and return it as a dict."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}: pass a directory written by "
                                f"save_adapter or PEFT's save_pretrained")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type {config['task_type']!r}; only CAUSAL_LM adapters are supported")
    for field, what in _UNSUPPORTED.items():
        value = config.get(field)
        if not (value is None or value is False or value in ({}, [], "")):  # (0 is a layer index, not "unset")
            raise ValueError(f"{path}: {field}={value!r} ({what}) is not supported by lora.py")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} (trained biases) is not supported; need 'none'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and r > 0) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: needs an int r > 0 and a numeric lora_alpha, got r={r!r} lora_alpha={alpha!r}")
    if not config.get("target_modules"):
        raise ValueError(f"{path}: target_modules is empty; which layers the adapter belongs to is unknown")
    return config


def atomic_write(path, write):
    """write(tmp_path) into a temp file in path's directory, then rename over path (never a torn file).
    The one atomic-write helper of the project (adapters here; train.py's metrics, config and plot)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replace_dir(tmp, final):
    """Move the finished directory `tmp` to `final`, replacing what is there, so that `final` is always
    either the old or the new complete directory (a crash or full disk never leaves half of one): the old
    one is renamed aside, the new one renamed in (put back on failure), and only then is the old deleted.
    The one write-then-swap of the project (train.py's checkpoints, merge.py's output)."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # put the previous directory back rather than leave none
        raise
    shutil.rmtree(old)


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model, directory, base_model_name_or_path):
    """Write the model's adapters as PEFT does: adapter_model.safetensors + adapter_config.json."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora or load_adapter first")
    settings = {(m.r, m.alpha, m.use_rslora, _dropout_p(m)) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers differ in (r, alpha, use_rslora, dropout) {sorted(settings)}; "
                         f"PEFT's rank_pattern/alpha_pattern are not supported")
    (r, alpha, use_rslora, dropout), = settings
    tensors = {}
    for name, m in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()  # (R, I)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()  # (O, R)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    config = {  # PEFT 0.21.2's LoraConfig.to_dict() field set, with PEFT's defaults for what we do not use
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path), "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": r,
        "rank_pattern": {}, "revision": None, "target_modules": sorted(layers), "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": use_rslora, "velora_config": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first: a directory holding adapter_config.json counts as a finished adapter (see DESIGN.md).
    atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(directory / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))


def _dropout_p(layer):
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def load_adapter(model, directory):
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model` in place and return its config.

    Layers the config targets get a LoRALinear if they have none yet (with the config's r, alpha,
    dropout, rsLoRA); every target must find its A and B in the file with exactly the expected shapes,
    and every tensor in the file must be used. Everything but the adapters is frozen, as by add_lora.
    Nothing in the model changes unless all checks pass."""
    config = adapter_config(directory)
    directory = Path(directory)
    if (directory / ADAPTER_WEIGHTS).is_file():
        tensors = load_file(directory / ADAPTER_WEIGHTS)
    elif (directory / ADAPTER_WEIGHTS_BIN).is_file():
        tensors = torch.load(directory / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}) in {directory}")
    r, alpha = config["r"], config["lora_alpha"]
    use_rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    targets = config["target_modules"]
    chosen = _select(model, targets, exclude=config.get("exclude_modules"), every_target_must_match=False)

    updates, unused = [], set(tensors)
    for name, layer in chosen.items():
        if isinstance(layer, LoRALinear) and (layer.r, layer.alpha, layer.use_rslora) != (r, alpha, use_rslora):
            raise ValueError(f"{name} already has a LoRA with (r, alpha, use_rslora) = "
                             f"{(layer.r, layer.alpha, layer.use_rslora)}, the adapter has {(r, alpha, use_rslora)}")
        pair = []
        for part, shape in (("lora_A", (r, layer.in_features)), ("lora_B", (layer.out_features, r))):
            key = f"{KEY_PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise ValueError(f"{directory / ADAPTER_WEIGHTS} has no {key}, but target_modules selects {name}")
            if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
                raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} {tensors[key].dtype}, "
                                 f"expected float {shape} for {name} with r={r}")
            unused.discard(key)
            pair.append(tensors[key])
        updates.append((name, layer, *pair))
    if unused:
        raise ValueError(f"{len(unused)} tensors in {directory} belong to no targeted layer, e.g. "
                         f"{sorted(unused)[:3]}")

    for name, layer, a, b in updates:
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, r, alpha, dropout, use_rslora)
            model.set_submodule(name, layer)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)  # copy_ casts (fp16/bf16 files too) to the fp32 master, on its device
            layer.lora_B.weight.copy_(b)
    _freeze_all_but_lora(model)
    return config


# ---------------------------------------------------------------------------------------------------
# Merging.

def merge_weight(weight, lora_A, lora_B, scaling):
    """W + scaling * B @ A, summed in float32 and cast once to W's dtype (W [O, I], A [R, I], B [O, R])."""
    delta = lora_B.float() @ lora_A.float()  # (O, I)
    return (weight.float() + scaling * delta).to(weight.dtype)


def merge_lora(model):
    """Replace every LoRALinear in `model` (in place) by a plain frozen nn.Linear holding W + s B A.

    An nn.Linear base merges into its own weight (dtype kept). A Linear4bit base merges into its
    dequantized weight, i.e. the weight the adapter was trained against, not the original 16-bit one
    (merge.py streams the original shards for that). Returns the model."""
    for name, layer in _lora_layers(model).items():
        base = layer.base
        with torch.no_grad():
            weight = base.dequantize() if isinstance(base, Linear4bit) else base.weight
            weight = merge_weight(weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)  # (O, I)
        merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, merged)
    return model
