"""llama.py against transformers: logits, hidden states and rope tables of the tiny transformers-written
checkpoints in fixtures/hf (see its README), config layouts, strict loading and load errors."""
import json
import os
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_checkpoint
import llama
from conftest import HF

VARIANTS = ["gqa", "tied", "sharded", "llama3rope", "bf16"]


def load(variant_dir, **kw):
    kw = {"quant": None, "dtype": torch.float32, "device": "cpu"} | kw
    return llama.from_pretrained(variant_dir, **kw)


def expected(variant):
    return load_file(HF / "expected" / f"{variant}.safetensors")


def assert_logits_close(actual, reference, rel=1e-5):
    """Max abs error within `rel` of the logits' scale (max |logit|): the parity criterion of the issue."""
    scale = reference.abs().max().item()
    torch.testing.assert_close(actual, reference, rtol=0, atol=rel * scale)


# ----------------------------------------------------------------------------------------------------
# parity with transformers (fp32, eager attention) for every variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_parity(variant):
    exp = expected(variant)
    model = load(HF / variant)
    captured = {}
    model.model.layers[0].register_forward_hook(lambda m, i, out: captured.setdefault("hidden_1", out))
    with torch.no_grad():
        logits = model(exp["input_ids"])
        hidden = model.hidden_states(exp["input_ids"])
    assert logits.shape == (2, 64, 512) and logits.dtype == torch.float32
    assert_logits_close(logits, exp["logits"])
    # embeddings are a lookup: exact; the rest within fp32 round-off of a 2-layer model
    assert torch.equal(model.model.embed_tokens(exp["input_ids"]), exp["hidden_0"])
    torch.testing.assert_close(captured["hidden_1"], exp["hidden_1"], rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden, exp["hidden_2"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=0)
    assert torch.equal(model.inv_freq, exp["inv_freq"])  # same formulas, same float32 order: bit-exact
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), exp["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, exp["loss"], rtol=1e-6, atol=0)


def test_bf16_parity():
    """bf16 weights run in bf16: transformers (eager attention) rounds the attention probabilities to bf16
    before the value matmul, SDPA does not, so exact equality is not expected; the difference must stay
    within two bf16 ulps of the logits' scale, and our bf16 logits must be as close to the fp32 truth as
    transformers' own."""
    exp = expected("bf16")
    model = load(HF / "bf16", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(exp["input_ids"])
    assert logits.dtype == torch.bfloat16
    ref = exp["logits_bf16"]
    assert load(HF / "bf16", dtype=None).lm_head.weight.dtype == torch.bfloat16  # None: config.json's dtype
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().max())).item() - 7)  # bf16 spacing at the largest logit
    torch.testing.assert_close(logits.float(), ref, rtol=0, atol=2 * ulp)
    ours, theirs = (logits.float() - exp["logits"]).abs().max(), (ref - exp["logits"]).abs().max()
    assert ours <= 1.25 * theirs, (ours, theirs)


