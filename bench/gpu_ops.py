"""Single operations of a QLoRA step, ours beside bitsandbytes' in the same run (bench/gpu.py's dequant,
optim and dequant_compiled sections).

  dequantize   NF4 + DQ weight -> bf16: GB/s of bytes read (packed weight + constants) + written (bf16), against
               a device-to-device copy of the same bf16 bytes, the achievable ceiling; ours eager and compiled
               (nf4.Linear4bit.compile), bitsandbytes.functional.dequantize_4bit
  linear       the 4-bit linear forward on a batch of tokens (no grad): nf4.Linear4bit against
               bnb.nn.Linear4bit, and the bf16 matmul alone (the weight already dequantized) as the floor
  AdamW        one step on the fp32 LoRA parameters of a model shape, with gradients: PagedAdamW 32/8-bit,
               plain and paged (nothing is paged out, so paging should cost ~nothing); bitsandbytes' AdamW
               32/8-bit and PagedAdamW 32/8; torch's fused AdamW as the ceiling
"""
import gc
import statistics
import traceback

import torch

import nf4
import paged_adamw
from gpu_memory import SHAPES, linear_shapes
from gpu_setups import DEFAULTS, INIT_STD, LORA, Timer, bnb_linear, buffer_bytes, managed_bytes, now, \
    optional_import, reset_memory, sync


BNB_OPTIMIZERS = (("adamw32", "AdamW32bit"), ("adamw8", "AdamW8bit"), ("paged_adamw32", "PagedAdamW32bit"),
                  ("paged_adamw8", "PagedAdamW8bit"))


# ----------------------------------------------------------------------------------------------------------
# dequantize and the 4-bit linear

def section_dequant(run: dict, device: torch.device, compiled: bool) -> dict:
    out_f, in_f = run["dequant"]
    tokens = run["linear_tokens"]
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * INIT_STD
    x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
    lin = nf4.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16)
    n = out_f * in_f
    moved = buffer_bytes(lin) + 2 * n  # read: packed weight + constants; written: bf16 weight
    reps = 50 if device.type == "cuda" else 3
    timer = Timer(device)
    res = dict(shape=[out_f, in_f], tokens=tokens, bytes_read_written=moved, linear_flop=2 * tokens * n)
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms, _ = timer.median(lambda: dst.copy_(src), 5, reps)
    res.update(copy_ms=copy_ms, copy_bytes=4 * n, copy_GBps=4 * n / copy_ms / 1e6)
    del src, dst
    if compiled:
        return dequant_compiled(res, lin, x, timer, reps, moved)
    ms, _ = timer.median(lambda: lin.dequantize(torch.bfloat16), 5, reps)
    res.update(eager_ms=ms, eager_GBps=moved / ms / 1e6, eager_fraction_of_copy=copy_ms / ms * moved / (4 * n))
    ours = lin.dequantize(torch.bfloat16)
    res["eager_matches_fp32"] = bool(torch.equal(ours, lin.dequantize(torch.float32).to(torch.bfloat16)))
    with torch.no_grad():
        res["matmul_ms"], _ = timer.median(lambda: x @ ours.t(), 5, reps)  # the ceiling: bf16 weight at hand
        res["linear_eager_ms"], _ = timer.median(lambda: lin(x), 5, reps)
    res["bitsandbytes"] = bnb_ops(w, x, ours, timer, reps, moved)
    return res


