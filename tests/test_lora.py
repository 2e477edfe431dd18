"""lora.py against dense float64 maths, PEFT's own adapter files and logits, and the 4-bit memory contract."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from conftest import HF
import lora
from lora import LoRALinear, add_lora, adapter_config, load_adapter, merge_lora, merge_weight, save_adapter

PEFT_ADAPTER = HF / "gqa_peft_adapter"


# ---------------------------------------------------------------------------------------------------
# A toy decoder with Llama's module names, small enough to check every number by hand.

class ToyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(c, c)  # with bias: bias must stay under its own key
        self.self_attn.v_proj = nn.Linear(c, c, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(c, 2 * c, bias=False)
        self.mlp.down_proj = nn.Linear(2 * c, c, bias=False)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        h = x + self.self_attn.v_proj(torch.tanh(self.self_attn.q_proj(self.norm(x))))
        return h + self.mlp.down_proj(F.silu(self.mlp.up_proj(h)))


class Toy(nn.Module):
    def __init__(self, vocab=50, c=16, n_layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, c)
        self.model.layers = nn.ModuleList(ToyBlock(c) for _ in range(n_layers))
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.gradient_checkpointing = False

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.gradient_checkpointing else layer(x)
        return self.lm_head(x)


TOY_LINEARS = [f"model.layers.{i}.{m}" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]


def randomize_B(model, seed=1):
    """B starts at zero (a no-op adapter); tests need a non-trivial adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)


def dense_reference(x, W, b, A, B, s):
    """W x + b + s B A x in float64."""
    x, W, A, B = x.double(), W.double(), A.double(), B.double()
    y = x @ W.T + s * (x @ A.T) @ B.T
    return y if b is None else y + b.double()


def toy_with_lora(seed=0, **kw):
    torch.manual_seed(seed)
    model = Toy()
    add_lora(model, **{"r": 4, "alpha": 8, "dropout": 0.0, **kw})
    randomize_B(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# LoRALinear

@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_dense_reference(use_rslora):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24), r=4, alpha=8, use_rslora=use_rslora)
    assert layer.scaling == (8 / 2 if use_rslora else 8 / 4) == lora.lora_scaling(4, 8, use_rslora)
    assert (layer.in_features, layer.out_features) == (32, 24)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 32)
    ref = dense_reference(x, layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight,
                          layer.scaling)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_init_is_kaiming_uniform_A_and_zero_B():
    torch.manual_seed(0)
    base = nn.Linear(256, 64, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=16, alpha=16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.dtype == B.dtype == torch.float32 and A.shape == (16, 256) and B.shape == (64, 16)
    # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(I), 1/sqrt(I)): 4096 draws fill the interval
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.equal(B, torch.zeros_like(B))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))  # B = 0: the wrapped model starts exactly at the base model
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_dropout_only_on_adapter_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24), r=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    mask = F.dropout(torch.ones_like(x), 0.5, training=True)  # the same draw the layer made: 0 or 2
    ref = dense_reference(x, layer.base.weight, layer.base.bias, torch.zeros(1, 32), torch.zeros(24, 1), 0)
    ref = ref + layer.scaling * (x * mask).double() @ layer.lora_A.weight.double().T @ layer.lora_B.weight.double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # eval: no dropout at all
    ref_eval = dense_reference(x, layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight,
                               layer.scaling)
    torch.testing.assert_close(layer.eval()(x).double(), ref_eval, rtol=1e-5, atol=1e-5)


def test_bf16_compute_fp32_masters_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(64, 48, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = dense_reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)
    y.float().square().sum().backward()
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.grad.dtype == B.grad.dtype == torch.float32  # gradients reach the fp32 masters
    assert base.weight.grad is None
    # reference gradient of sum(y^2) w.r.t. A and B in float64 (using the bf16 forward output)
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    y64 = dense_reference(x, base.weight, base.bias, A64, B64, layer.scaling)
    y64.square().sum().backward()
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=5e-2, atol=5e-2 * A64.grad.abs().max().item())
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=5e-2, atol=5e-2 * B64.grad.abs().max().item())