def test_transformers4_config_layout(tmp_path):
    """A config.json in the transformers-4 layout (top-level rope_theta, rope_scaling with the old `type`
    key, torch_dtype, no head_dim) reads to the same config and gives the same logits."""
    cfg = json.loads((HF / "llama3rope" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    del cfg["head_dim"]  # transformers 4 configs of Llama 2/3 leave it out: hidden_size / heads = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(HF / "llama3rope" / "model.safetensors", tmp_path / "model.safetensors")

    assert llama.LlamaConfig.from_file(tmp_path / "config.json") == \
        llama.LlamaConfig.from_file(HF / "llama3rope" / "config.json")
    exp = expected("llama3rope")
    model = load(tmp_path)
    assert torch.equal(model.inv_freq, exp["inv_freq"])
    with torch.no_grad():
        assert_logits_close(model(exp["input_ids"]), exp["logits"])


def test_config_fields_and_errors():
    base = json.loads((HF / "gqa" / "config.json").read_text())
    c = llama.LlamaConfig.from_dict(base)
    assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rope_scaling, c.torch_dtype) == \
        (2, 16, 10000.0, None, "float32")
    q = llama.LlamaConfig.from_file(HF.parent / "bnb" / "tiny_llama_nf4_dq" / "config.json")
    assert q.quantization_config["bnb_4bit_quant_type"] == "nf4"
    old = {k: v for k, v in base.items() if k not in ("rope_parameters", "num_key_value_heads")}
    old |= {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    c = llama.LlamaConfig.from_dict(old)
    assert (c.num_key_value_heads, c.rope_theta, c.rope_scaling) == (4, 5e5, {"rope_type": "linear", "factor": 4.0})
    assert llama.LlamaConfig.from_dict(base | {"rope_scaling": None}).rope_scaling is None

    with pytest.raises(ValueError, match="model_type 'mistral'"):
        llama.LlamaConfig.from_dict(base | {"model_type": "mistral"})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        llama.LlamaConfig.from_dict(base | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="needs 'factor'"):
        llama.LlamaConfig.from_dict(base | {"rope_parameters": {"rope_type": "dynamic"}})
    with pytest.raises(ValueError, match="lacks \\['hidden_size'\\]"):
        llama.LlamaConfig.from_dict({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="multiple of"):
        llama.LlamaConfig.from_dict(base | {"num_key_value_heads": 3})


# Reference values: transformers 5.24 LlamaRotaryEmbedding on the gqa config with max_position_embeddings
# 64, `inv_freq` after a forward over positions 0..99 (the dynamic type rescales there).
HF_INV_FREQ = {
    "dynamic": ["0x1.0000000000000p+0", "0x1.22c2840000000p-2", "0x1.4a3d460000000p-4", "0x1.7714540000000p-6",
                "0x1.aa02080000000p-8", "0x1.e3d9fc0000000p-10", "0x1.12c64a0000000p-11", "0x1.3815680000000p-13"],
    "linear": ["0x1.0000000000000p-2", "0x1.43d1360000000p-4", "0x1.99999a0000000p-6", "0x1.030dc60000000p-7",
               "0x1.47ae140000000p-9", "0x1.9e7c700000000p-11", "0x1.0624de0000000p-12", "0x1.4b96c00000000p-14"],
}


@pytest.mark.parametrize("kind,factor", [("dynamic", 2.0), ("linear", 4.0)])
def test_rope_scaling_inv_freq(kind, factor):
    cfg = json.loads((HF / "gqa" / "config.json").read_text())
    cfg |= {"max_position_embeddings": 64, "rope_parameters": {"rope_type": kind, "factor": factor}}
    c = llama.LlamaConfig.from_dict(cfg)
    ref = torch.tensor([float.fromhex(h) for h in HF_INV_FREQ[kind]])
    assert torch.equal(llama.rope_inv_freq(c, seq_len=100), ref)
    if kind == "dynamic":  # within the trained length dynamic scaling is plain rope
        assert torch.equal(llama.rope_inv_freq(c, seq_len=64), llama.rope_inv_freq(llama.LlamaConfig.from_dict(
            cfg | {"rope_parameters": {"rope_theta": 10000.0}})))


def test_linear_rope_is_position_interpolation(tmp_path):
    """Linear scaling by 2 at positions 2p equals plain rope at positions p: the angles are the same
    float32 numbers (halving is exact), so the logits are too."""
    model = load(HF / "gqa")
    cfg = json.loads((HF / "gqa" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(HF / "gqa" / "model.safetensors", tmp_path / "model.safetensors")
    scaled = load(tmp_path)
    ids = expected("gqa")["input_ids"]
    pos = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids, position_ids=2 * pos), model(ids, position_ids=pos), rtol=0, atol=0)
        assert not torch.allclose(scaled(ids), model(ids))


def test_dynamic_rope_forward_rescales_past_max_positions(tmp_path):
    """Beyond max_position_embeddings the forward uses the rescaled frequencies (else the model is plain)."""
    cfg = json.loads((HF / "gqa" / "config.json").read_text())
    cfg |= {"max_position_embeddings": 32, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(HF / "gqa" / "model.safetensors", tmp_path / "model.safetensors")
    dyn, plain = load(tmp_path), load(HF / "gqa")
    ids = expected("gqa")["input_ids"]
    with torch.no_grad():
        assert torch.equal(dyn(ids[:, :32]), plain(ids[:, :32]))
        long = dyn(ids)
        assert not torch.allclose(long, plain(ids))
        # what the rescaled table gives when installed by hand
        plain.inv_freq = llama.rope_inv_freq(dyn.config, seq_len=64)
        assert torch.equal(long, plain(ids))


# ----------------------------------------------------------------------------------------------------
# model behaviour: padding, cache, tied weights, gradient checkpointing


def test_padding_mask_matches_unpadded():
    """Left padding (with positions counted from the first real token) and right padding leave the real
    tokens' logits as they are without padding."""
    model = load(HF / "gqa")
    ids = expected("gqa")["input_ids"][0]
    with torch.no_grad():
        ref = model(ids[None, :40])[0]  # (40, V)
        batch = torch.stack([torch.cat([torch.full((24,), 2), ids[:40]]), ids[:64]])  # row 0 left-padded
        mask = torch.ones(2, 64, dtype=torch.long)
        mask[0, :24] = 0
        out = model(batch, attention_mask=mask)
        assert torch.isfinite(out).all()
        assert_logits_close(out[0, 24:], ref)
        assert_logits_close(out[1], model(ids[None])[0])
        right = torch.stack([ids[:64], torch.cat([ids[:40], torch.full((24,), 2)])])
        mask = torch.ones(2, 64, dtype=torch.long)
        mask[1, 40:] = 0
        assert_logits_close(model(right, attention_mask=mask)[1, :40], ref)


def test_kv_cache_matches_full_forward():
    model = load(HF / "gqa")
    ids = expected("gqa")["input_ids"]
    with torch.no_grad():
        full = model(ids)
        cache = llama.KVCache(model, batch_size=2, max_len=64)
        parts = [model(ids[:, :40], cache=cache), model(ids[:, 40:41], cache=cache),
                 model(ids[:, 41:50], cache=cache)]  # several tokens on top of a cache: explicit causal mask
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(50, 64)]
    assert cache.length == 64
    assert_logits_close(torch.cat(parts, dim=1), full)


def test_library_stays_on_the_cpu_unless_told(monkeypatch):
    """The device convention: device=None is the CPU even where a GPU is available (as torch and
    transformers do); only the command-line scripts pick CUDA by themselves (--device auto)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for quant in (None, "nf4"):
        model = llama.from_pretrained(HF / "gqa", quant=quant, dtype=torch.float32)
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}, quant


@pytest.mark.cuda
def test_cuda_model_takes_inputs_from_the_cpu():
    """Token ids, a padding mask and position ids on the CPU go to the model's device by themselves; fp32
    logits within the parity tolerance (TF32 is off for matmuls by default)."""
    exp = expected("gqa")
    model = load(HF / "gqa", device="cuda")
    mask = torch.ones(2, 64, dtype=torch.long)
    with torch.no_grad():
        out = model(exp["input_ids"], attention_mask=mask)
        by_position = model.hidden_states(exp["input_ids"], position_ids=torch.arange(64).expand(2, 64))
    assert out.is_cuda and by_position.is_cuda
    assert_logits_close(out.cpu(), exp["logits"])
    torch.testing.assert_close(by_position.cpu(), exp["hidden_2"], rtol=0, atol=1e-5)


def test_tied_embeddings_share_one_matrix():
    model = load(HF / "tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sd = model.state_dict()
    assert "lm_head.weight" not in sd  # as in the HF checkpoint
    assert set(sd) == set(load_file(HF / "tied" / "model.safetensors"))
    with torch.device("meta"):
        fresh = llama.Llama(model.config)
    fresh.load_state_dict(sd, assign=True, strict=True)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    fresh.inv_freq = model.inv_freq
    ids = expected("tied")["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_gradient_checkpointing_without_inputs_requiring_grad():
    """Only a few inner weights train (as with LoRA), so no layer input requires grad: non-reentrant
    checkpointing must still give the same gradients, and it must actually recompute the layers."""
    ids = expected("gqa")["input_ids"][:, :32]
    grads = {}
    for ckpt in (False, True):
        model = load(HF / "gqa")
        model.requires_grad_(False)
        trained = [model.model.layers[0].mlp.down_proj.weight, model.model.layers[1].self_attn.q_proj.weight]
        for p in trained:
            p.requires_grad_(True)
        calls = []
        # a pre-hook: non-reentrant recomputation stops early, after the last tensor backward needs
        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *a: calls.append(1))
        model.gradient_checkpointing = ckpt
        model.train()
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        grads[ckpt] = [p.grad for p in trained]
        assert len(calls) == (2 if ckpt else 1)  # recomputed in backward
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# strict loading and load errors


def write_checkpoint(directory, tensors, config_from=HF / "gqa", **config_changes):
    directory.mkdir(exist_ok=True)
    cfg = json.loads((config_from / "config.json").read_text()) | config_changes
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_strict_keys_and_shapes(tmp_path):
    sd = load_file(HF / "gqa" / "model.safetensors")
    with pytest.raises(ValueError, match="missing \\(1\\).*model.norm.weight"):
        load(write_checkpoint(tmp_path / "a", {k: v for k, v in sd.items() if k != "model.norm.weight"}))
    with pytest.raises(ValueError, match="unexpected \\(1\\).*model.layers.2.mlp.up_proj.weight"):
        load(write_checkpoint(tmp_path / "b", sd | {"model.layers.2.mlp.up_proj.weight": torch.zeros(176, 64)}))
    with pytest.raises(ValueError, match=r"wrong shape.*k_proj.weight: checkpoint \[32, 64\], config.json implies \[64"):
        load(write_checkpoint(tmp_path / "c", sd, num_key_value_heads=4))
    # stray rope buffers of older transformers are ignored; a tied checkpoint may still carry lm_head
    d = write_checkpoint(tmp_path / "d", sd | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    assert torch.equal(load(d).lm_head.weight, sd["lm_head.weight"])
    tied = load(write_checkpoint(tmp_path / "e", sd, tie_word_embeddings=True))
    assert torch.equal(tied.lm_head.weight, sd["model.embed_tokens.weight"])


def test_biases_load(tmp_path):
    """attention_bias / mlp_bias checkpoints: every bias lands in its own linear (4-bit: test_llama_quant)."""
    sd = load_file(HF / "gqa" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    biases = {k.replace(".weight", ".bias"): torch.randn(v.shape[0], generator=gen)
              for k, v in sd.items() if "_proj" in k}
    d = write_checkpoint(tmp_path / "bias", sd | biases, attention_bias=True, mlp_bias=True)
    model = load(d)
    for key, b in biases.items():
        assert torch.equal(model.get_parameter(key), b)
    ids = expected("gqa")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids), load(HF / "gqa")(ids))


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        llama.from_pretrained(tmp_path / "nope")
    (tmp_path / "bin").mkdir()
    shutil.copy(HF / "gqa" / "config.json", tmp_path / "bin" / "config.json")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only PyTorch .bin weights.*safetensors"):
        llama.from_pretrained(tmp_path / "bin")
    with pytest.raises(ValueError, match="quant must be"):
        llama.from_pretrained(HF / "gqa", quant="int8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llama.from_pretrained(tmp_path / "empty")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        llama.from_pretrained(tmp_path / "file")

    # no network in tests: conftest sets HF_HUB_OFFLINE=1, and this repo is in no cache
    with pytest.raises(ConnectionError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hf_checkpoint.resolve_checkpoint("minqlora-test/no-such-model")

    # the hub's own exceptions become errors that say what to do
    import huggingface_hub
    from huggingface_hub import errors

    def raising(exc_type, status):
        def fake(*args, **kwargs):
            response = types.SimpleNamespace(status_code=status, headers={}, request=None)
            raise exc_type("hub said no", response=response)
        return fake

    for exc_type, status, expected_error, text in [
            (errors.GatedRepoError, 403, PermissionError, "gated repository.*accept its license.*HF_TOKEN"),
            (errors.RepositoryNotFoundError, 401, FileNotFoundError, "no such repository.*or it is private"),
            (errors.HfHubHTTPError, 401, PermissionError, "access denied \\(HTTP 401\\).*HF_TOKEN")]:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(exc_type, status))
        with pytest.raises(expected_error, match=text):
            hf_checkpoint.resolve_checkpoint("owner/model")


def test_hub_snapshot_is_used(tmp_path, monkeypatch):
    """A hub id goes through snapshot_download with only the files the loader reads; the token comes from
    the argument or HF_TOKEN."""
    import huggingface_hub
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(HF / "gqa")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    model = llama.from_pretrained("owner/tiny", quant=None, dtype=torch.float32, device="cpu", revision="main")
    assert model.name_or_path == "owner/tiny"
    assert seen["repo_id"] == "owner/tiny" and seen["revision"] == "main" and seen["token"] == "hf_env"
    assert "model*.safetensors" in seen["allow_patterns"] and "*.bin" not in seen["allow_patterns"]
    hf_checkpoint.resolve_checkpoint("owner/tiny", token="hf_arg")
    assert seen["token"] == "hf_arg"

    # a repo with only pytorch_model.bin: the snapshot holds no safetensors; the listing names the .bin
    (tmp_path / "config.json").write_text((HF / "gqa" / "config.json").read_text())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, *a, **kw: ["config.json", "pytorch_model.bin"])
    with pytest.raises(ValueError, match="only PyTorch .bin weights \\(pytorch_model.bin"):
        llama.from_pretrained("owner/old")


def test_packed_rows_with_a_block_diagonal_mask():
    """A ready (B, 1, T, S) boolean mask with explicit position_ids (train.py packs several examples in a
    row): each packed example gets exactly the logits it has alone."""
    model = load(HF / "gqa")
    ids = expected("gqa")["input_ids"]
    a, b = ids[0, :40], ids[1, :24]
    seg = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(24, dtype=torch.long)])
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]  # (1, 1, T, S)
    pos = torch.cat([torch.arange(40), torch.arange(24)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b])[None], attention_mask=mask, position_ids=pos)[0]
        assert_logits_close(packed[:40], model(a[None])[0])
        assert_logits_close(packed[40:], model(b[None])[0])
    with pytest.raises(ValueError, match="needs explicit position_ids"):
        model(torch.cat([a, b])[None], attention_mask=mask)