def bnb_ops(w, x, ours, timer, reps, moved) -> dict:
    """bitsandbytes' dequantize_4bit and bnb.nn.Linear4bit forward on the same weight and input."""
    bnb, why = optional_import("bitsandbytes")
    if bnb is None:
        return dict(skipped=why)
    import bitsandbytes.functional as bnbf
    out = dict(version=bnb.__version__)
    try:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ms, _ = timer.median(lambda: bnbf.dequantize_4bit(packed, state), 5, reps)
        out.update(dequant_ms=ms, dequant_GBps=moved / ms / 1e6,
                   dequant_equals_ours=bool(torch.equal(bnbf.dequantize_4bit(packed, state), ours)))
        layer = bnb_linear(bnb, w)
        with torch.no_grad():
            out["linear_ms"], _ = timer.median(lambda: layer(x), 5, reps)
    except Exception as e:  # noqa: BLE001 - e.g. a CPU build without some kernel: say so, keep the rest
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def dequant_compiled(res, lin, x, timer, reps, moved) -> dict:
    """nf4's compiled path (Linear4bit.compile), the one training uses with --compile auto on CUDA."""
    eager = lin.dequantize(torch.bfloat16)
    lin.compile = True
    t0 = now()
    got = lin.dequantize(torch.bfloat16)
    sync(eager.device)
    res["compile_s"] = now() - t0
    # the fused kernel must compute the same function: the same fp32 product, rounded once to bf16
    res["compiled_matches_eager"] = bool(torch.equal(got, eager))
    del got, eager
    ms, _ = timer.median(lambda: lin.dequantize(torch.bfloat16), 5, reps)
    res.update(compiled_ms=ms, compiled_GBps=moved / ms / 1e6,
               compiled_fraction_of_copy=res["copy_ms"] / ms * moved / res["copy_bytes"])
    with torch.no_grad():
        res["linear_compiled_ms"], _ = timer.median(lambda: lin(x), 5, reps)
    return res


# ----------------------------------------------------------------------------------------------------------
# AdamW

def lora_params(shape: dict, device: torch.device) -> list:
    """fp32 lora_A [r, in] and lora_B [out, r] for every decoder linear, each with a random gradient."""
    torch.manual_seed(0)
    params = []
    for o, n in linear_shapes(shape):
        for rows, cols in ((LORA["r"], n), (o, LORA["r"])):
            p = torch.nn.Parameter(torch.randn(rows, cols, device=device) * 0.01)
            p.grad = torch.randn_like(p) * 1e-3
            params.append(p)
    return params


def time_optimizer(make, params, timer, budget_s, reps) -> dict:
    opt = make(params)
    ms, times = timer.median(opt.step, 2, reps, budget_s)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    del opt
    gc.collect()
    return dict(ms=ms, reps=len(times), state_bytes_per_param=state / sum(p.numel() for p in params))


def ours_plain_vs_paged(params, bits, timer, per, reps) -> dict:
    """PagedAdamW with paged=False and True alternating, twice, so clock drift hits both alike."""
    times, out = {False: [], True: []}, {}
    for _ in range(2):
        for paged in (False, True):
            def make(ps, paged=paged):
                return paged_adamw.PagedAdamW(ps, lr=DEFAULTS.lr, optim_bits=bits, paged=paged)
            times[paged].append(time_optimizer(make, params, timer, per / 2, reps)["ms"])
            if paged:
                out[f"adamw{bits}_managed_bytes"] = managed_bytes()
    plain, paged = statistics.median(times[False]), statistics.median(times[True])
    out.update({f"adamw{bits}_plain_ms": plain, f"adamw{bits}_paged_ms": paged,
                f"adamw{bits}_paged_over_plain": paged / plain})
    return out


def section_optim(run: dict, device: torch.device, deadline: float) -> dict:
    """AdamW step times, same parameters and gradients: ours plain and paged, 32- and 8-bit; bitsandbytes' four;
    torch's fused AdamW (foreach on the CPU) as the ceiling."""
    params = lora_params(SHAPES[run["shape"]], device)
    timer = Timer(device)
    per = max(0.3, (deadline - now()) / 16)  # seconds per optimizer timing: 8 ours + 4 bnb + torch, with slack
    out = dict(params=sum(p.numel() for p in params), tensors=len(params))
    cuda = device.type == "cuda"
    try:
        out["torch_adamw"] = time_optimizer(
            lambda ps: torch.optim.AdamW(ps, lr=DEFAULTS.lr, **(dict(fused=True) if cuda else dict(foreach=True))),
            params, timer, per, run["optim_reps"])
    except Exception as e:  # noqa: BLE001
        out["torch_adamw"] = dict(error=f"{type(e).__name__}: {e}"[:200])
    for bits in (32, 8):
        try:
            out.update(ours_plain_vs_paged(params, bits, timer, per, run["optim_reps"]))
        except Exception as e:  # noqa: BLE001 - one failing optimizer must not lose the others' rows
            traceback.print_exc()
            out[f"adamw{bits}_error"] = f"{type(e).__name__}: {e}"[:300]
    bnb, why = optional_import("bitsandbytes")
    out["bitsandbytes"] = {}
    for key, cls in BNB_OPTIMIZERS:
        if bnb is None:
            out["bitsandbytes"][key] = dict(skipped=why)
            continue
        try:
            out["bitsandbytes"][key] = time_optimizer(lambda ps: getattr(bnb.optim, cls)(ps, lr=DEFAULTS.lr),
                                                      params, timer, per, run["optim_reps"])
        except Exception as e:  # noqa: BLE001 - paged optimizers need CUDA; a CPU build says so here
            out["bitsandbytes"][key] = dict(error=f"{type(e).__name__}: {e}"[:200])
    del params
    reset_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# report

