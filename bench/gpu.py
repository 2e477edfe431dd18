"""GPU benchmark: QLoRA on a Llama-2-7B-shaped model, ours beside transformers + PEFT + bitsandbytes, one call.

Sized for one device call (`--budget-s`, default 330 s on a GPU; every section keeps to its share and a
cut section says so). The model's random weights are quantized straight on the GPU one linear at a time (no
download; the bf16 model never exists in memory). Sections, cheapest and most wanted first:

  estimate          memory for 7B/13B on one GPU and 70B over 2 and 4 GPUs with FSDP2 (bench/gpu_memory.py)
  dequant           single ops, same run: NF4 + DQ dequantize of an 11008 x 4096 weight to bf16 (GB/s of
                    bytes read + written) against a device copy; the 4-bit linear forward on 2048 tokens
                    (4096 -> 11008) against the bf16 matmul alone; ours eager and bitsandbytes'
                    dequantize_4bit / bnb.nn.Linear4bit
  optim             one AdamW step on the 160M LoRA parameters of 7B (448 tensors): ours 32/8-bit, plain and
                    paged; bitsandbytes' AdamW 32/8-bit and paged 32/8; torch's fused AdamW as the ceiling
  train             our QLoRA step as train.py runs it (LoRA r 64 alpha 16 dropout 0.1 on every linear but
                    lm_head, per-layer checkpointing, chunked loss, clipping, PagedAdamW) with --compile off
                    at 4x512 and 1x2048 (AdamW 32 and 8) and 1x512; plus 4x512 with offloaded activations
  baseline          the same configs through transformers + PEFT + bitsandbytes (nf4, double quant, its
                    gradient checkpointing, bnb PagedAdamW 32/8)
  train_compiled    ours with --compile auto (what train.load_model does on CUDA: the compiled dequantize and
                    train.compile_layers, each decoder layer one compiled graph)
  dequant_compiled  our compiled dequantize and 4-bit linear forward
  context           (only with --only context) the longest batch-1 sequence that trains one step under a
                    24 GiB cap, by bisection in steps of 1024 up to 131072: ours (--compile off) with
                    offloaded activations on and off, and transformers + PEFT + bnb with gradient
                    checkpointing; tok/s at the longest length all of them reach (bench/gpu_context.py)

Per training config: tokens/s = B*T / median step time (CUDA events, after warm-up); the GPU-busy fraction =
the summed time of the GPU kernels torch.profiler records over one profiled step / the median wall time of the
unprofiled steps (the profiler slows the host, so its own wall time is not the denominator), with the top
kernels; peak memory = torch.cuda.max_memory_allocated + the CUDA managed memory the paged optimizer holds
(the caching allocator does not see it).

Every section (and training config) writes its numbers into the JSON (--json) as soon as it finishes, so a run
cut short keeps what it measured (--report prints its table); a failing section records its error and the
others still run; bitsandbytes' rows say "not installed" when it is not. Without CUDA (or with --tiny) the same
code runs on a tiny shape on the CPU: the CI smoke test (tests/test_bench_gpu.py). Its timings mean nothing, and
on the CPU "busy" sums leaf operators.

Arithmetic behind the targets (QLoRA arXiv:2305.14314 §3-4): a 7B base in NF4 + DQ costs 4.127 bits per
linear parameter = 3.3 GB for 6.5e9 linear parameters, plus 0.5 GB of bf16 embeddings and lm_head; a training
step costs about 6 N T FLOPs (forward, recomputed forward, input-gradient backward: the frozen base gets no
weight gradient), ~105 ms at 4x512 on an H200's ~790 TFLOP/s of bf16 matmul.

The parts beside this file: gpu_setups.py (the two QLoRA setups measured, the clock and memory counters),
gpu_ops.py (the single-op sections), gpu_context.py (the context search), gpu_memory.py (the estimate).

Usage:  python bench/gpu.py [--tiny] [--json bench/gpu.json] [--only train,baseline,...] [--budget-s 330]
        python bench/gpu.py --only context --json bench/context.json --budget-s 120
        python bench/gpu.py --report bench/gpu.json      # the table again, from the JSON
"""
import argparse
import json
import os
import statistics
import sys
import traceback
import warnings
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (after the sys.path insert: the concept files live in the repo root, the bench's parts beside this file)
import nf4  # noqa: E402
from gpu_context import GiB, context_lines, section_context  # noqa: E402
from gpu_memory import GB, SHAPES, estimate_rows, estimate_table, linear_shapes, quantized_linear_bytes  # noqa: E402
from gpu_ops import ops_lines, optim_lines, section_dequant, section_optim  # noqa: E402
from gpu_setups import LORA, Timer, allocated, bnb_managed_bytes, buffer_bytes, hf_lora_model, hf_step, \
    import_baseline, is_oom, lora_model, managed_bytes, now, our_step, peak_allocated, reset_memory, set_compile, \
    sync  # noqa: E402


TRAIN_FULL = [(4, 512, 32), (4, 512, 8), (1, 2048, 32), (1, 2048, 8), (1, 512, 32)]  # (batch, seq, optim bits)
RUNS = {
    "full": dict(shape="7b", train=TRAIN_FULL, train_compiled=TRAIN_FULL, train_offload=[(4, 512, 32)],
                 warmup=2, steps=5, dequant=(11008, 4096), linear_tokens=2048, optim_reps=20, budget_s=330.0,
                 context=dict(step=1024, max_len=131072, cap_bytes=24 * GiB)),
    "tiny": dict(shape="tiny", train=[(2, 32, 32), (2, 32, 8), (1, 64, 32)], train_compiled=[],
                 train_offload=[(2, 32, 32)], warmup=1, steps=2, dequant=(64, 176), linear_tokens=32, optim_reps=3,
                 budget_s=None, context=dict(step=16, max_len=128, cap_bytes=24 * GiB)),
}
# Cheap and most wanted first; torch.compile (tens of seconds of compiling) last, so a time limit cuts it first.
SECTIONS = ("estimate", "dequant", "optim", "train", "baseline", "train_compiled", "dequant_compiled")
EXTRA_SECTIONS = ("context",)  # only when named in --only
# each section's share of --budget-s; time a section leaves unused goes to the next ones
# (train_compiled has the most: the first step of each new shape compiles the decoder layer, tens of seconds)
SHARES = dict(estimate=0.0, dequant=0.04, optim=0.08, train=0.22, baseline=0.2, train_compiled=0.4,
              dequant_compiled=0.06, context=1.0)


# ----------------------------------------------------------------------------------------------------------
# profiles and training configs

def kernel_summary(events, cuda: bool, top: int = 8) -> dict:
    """Kernel time of one profiled step from torch.profiler events (FunctionEvent-like: name, device_type,
    time_range, cpu_children). On CUDA the kernels are the events the GPU ran (kernels, memcpy, memset); on
    the CPU, the leaf operators (those that call no other), the nearest thing to a kernel there."""
    from torch.autograd import DeviceType
    per_name, cpu_ops = {}, 0
    for e in events:
        if e.device_type == DeviceType.CPU:
            cpu_ops += 1
        leaf_op = e.device_type == DeviceType.CPU and not e.cpu_children
        is_kernel = e.device_type == DeviceType.CUDA if cuda else leaf_op
        if is_kernel:
            calls, us = per_name.get(e.name, (0, 0.0))
            per_name[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    total_us = sum(us for _, us in per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(kernel_ms=total_us / 1e3, kernel_launches=sum(c for c, _ in per_name.values()), cpu_ops=cpu_ops,
                top_kernels=[dict(name=n[:120], calls=c, ms=us / 1e3, share=us / total_us if total_us else 0.0)
                             for n, (c, us) in ranked])


def profile_step(step, device: torch.device) -> dict:
    """torch.profiler over one call of step: its kernels (kernel_summary) and the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = now()
    with profile(activities=activities) as prof:
        step()
        sync(device)
    wall_ms = (now() - t0) * 1e3
    return dict(profiled_wall_ms=wall_ms, **kernel_summary(prof.events(), device.type == "cuda"))


def time_steps(step, device, warmup: int, steps: int, deadline: float) -> dict:
    """Median of up to `steps` timed steps after `warmup` (first steps: optimizer state, cuBLAS handles,
    torch.compile); at least 2, fewer than `steps` when they would run past `deadline`."""
    timer = Timer(device)
    t0 = now()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = now() - t0
    times = [timer(step)]
    fit = int(min(deadline - now(), 1e6) * 1e3 / max(times[0], 1e-3)) - 2  # two steps' time kept for the profile
    times += [timer(step) for _ in range(max(1, min(steps - 1, fit)))]
    return dict(step_ms_median=statistics.median(times), step_ms=times, warmup_s=warmup_s)


def train_config(make_step, managed, device, batch, seq, bits, warmup, steps, vocab, deadline, **record) -> dict:
    """Time one (batch, seq, optim_bits) configuration, memory from a clean peak, then profile one step."""
    reset_memory(device)
    managed_before = managed()
    before = allocated(device)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    step, opt = make_step(ids, bits)
    res = time_steps(step, device, warmup, steps, deadline)
    res.update(batch=batch, seq_len=seq, optim_bits=bits, **record,
               tokens_per_s=batch * seq / (res["step_ms_median"] / 1e3),
               allocated_before_bytes=before, peak_allocated_bytes=peak_allocated(device),
               managed_bytes=managed() - managed_before, loss=float(step.last_loss),
               optimizer_state_bytes=sum(t.numel() * t.element_size() for state in opt.state.values()
                                         for t in state.values() if torch.is_tensor(t) and t.dim() > 0))
    res["peak_total_bytes"] = res["peak_allocated_bytes"] + res["managed_bytes"]
    if deadline - now() > 3 * res["step_ms_median"] / 1e3:  # the profiler slows the host: ~2-3 steps' time
        try:
            prof = profile_step(step, device)
            prof["busy_fraction"] = prof["kernel_ms"] / res["step_ms_median"]
            res["profile"] = prof
        except Exception as e:  # noqa: BLE001 - a profiler failure (CUPTI) must not lose the timings
            res["profile"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    else:
        res["profile"] = dict(skipped="time budget")
    del step, opt
    return res


def run_configs(configs, make_step, managed, device, run, deadline, params, progress, out, **record):
    """Each config in its share of the time left; an OOM is recorded as that config's result."""
    for k, (batch, seq, bits) in enumerate(configs):
        row = dict(batch=batch, seq_len=seq, optim_bits=bits, **record)
        left = deadline - now()
        if left <= 0:
            out["configs"].append(dict(row, skipped="time budget"))
            continue
        try:
            out["configs"].append(train_config(make_step, managed, device, batch, seq, bits, run["warmup"],
                                               run["steps"], run["vocab"], now() + left / (len(configs) - k),
                                               **record))
        except Exception as e:  # noqa: BLE001 - an OOM or a failing config: record it, run the next
            if not is_oom(e):
                traceback.print_exc()
            out["configs"].append(dict(row, error=f"{'OOM' if is_oom(e) else type(e).__name__}: {e}"[:300]))
        for p in params:  # a step cut short leaves its gradients behind
            p.grad = None
        progress(out)


def section_train(run: dict, device: torch.device, progress, deadline: float, compiled: bool = False) -> dict:
    """Our QLoRA step at each training config, --compile off (or auto: `compiled`), then offloaded activations."""
    shape = SHAPES[run["shape"]]
    reset_memory(device)
    t0 = now()
    model, n_trainable = lora_model(shape, device)
    set_compile(model, compiled)
    sync(device)
    # build_peak_bytes: the quantized model plus one bf16 weight in flight, never the bf16 model (13.5 GB at 7B)
    out = dict(build_s=now() - t0, trainable_params=n_trainable, model_bytes=allocated(device),
               build_peak_bytes=peak_allocated(device),
               quantized_linear_bytes=sum(buffer_bytes(m) for m in model.modules() if isinstance(m, nf4.Linear4bit)),
               quantized_linear_bytes_formula=sum(quantized_linear_bytes(o, n) for o, n in linear_shapes(shape)),
               configs=[])
    params = [p for p in model.parameters() if p.requires_grad]
    make_step = lambda ids, bits: our_step(model, params, ids, bits)  # noqa: E731
    offload = run["train_offload"] if not compiled else []
    n_all = len(run["train_compiled" if compiled else "train"]) + len(offload)
    main_deadline = now() + (deadline - now()) * (n_all - len(offload)) / max(1, n_all)
    with warnings.catch_warnings(record=True) as caught:  # nf4 / train.compile_layers fall back to eager so
        warnings.simplefilter("always")
        run_configs(run["train_compiled" if compiled else "train"], make_step, managed_bytes, device, run,
                    main_deadline, params, progress, out, compiled=compiled, offload=False)
    fallbacks = sorted({str(w.message)[:300] for w in caught if "torch.compile" in str(w.message)})
    if fallbacks:  # then the "compiled" rows timed eager code: the table says so
        out["compile_fallbacks"] = fallbacks
    if offload and hasattr(model, "offload_activations"):
        model.offload_activations = True
        run_configs(offload, make_step, managed_bytes, device, run, deadline, params, progress, out,
                    compiled=False, offload=True)
        model.offload_activations = False
    elif offload:
        out["offload"] = "unavailable: llama.Llama has no offload_activations attribute in this checkout"
    del model, params, make_step
    reset_memory(device)
    return out


def section_baseline(run: dict, device: torch.device, progress, deadline: float) -> dict:
    deps, why = import_baseline()
    if deps is None:
        return dict(skipped=why)
    shape = SHAPES[run["shape"]]
    reset_memory(device)
    t0 = now()
    try:
        model, params = hf_lora_model(shape, device, deps)
    except Exception as e:  # noqa: BLE001 - a GPU machine must build it; a CPU may lack bnb's CPU kernels
        if device.type == "cuda":
            raise
        return dict(skipped=f"bitsandbytes on the CPU: {type(e).__name__}: {e}"[:300])
    sync(device)
    bnb, peft, transformers = deps
    out = dict(build_s=now() - t0, trainable_params=sum(p.numel() for p in params),
               model_bytes=allocated(device), build_peak_bytes=peak_allocated(device), configs=[],
               versions=dict(transformers=transformers.__version__, peft=peft.__version__,
                             bitsandbytes=bnb.__version__))
    managed = bnb_managed_bytes if device.type == "cuda" else (lambda: 0)
    run_configs(run["train"], lambda ids, bits: hf_step(model, params, ids, bits, bnb, device), managed, device,
                run, deadline, params, progress, out)
    del model, params
    reset_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# report

def train_lines(results: dict) -> list[str]:
    est = results.get("estimate", {})
    lines = ["top kernels (one profiled step, share of kernel time):"]
    for impl, key in (("minqlora", "train"), ("hf+bnb", "baseline"), ("mq+compile", "train_compiled")):
        for c in results.get(key, {}).get("configs", [])[:1]:  # the first config (4x512, AdamW 32)
            top = c.get("profile", {}).get("top_kernels", [])
            lines.append(f"  {impl} {c['batch']}x{c['seq_len']}: " + "; ".join(
                f"{k['share'] * 100:.0f}% {k['name'][:48]} x{k['calls']}" for k in top[:3]))
    lines.append(f"{'impl':12} {'batch':7} {'optim':>5} {'tok/s':>8} {'step ms':>8} {'busy':>5} {'launch':>7} "
                 f"{'peak GB':>8} {'managed':>7} {'estimate':>8}")
    for impl, key in (("minqlora", "train"), ("hf+bnb", "baseline"), ("mq+compile", "train_compiled")):
        sec = results.get(key, {})
        for message in sec.get("compile_fallbacks", []):
            lines.append(f"{impl:12} WARNING, these rows ran eager: {message}"[:200])
        if not sec.get("configs"):
            lines.append(f"{impl:12} {sec.get('skipped') or sec.get('error') or 'not run'}"[:160])
        for c in sec.get("configs", []):
            name = impl + ("+offload" if c.get("offload") else "")
            bt = f"{c['batch']}x{c['seq_len']}"
            if "tokens_per_s" not in c:
                lines.append(f"{name:12} {bt:7} {c['optim_bits']:>5} {(c.get('error') or c.get('skipped'))[:90]}")
                continue
            e = est.get(f"{results['shape']}_{bt}_adamw{c['optim_bits']}") if key != "baseline" else None
            p = c.get("profile", {})
            busy = f"{100 * p['busy_fraction']:.0f}%" if "busy_fraction" in p else "-"
            lines.append(f"{name:12} {bt:7} {c['optim_bits']:>5} {c['tokens_per_s']:8.0f} {c['step_ms_median']:8.1f} "
                         f"{busy:>5} {p.get('kernel_launches', '-'):>7} {c['peak_total_bytes'] / GB:8.2f} "
                         f"{c['managed_bytes'] / GB:7.2f} {e['total_estimate'] / GB if e else float('nan'):8.2f}")
    return lines


def ratio_lines(results: dict) -> list[str]:
    def rows(key):
        return {(c["batch"], c["seq_len"], c["optim_bits"]): c for c in results.get(key, {}).get("configs", [])
                if "tokens_per_s" in c and not c.get("offload")}
    ours, theirs, comp = rows("train"), rows("baseline"), rows("train_compiled")
    lines = []
    for k, t in theirs.items():
        o, c = ours.get(k), comp.get(k)
        speed = "; ".join(f"{label} {x['tokens_per_s'] / t['tokens_per_s']:.2f}x" for label, x in
                          (("eager", o), ("compiled", c)) if x)
        mem = f", memory {o['peak_total_bytes'] / t['peak_total_bytes']:.2f}x" if o and t["peak_total_bytes"] else ""
        lines.append(f"  vs hf+bnb {k[0]}x{k[1]} adamw{k[2]}: speed {speed or '-'} [targets 1.0 / 2.0]{mem} [<= 1.0]")
    for c in results.get("train", {}).get("configs", []):
        o = ours.get((c["batch"], c["seq_len"], c["optim_bits"]))
        if c.get("offload") and "tokens_per_s" in c and o:
            lines.append(f"  offloaded activations {c['batch']}x{c['seq_len']}: time cost "
                         f"{100 * (o['tokens_per_s'] / c['tokens_per_s'] - 1):.1f}% [<= 5%], peak memory "
                         f"{c['peak_total_bytes'] / GB:.2f} vs {o['peak_total_bytes'] / GB:.2f} GB")
    return lines


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"== bench/gpu.py: {env['device_name']}, torch {env['torch']}, shape {results['shape']}"
             f"{' (tiny CPU dry run: timings mean nothing)' if results['shape'] == 'tiny' else ''} =="]
    lines += estimate_table(results.get("estimate", {}))
    lines += ops_lines(results) + optim_lines(results) + context_lines(results)
    if any(k in results for k in ("train", "baseline", "train_compiled")):
        lines += train_lines(results) + ratio_lines(results)
    if results.get("errors"):
        lines.append(f"ERRORS in sections: {', '.join(results['errors'])} (tracebacks in the JSON)")
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    """Atomic: a temp file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, device=str(device), python=sys.version.split()[0])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   total_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
    else:
        env.update(device_name="CPU", threads=torch.get_num_threads())
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes on whatever device (automatic without CUDA): the CI smoke run")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "gpu.json",
                    help="where the full numbers go (default bench/gpu.json), rewritten after every section")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections, run in this order: {','.join(SECTIONS + EXTRA_SECTIONS)} "
                         f"(default: all but {','.join(EXTRA_SECTIONS)})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per training config (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; tiny 1)")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of a JSON an earlier run wrote (also one cut short), and exit")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run, shared among the sections (default 330 on a GPU, none tiny)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS + EXTRA_SECTIONS)
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS + EXTRA_SECTIONS)}")
    return args


def section_deadlines(names, budget_s, t0) -> dict:
    """Absolute deadline per section: its cumulative share of the budget (time a section leaves unused goes to
    the ones after it). Without a budget, none."""
    if budget_s is None:
        return {n: float("inf") for n in names}
    total = sum(SHARES[n] for n in names) or 1.0
    out, acc = {}, 0.0
    for n in names:
        acc += SHARES[n] / total
        out[n] = t0 + budget_s * acc
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(table(json.loads(args.report.read_text())))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    if device.type == "cpu":
        # tiny matrices gain nothing from threads, and spinning OpenMP workers cost several times the work
        # on a busy 2-core CI machine
        torch.set_num_threads(1)
    run = dict(RUNS["tiny" if tiny else "full"])
    run["warmup"] = run["warmup"] if args.warmup is None else args.warmup
    run["steps"] = run["steps"] if args.steps is None else args.steps
    run["vocab"] = SHAPES[run["shape"]]["vocab_size"]
    budget = args.budget_s if args.budget_s is not None else run["budget_s"]
    results = dict(shape=run["shape"], model=dict(SHAPES[run["shape"]]), lora=LORA, budget_s=budget,
                   run={k: run[k] for k in ("train", "train_compiled", "train_offload", "warmup", "steps")},
                   env=environment(device), errors={})

    def report(key, value):  # every section, and every training config as it finishes
        results[key] = value
        write_json(args.json, results)

    cuda = device.type == "cuda"
    sections = {
        "estimate": lambda progress, end: dict(estimate_rows(LORA["r"], LORA["dropout"], tiny=tiny),
                                               note="computed, not measured (bench/gpu_memory.py)"),
        "dequant": lambda progress, end: section_dequant(run, device, compiled=False),
        "optim": lambda progress, end: section_optim(run, device, end),
        "train": lambda progress, end: section_train(run, device, progress, end),
        "baseline": lambda progress, end: section_baseline(run, device, progress, end),
        "train_compiled": lambda progress, end: (
            section_train(run, device, progress, end, compiled=True) if cuda else
            dict(skipped="CUDA only (train.py --compile auto compiles on CUDA)")),
        "dequant_compiled": lambda progress, end: (
            section_dequant(run, device, compiled=True) if cuda else
            dict(skipped="CUDA only")),  # a CPU inductor build would outlast the smoke run
        "context": lambda progress, end: section_context(run, device, progress, end),
    }
    names = [s for s in SECTIONS + EXTRA_SECTIONS if s in args.only.split(",")]
    deadlines = section_deadlines(names, budget, now())
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        t0 = now()
        try:
            res = sections[name](lambda value, key=name: report(key, value), deadlines[name])
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' numbers
            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}"[:500])
            results["errors"][name] = traceback.format_exc()[-3000:]
            reset_memory(device)
        res["section_s"] = now() - t0
        report(name, res)
        print(f"[bench] {name} done in {res['section_s']:.1f} s", flush=True)
    print(table(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