def test_state_dict_keeps_base_keys_and_loads_base_checkpoint():
    torch.manual_seed(0)
    base_ckpt = Toy().state_dict()  # a "pretrained" checkpoint, different weights from the model below
    model = Toy()
    add_lora(model, r=4, alpha=8)
    keys = list(model.state_dict())
    adapter_keys = [f"{n}.lora_{p}.weight" for n in TOY_LINEARS for p in "AB"]
    assert sorted(keys) == sorted([*base_ckpt, *adapter_keys])
    q = "model.layers.0.self_attn.q_proj"
    assert keys.index(f"{q}.weight") < keys.index(f"{q}.bias") < keys.index(f"{q}.lora_A.weight")
    result = model.load_state_dict(base_ckpt, strict=False)
    assert sorted(result.missing_keys) == sorted(adapter_keys) and result.unexpected_keys == []
    for k, v in model.state_dict().items():
        if k in base_ckpt:
            assert torch.equal(v, base_ckpt[k]), k
    # and a full LoRA state dict round-trips strictly
    full = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(full, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full.items())


# ---------------------------------------------------------------------------------------------------
# add_lora

def test_add_lora_all_linear_counts_and_freezes(capsys):
    torch.manual_seed(0)
    model = Toy()
    n = add_lora(model, r=4, alpha=8)
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(TOY_LINEARS)  # every linear but lm_head
    c = 16
    assert n == 2 * 4 * ((c + c) + (c + c) + (c + 2 * c) + (2 * c + c))  # r * (in + out) per layer
    assert f"{n:,}" in capsys.readouterr().out
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{p}.weight" for m in TOY_LINEARS for p in "AB"}


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], [m for m in TOY_LINEARS if "attn" in m]),
    (["model.layers.1.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]),
    (["self_attn.q_proj", "lm_head"], [m for m in TOY_LINEARS if "q_proj" in m] + ["lm_head"]),
    (r"model\.layers\.0\..*_proj", TOY_LINEARS[:4]),  # a string other than all-linear: full-name regex (PEFT)
])
def test_add_lora_targets(targets, expected):
    model = Toy()
    add_lora(model, r=2, alpha=2, targets=targets)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == sorted(expected)


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "qproj"], "qproj"),        # a typo is an error, not a silent no-op
    (["proj"], "proj"),                    # suffixes match on a module-name boundary only
    (["mlp"], "not linear"),               # a container is not a linear layer
    (["embed_tokens"], "not linear"),
    ([], "targets"),
])
def test_add_lora_bad_targets(targets, message):
    model = Toy()
    with pytest.raises(ValueError, match=message):
        add_lora(model, targets=targets)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_add_lora_twice_is_an_error():
    model = Toy()
    add_lora(model, r=2)
    with pytest.raises(ValueError, match="already"):
        add_lora(model, r=2)


def test_only_adapter_params_get_gradients():
    model = toy_with_lora(dropout=0.1).train()
    ids = torch.randint(0, 50, (2, 7))
    model(ids).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{m}.lora_{p}.weight" for m in TOY_LINEARS for p in "AB"}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_gradient_checkpointing_gives_identical_gradients():
    grads = []
    for ckpt in (False, True):
        model = toy_with_lora(dropout=0.3).train()  # dropout: recomputation must redraw the same mask
        model.gradient_checkpointing = ckpt
        torch.manual_seed(5)
        model(torch.randint(0, 50, (2, 7))).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# save_adapter / load_adapter

