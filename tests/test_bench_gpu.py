"""bench/gpu.py and bench/run_device.sh without a GPU: the pure parts exactly, the whole script as a dry run.

The tiny run's timings mean nothing (no GPU). What is checked: every section ran without error, every number is
finite, the training losses are those of a random model (ln V, so the loss is a per-token mean), the
quantized-size formula behind the memory table equals what nf4.Linear4bit really allocates, the table's exact
parts (7B/13B on one GPU, 70B over 2 and 4 ranks with FSDP2) agree with counts done by hand here, the bisection
finds the longest fitting length of a fake predicate in the fewest probes, the profile summary counts the right
events, and every missing piece (bitsandbytes, a GPU, llama's offload) turns into a row that says so.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT

GPU_PY = ROOT / "bench" / "gpu.py"
SECTIONS = ("estimate", "dequant", "optim", "train", "baseline", "train_compiled", "dequant_compiled")
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _load_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_PY)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


@pytest.fixture(scope="module")
def gpu():
    return _load_gpu()


@pytest.fixture(scope="module")
def parts(gpu):
    """bench/gpu.py's parts (importable once gpu.py has put bench/ on sys.path)."""
    import gpu_context
    import gpu_ops
    import gpu_setups
    return SimpleNamespace(context=gpu_context, ops=gpu_ops, setups=gpu_setups)


