"""How long a context trains on one GPU under a memory cap (bench/gpu.py --only context).

The longest batch-1 sequence at which one full training step (forward, backward, clipping, optimizer) fits under
`cap_bytes` of device memory (24 GiB: a consumer card), found by bisection over multiples of `step` up to
`max_len`. The cap is torch.cuda.set_per_process_memory_fraction on the caching allocator, less the managed
memory the paged optimizer state already holds (outside the allocator, but on the same card unless evicted).
Each probe starts from a clean allocator (empty cache, fresh peak); an allocation failure is "does not fit",
any other error is an error. Variants: transformers + PEFT + bnb with its gradient checkpointing (first: it is
expected to be the shortest, and is timed at its own longest length), then ours with offloaded activations off
and on (`llama.Llama.offload_activations`, one model; offloading only moves memory off the card, so the second
search starts where the first ended), both timed at the longest length all variants reach. The per-token cost
is the slope of the measured peak between the shortest and the longest probe that fit.

Bisection assumes that fitting is monotone in the length: true for memory that grows with T.
"""
import torch

import paged_adamw
import train
from gpu_memory import SHAPES
from gpu_setups import DEFAULTS, Step, Timer, bnb_managed_bytes, hf_lora_model, import_baseline, is_oom, lm_batch, \
    lora_model, managed_bytes, now, peak_allocated, reset_memory, set_compile, sync

GiB = 2 ** 30


def bisect_longest(fits, step: int, max_len: int, lo_len: int = 0, hi_len: int | None = None, stop=lambda: False,
                   guess=None):
    """The longest multiple of `step` up to `max_len` at which fits(length) holds, by bisection, assuming fits
    is monotone (true up to some length, false beyond). lo_len: a length known to fit (0: none); hi_len: one
    known to fail (None: none). guess(lo_len, hi_len), if given, proposes the next length (None: no idea); it
    is used, kept strictly inside the bracket, until two guesses in a row fail to halve it, then one midpoint
    is taken. Returns (longest fit or 0, shortest failure or None, complete): when stop() says so between
    probes, the bracket found so far with complete=False."""
    lo = lo_len // step
    hi = max_len // step + 1 if hi_len is None else hi_len // step  # the sentinel past max_len "fails"
    poor = 0  # guesses in a row that did not halve the bracket
    while hi - lo > 1:
        if stop():
            break
        mid, width = (lo + hi) // 2, hi - lo
        proposal = guess(lo * step, hi * step) if guess is not None and poor < 2 else None
        if proposal is not None:
            mid = min(max(int(proposal) // step, lo + 1), hi - 1)
        if fits(mid * step):
            lo = mid
        else:
            hi = mid
        poor = 0 if proposal is None or 2 * (hi - lo) <= width else poor + 1
    failure = hi * step if hi * step <= max_len else None
    return lo * step, failure, hi - lo <= 1


def linear_guess(points: list, cap: int, step: int):
    """A guess for bisect_longest from what the fitting probes used: peak reserved bytes grow about linearly
    with the length (flash attention, a chunked loss, checkpoints: all O(T)), so the widest pair of fitting
    probes (length, peak reserved) predicts where the peak meets the cap. Until there are two: 4 * step, then
    8 * step, cheap probes that fit."""
    def guess(lo_len, hi_len):
        if len(points) < 2:
            return next((k * step for k in (4, 8) if k * step > max(points, default=(0, 0))[0]), None)
        (t0, r0), (t1, r1) = min(points), max(points)
        if t1 <= t0 or r1 <= r0:
            return None  # no growth measured (the CPU: nothing reserved): plain bisection
        return t1 + (cap - r1) * (t1 - t0) / (r1 - r0)
    return guess


def context_variant(name, step_at, zero_grad, device, ctx, deadline, cap, points=None) -> dict:
    """Bisect one variant's longest trainable length, each probe from a clean allocator; an OOM is a failure.
    points: (length, peak reserved bytes) already measured with this variant, for the guess."""
    probes, points = [], list(points or [])

    def fits(length):
        reset_memory(device)
        t0, oom = now(), None
        try:
            step_at(length)
            sync(device)
        except Exception as e:  # noqa: BLE001 - only an allocation failure counts as "does not fit"
            if not is_oom(e):
                raise
            oom = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:160]
        probe = dict(length=length, fits=oom is None, s=now() - t0, peak_allocated_bytes=peak_allocated(device),
                     peak_reserved_bytes=peak_reserved(device))
        if oom:
            probe["oom"] = oom
        else:
            points.append((length, probe["peak_reserved_bytes"]))
        zero_grad()  # a step cut short leaves its gradients; the exception (and its frames) is gone by now
        reset_memory(device)
        probes.append(probe)
        print(f"[context] {name}: {length} tokens {'fits' if oom is None else 'OOM'} ({probe['s']:.1f} s)", flush=True)
        return oom is None

    longest, failure, complete = bisect_longest(fits, ctx["step"], ctx["max_len"], stop=lambda: now() > deadline,
                                                guess=linear_guess(points, cap, ctx["step"]))
    ok = sorted((p["length"], p["peak_allocated_bytes"]) for p in probes if p["fits"])
    per_token = ((ok[-1][1] - ok[0][1]) / (ok[-1][0] - ok[0][0])) if len(ok) > 1 and ok[-1][0] > ok[0][0] else None
    return dict(longest=longest, first_failure=failure, complete=complete, probes=probes,
                peak_bytes_per_token=per_token)


def peak_reserved(device) -> int:
    return torch.cuda.max_memory_reserved() if device.type == "cuda" else 0


def capped(device, ctx, managed_now: int):
    """Cap the caching allocator at cap_bytes minus the managed memory already held (the paged optimizer state
    lives outside the allocator but takes the same card memory unless evicted). Returns the cap used."""
    cap = ctx["cap_bytes"] - managed_now
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory)
    return cap