def test_save_load_round_trip(tmp_path):
    model = toy_with_lora(use_rslora=True)
    ids = torch.randint(0, 50, (2, 7))
    save_adapter(model, tmp_path / "run", "toy-base")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = adapter_config(tmp_path / "run")
    settings = (config["r"], config["lora_alpha"], config["use_rslora"], config["base_model_name_or_path"])
    assert settings == (4, 8, True, "toy-base")
    assert config["target_modules"] == sorted(TOY_LINEARS)
    tensors = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert len(tensors) == 16
    for name in TOY_LINEARS:
        m = model.get_submodule(name)
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], m.lora_A.weight)
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], m.lora_B.weight)

    torch.manual_seed(0)
    fresh = Toy().eval()  # same base weights (same seed), no LoRA yet
    load_adapter(fresh, tmp_path / "run")
    assert torch.equal(fresh(ids), model(ids))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        f"{m}.lora_{p}.weight" for m in TOY_LINEARS for p in "AB"}
    # loading into layers that already have LoRA copies into them
    again = toy_with_lora(use_rslora=True, seed=0)
    with torch.no_grad():
        for m in again.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.zero_()
    load_adapter(again, tmp_path / "run")
    assert torch.equal(again(ids), model(ids))


def test_wrapping_keeps_eval_mode(tmp_path):
    """A LoRA added to (or loaded into) a model in eval mode must not switch dropout on for inference."""
    model = toy_with_lora(dropout=0.5)  # eval()
    save_adapter(model, tmp_path, "toy")
    assert adapter_config(tmp_path)["lora_dropout"] == 0.5
    torch.manual_seed(0)
    fresh = Toy().eval()
    load_adapter(fresh, tmp_path)
    assert all(not m.training for m in fresh.modules())
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(fresh(ids), model(ids)) and torch.equal(fresh(ids), fresh(ids))
    evaluated = Toy().eval()
    add_lora(evaluated, dropout=0.5)
    assert all(not m.training for m in evaluated.modules())
    trained = Toy()
    add_lora(trained, dropout=0.5)
    assert all(m.training for m in trained.modules())


