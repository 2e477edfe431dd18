"""Throughput of NF4 quantize / dequantize on one weight matrix, side by side with a naive pure-PyTorch
baseline and with bitsandbytes, plus the measured storage cost in bits per parameter.

    python bench/quant.py [--quick] [--repeats 7] [--shape 4096 4096] [--threads N] [--clock wall|cpu]
                          [--no-compile] [--json FILE]

Rows: `ours` (nf4.py as it runs on this device: on a CPU its lookup tables, a 65536-bin encoder and a
256-entry byte decoder), `ours-plain` (nf4.CPU_TABLES off: the plain elementwise path GPUs run, on this
device), `ours+compile` (torch.compile of nf4.dequantize_4bit, which traces the plain path, if it compiles
here), `naive` (argmin over the 16 codes per element in 1M-element chunks; unpack with shifts, table
lookup, repeat_interleave of absmax) and `bnb` (bitsandbytes' quantize_4bit / dequantize_4bit on this
device). Each cell is the median of `--repeats` timed calls after
one warm-up, in million elements per second, at blocksize 64 (`--clock cpu`: per CPU-second of the whole
process, time.process_time, which other jobs on a shared machine disturb far less than the wall clock;
with --threads 1 the two agree on a quiet machine); "dq" = double quantization of the absmax
constants included in the timed call. bitsandbytes is not a project dependency: when it cannot be imported
here, its rows are measured by running this script under $REF_PYTHON (default /work/refvenv/bin/python,
if present) with `--only bnb`, so one run still prints everything.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import double_quant  # noqa: E402
import nf4  # noqa: E402

BLOCKSIZE = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(fn, repeats, clock="wall"):
    fn()  # warm-up: tables, allocator, lazy initialisation
    times = []
    for _ in range(repeats):
        t0 = CLOCK[clock]()
        fn()
        times.append(CLOCK[clock]() - t0)
    return statistics.median(times)


# ---- implementations: each gives quantize(x, dq) -> state and dequantize(state, dtype) -> tensor ---------
def ours(tables=True, dequantize_fn=nf4.dequantize_4bit):
    """nf4 with its CPU lookup tables on (the default) or off (the plain path), or a compiled dequantize."""
    def quantize(x, dq):
        nf4.CPU_TABLES = tables
        packed, absmax = nf4.quantize_4bit(x, BLOCKSIZE)
        return (packed, double_quant.quantize_absmax(absmax) if dq else absmax, x.shape)

    def dequantize(state, dtype):
        nf4.CPU_TABLES = tables
        packed, absmax, shape = state
        if isinstance(absmax, tuple):
            absmax = double_quant.dequantize_absmax(*absmax)
        return dequantize_fn(packed, absmax, shape, BLOCKSIZE, "nf4", dtype)
    return quantize, dequantize


def ours_compiled():
    return ours(dequantize_fn=torch.compile(nf4.dequantize_4bit, dynamic=False))


def naive():
    """What one writes first: distances to all 16 codes, argmin (a [chunk, 16] matrix per 1M elements)."""
    code = nf4.NF4_CODE

    def quantize(x, dq):
        blocks = x.reshape(-1, BLOCKSIZE).float()  # (nblocks, 64); n divisible by 64 in this bench
        absmax = blocks.abs().amax(1)
        scaled = (blocks / absmax[:, None]).view(-1)
        codes = torch.cat([(c[:, None] - code).abs().argmin(1) for c in scaled.split(1 << 20)]).to(torch.uint8)
        packed = (codes[0::2] << 4 | codes[1::2]).view(-1, 1)
        return (packed, double_quant.quantize_absmax(absmax) if dq else absmax, x.shape)

    def dequantize(state, dtype):
        packed, absmax, shape = state
        if isinstance(absmax, tuple):
            absmax = double_quant.dequantize_absmax(*absmax)
        p = packed.view(-1)
        codes = torch.stack([p >> 4, p & 15], 1).view(-1).long()
        return (code[codes] * absmax.repeat_interleave(BLOCKSIZE)).to(dtype).view(shape)
    return quantize, dequantize


def bnb():
    import bitsandbytes.functional as BF

    def quantize(x, dq):
        return BF.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=dq, quant_type="nf4")

    def dequantize(state, dtype):
        packed, qs = state
        return BF.dequantize_4bit(packed, qs)  # in the quant state's dtype = the input's
    return quantize, dequantize


def measure(name, impl, shape, repeats, only_dequant=False, clock="wall"):
    quantize, dequantize = impl
    rows = []
    n = shape[0] * shape[1]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for dname, dtype in DTYPES.items():
        x = w.to(dtype)
        for dq in (False, True):
            state = quantize(x, dq)
            if not only_dequant:
                t = median_seconds(lambda: quantize(x, dq), repeats, clock)
                rows.append(dict(impl=name, op="quantize", dtype=dname, dq=dq, ms=t * 1e3, melem_s=n / t / 1e6))
            t = median_seconds(lambda: dequantize(state, dtype), repeats, clock)
            rows.append(dict(impl=name, op="dequantize", dtype=dname, dq=dq, ms=t * 1e3, melem_s=n / t / 1e6))
            print(f"  measured {name} {dname} dq={dq}", file=sys.stderr, flush=True)
    return rows


def bits_per_parameter(shape):
    """Storage of one quantized [out, in] weight, from the actual tensors."""
    w = torch.randn(shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    out = {}
    for dq in (False, True):
        layer = nf4.Linear4bit.from_weight(w, double_quant=dq)
        n = w.numel()
        core = [layer.weight, layer.absmax] + ([layer.nested_absmax, layer.nested_offset] if dq else [])
        out[f"dq={dq} codes+constants"] = sum(t.numel() * t.element_size() for t in core) * 8 / n
        sd = layer.state_dict()
        out[f"dq={dq} whole state_dict"] = sum(t.numel() * t.element_size() for t in sd.values()) * 8 / n
    return out


def bnb_rows_elsewhere(args):
    """bitsandbytes' rows from $REF_PYTHON when this interpreter cannot import it; [] if unavailable."""
    ref = os.environ.get("REF_PYTHON", "/work/refvenv/bin/python")
    if not Path(ref).exists():
        return [], "bitsandbytes not importable and no $REF_PYTHON"
    cmd = [ref, __file__, "--only", "bnb", "--repeats", str(args.repeats), "--shape", *map(str, args.shape),
           "--json", "-", "--threads", str(torch.get_num_threads()), "--clock", args.clock]
    proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
    if proc.returncode != 0:
        return [], f"{ref} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"], f"via {ref}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 256 x 1024, 2 repeats, no torch.compile")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per cell (median reported)")
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], help="weight shape [out, in]")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--clock", choices=list(CLOCK), default="wall",
                   help="wall: elapsed time; cpu: CPU time of the process (steadier on a shared machine)")
    p.add_argument("--only", choices=["bnb"], help=argparse.SUPPRESS)  # used for the $REF_PYTHON child run
    p.add_argument("--json", help="also write the results as JSON to this file ('-' = stdout)")
    args = p.parse_args()
    if args.quick:
        args.shape, args.repeats, args.no_compile = [256, 1024], 2, True
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    if shape[0] * shape[1] % (2 * BLOCKSIZE):
        p.error("the naive baseline needs out*in divisible by 128")

    rows, notes = [], []
    if args.only != "bnb":
        rows += measure("ours", ours(), shape, args.repeats, clock=args.clock)
        rows += measure("ours-plain", ours(tables=False), shape, args.repeats, clock=args.clock)
        nf4.CPU_TABLES = True
        rows += measure("naive", naive(), shape, args.repeats, clock=args.clock)
    try:
        rows += measure("bnb", bnb(), shape, args.repeats, clock=args.clock)
        notes.append("bitsandbytes measured in-process")
    except ImportError:
        if args.only == "bnb":
            raise
        extra, note = bnb_rows_elsewhere(args)
        rows += extra
        notes.append(f"bitsandbytes: {note}")
    # last: inductor's CPU kernels run on their own OpenMP pool, whose spinning threads slow eager ops after
    if args.only != "bnb" and not args.no_compile:
        try:
            rows += measure("ours+compile", ours_compiled(), shape, args.repeats, only_dequant=True, clock=args.clock)
        except Exception as e:  # no C++ compiler, unsupported platform...
            notes.append(f"torch.compile rows skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    result = {"shape": list(shape), "blocksize": BLOCKSIZE, "threads": torch.get_num_threads(), "clock": args.clock,
              "torch": torch.__version__, "rows": rows, "notes": notes}
    if args.only != "bnb":
        result["bits_per_parameter"] = bits_per_parameter(shape)

    if args.json == "-":
        print(json.dumps(result))
        return
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\nNF4 blocksize {BLOCKSIZE}, weight {shape[0]}x{shape[1]}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; M elements per {args.clock}-clock second (ms)")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cols = [(op, d, dq) for op in ("quantize", "dequantize") for d in DTYPES for dq in (False, True)]
    head = [f"{op[:5]} {d}{' dq' if dq else ''}" for op, d, dq in cols]
    print(f"{'':14}" + "".join(f"{h:>15}" for h in head))
    for impl in impls:
        cells = []
        for op, d, dq in cols:
            r = [r for r in rows if (r["impl"], r["op"], r["dtype"], r["dq"]) == (impl, op, d, dq)]
            cells.append(f"{r[0]['melem_s']:7.0f} ({r[0]['ms']:5.1f})" if r else f"{'-':>14}")
        print(f"{impl:14}" + "".join(f"{c:>15}" for c in cells))
    for k, v in result["bits_per_parameter"].items():
        print(f"bits per parameter, {k}: {v:.4f}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
