"""Peak memory of merge.py on a synthetic ~1B checkpoint (TinyLlama-1.1B's shape), against its size.

    python bench/merge.py [--workdir DIR] [--keep] [--shard-size 1GB] [--peft]

Writes a random bf16 checkpoint of TinyLlama's shape (hidden 2048, 22 layers, 32 heads / 4 kv heads,
intermediate 5632, vocab 32000, untied; ~2.2 GB in ~1 GB shards) and a random r=64 adapter on every
linear layer, then runs `merge.py` in a child process (float16 output, 2 GB shards, no verify) while
sampling its /proc status: peak RSS (VmHWM, includes the mapped input pages) and peak anonymous RSS
(RssAnon: the memory the merge itself allocates). The claim to check: peak ~ the largest tensor, far
below the checkpoint and below one shard. `--peft` also runs transformers + PEFT's merge_and_unload +
save_pretrained from /work/refvenv (or $REF_PYTHON) for comparison, when available.
Results print as a table and go to bench/merge.json.
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

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             intermediate_size=5632, vocab_size=32000)
RANK, ALPHA = 64, 16


def tensor_shapes():
    c, i, v, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    kv = c // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, c)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,),
                       p + "self_attn.q_proj.weight": (c, c), p + "self_attn.k_proj.weight": (kv, c),
                       p + "self_attn.v_proj.weight": (kv, c), p + "self_attn.o_proj.weight": (c, c),
                       p + "mlp.gate_proj.weight": (i, c), p + "mlp.up_proj.weight": (i, c),
                       p + "mlp.down_proj.weight": (c, i)})
    shapes.update({"model.norm.weight": (c,), "lm_head.weight": (v, c)})
    return shapes


def write_checkpoint(directory, shard_bytes):
    """Random bf16 weights (std 1/sqrt(fan-in), norms ~1) in shards of about shard_bytes, HF layout."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}-of-NNNNN.safetensors"
        save_file(current, directory / name, metadata={"format": "pt"})
        shards.append((name, list(current)))

    for key, shape in tensor_shapes().items():
        t = (1 + 0.1 * torch.randn(shape, generator=gen) if len(shape) == 1
             else torch.randn(shape, generator=gen) / math.sqrt(shape[-1])).to(torch.bfloat16)
        if current and size + t.numel() * 2 > shard_bytes:
            flush()
            current, size = {}, 0
        current[key] = t
        size += t.numel() * 2
    flush()
    weight_map = {}
    for name, keys in shards:
        final = name.replace("NNNNN", f"{len(shards):05d}")
        os.replace(directory / name, directory / final)
        weight_map.update({k: final for k in keys})
    total = sum(math.prod(s) * 2 for s in tensor_shapes().values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
              "attention_bias": False, "mlp_bias": False, **SHAPE}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def write_adapter(directory, base):
    """A random r=64 LoRA on every linear layer but lm_head, in PEFT's layout."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors, modules = {}, set()
    for key, shape in tensor_shapes().items():
        if key.endswith("_proj.weight"):
            module = key.removesuffix(".weight")
            modules.add(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, shape[1], generator=gen) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], RANK, generator=gen) * 0.01
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": sorted(modules), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "base_model_name_or_path": str(base)}, indent=2))


def measure(cmd, cwd=None, env=None):
    """Run cmd; sample /proc/<pid>/status every 5 ms.
    -> (wall seconds, CPU seconds, peak RSS, peak anon RSS, peak file RSS), memory in bytes."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    finished = threading.Event()

    def sample():  # never polls the child: only the wait4 below reaps it
        while not finished.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in peaks:
                        peaks[name] = max(peaks[name], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.005)

    start = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it also returns the child's CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    finished.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]}... failed with exit code {proc.returncode}")
    return (time.perf_counter() - start, usage.ru_utime + usage.ru_stime, max(peaks["VmHWM"], usage.ru_maxrss * 1024),
            peaks["RssAnon"], peaks["RssFile"])


PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3], max_shard_size="2GB")
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoint goes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--shard-size", default=1_000_000_000, type=int, help="input shard size in bytes")
    p.add_argument("--peft", action="store_true", help="also measure transformers + PEFT (from /work/refvenv)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="minqlora-bench-merge-"))
    base, adapter, out = work / "base", work / "adapter", work / "merged"
    try:
        if not base.exists():
            t = time.perf_counter()
            write_checkpoint(base, args.shard_size)
            print(f"wrote the synthetic checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if not adapter.exists():
            write_adapter(adapter, base)
        files = sorted(base.glob("*.safetensors"))
        shapes = tensor_shapes()
        results = {"checkpoint_bytes": sum(f.stat().st_size for f in files),
                   "largest_shard_bytes": max(f.stat().st_size for f in files),
                   "largest_tensor_fp32_bytes": max(math.prod(s) for s in shapes.values()) * 4,
                   "parameters": sum(math.prod(s) for s in shapes.values())}
        baseline = measure([sys.executable, "-c", "import torch, safetensors, merge"], cwd=ROOT)
        results["python_torch_baseline_rss"], results["python_torch_baseline_anon_rss"] = baseline[2:4]
        shutil.rmtree(out, ignore_errors=True)
        seconds, cpu, rss, anon, file_rss = measure([sys.executable, "merge.py", "--adapter", str(adapter), "--model",
                                                str(base), "--output", str(out), "--no-verify"], cwd=ROOT)
        results.update(merge_seconds=seconds, merge_cpu_seconds=cpu, peak_rss=rss, peak_anon_rss=anon, peak_file_rss=file_rss,
                       output_files=sorted(f.name for f in out.iterdir()))
        ref_python = os.environ.get("REF_PYTHON", "/work/refvenv/bin/python")
        if args.peft and Path(ref_python).exists():
            shutil.rmtree(work / "merged_peft", ignore_errors=True)
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            seconds, cpu, rss, anon, _ = measure([ref_python, "-c", PEFT_MERGE, str(base), str(adapter),
                                             str(work / "merged_peft")], env=env)
            results.update(peft_seconds=seconds, peft_cpu_seconds=cpu, peft_peak_rss=rss, peft_peak_anon_rss=anon)
        gb = lambda b: f"{b / 1e9:.2f} GB"
        print(f"\nsynthetic TinyLlama-1.1B shape, bf16, {results['parameters'] / 1e9:.2f}B parameters, "
              f"r={RANK} adapter on all {len([k for k in shapes if k.endswith('_proj.weight')])} linear layers")
        print(f"  checkpoint {gb(results['checkpoint_bytes'])} in {len(files)} shards, largest shard "
              f"{gb(results['largest_shard_bytes'])}, largest tensor in fp32 {gb(results['largest_tensor_fp32_bytes'])}")
        print(f"  python + torch baseline: RSS {gb(baseline[2])} (anonymous {gb(baseline[3])})")
        print(f"  merge.py: {results['merge_seconds']:.1f} s ({results['merge_cpu_seconds']:.1f} s CPU), peak RSS {gb(results['peak_rss'])} "
              f"(anonymous {gb(results['peak_anon_rss'])}, file-backed {gb(results['peak_file_rss'])}) "
              f"= {results['peak_rss'] / results['checkpoint_bytes']:.2f}x the checkpoint, "
              f"{results['peak_rss'] / results['largest_shard_bytes']:.2f}x the largest shard")
        if "peft_seconds" in results:
            print(f"  transformers + PEFT merge_and_unload: {results['peft_seconds']:.1f} s "
                  f"({results['peft_cpu_seconds']:.1f} s CPU), peak RSS "
                  f"{gb(results['peft_peak_rss'])} (anonymous {gb(results['peft_peak_anon_rss'])})")
        (ROOT / "bench" / "merge.json").write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
