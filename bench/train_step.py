"""Benchmark: tokens/s and peak memory of one QLoRA training step, ours against transformers + PEFT + bnb.

The step (issue 6): a synthetic model of SmolLM2-135M's shape (hidden 576, 30 layers, 9 query / 3 kv
heads, intermediate 1536, vocab 49152, tied embeddings; random bf16 weights ~ N(0, 1/fan_in) written as a
Hugging Face checkpoint by this script), batch 4 x 128 random tokens, every token trained on, LoRA r 16
alpha 32 (no dropout) on every linear layer but lm_head, bf16 compute, gradient checkpointing per layer,
torch.optim.AdamW on the adapters.

Configurations, each in its own fresh subprocess so ru_maxrss is that configuration's peak RSS alone:
  ours-nf4      train.py's step: llama.from_pretrained(quant="nf4", double_quant) + lora.add_lora +
                train.lm_loss_sum (chunked cross-entropy over hidden_states) + backward + AdamW
  ours-bf16     the same without quantization (plain bf16 LoRA)
  hf-bnb-nf4    transformers AutoModelForCausalLM with BitsAndBytesConfig(nf4, double quant, bf16 compute)
                + peft LoRA + model(input_ids, labels=input_ids).loss (run with /work/refvenv's python)
  hf-bf16       transformers + peft on the plain bf16 model
The reference configurations run when their interpreter can import transformers, peft and bitsandbytes.

tokens/s = B*T / median wall time of the measured steps (after warm-up steps); CPU s = median process
CPU time of a step (all threads); peak RSS = the process's ru_maxrss, loading included. Wall times on a
shared machine move with its load (printed with the table); with --threads 1 the CPU time is the steadier
figure for comparing configurations.

Usage:
  python bench/train_step.py [--steps 6] [--warmup 2] [--json bench/train_step.json]
                             [--ref-python /work/refvenv/bin/python] [--only ours-nf4,hf-bnb-nf4]
  python bench/train_step.py --profile        # op-level profile of one ours-nf4 step
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {  # SmolLM2-135M's config.json fields that shape the maths
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 0,
}
BATCH, SEQ, R, ALPHA = 4, 128, 16, 32
CONFIGS = ["ours-nf4", "ours-bf16", "hf-bnb-nf4", "hf-bf16"]


def write_checkpoint(directory):
    """Random weights in the HF layout: config.json + model.safetensors (bf16)."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    C, I, V, L = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], CONFIG["num_hidden_layers"]
    q, kv = CONFIG["num_attention_heads"] * CONFIG["head_dim"], CONFIG["num_key_value_heads"] * CONFIG["head_dim"]

    def w(out, inp):
        return (torch.randn(out, inp, generator=g) / inp ** 0.5).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(V, C), "model.norm.weight": torch.ones(C, dtype=torch.bfloat16)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(q, C), p + "self_attn.k_proj.weight": w(kv, C),
                    p + "self_attn.v_proj.weight": w(kv, C), p + "self_attn.o_proj.weight": w(C, q),
                    p + "mlp.gate_proj.weight": w(I, C), p + "mlp.up_proj.weight": w(I, C),
                    p + "mlp.down_proj.weight": w(C, I),
                    p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16)}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))


# ---------------------------------------------------------------------------------------------------
# Workers: build the model, then time training steps. Each returns a function running one step.

def build_ours(model_dir, quant, checkpointing=True):
    import torch
    sys.path.insert(0, str(ROOT))
    import train
    cfg = train.TrainConfig(model=str(model_dir), quant=quant, lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                            dtype="bfloat16", gradient_checkpointing=checkpointing)
    model = train.load_model(cfg, model_dir, "cpu", torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "targets": torch.cat([ids[:, 1:], torch.full((BATCH, 1), train.IGNORE)], 1)}

    def step():
        loss, n = train.lm_loss_sum(model, batch)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item() / n
    return step


def build_hf(model_dir, quant, checkpointing=True):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    kwargs = {}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cpu", **kwargs)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def worker(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.worker
    quant = "nf4" if name.endswith("nf4") else "none"
    t0 = time.perf_counter()
    build = build_ours if name.startswith("ours") else build_hf
    step = build(args.model_dir, quant, checkpointing=not args.no_checkpointing)
    load_s = time.perf_counter() - t0
    if args.profile:
        for _ in range(args.warmup):
            step()
        from torch.profiler import profile
        with profile(record_shapes=False) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    times, cpu_times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    result = {"config": name, "tokens_per_s": BATCH * SEQ / statistics.median(times),
              "step_s_median": statistics.median(times), "step_s_all": times,
              "cpu_s_median": statistics.median(cpu_times), "loss_first": losses[0],
              "load_s": load_s, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result))


def can_import(python, modules):
    code = "import " + ", ".join(modules)
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--only", default=",".join(CONFIGS), help="comma list of configurations to run")
    p.add_argument("--ref-python", default="/work/refvenv/bin/python",
                   help="interpreter with transformers + peft + bitsandbytes for the hf-* configurations")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every worker (0: torch's default, one per core); 1 gives steadier "
                        "numbers on a machine other jobs are loading")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="run every configuration without gradient checkpointing (train.py's default is on)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", action="store_true", help="print an op profile of one ours-nf4 step")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    workdir = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    try:
        model_dir = workdir / "smollm2-135m-shape"
        write_checkpoint(model_dir)
        if args.profile:
            subprocess.run([sys.executable, __file__, "--worker", "ours-nf4", "--model-dir", str(model_dir),
                            "--warmup", str(args.warmup), "--threads", str(args.threads), "--profile"], check=True)
            return
        results = []
        for name in args.only.split(","):
            python = sys.executable
            if name.startswith("hf"):
                python = args.ref_python
                needs = ["transformers", "peft"] + (["bitsandbytes"] if "bnb" in name else [])
                if not (Path(python).exists() and can_import(python, needs)):
                    print(f"{name}: skipped ({python} cannot import {', '.join(needs)})")
                    continue
            run = subprocess.run([python, __file__, "--worker", name, "--model-dir", str(model_dir),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--threads", str(args.threads)] + ["--no-checkpointing"] * args.no_checkpointing,
                                 capture_output=True, text=True)
            line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
            if run.returncode or line is None:
                print(f"{name}: failed\n{run.stderr[-3000:]}")
                continue
            results.append(json.loads(line[len("RESULT "):]))
            r = results[-1]
            print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, {r['peak_rss_gb']:.2f} GB", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ref = next((r for r in results if r["config"] == "hf-bnb-nf4"), None)
    print(f"\nbatch {BATCH} x {SEQ}, LoRA r {R} alpha {ALPHA} all-linear, bf16, AdamW, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; "
          f"{os.cpu_count()} CPUs, {results[0]['threads'] if results else '?'} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| config | tokens/s | step s (median) | CPU s per step | peak RSS GB |"
          + (" vs hf-bnb-nf4: speed, CPU time, memory |" if ref else ""))
    print("|---|---|---|---|---|" + ("---|" if ref else ""))
    for r in results:
        rel = (f" {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x, {r['cpu_s_median'] / ref['cpu_s_median']:.2f}x, "
               f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x |") if ref else ""
        print(f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['step_s_median']:.3f} | {r['cpu_s_median']:.2f} | "
              f"{r['peak_rss_gb']:.2f} |{rel}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