def uncap(device):
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)


def time_at(step_at, length, device, probes, deadline) -> dict:
    """tokens/s of one step at `length` after one untimed step there, if the two fit before `deadline` (judged
    from the slowest probe that fit at or below that length)."""
    seen = [p["s"] for p in probes if p["fits"] and p["length"] <= length] or [0.0]
    if now() + 2 * max(seen) > deadline:
        return dict(tokens_per_s_skipped="time budget")
    step_at(length)
    ms = Timer(device)(lambda: step_at(length))
    return dict(tokens_per_s=length / (ms / 1e3), tokens_per_s_at=length)


def warm_up(step_at, device, length) -> tuple[int, int]:
    """One step before the cap (it creates the optimizer state); returns (length, its peak reserved bytes)."""
    reset_memory(device)
    step_at(length)
    sync(device)
    return length, peak_reserved(device)


def section_context(run: dict, device: torch.device, progress, deadline: float) -> dict:
    """Longest batch-1 context under the cap: transformers+PEFT+bnb first (expected the shortest: it is timed
    at its own longest), then ours with offload off and on (one model), both timed at the longest common length.
    Shares of the time: 30% theirs, 30% ours plain, 30% ours offloaded, the rest for the timed steps."""
    ctx, shape = run["context"], SHAPES[run["shape"]]
    out = dict(cap_bytes=ctx["cap_bytes"], step=ctx["step"], max_len=ctx["max_len"], batch=1, optim_bits=32,
               model=run["shape"], compile="off", variants={},
               note="cap = cap_bytes - managed optimizer state, on the caching allocator; the CUDA context and "
                    "library workspaces outside it are not counted" if device.type == "cuda" else
               "CPU: nothing is capped, every probe fits (a dry run of the code path)")
    t_start = now()
    deps, why = import_baseline()
    if deps is None:
        out["variants"]["hf+bnb"] = dict(unavailable=why)
    else:
        out["variants"]["hf+bnb"] = context_hf(shape, device, deps, ctx, t_start + 0.3 * (deadline - t_start))
    progress(out)
    context_ours(shape, device, ctx, deadline, out["variants"], lambda: progress(out))
    lengths = [v["longest"] for v in out["variants"].values() if v.get("longest")]
    out["longest_common"] = min(lengths) if lengths else 0
    theirs = out["variants"]["hf+bnb"]
    if theirs.get("tokens_per_s_at") and theirs["tokens_per_s_at"] != out["longest_common"]:
        theirs["tokens_per_s_note"] = "timed at its own longest, not the common length"
    return out


def context_hf(shape, device, deps, ctx, deadline) -> dict:
    bnb = deps[0]
    reset_memory(device)
    model, params = hf_lora_model(shape, device, deps)
    vocab = shape["vocab_size"]
    opt_cls = bnb.optim.PagedAdamW32bit if device.type == "cuda" else torch.optim.AdamW
    managed_before = bnb_managed_bytes() if device.type == "cuda" else 0
    opt = opt_cls(params, lr=DEFAULTS.lr)

    def step_at(length):
        ids = torch.randint(0, vocab, (1, length), device=device)
        Step(lambda: model(input_ids=ids, labels=ids).loss, opt, params)()

    first = warm_up(step_at, device, ctx["step"])
    managed = (bnb_managed_bytes() if device.type == "cuda" else 0) - managed_before
    cap = capped(device, ctx, managed)
    res = dict(cap_used_bytes=cap, managed_bytes=managed)
    try:
        res.update(context_variant("hf+bnb", step_at, lambda: opt.zero_grad(set_to_none=True), device, ctx, deadline,
                                   cap, [first]))
        if res["longest"]:
            res.update(time_at(step_at, res["longest"], device, res["probes"], deadline))
    finally:
        uncap(device)
        del model, params, opt
        reset_memory(device)
    return res


