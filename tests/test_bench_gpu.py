"""bench/gpu.py on its tiny shape (the CPU here): the whole script runs, and its JSON holds what the README quotes.

The timings of this run mean nothing (no GPU). What is checked: every section ran without error, every number
is finite, the training losses are those of a random model (ln V, so the loss is a per-token mean), the
quantized-size formula behind the 7B/13B memory table equals what nf4.Linear4bit really allocates, and the
table's exact parts agree with counts done by hand here.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

GPU_PY = ROOT / "bench" / "gpu.py"
SECTIONS = ("estimate", "dequant", "train", "paging", "baseline", "train_compiled", "dequant_compiled")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    # the CPU path everywhere, a GPU machine too: the same sections run or skip, and nothing compiles
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(GPU_PY), "--tiny", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _numbers(x, path=""):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


def test_every_section_ran_and_every_number_is_finite(tiny_run):
    data, _ = tiny_run
    assert data["errors"] == {}
    for name in SECTIONS:
        assert name in data and "error" not in data[name], (name, data.get(name))
    assert data["shape"] == "tiny"
    bad = [(p, v) for p, v in _numbers(data) if not math.isfinite(v)]
    assert not bad, bad


def test_training_configs(tiny_run):
    data, _ = tiny_run
    train, model = data["train"], data["model"]
    configs = train["configs"]
    assert [(c["batch"], c["seq_len"], c["optim_bits"]) for c in configs] == [tuple(c) for c in data["run"]["train"]]
    # LoRA r on all seven linears of every layer: r * (in + out) each, counted by hand
    c, i, r = model["hidden_size"], model["intermediate_size"], data["lora"]["r"]
    assert train["trainable_params"] == model["num_hidden_layers"] * r * (4 * 2 * c + 3 * (c + i))
    # the memory table's base bytes come from the same formula: it must equal the real buffers
    assert train["quantized_linear_bytes"] == train["quantized_linear_bytes_formula"]
    for cfg in configs:
        assert len(cfg["step_ms"]) == data["run"]["steps"] and cfg["tokens_per_s"] > 0
        # random weights of std 0.02 give near-zero logits: the mean token loss is ln V (a sum would be ~T x)
        assert abs(cfg["loss"] - math.log(model["vocab_size"])) < 0.05, cfg["loss"]
        assert cfg["peak_total_bytes"] == cfg["peak_allocated_bytes"] + cfg["managed_bytes"]
        # the memory table's optimizer bytes are what PagedAdamW really holds (moments, 8-bit absmax)
        estimate = data["estimate"][f"tiny_2x32_adamw{cfg['optim_bits']}"]
        assert cfg["optimizer_state_bytes"] == estimate["optimizer_state"]


def test_dequant_and_paging_sections(tiny_run):
    data, _ = tiny_run
    d = data["dequant"]
    assert d["shape"] == [64, 176] and d["eager_matches_fp32"] is True
    assert d["eager_GBps"] > 0 and d["copy_GBps"] > 0
    p = data["paging"]
    for bits in (32, 8):
        assert p[f"adamw{bits}_paged_ms"] > 0 and p[f"adamw{bits}_plain_ms"] > 0
    for name in ("baseline", "train_compiled", "dequant_compiled"):  # the CUDA-only parts say why they did not run
        assert "skipped" in data[name]


def test_memory_table_counts(tiny_run):
    est = tiny_run[0]["estimate"]
    # LoRA r 64 on every linear: 7B 32 x 64 x (4 x 8192 + 3 x 15104); 13B 40 x 64 x (4 x 10240 + 3 x 18944)
    for name, lora_params in (("7b", 159_907_840), ("13b", 250_347_520)):
        for shape in ("1x512", "4x512", "1x2048"):
            e32, e8 = est[f"{name}_{shape}_adamw32"], est[f"{name}_{shape}_adamw8"]
            assert e32["lora_params"] == lora_params
            # fp32 adapter + fp32 grad + two fp32 moments = 16 bytes per trainable parameter
            assert e32["adapters_and_optimizer"] == 16 * lora_params
            assert 10 * lora_params < e8["adapters_and_optimizer"] < 10.1 * lora_params  # 2 uint8 moments + absmax
            # QLoRA §3: NF4 + DQ = 4 + 8/64 + 32/(64*256) = 4.12695 bits per linear weight (+4 bytes of offset)
            assert 4.12695 < e32["bits_per_linear_param"] < 4.1270
            assert e32["total_estimate"] == (e32["base_4bit"] + e32["base_bf16"] + e32["adapters_and_optimizer"]
                                            + e32["activations_estimate"])
    # DESIGN.md: a 7B base is about 3.9 GB (3.34 GB of NF4 linears + 0.52 GB of bf16 embeddings and head)
    e = est["7b_1x512_adamw32"]
    assert 3.85e9 < e["base_4bit"] + e["base_bf16"] < 3.9e9
    assert est["7b_4x512_adamw32"]["activations_estimate"] > e["activations_estimate"] > 0


def test_table_is_printed_last(tiny_run):
    _, stdout = tiny_run
    lines = stdout.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("== bench/gpu.py"))
    assert any(line.split()[:3] == ["minqlora", "2x32", "32"] for line in lines[header:])
    assert lines[-1].startswith(("minqlora", "hf+bnb", "mq+compile", "  vs", "ERRORS"))


def test_unknown_section_is_an_error():
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_PY)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "train,nope"])
    assert gpu.parse_args(["--only", "estimate"]).only == "estimate"