def _run_tiny(tmp_path_factory, *extra):
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    # the CPU path everywhere, a GPU machine too: the same sections run or skip, and nothing compiles
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(GPU_PY), "--tiny", "--json", str(out), *extra], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every section, the context search too (one process: the suite pays for torch's import once)."""
    return _run_tiny(tmp_path_factory, "--only", ",".join(SECTIONS + ("context",)))


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
    configs = [c for c in train["configs"] if not c["offload"]]
    assert [(c["batch"], c["seq_len"], c["optim_bits"]) for c in configs] == [tuple(c) for c in data["run"]["train"]]
    offloaded = [c for c in train["configs"] if c["offload"]]
    if offloaded:  # llama.Llama has offload_activations: the offload row ran
        assert [(c["batch"], c["seq_len"], c["optim_bits"]) for c in offloaded] == \
            [tuple(c) for c in data["run"]["train_offload"]]
    else:
        assert train["offload"].startswith("unavailable")
    # LoRA r on all seven linears of every layer: r * (in + out) each, counted by hand
    c, i, r = model["hidden_size"], model["intermediate_size"], data["lora"]["r"]
    assert train["trainable_params"] == model["num_hidden_layers"] * r * (4 * 2 * c + 3 * (c + i))
    # the memory table's base bytes come from the same formula: it must equal the real buffers
    assert train["quantized_linear_bytes"] == train["quantized_linear_bytes_formula"]
    for cfg in train["configs"]:
        assert len(cfg["step_ms"]) == data["run"]["steps"] and cfg["tokens_per_s"] > 0
        # random weights of std 0.02 give near-zero logits: the mean token loss is ln V (a sum would be ~T x)
        assert abs(cfg["loss"] - math.log(model["vocab_size"])) < 0.05, cfg["loss"]
        assert cfg["peak_total_bytes"] == cfg["peak_allocated_bytes"] + cfg["managed_bytes"]
        # the memory table's optimizer bytes are what PagedAdamW really holds (moments, 8-bit absmax)
        estimate = data["estimate"][f"tiny_2x32_adamw{cfg['optim_bits']}"]
        assert cfg["optimizer_state_bytes"] == estimate["optimizer_state"]
        # one profiled step per config: on the CPU the "kernels" are the leaf operators it ran
        prof = cfg["profile"]
        assert prof["kernel_launches"] > 0 and 0 < prof["kernel_ms"] <= prof["profiled_wall_ms"]
        assert prof["busy_fraction"] == prof["kernel_ms"] / cfg["step_ms_median"]
        assert prof["top_kernels"] and sum(k["share"] for k in prof["top_kernels"]) <= 1 + 1e-9


def test_dequant_and_optim_sections(tiny_run):
    data, _ = tiny_run
    d = data["dequant"]
    assert d["shape"] == [64, 176] and d["eager_matches_fp32"] is True
    assert d["eager_GBps"] > 0 and d["copy_GBps"] > 0 and d["linear_eager_ms"] > 0 and d["matmul_ms"] > 0
    o = data["optim"]
    # the 7B LoRA layout on the tiny shape: lora_A and lora_B for 7 linears of each layer
    assert o["tensors"] == 2 * 7 * data["model"]["num_hidden_layers"]
    for bits in (32, 8):
        assert o[f"adamw{bits}_paged_ms"] > 0 and o[f"adamw{bits}_plain_ms"] > 0, o.get(f"adamw{bits}_error")
    assert o["torch_adamw"]["ms"] > 0
    for name in ("train_compiled", "dequant_compiled"):  # the CUDA-only parts say why they did not run
        assert "CUDA only" in data[name]["skipped"]


def test_bitsandbytes_rows_present_or_say_not_installed(tiny_run):
    data, stdout = tiny_run
    bnb_ops, bnb_optim = data["dequant"]["bitsandbytes"], data["optim"]["bitsandbytes"]
    assert set(bnb_optim) == {"adamw32", "adamw8", "paged_adamw32", "paged_adamw8"}
    if not HAVE_BNB:
        assert bnb_ops == {"skipped": "not installed"}
        assert all(row == {"skipped": "not installed"} for row in bnb_optim.values())
        assert data["baseline"] == {"skipped": "bitsandbytes not installed", "section_s": data["baseline"]["section_s"]}
        assert "hf+bnb       bitsandbytes not installed" in stdout
    elif torch.version.cuda is None:  # a CPU build: bitsandbytes' CPU kernels run every row
        assert bnb_ops["dequant_ms"] > 0 and bnb_ops["linear_ms"] > 0
        assert all(row["ms"] > 0 for row in bnb_optim.values())
        if importlib.util.find_spec("peft") and importlib.util.find_spec("transformers"):
            assert len(data["baseline"]["configs"]) == len(data["run"]["train"])
    else:  # a CUDA build with the GPU hidden: bitsandbytes may load no CPU kernels; each row then says why
        assert bnb_ops.get("dequant_ms", 0) > 0 or bnb_ops["error"]
        assert all(row.get("ms", 0) > 0 or row["error"] for row in bnb_optim.values())


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


def test_fsdp_estimate_for_70b():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_memory as gm
    shape = gm.SHAPES["70b"]
    # 70B: hidden 8192, GQA with 8 kv heads of 128 (k/v project to 1024), intermediate 28672, 80 layers
    per_layer = 2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672)
    lora_params = 80 * 64 * per_layer
    assert lora_params == 828_375_040
    rows = gm.estimate_rows()
    for world in (2, 4):
        for bits in (32, 8):
            on, off = rows[f"70b_fsdp{world}_1x2048_adamw{bits}_offload"], rows[f"70b_fsdp{world}_1x2048_adamw{bits}"]
            assert on["lora_params"] == off["lora_params"] == lora_params
            whole = off["base_4bit"] + off["base_bf16"] + off["adapters_and_optimizer"]
            assert off["sharded_per_rank"] == -(-whole // world)  # every byte sharded evenly over the ranks
            assert off["adapters_and_optimizer"] == (16 * lora_params if bits == 32 else
                                                     gm.optimizer_state_bytes(gm.linear_shapes(shape), 64, 8)
                                                     + 8 * lora_params)
            # gathered: two decoder layers in flight (4-bit weights + fp32 adapters), one layer's adapter
            # gradients before their reduce-scatter, and the root's bf16 embeddings/lm_head/norms
            layer_4bit = sum(gm.quantized_linear_bytes(o, n) for o, n in gm.linear_shapes(shape)[:7])
            assert off["gathered"] == 2 * (layer_4bit + 4 * 64 * per_layer) + 4 * 64 * per_layer + off["base_bf16"]
            assert off["gpu_per_rank"] == off["sharded_per_rank"] + off["gathered"] + off["activations_estimate"]
            assert off["host_per_rank"] == 0
            # CPU offload: the shards (and the optimizer step) move to host memory, the rest stays
            assert on["gpu_per_rank"] == off["gathered"] + off["activations_estimate"]
            assert on["host_per_rank"] == off["sharded_per_rank"]
    # the arithmetic: Llama-2-70B in 4 bits is ~35 GB, so 2 x 24 GB needs sharding and not much else
    e = rows["70b_fsdp2_1x2048_adamw32"]
    assert 35e9 < e["base_4bit"] < 36e9 and 36e9 < e["base_4bit"] + e["base_bf16"] < 37e9
    assert rows["70b_fsdp4_1x2048_adamw32"]["gpu_per_rank"] < e["gpu_per_rank"]
    lines = gm.estimate_table(rows)
    assert any(line.split()[:2] == ["2", "CPU"] and line.endswith("yes/yes") for line in lines)


def test_bisection_finds_the_longest_fit_in_few_probes(parts):
    for limit in (0, 512, 1024, 1500, 4096, 65536, 130000, 131072, 10 ** 6):
        probes = []

        def fits(n, limit=limit):
            probes.append(n)
            return n <= limit
        longest, failure, complete = parts.context.bisect_longest(fits, 1024, 131072)
        assert complete and longest == min(limit // 1024 * 1024, 131072)
        assert failure == (None if longest == 131072 else longest + 1024)
        assert len(probes) <= 8 and all(n % 1024 == 0 and 1024 <= n <= 131072 for n in probes)
    # bounds already known: nothing below lo_len or at/above hi_len is probed again
    probes = []
    longest, failure, _ = parts.context.bisect_longest(lambda n: probes.append(n) or n <= 40960, 1024, 131072,
                                                       lo_len=32768, hi_len=65536)
    assert (longest, failure) == (40960, 41984) and all(32768 < n < 65536 for n in probes)
    # cut by the clock after three probes: a valid bracket, marked incomplete
    calls = []
    longest, failure, complete = parts.context.bisect_longest(lambda n: calls.append(n) or n <= 5000, 1024, 131072,
                                                              stop=lambda: len(calls) >= 3)
    assert not complete and len(calls) == 3 and longest <= 5000 < failure
    assert longest == 0 and failure == 16384  # 65536, 32768, 16384 all failed


def test_guided_bisection_lands_in_few_probes_and_survives_bad_guesses(parts):
    ctx = parts.context
    step, cap, fixed, per_token = 1024, 24 * 2 ** 30, 6.4e9, 150_000  # an affine peak: fixed + per_token * T
    truth = int((cap - fixed) // per_token) // step * step
    points, probes = [(step, fixed + per_token * step)], []

    def fits(n):
        probes.append(n)
        peak = fixed + per_token * n
        if peak <= cap:
            points.append((n, peak))
        return peak <= cap
    longest, failure, complete = ctx.bisect_longest(fits, step, 131072, guess=ctx.linear_guess(points, cap, step))
    assert complete and (longest, failure) == (truth, truth + step)
    assert probes[0] == 4 * step and len(probes) <= 4, probes  # a cheap probe, the prediction, one either side
    # a guess that is always wrong (one step above the known fit) falls back to midpoints: still exact
    for limit in (0, 5000, 77777, 131072):
        probes = []
        longest, failure, complete = ctx.bisect_longest(lambda n: probes.append(n) or n <= limit, step, 131072,
                                                        guess=lambda lo, hi: lo + step)
        assert complete and longest == min(limit // step * step, 131072) and len(probes) <= 24
    # no growth measured (the CPU reserves nothing): no prediction, plain bisection
    guess = ctx.linear_guess([(16, 0), (64, 0)], cap, 16)
    assert guess(64, 144) is None


def _event(name, device, us, children=()):
    start = 0.0
    return SimpleNamespace(name=name, device_type=device, cpu_children=list(children),
                           time_range=SimpleNamespace(elapsed_us=lambda: us, start=start, end=start + us))


def test_kernel_summary_counts_device_kernels_or_leaf_ops(gpu):
    from torch.autograd import DeviceType
    leaf = _event("aten::mm", DeviceType.CPU, 30.0)
    events = [_event("aten::linear", DeviceType.CPU, 50.0, [leaf]), leaf,
              _event("gemm_kernel", DeviceType.CUDA, 300.0), _event("gemm_kernel", DeviceType.CUDA, 100.0),
              _event("elementwise_kernel", DeviceType.CUDA, 100.0)]
    s = gpu.kernel_summary(events, cuda=True)
    assert s["kernel_ms"] == pytest.approx(0.5) and s["kernel_launches"] == 3 and s["cpu_ops"] == 2
    assert [(k["name"], k["calls"]) for k in s["top_kernels"]] == [("gemm_kernel", 2), ("elementwise_kernel", 1)]
    assert s["top_kernels"][0]["share"] == pytest.approx(0.8)
    s = gpu.kernel_summary(events, cuda=False)  # the CPU: the leaf operator only (its parent would count twice)
    assert s["kernel_ms"] == pytest.approx(0.03) and s["kernel_launches"] == 1


def test_time_steps_keeps_to_its_deadline(gpu):
    calls = []
    step = lambda: calls.append(1)  # noqa: E731
    res = gpu.time_steps(step, torch.device("cpu"), warmup=1, steps=5, deadline=float("inf"))
    assert len(res["step_ms"]) == 5 and len(calls) == 6
    calls.clear()
    res = gpu.time_steps(step, torch.device("cpu"), warmup=1, steps=5, deadline=gpu.now() - 1)
    assert len(res["step_ms"]) == 2 and len(calls) == 3  # past its deadline: the minimum of two timed steps


def test_section_deadlines_share_the_budget(gpu):
    names = ["estimate", "dequant", "train"]
    d = gpu.section_deadlines(names, 100.0, 1000.0)
    total = sum(gpu.SHARES[n] for n in names)
    assert d["estimate"] == 1000.0 and d["train"] == pytest.approx(1100.0)
    assert d["dequant"] == pytest.approx(1000.0 + 100.0 * gpu.SHARES["dequant"] / total)
    assert set(gpu.section_deadlines(names, None, 0.0).values()) == {float("inf")}


def test_missing_packages_become_rows_that_say_so(gpu, parts, monkeypatch):
    assert parts.setups.optional_import("no_such_package_for_minqlora") == (None, "not installed")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    assert parts.setups.import_baseline() == (None, "bitsandbytes not installed")
    env = dict(device_name="CPU", torch="x")
    results = dict(shape="7b", env=env, errors={}, estimate={},
                   dequant=dict(shape=[11008, 4096], tokens=2048, eager_ms=7.5, eager_GBps=15.0, copy_ms=0.1,
                                copy_GBps=4000.0, matmul_ms=0.24, linear_eager_ms=7.6,
                                bitsandbytes=dict(skipped="not installed")),
                   dequant_compiled=dict(skipped="CUDA only"),
                   optim=dict(params=159907840, tensors=448, torch_adamw=dict(ms=1.5), adamw32_plain_ms=3.3,
                              adamw32_paged_ms=3.4, adamw32_paged_over_plain=1.03, adamw8_error="ValueError: x",
                              bitsandbytes={k: dict(skipped="not installed") for k, _ in parts.ops.BNB_OPTIMIZERS}),
                   train=dict(configs=[dict(batch=4, seq_len=512, optim_bits=32, offload=False, tokens_per_s=3000.0,
                                            step_ms_median=680.0, peak_total_bytes=7e9, managed_bytes=1e9,
                                            profile=dict(busy_fraction=0.9, kernel_launches=5000, top_kernels=[])),
                                       dict(batch=4, seq_len=512, optim_bits=8, offload=False, skipped="time budget")]),
                   baseline=dict(skipped="bitsandbytes not installed"),
                   train_compiled=dict(compile_fallbacks=["torch.compile of the decoder layers failed (X)"],
                                       configs=[]),
                   context=dict(model="7b", cap_bytes=24 * 2 ** 30, step=1024, max_len=131072, longest_common=8192,
                                variants={"hf+bnb": dict(unavailable="bitsandbytes not installed"),
                                          "ours": dict(longest=8192, first_failure=None, complete=False,
                                                       probes=[dict(length=8192, fits=True,
                                                                    peak_allocated_bytes=2 ** 33)],
                                                       peak_bytes_per_token=None, tokens_per_s=900.0,
                                                       tokens_per_s_at=8192)}))
    text = gpu.table(results)
    lines = text.splitlines()
    dequant = next(line for line in lines if line.strip().startswith("dequantize"))
    assert "not installed" in dequant and "CUDA only" in dequant
    assert "bitsandbytes: adamw32 not installed; adamw8 not installed" in text
    assert "8-bit ValueError: x" in text
    assert any(line.split()[:2] == ["hf+bnb", "bitsandbytes"] for line in lines)
    assert any(line.split()[:4] == ["minqlora", "4x512", "8", "time"] for line in lines)
    assert any(line.split()[:3] == ["minqlora", "4x512", "32"] and "90%" in line for line in lines)
    assert any(line.split()[:3] == ["ours", "8192+", "-"] for line in lines)  # '+': cut by the clock
    assert "mq+compile   WARNING, these rows ran eager: torch.compile of the decoder layers failed (X)" in lines
    assert any(line.split()[:2] == ["hf+bnb", "bitsandbytes"] for line in lines if "not installed" in line)


def test_context_dry_run(tiny_run):
    data, stdout = tiny_run
    ctx = data["context"]
    assert data["errors"] == {} and ctx["step"] == 16 and ctx["max_len"] == 128
    ours = ctx["variants"]["ours"]
    # the CPU caps nothing: every probe fits, the bisection climbs to max_len in log2(128/16 + 1) probes
    assert ours["longest"] == 128 and ours["complete"] and ours["first_failure"] is None
    assert [p["length"] for p in ours["probes"]] == [64, 96, 112, 128] and all(p["fits"] for p in ours["probes"])
    assert ours["tokens_per_s"] > 0 and ours["tokens_per_s_at"] == ctx["longest_common"] == 128
    for name in ("ours+offload", "hf+bnb"):
        v = ctx["variants"][name]
        assert v.get("longest") == 128 or "not installed" in v.get("unavailable", "") or \
            "offload_activations" in v.get("unavailable", ""), v
    assert "longest common length 128" in stdout


def test_table_is_printed_last_and_again_from_the_json(tiny_run, gpu, tmp_path, capsys):
    data, stdout = tiny_run
    lines = stdout.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("== bench/gpu.py"))
    assert any(line.split()[:3] == ["minqlora", "2x32", "32"] for line in lines[header:])
    assert lines[-1].startswith(("minqlora", "hf+bnb", "mq+compile", "  vs", "  offloaded", "ERRORS"))
    # --report: the same table from the JSON (run_device.sh prints it so, even for a part cut by its limit)
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    assert gpu.main(["--report", str(path)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines() == lines[header:]


def test_unknown_section_is_an_error(gpu):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "train,nope"])
    assert gpu.parse_args(["--only", "estimate"]).only == "estimate"
    assert gpu.parse_args(["--only", "context"]).only == "context"


def test_prepare_without_bitsandbytes_says_how(tmp_path):
    """--prepare names both ways to point it at bitsandbytes, and leaves .whl alone when it cannot."""
    python = tmp_path / "python"  # a "python" that has no package at all
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    before = sorted((ROOT / ".whl").rglob("*")) if (ROOT / ".whl").exists() else []
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_device.sh"), "--prepare"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": str(python), "BNB_PYTHON": ""})
    assert proc.returncode == 1
    assert "bitsandbytes is not installed" in proc.stderr and "BNB_PYTHON=" in proc.stderr
    after = sorted((ROOT / ".whl").rglob("*")) if (ROOT / ".whl").exists() else []
    assert before == after
