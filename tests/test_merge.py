"""merge.py against PEFT's merge_and_unload logits, our own 4-bit+adapter model, and the file layout."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_checkpoint
import llama
import lora
import merge
import train_config
from conftest import HF, BNB

GQA, ADAPTER = HF / "gqa", HF / "gqa_peft_adapter"
EXPECTED = load_file(HF / "expected" / "gqa_peft_adapter.safetensors")


def logits_of(directory, quant=None, adapter=None):
    model = llama.from_pretrained(directory, quant=quant, dtype=torch.float32).eval()
    if adapter is not None:
        lora.load_adapter(model, adapter)
    with torch.no_grad():
        return model(EXPECTED["input_ids"])


def tensors(directory):
    out = {}
    for file in hf_checkpoint.checkpoint_files(directory):
        out.update(load_file(file))
    return out


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


def run_merge(*argv):
    return merge.main([*map(str, argv), "--no-verify"])


def copy_adapter(dst, src=ADAPTER, keep=None, base=None, scale_b=1.0):
    """A copy of a PEFT adapter in `dst`, optionally keeping only modules whose name contains one of
    `keep`, pointing at another base, or with lora_B scaled."""
    dst.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text())
    weights = load_file(src / "adapter_model.safetensors")
    if keep:
        weights = {k: v for k, v in weights.items() if any(s in k for s in keep)}
        config["target_modules"] = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                           for k in weights})
    weights = {k: v * scale_b if ".lora_B." in k else v for k, v in weights.items()}
    if base is not None:
        config["base_model_name_or_path"] = str(base)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, dst / "adapter_model.safetensors")
    return dst


def test_float32_merge_reproduces_peft_merge_and_unload(tmp_path):
    out = run_merge("--adapter", ADAPTER, "--model", GQA, "--output", tmp_path / "m", "--dtype", "float32")
    got = logits_of(out)
    # float32 throughout: only summation order differs from PEFT (1e-5 of the logits' scale).
    assert rel_err(got, EXPECTED["logits_merged"]) < 1e-5
    # ... and it is the adapted model, not the base: the adapter moves the logits by far more than that.
    assert rel_err(logits_of(GQA), EXPECTED["logits_merged"]) > 1e-2
    base, merged = tensors(GQA), tensors(out)
    assert set(merged) == set(base)  # exactly the base's keys
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight"
               for k in load_file(ADAPTER / "adapter_model.safetensors")}
    assert len(adapted) == 14
    for key, tensor in base.items():
        if key in adapted:
            assert not torch.equal(merged[key], tensor), key
        else:  # untargeted tensors pass through byte for byte
            assert merged[key].dtype == tensor.dtype and torch.equal(merged[key].view(torch.uint8),
                                                                     tensor.view(torch.uint8)), key
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((GQA / "config.json").read_text())  # already float32: unchanged
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (GQA / name).read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    assert not (out / "model.safetensors.index.json").exists()  # one file when it fits, as transformers


def test_float16_merge_rounds_once(tmp_path):
    out32 = run_merge("--adapter", ADAPTER, "--model", GQA, "--output", tmp_path / "f32", "--dtype", "float32")
    out16 = run_merge("--adapter", ADAPTER, "--model", GQA, "--output", tmp_path / "f16")  # default float16
    m32, m16 = tensors(out32), tensors(out16)
    assert set(m16) == set(m32)
    for key in m32:
        # one rounding of the float32 sum (never base->fp16, then + delta in fp16): bit-exact
        assert m16[key].dtype == torch.float16 and torch.equal(m16[key], m32[key].to(torch.float16)), key
    config = json.loads((out16 / "config.json").read_text())
    assert config["dtype"] == "float16" and "torch_dtype" not in config  # the source's (transformers 5) key
    # fp16 weights: logits within fp16 rounding of PEFT's fp32 merge (weights rel. 2^-11; measured 1.4e-3)
    assert rel_err(logits_of(out16), EXPECTED["logits_merged"]) < 3e-3


@pytest.fixture(scope="module")
def gqa_bf16(tmp_path_factory):
    """The gqa checkpoint stored in bfloat16, config in the transformers 4 layout (`torch_dtype`)."""
    base = tmp_path_factory.mktemp("gqa_bf16")
    shutil.copytree(GQA, base, dirs_exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(GQA / "model.safetensors").items()},
              base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype")
    config["torch_dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    # a second stop id only generation_config.json knows (as Llama 3's <|eot_id|>)
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 3}))
    return base


def test_bfloat16_source_passes_through_byte_identical(tmp_path, gqa_bf16):
    out = run_merge("--adapter", ADAPTER, "--model", gqa_bf16, "--output", tmp_path / "m", "--dtype", "bfloat16")
    src, merged = tensors(gqa_bf16), tensors(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.1.input_layernorm.weight"):
        assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key].view(torch.int16),
                                                                   src[key].view(torch.int16))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "dtype" not in config
    # every EOS id: the tokenizer's <|end_of_text|> and generation_config's own
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": [1, 3], "pad_token_id": 2}


def with_train_config(tmp_path, **run):
    adapter = copy_adapter(tmp_path / "adapter")
    (adapter / "train_config.json").write_text(json.dumps(run))  # as train.py writes it: the resolved flags
    return adapter


def four_bit_logits(base, adapter, **kwargs):
    model = llama.from_pretrained(base, dtype=torch.float32, **kwargs).eval()
    lora.load_adapter(model, adapter)
    with torch.no_grad():
        return model(EXPECTED["input_ids"])


def test_dequantized_base_reproduces_the_4bit_adapter_model(tmp_path):
    # A CPU run: float32 weights quantized to NF4 + double quant, blocksize 64, float32 compute.
    adapter = with_train_config(tmp_path, quant="nf4", double_quant=True, blocksize=64, dtype="float32")
    want = four_bit_logits(GQA, adapter, quant="nf4")
    out = run_merge("--adapter", adapter, "--model", GQA, "--output", tmp_path / "d32",
                    "--dtype", "float32", "--base", "dequantized")
    assert rel_err(logits_of(out), want) < 1e-5
    # --verify builds the same 4-bit reference from the run's settings
    assert merge.verify_merge(out, GQA, adapter, train_config.quant_settings(train_config.run_config(adapter))) < 1e-4
    out16 = run_merge("--adapter", adapter, "--model", GQA, "--output", tmp_path / "d16", "--base", "dequantized")
    assert rel_err(logits_of(out16), want) < 3e-3  # fp16 rounding of the weights, as above
    # The original-weights merge is a different model: off by the NF4 quantization error.
    original = run_merge("--adapter", adapter, "--model", GQA, "--output", tmp_path / "o32", "--dtype", "float32")
    assert rel_err(logits_of(original), want) > 5e-2


def test_dequantized_base_without_train_config_uses_qlora_defaults(tmp_path, gqa_bf16):
    # No train_config.json: NF4, double quant, blocksize 64, weights cast to bf16 before quantizing. On a
    # bf16 checkpoint that cast is exact, so a float32 load quantizes the very same values.
    want = four_bit_logits(gqa_bf16, ADAPTER, quant="nf4")
    out = run_merge("--adapter", ADAPTER, "--model", gqa_bf16, "--output", tmp_path / "m",
                    "--dtype", "float32", "--base", "dequantized")
    assert rel_err(logits_of(out), want) < 1e-5


def test_dequantized_base_reads_the_runs_quant_settings(tmp_path):
    adapter = with_train_config(tmp_path, quant="fp4", double_quant=False, blocksize=128, dtype="float32")
    want = four_bit_logits(GQA, adapter, quant="fp4", blocksize=128, double_quant=False)
    out = run_merge("--adapter", adapter, "--model", GQA, "--output", tmp_path / "m",
                    "--dtype", "float32", "--base", "dequantized")
    assert rel_err(logits_of(out), want) < 1e-5
    # ... and they matter: NF4/64/DQ (the defaults) is another model.
    assert rel_err(logits_of(out), four_bit_logits(GQA, adapter, quant="nf4")) > 5e-2


def test_sharded_input_and_sharded_output(tmp_path):
    # The sharded fixture has 4 kv heads, so only q/o/mlp adapters of the gqa adapter fit it.
    adapter = copy_adapter(tmp_path / "adapter", keep=("q_proj", "o_proj", "mlp"))
    limit = 150_000  # bytes; the fp16 model is ~330 kB, its largest tensors (embed, lm_head) 64 kB
    out = run_merge("--adapter", adapter, "--model", HF / "sharded", "--output", tmp_path / "m",
                    "--max-shard-size", limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for name in files:
        with safe_open(out / name, framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 2 for k in f.keys()]
            assert sorted(k for k, v in index["weight_map"].items() if v == name) == sorted(f.keys())
            assert f.metadata() == {"format": "pt"}
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors(HF / "sharded"))
    model = llama.from_pretrained(HF / "sharded", quant=None, dtype=torch.float32).eval()
    lora.load_adapter(model, adapter)
    with torch.no_grad():
        want = model(EXPECTED["input_ids"])
    assert rel_err(logits_of(out), want) < 3e-3  # fp16 weights


def test_bnb_4bit_base_is_dequantized_then_merged(tmp_path):
    base = BNB / "tiny_llama_nf4_dq"  # transformers-written NF4 + double quant checkpoint (4 kv heads)
    adapter = copy_adapter(tmp_path / "adapter", keep=("q_proj", "down_proj"), base=base)
    model = llama.from_pretrained(base, dtype=torch.float32).eval()
    lora.load_adapter(model, adapter)
    with torch.no_grad():
        want = model(EXPECTED["input_ids"])
    out = run_merge("--adapter", adapter, "--output", tmp_path / "m", "--dtype", "float32")
    merged = tensors(out)
    with safe_open(base / "model.safetensors", framework="pt") as f:
        assert set(merged) == {k for k in f.keys() if ".weight." not in k}  # 4-bit constants folded away
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert rel_err(logits_of(out), want) < 1e-5


def test_no_arguments_merges_the_latest_run(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    old = copy_adapter(runs / "20240101-000000", base=GQA.resolve())
    new = copy_adapter(runs / "20240102-000000", base=GQA.resolve())
    os.utime(old / "adapter_config.json", (2e9, 2e9))  # mtime, not the name, decides which run is newest
    os.utime(new / "adapter_config.json", (1e9, 1e9))
    monkeypatch.chdir(tmp_path)
    out = merge.main(["--no-verify"])
    assert out == Path("runs/20240101-000000/merged")
    assert (old / "merged" / "model.safetensors").is_file() and not (new / "merged").exists()
    assert rel_err(logits_of(old / "merged"), EXPECTED["logits_merged"]) < 3e-3


def test_verify_prints_the_difference_and_catches_a_wrong_merge(tmp_path, capsys):
    out = merge.main(["--adapter", str(ADAPTER), "--model", str(GQA), "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("verify:"))
    assert float(line.split("= ")[1].split()[0]) < 0.05  # fp16 rounding; logits are O(5)
    # The check can fail: the unmerged base is far from base + adapter.
    assert merge.verify_merge(GQA, GQA, ADAPTER, None) > 0.5
    assert merge.verify_merge(out, GQA, ADAPTER, None) < 0.05


def test_missing_adapter(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        run_merge("--adapter", tmp_path / "nope", "--model", GQA, "--output", tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "unfinished").mkdir(parents=True)  # no adapter_config.json yet: not a run
    with pytest.raises(FileNotFoundError, match="no finished training run"):
        merge.main([])
    assert not (tmp_path / "m").exists()


def test_shape_mismatch_names_the_tensor(tmp_path):
    # gqa's adapter has k/v [32, 64] (2 kv heads); the sharded fixture's k_proj is [64, 64].
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.self_attn\.k_proj\.weight"):
        run_merge("--adapter", ADAPTER, "--model", HF / "sharded", "--output", tmp_path / "m")
    with pytest.raises(ValueError, match="has no lm_head.weight"):  # tied: the adapter's module is absent
        adapter = copy_adapter(tmp_path / "adapter", keep=("q_proj",))
        w = load_file(adapter / "adapter_model.safetensors")
        w["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
        w["base_model.model.lm_head.lora_B.weight"] = torch.zeros(512, 8)
        save_file(w, adapter / "adapter_model.safetensors")
        run_merge("--adapter", adapter, "--model", HF / "tied", "--output", tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # nothing half-written


def test_existing_output_is_refused_unless_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        run_merge("--adapter", ADAPTER, "--model", GQA, "--output", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    run_merge("--adapter", ADAPTER, "--model", GQA, "--output", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind


def test_overflow_in_float16_is_an_error_naming_the_tensor(tmp_path):
    adapter = copy_adapter(tmp_path / "adapter", keep=("layers.1.mlp.up_proj",), scale_b=1e6)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: \d+ values are not finite"):
        run_merge("--adapter", adapter, "--model", GQA, "--output", tmp_path / "m")
    assert not (tmp_path / "m").exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    run_merge("--adapter", adapter, "--model", GQA, "--output", tmp_path / "m", "--dtype", "bfloat16")  # fits


def test_cli_errors_exit_cleanly(tmp_path):
    import subprocess, sys
    r = subprocess.run([sys.executable, "merge.py", "--adapter", str(tmp_path / "nope")],
                       cwd=Path(merge.__file__).parent, capture_output=True, text=True)
    assert r.returncode != 0 and "merge.py: error:" in r.stderr and "Traceback" not in r.stderr


def test_a_bitsandbytes_4bit_checkpoint_reads_as_its_dequantized_weights():
    # transformers wrote this NF4 + double-quant checkpoint with bitsandbytes; its `.dequant` tensors are
    # bitsandbytes' own dequantization. merge.Checkpoint hides the companion tensors (absmax, quant_map, the
    # quant_state blob...) behind one float `P.weight` and must give those values bit for bit.
    from conftest import ROOT
    from safetensors.torch import load_file
    fixture = ROOT / "tests" / "fixtures" / "bnb"
    expected = load_file(fixture / "tiny_llama_nf4_dq_expected.safetensors")
    ckpt = merge.Checkpoint(fixture / "tiny_llama_nf4_dq")
    assert ckpt.quantized and all(k in ckpt.keys for k in ckpt.quantized)
    assert not [k for k in ckpt.keys if ".absmax" in k or ".quant_" in k]
    checked = 0
    for key in ckpt.quantized:
        shape, dtype = ckpt.shape_dtype(key)
        weight = ckpt.get(key)
        assert tuple(weight.shape) == tuple(shape) and weight.dtype == torch.float32
        if key + ".dequant" in expected:
            assert torch.equal(weight.to(dtype), expected[key + ".dequant"]), key
            checked += 1
    assert checked >= 3