@pytest.mark.parametrize("target_modules", [
    ["q_proj", "v_proj", "up_proj", "down_proj"],          # suffixes
    "all-linear",
    r".*\.(q_proj|v_proj|up_proj|down_proj)",             # regex (PEFT: re.fullmatch on the full name)
])
def test_load_accepts_peft_target_forms(tmp_path, target_modules):
    model = toy_with_lora()
    save_adapter(model, tmp_path, "toy")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = target_modules
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    fresh = Toy().eval()
    load_adapter(fresh, tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(fresh(ids), model(ids))


def test_load_exclude_modules_and_half_precision_files(tmp_path):
    model = toy_with_lora()
    save_adapter(model, tmp_path, "toy")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"], config["exclude_modules"] = ["q_proj", "v_proj"], ["model.layers.1.self_attn.v_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kept = {k: v.half() for k, v in tensors.items() if ("q_proj" in k or "layers.0.self_attn.v_proj" in k)}
    save_file(kept, tmp_path / "adapter_model.safetensors")
    fresh = Toy()
    load_adapter(fresh, tmp_path)
    wrapped = sorted(n for n, m in fresh.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj"]
    for n in wrapped:
        assert fresh.get_submodule(n).lora_B.weight.dtype == torch.float32
        assert torch.equal(fresh.get_submodule(n).lora_B.weight, kept[f"base_model.model.{n}.lora_B.weight"].float())


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"), ("bias", "lora_only"),
    ("rank_pattern", {"q_proj": 16}), ("alpha_pattern", {"q_proj": 32}), ("fan_in_fan_out", True),
    ("layers_to_transform", 0), ("layer_replication", [[0, 1]]), ("lora_bias", True),
    ("trainable_token_indices", [3]), ("peft_type", "IA3"), ("task_type", "SEQ_CLS"), ("r", 0),
    ("target_modules", None),
])
def test_load_rejects_unsupported_config(tmp_path, field, value):
    config = json.loads((PEFT_ADAPTER / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = (PEFT_ADAPTER / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(ValueError, match=field):
        adapter_config(tmp_path)
    model = Toy()
    with pytest.raises(ValueError, match=field):
        load_adapter(model, tmp_path)


def test_load_rejects_wrong_shapes_missing_and_unused_keys(tmp_path):
    model = toy_with_lora()
    save_adapter(model, tmp_path, "toy")
    good = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    cases = {
        "shape": {**good, key: torch.zeros(32, 5)},
        "has no": {k: v for k, v in good.items() if k != key},
        "belong to no": {**good, "base_model.model.model.norm.lora_A.weight": torch.zeros(4, 16)},
    }
    for message, tensors in cases.items():
        save_file(tensors, tmp_path / "adapter_model.safetensors")
        fresh = Toy()
        with pytest.raises(ValueError, match=message):
            load_adapter(fresh, tmp_path)
        assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # all or nothing
    # an existing LoRA of another rank is a clear error too
    save_file(good, tmp_path / "adapter_model.safetensors")
    other = Toy()
    add_lora(other, r=8, alpha=8)
    with pytest.raises(ValueError, match="already has a LoRA"):
        load_adapter(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(Toy(), tmp_path / "nowhere")


def test_save_is_atomic_and_overwrites(tmp_path, monkeypatch):
    model = toy_with_lora()
    save_adapter(model, tmp_path, "toy")
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, "toy")
    # the old adapter is intact and no temp file is left behind
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="add_lora"):
        save_adapter(Toy(), tmp_path, "toy")


# ---------------------------------------------------------------------------------------------------
# Merging

def test_merge_weight_sums_in_fp32_and_casts_once():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=g).to(torch.bfloat16)
    A, B = torch.randn(8, 64, generator=g) * 0.1, torch.randn(48, 8, generator=g) * 0.1
    W0, A0, B0 = W.clone(), A.clone(), B.clone()
    merged = merge_weight(W, A, B, 2.0)
    assert merged.dtype == torch.bfloat16 and merged.shape == W.shape
    assert torch.equal(W, W0) and torch.equal(A, A0) and torch.equal(B, B0)  # pure
    ref = W.double() + 2.0 * B.double() @ A.double()
    # one rounding to bf16 (8 significant bits): within half an ulp, i.e. 2^-8 relative
    torch.testing.assert_close(merged.double(), ref, rtol=2 ** -8 * 1.001, atol=1e-30)
    fp32 = merge_weight(W.float(), A, B, 2.0)
    torch.testing.assert_close(fp32.double(), ref, rtol=1e-6, atol=1e-6)


def test_merge_lora_forward_equals_adapter_forward():
    model = toy_with_lora()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == list(Toy().state_dict())
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# On the real model: PEFT's adapter and logits (fixtures written by PEFT 0.21.2 / transformers 5.24)

def gqa_model():
    import llama
    return llama.from_pretrained(HF / "gqa", quant=None, dtype=torch.float32).eval()


def test_peft_adapter_reproduces_peft_logits_and_merged_logits():
    expected = load_file(HF / "expected" / "gqa_peft_adapter.safetensors")
    model = gqa_model()
    config = load_adapter(model, PEFT_ADAPTER)
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 14
    with torch.no_grad():
        logits = model(expected["input_ids"])
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(expected["input_ids"]), expected["logits_merged"], rtol=1e-5, atol=1e-5)
        # and the adapter really matters here: the base model's logits are far from PEFT's
        assert (gqa_model()(expected["input_ids"]) - expected["logits"]).abs().max() > 0.1


