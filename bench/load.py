"""Peak memory and time of `llama.from_pretrained(..., quant="nf4")` on a ~1.1B-parameter checkpoint.

The claim under test (DESIGN.md, "Memory model"): loading streams one tensor at a time, so the peak
anonymous (non-file-backed) memory is at most

    final quantized model + the largest single float tensor + a small constant,

never the float model. The bench writes a synthetic TinyLlama-shaped checkpoint (hidden 2048, 22 layers,
intermediate 5632, vocab 32000, 32 heads, 4 kv heads; random N(0, 0.02) bf16 weights, one safetensors shard
per layer plus an index, as on the hub) shard by shard, so it never holds the model itself. It then loads
it in a fresh subprocess, whose memory is only the loader's. That process samples RssAnon from
/proc/self/status on a thread every 0.5 ms and again right after every 4-bit quantization (when the float
weight, its packed copy and the constants coexist), and reports the peak over its post-import baseline.
File pages of the memory-mapped safetensors are page cache (RssFile), not anonymous memory; VmHWM, which
counts them, is reported for information.

    python bench/load.py                       # write to a temp dir, load on the CPU, delete
    python bench/load.py --device cuda         # also reports torch.cuda peak allocated
    python bench/load.py --layers 2 --keep --dir /tmp/ckpt   # small smoke run, keep the files
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(directory: str, quant: str, device: str) -> dict:
    import torch

    import llama
    import nf4

    peak = [0]

    def sample():
        peak[0] = max(peak[0], status_kb("RssAnon"))

    quantize = nf4.quantize_4bit

    def quantize_and_sample(*args, **kwargs):  # the moment float weight and 4-bit copy coexist
        out = quantize(*args, **kwargs)
        sample()
        return out

    nf4.quantize_4bit = quantize_and_sample
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            sample()
            time.sleep(0.0005)

    baseline = status_kb("RssAnon")
    sample()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model = llama.from_pretrained(directory, quant=quant, dtype=torch.bfloat16, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    sample()

    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}.values()
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    linear = [m for m in model.modules() if isinstance(m, nf4.Linear4bit)]
    result = {"load_seconds": seconds, "baseline_anon_bytes": baseline * 1024,
              "peak_anon_bytes": (peak[0] - baseline) * 1024,
              "final_anon_bytes": (status_kb("RssAnon") - baseline) * 1024,
              "vmhwm_bytes": status_kb("VmHWM") * 1024, "model_bytes": model_bytes,
              "linear_params": sum(m.in_features * m.out_features for m in linear), "n_linear4bit": len(linear),
              "largest_linear_float_bytes": max(m.in_features * m.out_features * 2 for m in linear)}
    if device.startswith("cuda"):
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return result


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
        proc = subprocess.run([sys.executable, __file__, "--child", str(directory), "--quant", args.quant,
                               "--device", args.device], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"loading failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1]) | written | {"write_seconds": write_seconds}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    budget = r["model_bytes"] + r["largest_tensor_bytes"]
    r["margin_bytes"] = budget - r["peak_anon_bytes"]  # the "small constant" still unused
    params = r["checkpoint_bytes"] / 2
    print(f"checkpoint: {params / 1e9:.3f}B params, {r['checkpoint_bytes'] / MIB:.0f} MiB bf16 in "
          f"{config['num_hidden_layers'] + 2} shards (written in {write_seconds:.1f} s)")
    print(f"load with quant={args.quant!r} on {args.device}: {r['load_seconds']:.1f} s")
    print(f"  quantized model (params + buffers)   {r['model_bytes'] / MIB:9.1f} MiB "
          f"({r['n_linear4bit']} Linear4bit, {8 * (r['model_bytes']) / params:.3f} bits/param overall)")
    print(f"  largest float tensor in checkpoint   {r['largest_tensor_bytes'] / MIB:9.1f} MiB "
          f"(largest linear weight: {r['largest_linear_float_bytes'] / MIB:.1f} MiB)")
    print(f"  peak anonymous memory while loading  {r['peak_anon_bytes'] / MIB:9.1f} MiB "
          f"(over a {r['baseline_anon_bytes'] / MIB:.0f} MiB post-import baseline)")
    print(f"  anonymous memory after loading       {r['final_anon_bytes'] / MIB:9.1f} MiB")
    print(f"  target: model + largest tensor       {budget / MIB:9.1f} MiB -> margin {r['margin_bytes'] / MIB:+.1f} MiB"
          f"  ({'OK' if r['margin_bytes'] >= -64 * MIB else 'EXCEEDED'})")
    print(f"  VmHWM (incl. mapped file pages)      {r['vmhwm_bytes'] / MIB:9.1f} MiB; float model would be "
          f"{r['checkpoint_bytes'] / MIB:.0f} MiB")
    if "cuda_peak_allocated_bytes" in r:
        print(f"  CUDA allocated {r['cuda_allocated_bytes'] / MIB:.1f} MiB, peak {r['cuda_peak_allocated_bytes'] / MIB:.1f} MiB")
    if args.output:
        Path(args.output).write_text(json.dumps(r | {"config": config, "quant": args.quant,
                                                      "device": args.device}, indent=2))


if __name__ == "__main__":
    main()
