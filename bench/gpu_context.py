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

def bisect_longest(fits, step: int, max_len: int, lo_len: int = 0, hi_len: int | None = None, stop=lambda: False):
    """The longest multiple of `step` up to `max_len` at which fits(length) holds, by bisection, assuming fits
    is monotone (true up to some length, false beyond). lo_len: a length known to fit (0: none); hi_len: one
    known to fail (None: none). Returns (longest fit or 0, shortest failure or None, complete): when stop()
    says so between probes, the bracket found so far with complete=False."""
    lo = lo_len // step
    hi = max_len // step + 1 if hi_len is None else hi_len // step  # the sentinel past max_len "fails"
    while hi - lo > 1:
        if stop():
            break
        mid = (lo + hi) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid
    failure = hi * step if hi * step <= max_len else None
    return lo * step, failure, hi - lo <= 1

def context_variant(name, step_at, zero_grad, device, ctx, deadline, lo_len=0, hi_len=None) -> dict:
    """Bisect one variant's longest trainable length, each probe from a clean allocator; an OOM is a failure."""
    probes = []

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
        probe = dict(length=length, fits=oom is None, s=now() - t0, peak_allocated_bytes=peak_allocated(device))
        if oom:
            probe["oom"] = oom
        zero_grad()  # a step cut short leaves its gradients; the exception (and its frames) is gone by now
        reset_memory(device)
        probes.append(probe)
        print(f"[context] {name}: {length} tokens {'fits' if oom is None else 'OOM'} ({probe['s']:.1f} s)", flush=True)
        return oom is None

    longest, failure, complete = bisect_longest(fits, ctx["step"], ctx["max_len"], lo_len, hi_len,
                                                stop=lambda: now() > deadline)
    ok = sorted((p["length"], p["peak_allocated_bytes"]) for p in probes if p["fits"])
    per_token = ((ok[-1][1] - ok[0][1]) / (ok[-1][0] - ok[0][0])) if len(ok) > 1 and ok[-1][0] > ok[0][0] else None
    return dict(longest=longest, first_failure=failure, complete=complete, probes=probes,
                peak_bytes_per_token=per_token)

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

def timed_at(step_at, length, device) -> float:
    """tokens/s of one step at `length` after one untimed step there."""
    step_at(length)
    ms = Timer(device)(lambda: step_at(length))
    return length / (ms / 1e3)