def test_saved_adapter_has_peft_layout(tmp_path):
    model = gqa_model()
    load_adapter(model, PEFT_ADAPTER)
    save_adapter(model, tmp_path, "gqa")
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = json.loads((PEFT_ADAPTER / "adapter_config.json").read_text())
    # every field PEFT writes, with PEFT's values (target_modules is a set in PEFT: order is arbitrary)
    assert sorted(ours) == sorted(theirs)
    assert ours["target_modules"] == sorted(theirs["target_modules"])
    assert {**ours, "target_modules": None} == {**theirs, "target_modules": None}
    ours_t = load_file(tmp_path / "adapter_model.safetensors")
    theirs_t = load_file(PEFT_ADAPTER / "adapter_model.safetensors")
    assert sorted(ours_t) == sorted(theirs_t)
    for k, v in theirs_t.items():
        assert ours_t[k].dtype == torch.float32 and torch.equal(ours_t[k], v), k


def test_llama_only_adapters_train_and_checkpointing_matches():
    ids = load_file(HF / "expected" / "gqa_peft_adapter.safetensors")["input_ids"][:, :16]
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = gqa_model()
        add_lora(model, r=4, alpha=8, dropout=0.1)
        randomize_B(model)
        model.train()
        model.gradient_checkpointing = ckpt
        torch.manual_seed(1)
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert all(".lora_A." in n or ".lora_B." in n for n in grads[-1])
        assert len(grads[-1]) == 2 * 14
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# A 4-bit base: forward = dense maths on the dequantized weight; no float weight saved for backward

def float_weight_saves(fn, shapes):
    """Run fn() under a saved-tensors hook; return the float tensors saved with out*in elements."""
    sizes, found = {o * i for o, i in shapes}, []

    def pack(t):
        if t.is_floating_point() and t.numel() in sizes:
            found.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return found


def test_lora_over_linear4bit_matches_dequantized_dense_and_saves_no_float_weight():
    from nf4 import Linear4bit
    torch.manual_seed(0)
    dense = nn.Linear(128, 96, bias=True)
    base = Linear4bit.from_linear(dense, compute_dtype=torch.float32)
    layer = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    x = torch.randn(3, 5, 128)
    ref = dense_reference(x, base.dequantize(torch.float32), base.bias, layer.lora_A.weight, layer.lora_B.weight,
                          layer.scaling)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)

    x.requires_grad_()
    saved = float_weight_saves(lambda: layer(x).square().sum().backward(), [(96, 128)])
    assert saved == []
    assert layer.lora_A.weight.grad is not None and x.grad is not None
    # the 4-bit keys stay the checkpoint's own, and a 4-bit state dict loads back
    keys = set(layer.state_dict())
    assert keys == set(base.state_dict()) | {"lora_A.weight", "lora_B.weight"}
    assert "weight.absmax" in keys or "weight.quant_state.bitsandbytes__nf4" in keys
    fresh = LoRALinear(Linear4bit.from_linear(nn.Linear(128, 96), compute_dtype=torch.float32), r=8, alpha=16)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_qlora_llama_saves_no_float_weight_for_backward():
    import llama
    model = llama.from_pretrained(HF / "gqa", quant="nf4", dtype=torch.bfloat16)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_B(model)
    model.train()  # (no checkpointing: its own saved-tensor hooks would hide the layers' saves from ours)
    # 6 tokens: no activation happens to have out*in elements
    ids = load_file(HF / "expected" / "gqa.safetensors")["input_ids"][:1, :6]
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, LoRALinear)}
    assert shapes == {(64, 64), (32, 64), (176, 64), (64, 176)}

    def step():
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    assert float_weight_saves(step, shapes) == []
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 28 and all(".lora_" in n for n in grads)


def test_replace_dir_swaps_whole_directories_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    final, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "a").write_text("first")
    lora.replace_dir(tmp, final)  # nothing there yet: a plain rename
    assert (final / "a").read_text() == "first" and not tmp.exists()
    tmp.mkdir()
    (tmp / "a").write_text("second")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside; now the new one fails to move in (e.g. the disk went away)
            raise OSError("simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="simulated"):
        lora.replace_dir(tmp, final)
    monkeypatch.undo()
    assert (final / "a").read_text() == "first"  # the old directory is back, whole
    lora.replace_dir(tmp, final)
    assert (final / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