def ms_cell(ms, width=12) -> str:
    """A number of ms, or the first words of why there is none."""
    return f"{ms:{width}.3f}" if isinstance(ms, (int, float)) else f"{(ms or '-')[:width]:>{width}}"


def ops_lines(results: dict) -> list[str]:
    d, dc = results.get("dequant", {}), results.get("dequant_compiled", {})
    if "eager_ms" not in d:
        return []
    b = d.get("bitsandbytes", {})
    bnb_why = b.get("skipped") or b.get("error")
    lines = [f"single ops, NF4+DQ {d['shape'][0]}x{d['shape'][1]} (ms; dequantize GB/s of bytes read+written), "
             f"linear forward on {d['tokens']} tokens:",
             f"  {'op':16} {'ours eager':>12} {'ours compiled':>14} {'bitsandbytes':>14}   ceiling"]
    comp = dc.get("compiled_ms", dc.get("skipped") or dc.get("error") or "not run")
    lines.append(f"  {'dequantize':16} {ms_cell(d['eager_ms'])} {ms_cell(comp, 14)} "
                 f"{ms_cell(b.get('dequant_ms', bnb_why), 14)}   copy {d['copy_ms']:.3f} ({d['copy_GBps']:.0f} GB/s)")
    gbps = [f"{x:.0f}" if isinstance(x, float) else "-" for x in
            (d["eager_GBps"], dc.get("compiled_GBps"), b.get("dequant_GBps"))]
    lines.append(f"  {'  GB/s':16} {gbps[0]:>12} {gbps[1]:>14} {gbps[2]:>14}")
    lines.append(f"  {'linear forward':16} {ms_cell(d['linear_eager_ms'])} "
                 f"{ms_cell(dc.get('linear_compiled_ms', comp if isinstance(comp, str) else '-'), 14)} "
                 f"{ms_cell(b.get('linear_ms', bnb_why), 14)}   bf16 matmul {d['matmul_ms']:.3f}")
    return lines


def optim_lines(results: dict) -> list[str]:
    o = results.get("optim", {})
    if "params" not in o:
        return []

    def cell(r: dict) -> str:
        return f"{r['ms']:.2f}" if "ms" in r else (r.get("skipped") or r.get("error") or "-")[:50]

    def ours(bits: int) -> str:
        if f"adamw{bits}_plain_ms" not in o:
            return o.get(f"adamw{bits}_error", "-")[:60]
        return (f"{o[f'adamw{bits}_plain_ms']:.2f} plain / {o[f'adamw{bits}_paged_ms']:.2f} paged "
                f"({o[f'adamw{bits}_paged_over_plain']:.2f}x)")
    b = o.get("bitsandbytes", {})
    return [f"AdamW step, {o['params'] / 1e6:.1f}M params in {o['tensors']} tensors (ms): torch "
            f"{cell(o.get('torch_adamw', {}))}; ours 32-bit {ours(32)}; 8-bit {ours(8)} [paged/plain <= 1.05]",
            "  bitsandbytes: " + "; ".join(f"{k} {cell(b.get(k, {}))}" for k, _ in BNB_OPTIMIZERS)]
