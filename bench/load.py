"""Peak memory and time of `llama.from_pretrained(..., quant="nf4")` on a ~1.1B-parameter checkpoint.

The claim under test (DESIGN.md, "Memory model"): loading streams one tensor at a time, so the peak
anonymous (non-file-backed) memory is at most

    final quantized model + the largest single float tensor + a small constant,

never the float model. The bench writes a synthetic TinyLlama-shaped checkpoint (hidden 2048, 22 layers,
intermediate 5632, vocab 32000, 32 heads, 4 kv heads; random N(0, 0.02) bf16 weights, one safetensors shard
per layer plus an index, as on the hub) shard by shard, so it never holds the model itself. It then loads
it in a fresh subprocess and samples that process's RssAnon (/proc/PID/status) from the outside every
~0.5 ms; the peak is reported over the child's post-import baseline. File pages of the memory-mapped
safetensors are page cache (RssFile), not anonymous memory; VmHWM, which counts them, is shown for
information. Wall time on a busy machine is noisy; the loader's CPU time is reported too.

    python bench/load.py                       # write to a temp dir, load on the CPU, delete
    python bench/load.py --device cuda         # also reports torch.cuda peak allocated
    python bench/load.py --layers 2 --keep --dir /tmp/ckpt   # small smoke run, keep the files
"""
import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=32000,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"],
                 hidden_act="silu", attention_bias=False, mlp_bias=False, dtype="bfloat16")
MIB = 1 << 20


def write_checkpoint(directory: Path, config: dict, seed: int = 0) -> dict:
    """One shard per decoder layer (+ one for the embeddings, one for norm and lm_head), each built, saved
    and dropped before the next: this process holds at most one shard (~90 MB)."""
    import torch
    from safetensors.torch import save_file

    C, Fi, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, K, D, L = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], \
        config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    def layer(i):
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": randn(H * D, C), p + "self_attn.k_proj.weight": randn(K * D, C),
                p + "self_attn.v_proj.weight": randn(K * D, C), p + "self_attn.o_proj.weight": randn(C, H * D),
                p + "mlp.gate_proj.weight": randn(Fi, C), p + "mlp.up_proj.weight": randn(Fi, C),
                p + "mlp.down_proj.weight": randn(C, Fi),
                p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16)}

    shards = [lambda: {"model.embed_tokens.weight": randn(V, C)}]
    shards += [lambda i=i: layer(i) for i in range(L)]
    shards += [lambda: {"model.norm.weight": torch.ones(C, dtype=torch.bfloat16), "lm_head.weight": randn(V, C)}]
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total, largest = {}, 0, 0
    for n, make in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, directory / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return {"checkpoint_bytes": total, "largest_tensor_bytes": largest}


# ---- the measuring subprocess ------------------------------------------------------------------------