def section_context(run: dict, device: torch.device, progress, deadline: float) -> dict:
    """Longest batch-1 context under the cap: transformers+PEFT+bnb first (expected the shortest: it is timed
    at its own longest), then ours with offload off and on (one model), both timed at the longest common length."""
    ctx, shape = run["context"], SHAPES[run["shape"]]
    out = dict(cap_bytes=ctx["cap_bytes"], step=ctx["step"], max_len=ctx["max_len"], batch=1, optim_bits=32,
               model=run["shape"], variants={},
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
    theirs = out["variants"]["hf+bnb"].get("longest")
    out["variants"].update(context_ours(shape, device, ctx, deadline, theirs))
    lengths = [v["longest"] for v in out["variants"].values() if v.get("longest")]
    out["longest_common"] = min(lengths) if lengths else 0
    if theirs and out["longest_common"] != theirs:
        out["variants"]["hf+bnb"]["tokens_per_s_note"] = "timed at its own longest, not the common length"
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

    step_at(ctx["step"])  # creates the optimizer state before the cap is set
    managed = (bnb_managed_bytes() if device.type == "cuda" else 0) - managed_before
    res = dict(cap_used_bytes=capped(device, ctx, managed), managed_bytes=managed)
    try:
        res.update(context_variant("hf+bnb", step_at, lambda: opt.zero_grad(set_to_none=True), device, ctx, deadline))
        if res["longest"] and now() < deadline:
            res["tokens_per_s"] = timed_at(step_at, res["longest"], device)
            res["tokens_per_s_at"] = res["longest"]
    finally:
        uncap(device)
        del model, params, opt
        reset_memory(device)
    return res

def context_ours(shape, device, ctx, deadline, theirs) -> dict:
    reset_memory(device)
    model, _ = lora_model(shape, device)
    set_compile(model, device.type == "cuda")  # train.py's default there: --compile auto
    params = [p for p in model.parameters() if p.requires_grad]
    opt = paged_adamw.PagedAdamW(params, lr=DEFAULTS.lr, weight_decay=DEFAULTS.weight_decay, optim_bits=32, paged=True)
    vocab, managed_before = shape["vocab_size"], managed_bytes()

    def step_at(length):
        batch = lm_batch(torch.randint(0, vocab, (1, length), device=device))

        def loss():
            loss_sum, n_targets = train.lm_loss_sum(model, batch)
            return loss_sum / n_targets
        Step(loss, opt, params)()

    step_at(ctx["step"])
    managed = managed_bytes() - managed_before
    out, cap = {}, capped(device, ctx, managed)
    zero = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    has_offload = hasattr(model, "offload_activations")
    t0 = now()
    try:  # shares of the time left: offload off 45%, on 45%, the two timed steps 10%
        off = context_variant("ours", step_at, zero, device, ctx, t0 + 0.45 * (deadline - t0))
        out["ours"] = dict(off, offload=False, cap_used_bytes=cap, managed_bytes=managed)
        if has_offload:
            model.offload_activations = True
            end = t0 + 0.9 * (deadline - t0)
            # offloading only moves memory off the card: search above the length that fit without it
            on = (context_from(step_at, zero, device, ctx, end, off["longest"]) if off["longest"] else
                  context_variant("ours+offload", step_at, zero, device, ctx, end))
            out["ours+offload"] = dict(on, offload=True, cap_used_bytes=cap, managed_bytes=managed)
        else:
            out["ours+offload"] = dict(unavailable="llama.Llama has no offload_activations attribute in this checkout")
        lengths = [v["longest"] for v in out.values() if v.get("longest")] + ([theirs] if theirs else [])
        common = min(lengths) if lengths else 0
        for key, offload in (("ours", False), ("ours+offload", True)):
            if common and out[key].get("longest") and now() < deadline:
                if has_offload:
                    model.offload_activations = offload
                out[key].update(tokens_per_s=timed_at(step_at, common, device), tokens_per_s_at=common)
    finally:
        uncap(device)
        del model, params, opt
        reset_memory(device)
    return out

def context_from(step_at, zero, device, ctx, deadline, known) -> dict:
    """Bisection above a length that is expected to fit: probe it first, then search (known, max_len]."""
    first = context_variant("ours+offload", step_at, zero, device, ctx, deadline, lo_len=known - ctx["step"],
                            hi_len=known + ctx["step"])
    if first["longest"] != known:  # it did not fit after all: search below it instead
        rest = context_variant("ours+offload", step_at, zero, device, ctx, deadline, hi_len=known)
    else:
        rest = context_variant("ours+offload", step_at, zero, device, ctx, deadline, lo_len=known)
    rest["probes"] = first["probes"] + rest["probes"]
    return rest


# ----------------------------------------------------------------------------------------------------------
# report

def context_lines(results: dict) -> list[str]:
    c = results.get("context")
    if not c or "variants" not in c:
        return []
    lines = [f"context, {c['model']} batch 1, r 64 all-linear, paged AdamW 32, cap {c['cap_bytes'] / GiB:.0f} GiB "
             f"(bisection in steps of {c['step']} up to {c['max_len']}):",
             f"  {'variant':14} {'longest':>8} {'fails at':>8} {'probes':>6} {'peak GiB':>8} {'B/token':>8} {'tok/s':>8} at"]
    for name, v in c["variants"].items():
        if "longest" not in v:
            lines.append(f"  {name:14} {v.get('unavailable') or v.get('error') or 'not run'}"[:160])
            continue
        peak = max([p["peak_allocated_bytes"] for p in v["probes"] if p["fits"]], default=0) / GiB
        per_tok = f"{v['peak_bytes_per_token']:.0f}" if v.get("peak_bytes_per_token") else "-"
        tps = f"{v['tokens_per_s']:.0f}" if "tokens_per_s" in v else "-"
        longest = f"{v['longest']}{'' if v['complete'] else '+'}"
        lines.append(f"  {name:14} {longest:>8} {str(v['first_failure'] or '-'):>8} {len(v['probes']):>6} "
                     f"{peak:8.2f} {per_tok:>8} {tps:>8} {v.get('tokens_per_s_at', '')}")
    theirs = c["variants"].get("hf+bnb", {}).get("longest")
    ratios = "; ".join(f"{name} {v['longest'] / theirs:.1f}x" for name, v in c["variants"].items()
                       if theirs and name != "hf+bnb" and v.get("longest"))
    lines.append(f"  longest common length {c.get('longest_common')}; vs hf+bnb: {ratios or '-'} [ours+offload >= 10x]; "
                 "'+': bisection cut by the time budget")
    return lines
