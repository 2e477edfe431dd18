"""train.py under torchrun on the CPU (gloo), in real 2-process groups: data parallel and FSDP2 each train
like one process with the doubled batch, FSDP2 leaves each rank half of the 4-bit base, an FSDP2 run
resumes exactly (and refuses another world size), its adapter works in a single process, and a failing
rank ends the job instead of hanging it.

The reference is the single-process trainer itself (tests/test_train.py checks it against torch and PEFT).
Cost: four torchrun launches of the tiny fixture model, ~15-25 s each on a busy 2-core machine."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import HF, ROOT

import distributed
import llama
import lora
import train
from tokenizer import Tokenizer

GQA = HF / "gqa"
pytestmark = pytest.mark.filterwarnings("ignore:training on the CPU")
RANKS, BATCH, STEPS, LR = 2, 2, 10, 1e-2
# 21 rows of uneven lengths (a per-rank or per-micro-batch mean would weight them wrongly), 4 held out.
# Global micro-batches of 2 ranks x 2 rows take the 17 training rows as 4+4 | 4+4 | 1: the last one leaves
# a rank without rows (it runs a masked row for the collectives). 10 steps are 3 reshuffled epochs and one step.
COMMON = ["--model", str(GQA), "--max-steps", str(STEPS), "--lr", str(LR), "--grad-accum", "2",
          "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--dtype", "float32", "--optim", "adamw",
          "--threads", "1", "--eval-fraction", "0.2", "--save-every", "5", "--save-total-limit", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only waits at barriers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" It is {2 * i}." + " Yes." * (i % 4)}
            for i in range(21)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def torchrun(args, cwd, check=True, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, batch RANKS * BATCH: what the distributed runs must reproduce."""
    out = tmp_path_factory.mktemp("one") / "run"
    train.main(COMMON + ["--data", str(data), "--batch-size", str(RANKS * BATCH), "--output-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = torchrun([str(ROOT / "train.py"), *COMMON, "--data", str(data), "--batch-size", str(BATCH),
                       "--output-dir", str(out), "--fsdp"], cwd=out.parent)
    return out, result.stderr


