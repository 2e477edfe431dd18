"""Benchmark paged_adamw.PagedAdamW against torch.optim.AdamW and bitsandbytes on LoRA-shaped parameters.

One call prints one table, every row measured in the same process on its own copy of the same parameters
and gradients, the optimizers stepped in alternation so that clock drift and other jobs hit all alike:

  ours         PagedAdamW 32-bit and 8-bit, plain (paged=False) and paged (managed memory; CUDA only)
  torch        torch.optim.AdamW(foreach=True), and fused=True where this torch build has it
  bitsandbytes AdamW32bit, AdamW8bit, PagedAdamW32bit, PagedAdamW8bit (CUDA, when bitsandbytes imports)

Columns: median ms per step(); ratios to our 32-bit plain step, to torch's foreach step and to
bitsandbytes' 8-bit step (same run); aten ops per step (top level, from torch.profiler: what the host
issues); optimizer state bytes per parameter; bytes of it in CUDA managed memory.

Shapes (the LoRA A [r, in] and B [out, r] of every linear layer, float32):
  7b      Llama-2-7B at QLoRA's r=64: 448 tensors, 160M parameters (the GPU default)
  toy448  448 tensors like 7B's, hidden 512, r=8: 2.5M parameters (the CPU default)
  smollm  SmolLM2-135M at r=16: 420 tensors, 4.9M parameters

    python bench/optim.py                     # default shape for the device, 20 timed steps
    python bench/optim.py --quick             # 5 timed steps
    python bench/optim.py --threads 1         # steadier CPU numbers on a busy machine
    python bench/optim.py --device cuda --shape 7b
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import managed_memory  # noqa: E402
from paged_adamw import PagedAdamW  # noqa: E402

# (hidden, intermediate, kv dim, rank, layers)
SHAPES = {"7b": (4096, 11008, 4096, 64, 32), "toy448": (512, 1376, 512, 8, 32), "smollm": (576, 1536, 192, 16, 30)}
VIEW_OPS = {"aten::view", "aten::reshape", "aten::slice", "aten::as_strided", "aten::split", "aten::split_with_sizes",
            "aten::unsqueeze", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::narrow", "aten::expand"}


def lora_shapes(shape: str) -> list:
    """[r, in] and [out, r] for q, k, v, o, gate, up, down of every layer."""
    hidden, inter, kv, r, layers = SHAPES[shape]
    proj = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
            (inter, hidden)]
    return [s for _ in range(layers) for fan_in, fan_out in proj for s in ((r, fan_in), (fan_out, r))]


def lora_params(shape: str, device) -> list:
    """Float32 parameters of `shape` with gradients, the same values on every call (seeded)."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in lora_shapes(shape):
        p = torch.randn(s, generator=gen).mul_(0.02).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=gen).mul_(1e-3).to(device)
        params.append(p)
    return params


def optimizers(device: torch.device) -> dict:
    """name -> (family, constructor taking the parameter list) for every row this machine can run."""
    rows = {"ours 32-bit plain": ("ours", lambda ps: PagedAdamW(ps, optim_bits=32, paged=False)),
            "ours 8-bit plain": ("ours", lambda ps: PagedAdamW(ps, optim_bits=8, paged=False))}
    if device.type == "cuda":  # managed memory exists only there (on a CPU paged=True is the plain path)
        rows["ours 32-bit paged"] = ("ours", lambda ps: PagedAdamW(ps, optim_bits=32, page_threshold=0))
        rows["ours 8-bit paged"] = ("ours", lambda ps: PagedAdamW(ps, optim_bits=8, page_threshold=0))
    rows["torch AdamW foreach"] = ("torch", lambda ps: torch.optim.AdamW(ps, foreach=True))
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        rows["torch AdamW fused"] = ("torch", lambda ps: torch.optim.AdamW(ps, fused=True))
    except (RuntimeError, ValueError):
        pass  # this build has no fused AdamW for the device
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb
            for name in ("AdamW32bit", "AdamW8bit", "PagedAdamW32bit", "PagedAdamW8bit"):
                rows[f"bnb {name}"] = ("bnb", lambda ps, cls=getattr(bnb.optim, name): cls(ps))
        except ImportError:
            pass
    return rows


def ops_per_step(opt) -> tuple:
    """(all top-level aten ops, those that are not views) of one step(), as the profiler sees them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    top = [e.name for e in prof.events()
           if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    return len(top), sum(name not in VIEW_OPS for name in top)


def state_bytes(opt) -> tuple:
    """(bytes of optimizer state, bytes of it in CUDA managed memory): each allocation counted once."""
    tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    total = sum(v.numel() * v.element_size() for v in tensors)
    managed = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in tensors
               if managed_memory.is_managed(v)}
    bnb_paged = sum(v.numel() * v.element_size() for v in tensors if getattr(v, "is_paged", False))
    return total, sum(managed.values()) + bnb_paged


def run(device: torch.device, shape: str, steps: int, warmup: int = 2) -> list:
    """One row dict per optimizer: name, family, ms (median), ops, state bytes, managed bytes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    made = {name: (family, make(lora_params(shape, device))) for name, (family, make) in optimizers(device).items()}
    for _, opt in made.values():
        for _ in range(warmup):  # allocates state, first-call overheads
            opt.step()
    times = {name: [] for name in made}
    for _ in range(steps):
        for name, (_, opt) in made.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, (family, opt) in made.items():
        ops, compute_ops = ops_per_step(opt)
        total, managed = state_bytes(opt)
        rows.append(dict(name=name, family=family, ms=statistics.median(times[name]) * 1e3, ops=ops,
                         compute_ops=compute_ops, state_bytes=total, managed_bytes=managed))
    return rows


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {torch.get_num_threads()} torch threads; torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
        try:
            import bitsandbytes as bnb
            text += f", bitsandbytes {bnb.__version__}"
        except ImportError:
            text += ", bitsandbytes not installed"
    return text


def table(rows: list, n: int) -> str:
    by_name = {r["name"]: r for r in rows}
    bases = [("ours 32-bit plain", "vs ours32"), ("torch AdamW foreach", "vs torch"), ("bnb AdamW8bit", "vs bnb8")]
    bases = [(name, label) for name, label in bases if name in by_name]
    head = f"{'optimizer':22} {'ms/step':>9} " + " ".join(f"{label:>9}" for _, label in bases)
    head += f" {'aten ops':>9} {'non-view':>9} {'B/param':>8} {'managed MiB':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratios = " ".join(f"{r['ms'] / by_name[name]['ms']:8.2f}x" for name, _ in bases)
        lines.append(f"{r['name']:22} {r['ms']:9.2f} {ratios} {r['ops']:9d} {r['compute_ops']:9d} "
                     f"{r['state_bytes'] / n:8.3f} {r['managed_bytes'] / 2**20:12.1f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on CUDA, toy448 on CPU")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    ap.add_argument("--quick", action="store_true", help="5 timed steps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = args.shape or ("7b" if device.type == "cuda" else "toy448")
    steps = 5 if args.quick else args.steps
    shapes = lora_shapes(shape)
    n = sum(a * b for a, b in shapes)
    print(f"AdamW step on the LoRA parameters of '{shape}': {len(shapes)} float32 tensors, {n / 1e6:.2f}M parameters, "
          f"{device}; median of {steps} steps, optimizers in alternation")
    print(f"machine: {machine(device)}")
    print(table(run(device, shape, steps), n))
    print("targets (issue 12): ours 8-bit <= 2x ours 32-bit and <= 0.5x bnb AdamW8bit; paged / plain <= 1.05")


if __name__ == "__main__":
    main()