def status_kb(field: str, pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(directory: str, quant: str, device: str) -> dict:
    """Runs in the fresh process: signals its post-import baseline, loads, reports. Its memory is sampled
    from the outside (a sampling thread in here would perturb glibc's arenas: it measurably left ~200 MB of
    freed-but-retained heap behind)."""
    import torch

    import llama
    import nf4

    before_meta = status_kb("RssAnon")
    # The first in-place init of a meta tensor imports torch's Python decompositions (~800 modules,
    # ~70 MB of code and objects). A once-per-process cost of torch, independent of the model: kept apart.
    torch.empty(1, device="meta").normal_()
    baseline = status_kb("RssAnon")
    print(json.dumps({"baseline_kb": baseline}), flush=True)  # the parent starts its peak from here
    t0, c0 = time.perf_counter(), time.process_time()
    model = llama.from_pretrained(directory, quant=quant, dtype=torch.bfloat16, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    final = status_kb("RssAnon")
    try:  # hand glibc's freed-but-kept heap back: what remains is live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    trimmed = status_kb("RssAnon")

    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}.values()
    linear = [m for m in model.modules() if isinstance(m, nf4.Linear4bit)]
    result = {"load_seconds": seconds, "load_cpu_seconds": cpu_seconds, "baseline_anon_bytes": baseline * 1024,
              "meta_import_bytes": (baseline - before_meta) * 1024, "final_anon_bytes": (final - baseline) * 1024,
              "trimmed_anon_bytes": (trimmed - baseline) * 1024,
              "vmhwm_bytes": status_kb("VmHWM") * 1024,
              "model_bytes": sum(t.numel() * t.element_size() for t in tensors), "n_linear4bit": len(linear),
              "largest_linear_float_bytes": max(m.in_features * m.out_features * 2 for m in linear)}
    if device.startswith("cuda"):
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return result


def measure(directory: Path, quant: str, device: str, env: dict | None = None) -> dict:
    """Start the loader in a fresh process and sample its RssAnon every ~0.5 ms until it exits."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(directory), "--quant", quant,
                             "--device", device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}))
    baseline = json.loads(proc.stdout.readline() or "{}").get("baseline_kb")  # blocks until imports are done
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, status_kb("RssAnon", proc.pid))
        except (FileNotFoundError, KeyError, ProcessLookupError):  # exiting
            break
        time.sleep(0.0005)
    out, err = proc.communicate()
    if proc.returncode or baseline is None:
        sys.exit(f"loading failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1]) | {"peak_anon_bytes": (peak - baseline) * 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where to write the checkpoint (default: a new temp dir, deleted afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    ap.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"], help="decoder layers (22)")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--device", default="cpu", help="where the quantized model goes (cpu, cuda)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "load.json"), help="results JSON ('' for none)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quant, args.device)))
        return

    config = TINYLLAMA | {"num_hidden_layers": args.layers}
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="minqlora-bench-"))
    try:
        t0 = time.perf_counter()
        written = write_checkpoint(directory, config)
        write_seconds = time.perf_counter() - t0
        # glibc's default allocator raises its mmap threshold as big blocks are freed, after which the
        # quantizer's temporaries come from the heap; persistent packed weights allocated between them pin
        # it, so RssAnon keeps freed memory. A fixed threshold returns big blocks to the OS at free, and
        # RssAnon then follows the live tensors: both runs are reported.
        runs = {"glibc default": measure(directory, args.quant, args.device),
                "MALLOC_MMAP_THRESHOLD_=1MiB": measure(directory, args.quant, args.device,
                                                       {"MALLOC_MMAP_THRESHOLD_": str(MIB)})}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    first = next(iter(runs.values()))
    model, largest = first["model_bytes"], written["largest_tensor_bytes"]
    params = written["checkpoint_bytes"] / 2
    print(f"checkpoint: {params / 1e9:.3f}B params, {written['checkpoint_bytes'] / MIB:.0f} MiB bf16 in "
          f"{config['num_hidden_layers'] + 2} shards (written in {write_seconds:.1f} s)")
    print(f"quantized model (params + buffers): {model / MIB:.1f} MiB ({first['n_linear4bit']} Linear4bit, "
          f"{8 * model / params:.3f} bits/param overall); largest float tensor {largest / MIB:.1f} MiB "
          f"(largest linear weight {first['largest_linear_float_bytes'] / MIB:.1f} MiB)")
    print(f"target: peak anonymous memory <= model + largest tensor = {(model + largest) / MIB:.1f} MiB "
          f"+ a small constant; the float model is {written['checkpoint_bytes'] / MIB:.0f} MiB")
    print(f"baseline after imports {first['baseline_anon_bytes'] / MIB:.0f} MiB, of which torch's one-time "
          f"meta-tensor decompositions {first['meta_import_bytes'] / MIB:.0f} MiB (not counted below)\n")
    print(f"{'allocator':28} {'load s':>7} {'CPU s':>6} {'peak anon':>10} {'after load':>10} "
          f"{'after trim':>10} {'margin':>8} {'VmHWM':>8}   (MiB)")
    for name, r in runs.items():
        r["margin_bytes"] = model + largest - r["peak_anon_bytes"]
        print(f"{name:28} {r['load_seconds']:7.1f} {r['load_cpu_seconds']:6.1f} {r['peak_anon_bytes'] / MIB:10.1f} "
              f"{r['final_anon_bytes'] / MIB:10.1f} {r['trimmed_anon_bytes'] / MIB:10.1f} "
              f"{r['margin_bytes'] / MIB:+8.1f} {r['vmhwm_bytes'] / MIB:8.1f}")
        if "cuda_peak_allocated_bytes" in r:
            print(f"{'':28} CUDA allocated {r['cuda_allocated_bytes'] / MIB:.1f} MiB, "
                  f"peak {r['cuda_peak_allocated_bytes'] / MIB:.1f} MiB")
    print("\n'after trim': RssAnon once malloc_trim(0) has returned glibc's freed-but-kept heap = live memory.")
    if args.output:
        Path(args.output).write_text(json.dumps({"config": config, "quant": args.quant, "device": args.device,
                                                 "write_seconds": write_seconds, **written, "runs": runs},
                                                indent=2))


if __name__ == "__main__":
    main()