def assert_same_training(reference, out):
    """Losses, token counts and eval loss within fp32 rounding; adapters within AdamW's amplification of it."""
    a, b = metrics(reference), metrics(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # rank 0 alone logs: one line per step
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]  # every row seen once per epoch, counted once
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], rel=1e-5)
    # The ranks sum the same fp32 terms as one process in another order (two 2-row matmuls and an
    # all-reduce vs one 4-row matmul), so gradients differ by ulps of their scale G, |dg| <~ 1e-5 G.
    # AdamW's update lr * m_hat / (sqrt(v_hat) + eps) has slope ~lr / (sqrt(v_hat) + eps) in g, so an element
    # whose gradient cancels to ~0 turns that noise into up to lr * 1e-5 G / eps per step (the reasoning of
    # test_train.py::test_accumulation_normalizes_by_all_supervised_tokens). Each element's tolerance is
    # that slope times the noise, from the reference run's own optimizer state; a wrong normalisation
    # (mean over ranks, per-rank token counts) changes gradients by O(1): most elements by ~lr.
    fa, fb = (load_file(d / "adapter_model.safetensors") for d in (reference, out))
    assert fa.keys() == fb.keys()
    state = torch.load(reference / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    model = llama.from_pretrained(GQA, quant=None, dtype=torch.float32, device="cpu")
    lora.add_lora(model, r=8, alpha=16, dropout=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
    eps, beta2 = 1e-8, 0.999
    for i, name in enumerate(names):
        v_hat = state[i]["exp_avg_sq"] / (1 - beta2 ** STEPS)
        tolerance = 1e-6 + STEPS * LR * 1e-5 * v_hat.sqrt().max() / (v_hat.sqrt() + eps)
        diff = (fa[lora.KEY_PREFIX + name] - fb[lora.KEY_PREFIX + name]).abs()
        assert (diff <= tolerance).all(), (name, diff.max().item(), (diff / tolerance).max().item())
        assert tolerance.median() < LR / 300, (name, tolerance.median().item())  # the check keeps its teeth
    assert (json.loads((out / "adapter_config.json").read_text())
            == json.loads((reference / "adapter_config.json").read_text()))  # the same PEFT files


def test_data_parallel_two_ranks_equal_one_process_with_the_doubled_batch(reference, data, tmp_path):
    out = tmp_path / "run"
    torchrun([str(ROOT / "train.py"), *COMMON, "--data", str(data), "--batch-size", str(BATCH),
              "--output-dir", str(out)], cwd=tmp_path)
    assert_same_training(reference, out)
    # every rank holds the same optimizer state, so rank 0 writes it once; RNG states are per rank
    assert sorted(p.name for p in (out / "checkpoint-5").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.rank0.pt",
        "rng_state.rank1.pt", "trainer_state.json"]


def test_fsdp_two_ranks_equal_one_process_and_each_holds_half_the_4bit_base(reference, fsdp_run):
    out, stderr = fsdp_run
    assert_same_training(reference, out)
    assert sorted(p.name for p in (out / "checkpoint-5").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.rank0.pt", "optimizer.rank1.pt",
        "rng_state.rank0.pt", "rng_state.rank1.pt", "trainer_state.json"]
    # what each rank reported from its local shards, against the whole 4-bit base of one process
    held = {}
    for line in stderr.splitlines():
        if "this rank holds" in line:
            rank = int(line.split("[rank ", 1)[1].split("/")[0])
            held[rank] = {k: int(line.split(k + " ", 1)[1].split(" B")[0].replace(",", ""))
                          for k in ("4-bit base", "adapters")}
    whole = train.load_model(train.TrainConfig(model=str(GQA), lora_r=8), GQA, "cpu", torch.float32)
    total = distributed.local_bytes(whole)
    assert sorted(held) == [0, 1], stderr[-2000:]
    for r in held:  # half each, up to the uneven split of small tensors and the replicated 4-byte offsets
        assert abs(held[r]["4-bit base"] - total["4bit"] / 2) <= 0.01 * total["4bit"], (held, total)
        assert abs(held[r]["adapters"] - total["trainable"] / 2) <= 0.01 * total["trainable"], (held, total)
    assert sum(h["4-bit base"] for h in held.values()) >= total["4bit"]  # nothing lost


def test_fsdp_resume_equals_uninterrupted_run_and_other_world_sizes_are_refused(fsdp_run, tmp_path):
    full, _ = fsdp_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-5", resumed / "checkpoint-5")  # as if the run had died after step 5
    torchrun([str(ROOT / "train.py"), "--resume", str(resumed / "checkpoint-5")], cwd=tmp_path)
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == list(range(6, STEPS + 1))
    # same world size, same collectives in the same order: bit-exact, as a one-process resume
    assert [(r["loss"], r["lr"], r["tokens"]) for r in b] == [(r["loss"], r["lr"], r["tokens"]) for r in a[5:]]
    assert b[-1]["eval_loss"] == a[-1]["eval_loss"]
    fa, fb = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    checkpoint = str(resumed / "checkpoint-5")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):  # --fsdp comes with the checkpoint
        train.main(["--resume", checkpoint])
    with pytest.raises(ValueError, match="written by 2 process.*torchrun --nproc-per-node 2 train.py --fsdp"):
        train.main(["--resume", checkpoint, "--no-fsdp"])


def test_fsdp_adapter_loads_in_one_process_and_reproduces_the_last_eval_loss(fsdp_run):
    out, _ = fsdp_run
    cfg = train.TrainConfig(**json.loads((out / "train_config.json").read_text()))
    tokenizer = Tokenizer.from_dir(GQA)
    _, eval_examples, _ = train.prepare_data(cfg, tokenizer)
    model = llama.from_pretrained(GQA, quant="nf4", dtype=torch.float32, device="cpu")
    lora.load_adapter(model, out)
    loss = train.eval_loss(model, eval_examples, cfg, tokenizer.pad_id)
    assert loss == pytest.approx(metrics(out)[-1]["eval_loss"], rel=1e-6)


def test_fsdp_without_torchrun_explains(data, tmp_path):
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2 train.py"):
        train.main(COMMON + ["--data", str(data), "--output-dir", str(tmp_path / "o"), "--fsdp"])
    assert not (tmp_path / "o").exists()


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    worker = tmp_path / "worker.py"  # rank 1 fails; rank 0 waits for it in an all-reduce (10 min timeout)
    worker.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import distributed\n"
                      "distributed.init('cpu', timeout_minutes=10)\n"
                      "if distributed.rank() == 1:\n    raise ValueError('rank 1 failed on purpose')\n"
                      "distributed.sum_across([1.0])\n")
    started = time.perf_counter()
    result = torchrun([str(worker)], cwd=tmp_path, check=False, timeout=120)
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stderr
    assert time.perf_counter() - started < 60  # torchrun stopped rank 0 instead of letting it wait
