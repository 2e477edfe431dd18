"""train.py's flags: one dataclass is the one source of their defaults, the CLI is generated from it.

    python train.py --help                  # every field below, with its default and meaning

A run's settings come in layers, lowest priority first: this dataclass, the offline demo's values when
--model is omitted (demo_task.DEMO_TRAIN_DEFAULTS), a resumed checkpoint's own config (--resume), then
the flags typed on the command line. argparse keeps only the typed flags (argument_default=SUPPRESS), so
the layering needs no second table of defaults. The resolved TrainConfig is what train.py writes to
train_config.json and into each checkpoint; merge.py and generate.py read the run's settings back from
there. The defaults are the QLoRA recipe (arXiv:2305.14314 §4, Appendix B).

Also here: what --device auto and --dtype auto resolve to (the command line chooses the device; library
calls such as llama.from_pretrained stay on the CPU unless told), and the memory budget train.py prints
at start-up, both functions of the settings alone.
"""
import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import nf4
from lm_loss import loss_chunk_rows

DEFAULT_DATASET = "mlabonne/guanaco-llama2-1k"  # the classic QLoRA Colab's 1k-row Guanaco subset



def _flag(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    model: str | None = _flag(None, "hub id or local directory of a Llama checkpoint; omitted: the offline "
                                    "demo (SmolLM2-135M-Instruct on an embedded task)", type=str)
    revision: str | None = _flag(None, "hub revision (branch, tag or commit) of --model", type=str)
    data: str | None = _flag(None, "a .jsonl/.json/.parquet/.txt file or a hub dataset id; rows are {text}, "
                                   "{prompt, completion}, {instruction, input, output} or {messages}; default: "
                                   f"{DEFAULT_DATASET} (the demo's own data without --model)", type=str)
    data_split: str = _flag("train", "split of a hub dataset (or a directory of data files) to train on")
    output_dir: str | None = _flag(None, "where adapters, checkpoints and metrics go; default "
                                         "runs/<YYYYmmdd-HHMMSS>", type=str)
    quant: str = _flag("nf4", "4-bit data type of the frozen base (QLoRA §3 NF4), or none for plain LoRA",
                       choices=["nf4", "fp4", "none"])
    double_quant: bool = _flag(True, "quantize the 4-bit block constants again (QLoRA §3, ~0.37 bit/param)")
    blocksize: int = _flag(64, "weights per 4-bit block (QLoRA §3)")
    lora_r: int = _flag(64, "LoRA rank (QLoRA Appendix B)")
    lora_alpha: float = _flag(16.0, "LoRA alpha; the update is scaled by alpha/r")
    lora_dropout: float = _flag(0.1, "dropout on the LoRA branch (QLoRA: 0.1 up to 13B, 0.05 above)")
    lora_targets: str = _flag("all-linear", "layers to adapt: all-linear (every linear but lm_head, QLoRA §4), "
                                            "a comma list of names like q_proj,v_proj, or a regex")
    use_rslora: bool = _flag(False, "scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)")
    optim: str = _flag("paged_adamw_32bit", "optimizer (QLoRA §3: paged optimizers)",
                       choices=["paged_adamw_32bit", "paged_adamw_8bit", "adamw"])
    lr: float = _flag(2e-4, "peak learning rate (QLoRA Appendix B)")
    lr_scheduler: str = _flag("constant", "schedule after warmup", choices=["constant", "cosine", "linear"])
    warmup_ratio: float = _flag(0.03, "fraction of the steps spent warming the lr up linearly")
    weight_decay: float = _flag(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = _flag(0.3, "clip the global gradient norm to this (QLoRA Appendix B); 0 disables")
    batch_size: int = _flag(4, "rows per micro-batch")
    grad_accum: int = _flag(4, "micro-batches per optimizer step")
    seq_len: int = _flag(512, "maximum tokens per row (longer rows are truncated and counted)")
    max_steps: int = _flag(0, "optimizer steps to run; 0: --epochs passes over the data")
    epochs: int = _flag(1, "passes over the data when --max-steps is 0")
    packing: bool = _flag(False, "pack rows into --seq-len blocks (no attention across rows)")
    gradient_checkpointing: bool = _flag(True, "recompute each decoder layer in backward instead of storing it")
    offload_activations: bool = _flag(False, "with gradient checkpointing: keep each layer's saved input in CPU "
                                             "memory, not on the GPU (long context; see llama.py)")
    compile: str = _flag("auto", "torch.compile each decoder layer, 4-bit dequantize included, into a few fused "
                                 "kernels (CUDA; falls back to eager with a warning if compiling fails); auto: "
                                 "on for CUDA, off on the CPU, where eager is as fast", choices=["auto", "on", "off"])
    eval_fraction: float = _flag(0.0, "fraction of the rows held out for eval loss")
    eval_every: int = _flag(0, "evaluate every N steps (0: only at the end); needs --eval-fraction")
    log_every: int = _flag(1, "write a metrics.jsonl line every N steps")
    save_every: int = _flag(250, "write checkpoint-<step>/ every N steps (and always at the end); 0: end only")
    save_total_limit: int = _flag(3, "keep only the newest N checkpoint dirs; 0 keeps all")
    resume: str | None = _flag(None, "continue from a checkpoint-<step> dir, or 'auto' for the newest in "
                                     "--output-dir", type=str)
    device: str = _flag("auto", "auto: CUDA if available, else CPU (slow)", choices=["auto", "cuda", "cpu"])
    dtype: str = _flag("auto", "compute dtype; auto: bf16 where the hardware has it, else fp16 with loss "
                               "scaling on GPU, fp32 on CPU", choices=["auto", *nf4.DTYPES])
    threads: int = _flag(0, "CPU threads for torch (0: torch's default, one per core); 1 is far faster on a "
                            "machine other jobs keep busy, where a second thread waits at every op's barrier")
    seed: int = _flag(42, "seed for LoRA init, dropout and the data order")
    fsdp: bool = _flag(False, "under torchrun: shard the 4-bit base, adapters and optimizer state over the "
                              "ranks with FSDP2 (a model too big for one device); without it torchrun trains "
                              "data-parallel. --batch-size stays per device")
    fsdp_cpu_offload: bool = _flag(False, "with --fsdp: keep the shards and the optimizer step in host RAM "
                                          "(FSDP2 CPUOffloadPolicy)")
    dist_timeout: float = _flag(30.0, "under torchrun: minutes a rank waits in a collective before giving up")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        # SUPPRESS: the namespace then holds only the flags the user typed, so defaults can be layered
        # (dataclass < demo defaults < a resumed run's config < command line) without a second table.
        argument_default=argparse.SUPPRESS)
    for f in FIELDS.values():
        meta = dict(f.metadata)
        help_text = f"{meta.pop('help')} (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            meta.setdefault("type", f.type)
            if "choices" not in meta:  # with choices, argparse shows them: --quant {nf4,fp4,none}
                meta["metavar"] = f.name.upper()
            parser.add_argument(flag, help=help_text, **meta)
    return parser


def validate(cfg):
    positive = ["blocksize", "lora_r", "batch_size", "grad_accum", "epochs", "log_every"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ["threads", "max_steps", "eval_every", "save_every", "save_total_limit", "weight_decay",
                 "max_grad_norm"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (a token and its successor), got {cfg.seq_len}")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.warmup_ratio < 1 or not 0 <= cfg.eval_fraction < 1:
        raise ValueError("--lora-dropout, --warmup-ratio and --eval-fraction must be in [0, 1)")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.offload_activations and not cfg.gradient_checkpointing:
        raise ValueError("--offload-activations moves the checkpointed layer inputs: it needs --gradient-checkpointing")


def resolve_config(argv):
    """TrainConfig from (lowest to highest priority) the dataclass, the demo's defaults when --model is
    omitted, a resumed checkpoint's config, and the command line. Returns (cfg, demo)."""
    given = vars(build_parser().parse_args(argv))
    values = {name: f.default for name, f in FIELDS.items()}
    demo = None
    resume_from = find_checkpoint(given["resume"], given.get("output_dir")) if given.get("resume") else None
    if resume_from is not None:  # continue with the run's own settings unless overridden now
        saved = json.loads((resume_from / "trainer_state.json").read_text())["config"]
        values.update({k: v for k, v in saved.items() if k in FIELDS})
        values["output_dir"] = str(resume_from.parent)
    elif given.get("model") is None:
        import demo_task
        model_dir, train_file, eval_rows = demo_task.prepare()
        unknown = sorted(set(k.replace("-", "_") for k in demo_task.DEMO_TRAIN_DEFAULTS) - set(FIELDS))
        if unknown:
            raise ValueError(f"demo_task.DEMO_TRAIN_DEFAULTS has keys train.py doesn't know: {unknown}")
        values.update({k.replace("-", "_"): v for k, v in demo_task.DEMO_TRAIN_DEFAULTS.items()})
        values["model"] = str(model_dir)
        if given.get("data") is None:
            values["data"] = str(train_file)
            demo = eval_rows
    values.update(given)
    if values["data"] is None:
        values["data"] = DEFAULT_DATASET
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg, demo


def find_checkpoint(resume, output_dir):
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint (no trainer_state.json); "
                                    "pass a checkpoint-<step> directory or 'auto'")
        return path
    if output_dir is None:
        raise ValueError("--resume auto needs --output-dir (the run to continue)")
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


# ---------------------------------------------------------------------------------------------------
# A finished run, read back (merge.py, generate.py): the newest one, and the settings it trained with.

def latest_run(runs_dir="runs"):
    """Newest finished training run under `runs_dir`: a run is finished once its top-level
    adapter_config.json exists; its mtime (not the directory's, which `merged/` would bump) orders runs."""
    runs = [p.parent for p in Path(runs_dir).glob("*/adapter_config.json")]
    if not runs:
        raise FileNotFoundError(f"no finished training run under {Path(runs_dir).resolve()} (a run dir holds "
                                "adapter_config.json): train one with `python train.py`, or pass --adapter DIR")
    return max(runs, key=lambda p: ((p / "adapter_config.json").stat().st_mtime, p.name))


def run_config(adapter_dir):
    """The resolved flags (train_config.json) of the run that wrote this adapter: next to it, or one
    level up for a checkpoint-<step>/ dir. {} for an adapter from elsewhere (e.g. PEFT)."""
    for candidate in (Path(adapter_dir) / "train_config.json", Path(adapter_dir).parent / "train_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def quant_settings(run):
    """The 4-bit base a run trained against, from its run_config (missing fields: this dataclass's
    defaults, the QLoRA recipe). dtype is what the weights were cast to before quantizing: the run's
    resolved compute dtype, else bfloat16 (QLoRA's compute dtype; "auto" is resolved only at run time)."""
    quant = run.get("quant", FIELDS["quant"].default)
    return {"quant_type": None if quant in (None, "none") else quant,
            "blocksize": int(run.get("blocksize", FIELDS["blocksize"].default)),
            "double_quant": bool(run.get("double_quant", FIELDS["double_quant"].default)),
            "dtype": run["dtype"] if run.get("dtype") in nf4.DTYPES else "bfloat16"}


# ---------------------------------------------------------------------------------------------------
# What "auto" means, and what the settings will cost.

def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        warnings.warn("training on the CPU: fine for tiny models and the demo, very slow for 7B", stacklevel=2)
    return name


def cpu_has_bf16():
    """bf16 matmuls in hardware (AVX512-BF16 / AMX). Measured on a 2-core AMD Zen 5 (avx512_bf16):
    a 512x576x1536 matmul runs at ~950 GFLOP/s in bf16 against ~190 in fp32. Without these instructions
    PyTorch emulates bf16 and fp32 is faster, so auto picks fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name, device):
    if name != "auto":
        return name
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def memory_estimate(config, cfg, dtype):
    """A rough device-memory budget from the config alone (bytes), printed at start-up."""
    C, L, V, I = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    D = getattr(config, "head_dim", None) or C // config.num_attention_heads
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    shapes = [(C, q), (C, kv), (C, kv), (q, C), (C, I), (C, I), (I, C)]  # (in, out) of the 7 linears
    linear = L * sum(i * o for i, o in shapes)
    item = nf4.DTYPES[dtype].itemsize
    if cfg.quant == "none":
        bits = 8 * item
    elif cfg.double_quant:
        bits = 4 + 8 / cfg.blocksize + 32 / (cfg.blocksize * 256)  # QLoRA §3: 4.127 bits at blocksize 64
    else:
        bits = 4 + 32 / cfg.blocksize
    weights = linear * bits / 8 + V * C * (1 if config.tie_word_embeddings else 2) * item
    adapters = L * cfg.lora_r * sum(i + o for i, o in shapes) if cfg.lora_targets == "all-linear" else 0
    optimizer = adapters * (4 + 4 + (2 if cfg.optim == "paged_adamw_8bit" else 8))  # weight, grad, 2 moments
    tokens = cfg.batch_size * cfg.seq_len
    # one layer's internals while it runs (in backward), attention scores counted as if materialized
    scores = cfg.batch_size * config.num_attention_heads * cfg.seq_len ** 2 * 4
    layer = tokens * (4 * C + 2 * kv + 3 * I) * item * 2 + scores
    activations = (L * tokens * C * item + layer) if cfg.gradient_checkpointing else L * layer
    loss = tokens * C * 4 + min(tokens, loss_chunk_rows(V)) * V * (4 + 2 + 2)  # fp32 + 2 bf16 logit copies
    total = weights + optimizer + activations + loss
    return (f"memory estimate: base weights {weights / 2**30:.2f} GiB + adapters and optimizer "
            f"{optimizer / 2**20:.0f} MiB + activations {activations / 2**30:.2f} GiB + loss "
            f"{loss / 2**20:.0f} MiB = ~{total / 2**30:.2f} GiB (+ framework overhead)")