def context_ours(shape, device, ctx, deadline, variants: dict, report) -> None:
    """Ours, offload off then on, into variants["ours"] and variants["ours+offload"] (report() after each)."""
    reset_memory(device)
    model, _ = lora_model(shape, device)
    # --compile off: a compiled layer would recompile for new lengths (tens of seconds each, more than a probe),
    # and fused kernels only lower the peak, so eager gives the conservative length
    set_compile(model, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = paged_adamw.PagedAdamW(params, lr=DEFAULTS.lr, weight_decay=DEFAULTS.weight_decay, optim_bits=32, paged=True)
    vocab, managed_before = shape["vocab_size"], managed_bytes()

    def step_at(length):
        batch = lm_batch(torch.randint(0, vocab, (1, length), device=device))

        def loss():
            loss_sum, n_targets = train.lm_loss_sum(model, batch)
            return loss_sum / n_targets
        Step(loss, opt, params)()

    first = warm_up(step_at, device, ctx["step"])
    managed = managed_bytes() - managed_before
    cap = capped(device, ctx, managed)
    zero = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    has_offload = hasattr(model, "offload_activations")
    t0 = now()
    try:
        off = context_variant("ours", step_at, zero, device, ctx, t0 + 0.45 * (deadline - t0), cap, [first])
        variants["ours"] = dict(off, offload=False, cap_used_bytes=cap, managed_bytes=managed)
        report()
        if has_offload:
            model.offload_activations = True  # a new slope: none of the points above apply
            on = context_variant("ours+offload", step_at, zero, device, ctx, t0 + 0.9 * (deadline - t0), cap)
            variants["ours+offload"] = dict(on, offload=True, cap_used_bytes=cap, managed_bytes=managed)
        else:
            variants["ours+offload"] = dict(unavailable="llama.Llama has no offload_activations attribute here")
        report()
        lengths = [v["longest"] for v in variants.values() if v.get("longest")]
        common = min(lengths) if lengths else 0
        for key, offload in (("ours", False), ("ours+offload", True)):
            if common and variants[key].get("longest"):
                if has_offload:
                    model.offload_activations = offload
                variants[key].update(time_at(step_at, common, device, variants[key]["probes"], deadline))
                report()
    finally:
        uncap(device)
        del model, params, opt
        reset_memory(device)


# ----------------------------------------------------------------------------------------------------------
# report

def context_lines(results: dict) -> list[str]:
    c = results.get("context")
    if not c or "variants" not in c:
        return []
    lines = [f"context, {c['model']} batch 1, r 64 all-linear, paged AdamW 32, ours --compile off, cap "
             f"{c['cap_bytes'] / GiB:.0f} GiB "
             f"(bisection in steps of {c['step']} up to {c['max_len']}):",
             f"  {'variant':14} {'longest':>8} {'fails at':>8} {'probes':>6} {'peak GiB':>8} {'B/token':>8} "
             f"{'tok/s':>8} at"]
    for name, v in c["variants"].items():
        if "longest" not in v:
            lines.append(f"  {name:14} {v.get('unavailable') or v.get('error') or 'not run'}"[:160])
            continue
        peak = max([p["peak_allocated_bytes"] for p in v["probes"] if p["fits"]], default=0) / GiB
        per_tok = f"{v['peak_bytes_per_token']:.0f}" if v.get("peak_bytes_per_token") else "-"
        tps = f"{v['tokens_per_s']:.0f}" if "tokens_per_s" in v else v.get("tokens_per_s_skipped", "-")[:8]
        longest = f"{v['longest']}{'' if v['complete'] else '+'}"
        lines.append(f"  {name:14} {longest:>8} {str(v['first_failure'] or '-'):>8} {len(v['probes']):>6} "
                     f"{peak:8.2f} {per_tok:>8} {tps:>8} {v.get('tokens_per_s_at', '')}")
    theirs = c["variants"].get("hf+bnb", {}).get("longest")
    ratios = "; ".join(f"{name} {v['longest'] / theirs:.1f}x" for name, v in c["variants"].items()
                       if theirs and name != "hf+bnb" and v.get("longest"))
    lines.append(f"  longest common length {c.get('longest_common')}; vs hf+bnb: {ratios or '-'} "
                 "[ours+offload >= 10x]; '+': bisection cut by the time budget")
    return lines
