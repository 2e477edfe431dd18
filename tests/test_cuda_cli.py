"""The command-line pipeline end to end on a CUDA GPU, on the tiny fixtures: train.py in bf16 with
--compile auto and off and both paged optimizers, an exact-position resume, merge.py --verify and
generate.py, each run as a user runs it (a subprocess with the real flags); plus the torch.compile
failure fallback in-process. Every test here is marked cuda: skipped on a machine without a GPU."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import HF, ROOT

pytestmark = pytest.mark.cuda
GQA = HF / "gqa"
# 8 rows to memorize, 4 a step, no dropout: the loss must fall far in a few dozen steps
LEARN = ["--lr", "1e-2", "--lora-r", "8", "--lora-dropout", "0", "--batch-size", "4", "--grad-accum", "1",
         "--device", "cuda", "--dtype", "bfloat16", "--threads", "1"]


def write_rows(path, n=8):
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(script, *args):
    done = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "rows.jsonl")


@pytest.fixture(scope="module")
def trained(rows, tmp_path_factory):
    """One bf16 run with the defaults a GPU user gets (--compile auto, paged AdamW 32-bit)."""
    out = tmp_path_factory.mktemp("runs") / "auto32"
    run("train.py", "--model", GQA, "--data", rows, "--output-dir", out, "--max-steps", "40", *LEARN)
    return out


def test_train_bf16_compile_auto_paged_32(trained):
    m = metrics(trained)
    config = json.loads((trained / "train_config.json").read_text())
    assert (config["dtype"], config["device"], config["compile"], config["optim"]) == \
        ("bfloat16", "cuda", "auto", "paged_adamw_32bit")
    assert [r["step"] for r in m] == list(range(1, 41))
    assert m[-1]["loss"] < 0.2 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])
    assert (trained / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("compile_flag,optim", [("off", "paged_adamw_32bit"), ("auto", "paged_adamw_8bit")])
def test_train_bf16_compile_and_optimizer_variants(rows, tmp_path, compile_flag, optim):
    out = tmp_path / "run"
    run("train.py", "--model", GQA, "--data", rows, "--output-dir", out, "--max-steps", "40",
        "--compile", compile_flag, "--optim", optim, *LEARN)
    m = metrics(out)
    assert len(m) == 40 and m[-1]["loss"] < 0.2 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])


def test_resume_continues_the_run(rows, tmp_path):
    # Dropout 0.1 and a cosine schedule over 3 epochs: the RNG, the optimizer state and the data position
    # all have to come back. On the GPU the kernels' summation order is not guaranteed run to run, so the
    # comparison is against what the last two steps changed: the resumed adapter must be far closer to
    # the uninterrupted one than either is to the step-4 checkpoint (a lost optimizer state or a wrong
    # data position moves the last two steps by O(1) of that change).
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--model", GQA, "--data", rows, "--max-steps", "6", "--save-every", "2", "--batch-size", "2",
            "--grad-accum", "2", "--lr", "5e-3", "--lr-scheduler", "cosine", "--warmup-ratio", "0.3",
            "--lora-r", "4", "--device", "cuda", "--dtype", "bfloat16", "--compile", "off"]
    run("train.py", *args, "--output-dir", full)
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    run("train.py", "--resume", resumed / "checkpoint-4")
    a, b = metrics(full), metrics(resumed)
    assert [(r["step"], r["lr"], r["tokens"]) for r in b] == [(r["step"], r["lr"], r["tokens"]) for r in a[4:]]
    for x, y in zip(a[4:], b):
        assert abs(x["loss"] - y["loss"]) <= 1e-2 * abs(x["loss"])  # bf16 forward: a few ulps of 2^-8
    fa, fb = (load_file(d / "adapter_model.safetensors") for d in (full, resumed))
    f4 = load_file(full / "checkpoint-4" / "adapter_model.safetensors")
    moved = max(float((fa[k] - f4[k]).abs().max()) for k in fa)
    apart = max(float((fa[k] - fb[k]).abs().max()) for k in fa)
    assert moved > 0 and apart <= 0.05 * moved, (apart, moved)


def test_merge_verify_and_generate(trained, tmp_path):
    # merge: into the dequantized 4-bit base in float32, so --verify's reference is the same model (the
    # CPU suite holds this to 1e-4); the adapter was trained on the GPU in bf16.
    merged = tmp_path / "merged"
    done = run("merge.py", "--adapter", trained, "--output", merged, "--base", "dequantized", "--dtype", "float32",
               "--verify")
    line = next(l for l in done.stderr.splitlines() if l.startswith("verify:"))
    assert float(line.split("= ")[1].split()[0]) < 1e-4, line
    # generate with the adapter on the GPU, greedy: the learned completion pattern comes out
    done = run("generate.py", "--adapter", trained, "--prompt", "Q3: what is 3 plus 3?", "--max-new-tokens", "8",
               "--temperature", "0", "--device", "cuda", "--no-chat-template")
    assert "It is" in done.stdout, done.stdout
    # and the merged checkpoint generates without an adapter
    done = run("generate.py", "--model", merged, "--prompt", "Q3: what is 3 plus 3?", "--max-new-tokens", "8",
               "--temperature", "0", "--device", "cuda", "--no-chat-template", "--quant", "none")
    assert "It is" in done.stdout, done.stdout


def test_compile_failure_falls_back_and_the_run_completes(rows, tmp_path, monkeypatch):
    # Inductor failing while it compiles (no Triton, a compiler bug) must cost a warning, not the run.
    import train

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("inductor crashed")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        train.main(["--model", str(GQA), "--data", str(rows), "--output-dir", str(out), "--max-steps", "20",
                    "--compile", "on", *LEARN])
    layer_warnings = [w for w in caught if "decoder layers failed" in str(w.message)]
    assert len(layer_warnings) == 1
    m = metrics(out)
    assert len(m) == 20 and m[-1]["loss"] < 0.5 * m[0]["loss"]
