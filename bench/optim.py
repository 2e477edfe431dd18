"""Benchmark paged_adamw.PagedAdamW against torch.optim.AdamW(foreach=True) on LoRA-shaped parameters.

The parameters are the r=16 LoRA adapters of every linear layer of a SmolLM2-135M-sized Llama
(hidden 576, intermediate 1536, 3 kv heads of 64, 30 layers): 420 float32 tensors, 4.88M parameters.
Reported: median optimizer step time (each optimizer is timed in alternation, in the same process, on
the same gradients) and its ratio to torch's foreach AdamW; optimizer state bytes per parameter. On a
GPU, also the paged variants and how many bytes of state live in CUDA managed memory.

    python bench/optim.py            # full: 30 layers, 30 timed steps per optimizer (5 for 8-bit)
    python bench/optim.py --quick    # 8 layers, 10 timed steps (a few seconds)
    python bench/optim.py --threads 1   # steadier numbers on a busy machine
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import paged_adamw  # noqa: E402
from paged_adamw import PagedAdamW  # noqa: E402

HIDDEN, INTERMEDIATE, KV_DIM, RANK = 576, 1536, 192, 16
PROJ = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV_DIM), "v": (HIDDEN, KV_DIM), "o": (HIDDEN, HIDDEN),
        "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}


def lora_params(layers: int, device) -> list:
    """lora_A [R, in] and lora_B [out, R] (float32) for every projection of `layers` decoder layers."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(layers):
        for fan_in, fan_out in PROJ.values():
            for shape in ((RANK, fan_in), (fan_out, RANK)):
                p = torch.randn(shape, generator=gen).mul_(0.02).to(device).requires_grad_()
                p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device)
                params.append(p)
    return params


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def llama7b_state_bytes_per_param(optim_bits: int) -> float:
    """State bytes per parameter for Llama-2-7B's r=64 LoRA shapes (QLoRA's setting), on the meta device."""
    hidden, inter, rank = 4096, 11008, 64
    shapes = [(rank, i) for i, _ in [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]]
    shapes += [(o, rank) for _, o in [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]]
    params = [torch.empty(s, device="meta", requires_grad=True) for s in shapes]
    opt = PagedAdamW(params, optim_bits=optim_bits)
    total = sum(v.numel() * v.element_size() for p in params for v in opt._init_state(p, opt.param_groups[0]).values()
                if isinstance(v, torch.Tensor))
    return total / sum(p.numel() for p in params)  # the same for all 32 layers


def time_steps(makers: dict, layers: int, device, steps: int, steps_8bit: int) -> dict:
    """Median seconds per step() for each optimizer, timed in alternation so drift hits all equally
    (8-bit optimizers, slow on CPU, only for their first `steps_8bit` rounds)."""
    opts = {name: make(lora_params(layers, device)) for name, make in makers.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for opt in opts.values():  # warm-up: allocates state, first-call overheads
        for _ in range(2):
            opt.step()
    times = {name: [] for name in opts}
    for i in range(steps):
        for name, opt in opts.items():
            if "8-bit" in name and i >= steps_8bit:
                continue
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), opts[name]) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 layers and 10 timed steps instead of 30 and 30")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 30, quick 10)")
    ap.add_argument("--steps-8bit", type=int, default=None, help="timed steps of the 8-bit rows (default 5, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = 8 if args.quick else 30
    steps = args.steps or (10 if args.quick else 30)
    steps_8bit = min(steps, args.steps_8bit or (3 if args.quick else 5))
    n = sum(p.numel() for p in lora_params(layers, "cpu"))
    print(f"{layers} layers of r={RANK} LoRA adapters: {n / 1e6:.2f}M float32 parameters in {layers * 14} tensors; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {steps} steps "
          f"({steps_8bit} for 8-bit)")

    runs = [("cpu", {"torch.optim.AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, foreach=True),
                     "PagedAdamW 32-bit": lambda ps: PagedAdamW(ps, optim_bits=32),
                     "PagedAdamW 8-bit": lambda ps: PagedAdamW(ps, optim_bits=8),
                     "PagedAdamW 8-bit, min_8bit_size=0": lambda ps: PagedAdamW(ps, optim_bits=8, min_8bit_size=0)})]
    if torch.cuda.is_available():
        runs.append(("cuda", {"torch.optim.AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, foreach=True),
                              "torch.optim.AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, fused=True),
                              "PagedAdamW 32-bit, not paged": lambda ps: PagedAdamW(ps, paged=False),
                              "PagedAdamW 32-bit, paged (page_threshold=0)":
                                  lambda ps: PagedAdamW(ps, page_threshold=0),
                              "PagedAdamW 8-bit, not paged": lambda ps: PagedAdamW(ps, optim_bits=8, paged=False),
                              "PagedAdamW 8-bit, paged (page_threshold=0)":
                                  lambda ps: PagedAdamW(ps, optim_bits=8, page_threshold=0)}))
    else:
        print("(no CUDA device: GPU rows skipped)")

    header = f"{'device':6} {'optimizer':45} {'ms/step':>9} {'vs torch':>9} {'state B/param':>14} {'managed MiB':>12}"
    print(header)
    print("-" * len(header))
    for device_name, makers in runs:
        device = torch.device(device_name)
        results = time_steps(makers, layers, device, steps, steps_8bit)
        base = results["torch.optim.AdamW(foreach=True)"][0]
        for name, (sec, opt) in results.items():
            managed = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor) and paged_adamw.is_managed(v))
            print(f"{device_name:6} {name:45} {sec * 1e3:9.2f} {sec / base:8.2f}x {state_bytes(opt) / n:14.3f} "
                  f"{managed / 2**20:12.1f}")
        del results
    for bits in (32, 8):
        print(f"Llama-2-7B r=64 LoRA on every linear (160M params), {bits}-bit state, default options: "
              f"{llama7b_state_bytes_per_param(bits):.3f} bytes/param")
    print("(8-bit with default min_8bit_size=4096 keeps 32-bit state for the [192, 16] k/v lora_B tensors "
          "of this small model; the 7B shapes are all above it)")
    print("targets: PagedAdamW 32-bit within 1.2x of torch foreach on CPU; 8-bit state <= 2.1 bytes/param")


if __name__ == "__main__":
    main()
