"""GPU benchmark: QLoRA on a Llama-2-7B-shaped model, ours beside transformers + PEFT + bitsandbytes, one call.

Sized for one device call (`--budget-s`, default 330 s on a GPU; every section keeps to its share and a
cut section says so). The model's random weights are quantized straight on the GPU one linear at a time (no
download; the bf16 model never exists in memory). Sections, cheapest and most wanted first:

  estimate          memory for 7B/13B on one GPU and 70B over 2 and 4 GPUs with FSDP2 (bench/gpu_memory.py)
  dequant           single ops, same run: NF4 + DQ dequantize of an 11008 x 4096 weight to bf16 (GB/s of
                    bytes read + written) against a device copy; the 4-bit linear forward on 2048 tokens
                    (4096 -> 11008) against the bf16 matmul alone; ours eager and bitsandbytes'
                    dequantize_4bit / bnb.nn.Linear4bit
  optim             one AdamW step on the 160M LoRA parameters of 7B (448 tensors): ours 32/8-bit, plain and
                    paged; bitsandbytes' AdamW 32/8-bit and paged 32/8; torch's fused AdamW as the ceiling
  train             our QLoRA step as train.py runs it (LoRA r 64 alpha 16 dropout 0.1 on every linear but
                    lm_head, per-layer checkpointing, chunked loss, clipping, PagedAdamW) with --compile off
                    at 4x512 and 1x2048 (AdamW 32 and 8) and 1x512; plus 4x512 with offloaded activations
  baseline          the same configs through transformers + PEFT + bitsandbytes (nf4, double quant, its
                    gradient checkpointing, bnb PagedAdamW 32/8)
  train_compiled    ours with --compile auto (what train.py does on CUDA)
  dequant_compiled  our compiled dequantize and 4-bit linear forward
  context           (only with --only context) the longest batch-1 sequence that trains one step under a
                    24 GiB cap, by bisection in steps of 1024 up to 131072: ours with offloaded activations
                    on and off, and transformers + PEFT + bnb with gradient checkpointing; tok/s at the
                    longest length all of them reach

Per training config: tokens/s = B*T / median step time (CUDA events, after warm-up); the GPU-busy fraction =
the summed time of the GPU kernels torch.profiler records over one profiled step / the median wall time of the
unprofiled steps (the profiler slows the host, so its own wall time is not the denominator), with the top
kernels; peak memory = torch.cuda.max_memory_allocated + the CUDA managed memory the paged optimizer holds
(the caching allocator does not see it).

Every section writes its numbers into the JSON (--json) as soon as it finishes, so a run cut short keeps what
it measured; a failing section records its error and the others still run; bitsandbytes' rows say
"not installed" when it is not. Without CUDA (or with --tiny) the same code runs on a tiny shape on the CPU:
the CI smoke test (tests/test_bench_gpu.py). Its timings mean nothing, and on the CPU "busy" sums leaf ops.

Usage:  python bench/gpu.py [--tiny] [--json bench/gpu.json] [--only train,baseline,...] [--budget-s 330]
        python bench/gpu.py --only context --json bench/context.json --budget-s 120
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llama  # noqa: E402  (after the sys.path insert: the concept files live in the repo root)
import lora  # noqa: E402
import nf4  # noqa: E402
import paged_adamw  # noqa: E402
import train  # noqa: E402  (its loss, batch layout and defaults: the step measured is the step it runs)
from gpu_memory import GB, SHAPES, estimate_rows, estimate_table, linear_shapes, quantized_linear_bytes  # noqa: E402

GiB = 2 ** 30
COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")
# train.py's defaults are the QLoRA recipe (§4, Appendix B); the bench reads them rather than restating them.
DEFAULTS = train.TrainConfig()
LORA = dict(r=DEFAULTS.lora_r, alpha=DEFAULTS.lora_alpha, dropout=DEFAULTS.lora_dropout, targets=DEFAULTS.lora_targets)
INIT_STD = 0.02  # HF's initializer_range; random weights of this size keep activations finite in bf16
TRAIN_FULL = [(4, 512, 32), (4, 512, 8), (1, 2048, 32), (1, 2048, 8), (1, 512, 32)]  # (batch, seq, optim bits)
RUNS = {
    "full": dict(shape="7b", train=TRAIN_FULL, train_compiled=TRAIN_FULL, train_offload=[(4, 512, 32)],
                 warmup=2, steps=5, dequant=(11008, 4096), linear_tokens=2048, budget_s=330.0,
                 context=dict(step=1024, max_len=131072, cap_bytes=24 * GiB)),
    "tiny": dict(shape="tiny", train=[(2, 32, 32), (2, 32, 8), (1, 64, 32)], train_compiled=[],
                 train_offload=[(2, 32, 32)], warmup=1, steps=2, dequant=(64, 176), linear_tokens=32, budget_s=None,
                 context=dict(step=16, max_len=128, cap_bytes=24 * GiB)),
}
# Cheap and most wanted first; torch.compile (tens of seconds of compiling) last, so a time limit cuts it first.
SECTIONS = ("estimate", "dequant", "optim", "train", "baseline", "train_compiled", "dequant_compiled")
EXTRA_SECTIONS = ("context",)  # only when named in --only
# each section's share of --budget-s; time a section leaves unused goes to the next ones
SHARES = dict(estimate=0.0, dequant=0.05, optim=0.09, train=0.26, baseline=0.22, train_compiled=0.31,
              dequant_compiled=0.07, context=1.0)
DECODER_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                   ("mlp", ("gate_proj", "up_proj", "down_proj")))
BNB_OPTIMIZERS = (("adamw32", "AdamW32bit"), ("adamw8", "AdamW8bit"), ("paged_adamw32", "PagedAdamW32bit"),
                  ("paged_adamw8", "PagedAdamW8bit"))


# ----------------------------------------------------------------------------------------------------------
# time, memory, profiles

def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Times a callable: CUDA events on the GPU (device work is asynchronous), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        """Milliseconds one call of fn takes."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = now()
        fn()
        return (now() - t0) * 1e3

    def median(self, fn, warmup: int, reps: int, budget_s: float = float("inf")) -> tuple[float, list[float]]:
        """Median ms of up to `reps` calls after `warmup`; at least 3, fewer than `reps` once budget_s is spent."""
        for _ in range(warmup):
            fn()
        end, times = now() + budget_s, []
        while len(times) < reps and (len(times) < 3 or now() < end):
            times.append(self(fn))
        return statistics.median(times), times


def managed_bytes() -> int:
    """CUDA managed memory our paged optimizer holds right now (0 on the CPU)."""
    return paged_adamw.managed_bytes()


def bnb_managed_bytes() -> int:
    """bitsandbytes' paged buffers: it appends every one to a global list and never frees them."""
    import bitsandbytes.functional as bnbf
    return sum(t.numel() * t.element_size() for t in bnbf.GlobalPageManager.get_instance().paged_tensors)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def peak_allocated(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def kernel_summary(events, cuda: bool, top: int = 8) -> dict:
    """Kernel time of one profiled step from torch.profiler events (FunctionEvent-like: name, device_type,
    time_range, cpu_children). On CUDA the kernels are the events the GPU ran (kernels, memcpy, memset); on
    the CPU, the leaf operators (those that call no other), the nearest thing to a kernel there."""
    from torch.autograd import DeviceType
    per_name, cpu_ops = {}, 0
    for e in events:
        if e.device_type == DeviceType.CPU:
            cpu_ops += 1
        is_kernel = e.device_type == DeviceType.CUDA if cuda else (e.device_type == DeviceType.CPU and not e.cpu_children)
        if is_kernel:
            calls, us = per_name.get(e.name, (0, 0.0))
            per_name[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    total_us = sum(us for _, us in per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(kernel_ms=total_us / 1e3, kernel_launches=sum(c for c, _ in per_name.values()), cpu_ops=cpu_ops,
                top_kernels=[dict(name=n[:120], calls=c, ms=us / 1e3, share=us / total_us if total_us else 0.0)
                             for n, (c, us) in ranked])


def profile_step(step, device: torch.device) -> dict:
    """torch.profiler over one call of step: its kernels (kernel_summary) and the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = now()
    with profile(activities=activities) as prof:
        step()
        sync(device)
    wall_ms = (now() - t0) * 1e3
    return dict(profiled_wall_ms=wall_ms, **kernel_summary(prof.events(), device.type == "cuda"))


def optional_import(name: str):
    """(module, None), or (None, why): "not installed" when the package is absent, else the import error."""
    try:
        return __import__(name), None
    except ImportError as e:
        if e.name == name:
            return None, "not installed"
        return None, f"unavailable: {type(e).__name__}: {e}"[:300]
    except Exception as e:  # noqa: BLE001 - bitsandbytes can fail to load its native library in many ways
        return None, f"unavailable: {type(e).__name__}: {e}"[:300]


def import_baseline():
    """(bnb, peft, transformers) or (None, why); bitsandbytes is checked first, it is the one most often absent."""
    mods = []
    for name in ("bitsandbytes", "peft", "transformers"):
        mod, why = optional_import(name)
        if mod is None:
            return None, f"{name} {why}"
        mods.append(mod)
    return tuple(mods), None


def is_oom(e: BaseException) -> bool:
    """An allocation that did not fit: the caching allocator's error, or a library's failed workspace."""
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


# ----------------------------------------------------------------------------------------------------------
# our model

def fill_meta_parameters(model, device):
    """Give every parameter still on the meta device random bf16 values (norm weights: ones), frozen."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                data = (torch.ones(p.shape, device=device, dtype=torch.bfloat16) if p.dim() == 1 else
                        torch.randn(p.shape, device=device, dtype=torch.bfloat16) * INIT_STD)
                module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)


def build_model(shape: dict, device: torch.device, seed: int = 0) -> "llama.Llama":
    """A Llama with random NF4 + DQ decoder linears quantized on `device`, one weight at a time: built on the
    meta device, each linear's bf16 weight drawn, quantized and dropped before the next is drawn."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.from_dict({**COMMON, **shape}))
    for layer in model.model.layers:
        for block, names in DECODER_LINEARS:
            parent = getattr(layer, block)
            for name in names:
                old = getattr(parent, name)
                w = torch.randn(old.out_features, old.in_features, device=device, dtype=torch.bfloat16) * INIT_STD
                setattr(parent, name, nf4.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16))
                del w
    fill_meta_parameters(model, device)  # embeddings and lm_head (random bf16), norm weights (ones)
    model.inv_freq = model.inv_freq.to(device)  # llama.py computes the rope table on the CPU, even under meta
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.device.type != device.type]
    if leftover:
        raise RuntimeError(f"tensors not on {device} after building: {leftover[:5]}")
    return model


def lora_model(shape: dict, device: torch.device):
    model = build_model(shape, device)
    model.gradient_checkpointing = True
    n_trainable = lora.add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                targets=LORA["targets"])
    model.to(device)  # the adapters, if add_lora created them on the CPU
    model.train()
    return model, n_trainable


def set_compile(model, on: bool) -> None:
    """What train.py --compile auto (on, on CUDA) or off does to the model. train.py's own hook when it has
    one (train.apply_compile(model, mode)), else what train.load_model does today: the switch on every
    4-bit linear."""
    hook = getattr(train, "apply_compile", None)
    if hook is not None:
        hook(model, "on" if on else "off")
        return
    for module in model.modules():
        if isinstance(module, nf4.Linear4bit):
            module.compile = on


def lm_batch(ids: torch.Tensor) -> dict:
    """A train.py batch of random tokens: every next token is a target (no padding, nothing masked)."""
    targets = torch.full_like(ids, train.IGNORE)  # (B, T)
    targets[:, :-1] = ids[:, 1:]  # targets[t] = the token at t+1, as train.collate builds them
    return {"input_ids": ids, "targets": targets}


class Step:
    """One optimizer step as train.py's loop runs it (one micro-batch): forward + loss, backward, clip the
    gradient norm to train.py's max_grad_norm, optimizer step, zero grads. Keeps the last loss."""

    def __init__(self, forward_loss, opt, params):
        self.forward_loss, self.opt, self.params, self.last_loss = forward_loss, opt, params, float("nan")

    def __call__(self):
        loss = self.forward_loss()
        loss.backward()
        if DEFAULTS.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, DEFAULTS.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


def our_step(model, params, ids, bits):
    """train.make_optimizer with --optim paged_adamw_{32,8}bit, and train.lm_loss_sum's loss."""
    opt = paged_adamw.PagedAdamW(params, lr=DEFAULTS.lr, weight_decay=DEFAULTS.weight_decay, optim_bits=bits,
                                 paged=True)
    batch = lm_batch(ids)

    def loss():
        loss_sum, n_targets = train.lm_loss_sum(model, batch)
        return loss_sum / n_targets
    return Step(loss, opt, params), opt


def buffer_bytes(module) -> int:
    """Bytes of a module's own buffers and frozen non-bias parameters (its quantized weight and constants)."""
    own = list(module._buffers.values()) + [p for n, p in module._parameters.items() if n != "bias"]
    return sum(t.numel() * t.element_size() for t in own if t is not None)


# ----------------------------------------------------------------------------------------------------------
# training configs

def time_steps(step, device, warmup: int, steps: int, deadline: float) -> dict:
    """Median of up to `steps` timed steps after `warmup` (first steps: optimizer state, cuBLAS handles,
    torch.compile); at least 2, fewer than `steps` when they would run past `deadline`."""
    timer = Timer(device)
    t0 = now()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = now() - t0
    times = [timer(step)]
    fit = int(min(deadline - now(), 1e6) * 1e3 / max(times[0], 1e-3)) - 2  # two steps' time kept for the profile
    times += [timer(step) for _ in range(max(1, min(steps - 1, fit)))]
    return dict(step_ms_median=statistics.median(times), step_ms=times, warmup_s=warmup_s)


def train_config(make_step, managed, device, batch, seq, bits, warmup, steps, vocab, deadline, **record) -> dict:
    """Time one (batch, seq, optim_bits) configuration, memory from a clean peak, then profile one step."""
    reset_memory(device)
    managed_before = managed()
    before = allocated(device)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    step, opt = make_step(ids, bits)
    res = time_steps(step, device, warmup, steps, deadline)
    res.update(batch=batch, seq_len=seq, optim_bits=bits, **record,
               tokens_per_s=batch * seq / (res["step_ms_median"] / 1e3),
               allocated_before_bytes=before, peak_allocated_bytes=peak_allocated(device),
               managed_bytes=managed() - managed_before, loss=float(step.last_loss),
               optimizer_state_bytes=sum(t.numel() * t.element_size() for state in opt.state.values()
                                         for t in state.values() if torch.is_tensor(t) and t.dim() > 0))
    res["peak_total_bytes"] = res["peak_allocated_bytes"] + res["managed_bytes"]
    if deadline - now() > 3 * res["step_ms_median"] / 1e3:  # the profiler slows the host: ~2-3 steps' time
        try:
            prof = profile_step(step, device)
            prof["busy_fraction"] = prof["kernel_ms"] / res["step_ms_median"]
            res["profile"] = prof
        except Exception as e:  # noqa: BLE001 - a profiler failure (CUPTI) must not lose the timings
            res["profile"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    else:
        res["profile"] = dict(skipped="time budget")
    del step, opt
    return res


def run_configs(configs, make_step, managed, device, run, deadline, params, progress, out, **record):
    """Each config in its share of the time left; an OOM is recorded as that config's result."""
    for k, (batch, seq, bits) in enumerate(configs):
        row = dict(batch=batch, seq_len=seq, optim_bits=bits, **record)
        left = deadline - now()
        if left <= 0:
            out["configs"].append(dict(row, skipped="time budget"))
            continue
        try:
            out["configs"].append(train_config(make_step, managed, device, batch, seq, bits, run["warmup"],
                                               run["steps"], run["vocab"], now() + left / (len(configs) - k),
                                               **record))
        except Exception as e:  # noqa: BLE001 - an OOM or a failing config: record it, run the next
            if not is_oom(e):
                traceback.print_exc()
            out["configs"].append(dict(row, error=f"{'OOM' if is_oom(e) else type(e).__name__}: {e}"[:300]))
        for p in params:  # a step cut short leaves its gradients behind
            p.grad = None
        progress(out)


def section_train(run: dict, device: torch.device, progress, deadline: float, compiled: bool = False) -> dict:
    """Our QLoRA step at each training config, --compile off (or auto: `compiled`), then offloaded activations."""
    shape = SHAPES[run["shape"]]
    reset_memory(device)
    t0 = now()
    model, n_trainable = lora_model(shape, device)
    set_compile(model, compiled)
    sync(device)
    # build_peak_bytes: the quantized model plus one bf16 weight in flight, never the bf16 model (13.5 GB at 7B)
    out = dict(build_s=now() - t0, trainable_params=n_trainable, model_bytes=allocated(device),
               build_peak_bytes=peak_allocated(device),
               quantized_linear_bytes=sum(buffer_bytes(m) for m in model.modules() if isinstance(m, nf4.Linear4bit)),
               quantized_linear_bytes_formula=sum(quantized_linear_bytes(o, n) for o, n in linear_shapes(shape)),
               configs=[])
    params = [p for p in model.parameters() if p.requires_grad]
    make_step = lambda ids, bits: our_step(model, params, ids, bits)  # noqa: E731
    offload = run["train_offload"] if not compiled else []
    n_all = len(run["train_compiled" if compiled else "train"]) + len(offload)
    main_deadline = now() + (deadline - now()) * (n_all - len(offload)) / max(1, n_all)
    run_configs(run["train_compiled" if compiled else "train"], make_step, managed_bytes, device, run,
                main_deadline, params, progress, out, compiled=compiled, offload=False)
    if offload and hasattr(model, "offload_activations"):
        model.offload_activations = True
        run_configs(offload, make_step, managed_bytes, device, run, deadline, params, progress, out,
                    compiled=False, offload=True)
        model.offload_activations = False
    elif offload:
        out["offload"] = "unavailable: llama.Llama has no offload_activations attribute in this checkout"
    del model, params, make_step
    reset_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# transformers + PEFT + bitsandbytes

def bnb_linear(bnb, w: torch.Tensor):
    """bnb.nn.Linear4bit (nf4, double quant, bf16 compute) holding `w`, quantized on w's device by bnb itself
    (Params4bit.to quantizes a weight that is not yet quantized: what transformers does when it loads a
    checkpoint with BitsAndBytesConfig(nf4, double quant))."""
    out_f, in_f = w.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")
    layer._parameters["weight"] = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                                    quant_type="nf4", module=layer).to(w.device)
    return layer


def build_hf_model(shape: dict, device: torch.device, bnb, transformers):
    """transformers' Llama on the meta device, each decoder linear a bnb Linear4bit of a random weight."""
    config = transformers.LlamaConfig(**{k: v for k, v in COMMON.items() if k != "torch_dtype"}, **shape,
                                      initializer_range=INIT_STD)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    torch.manual_seed(0)
    for layer in model.model.layers:
        for block, names in DECODER_LINEARS:
            parent = getattr(layer, block)
            for name in names:
                old = getattr(parent, name)
                w = torch.randn(old.out_features, old.in_features, device=device, dtype=torch.bfloat16) * INIT_STD
                setattr(parent, name, bnb_linear(bnb, w))
                del w
    fill_meta_parameters(model, device)
    rotary = model.model.rotary_emb  # non-persistent inv_freq: rebuilt from the config on the device
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    # the flag transformers/PEFT read to know the base is 4-bit (set by from_pretrained with a quantization config)
    model.is_loaded_in_4bit = True
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"HF baseline: tensors still on meta: {leftover[:5]}")
    return model


def hf_lora_model(shape, device, deps):
    """The way most QLoRA users train: transformers Llama + bnb 4-bit, its gradient checkpointing, PEFT LoRA
    r 64 all-linear."""
    bnb, peft, transformers = deps
    model = build_hf_model(shape, device, bnb, transformers)
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    elsewhere = [n for n, p in model.named_parameters() if p.requires_grad and p.device.type != device.type]
    if elsewhere:  # PEFT puts adapters on the base layer's device; say so if a version does not
        raise RuntimeError(f"HF baseline: adapters not on {device}: {elsewhere[:3]}")
    return model, params


def hf_step(model, params, ids, bits, bnb, device):
    if device.type == "cuda":
        opt = (bnb.optim.PagedAdamW32bit if bits == 32 else bnb.optim.PagedAdamW8bit)(params, lr=DEFAULTS.lr)
    else:  # bnb's paged buffers need CUDA; the CPU run only exercises this code path
        opt = torch.optim.AdamW(params, lr=DEFAULTS.lr)
    return Step(lambda: model(input_ids=ids, labels=ids).loss, opt, params), opt


def section_baseline(run: dict, device: torch.device, progress, deadline: float) -> dict:
    deps, why = import_baseline()
    if deps is None:
        return dict(skipped=why)
    shape = SHAPES[run["shape"]]
    reset_memory(device)
    t0 = now()
    model, params = hf_lora_model(shape, device, deps)
    sync(device)
    bnb, peft, transformers = deps
    out = dict(build_s=now() - t0, trainable_params=sum(p.numel() for p in params),
               model_bytes=allocated(device), build_peak_bytes=peak_allocated(device), configs=[],
               versions=dict(transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bnb.__version__))
    managed = bnb_managed_bytes if device.type == "cuda" else (lambda: 0)
    run_configs(run["train"], lambda ids, bits: hf_step(model, params, ids, bits, bnb, device), managed, device,
                run, deadline, params, progress, out)
    del model, params
    reset_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# single ops: dequantize, 4-bit linear forward

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
# optimizers on the 7B LoRA parameters

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


def time_optimizer(make, params, timer, budget_s) -> dict:
    opt = make(params)
    ms, times = timer.median(opt.step, 2, 20, budget_s)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    del opt
    gc.collect()
    return dict(ms=ms, reps=len(times), state_bytes_per_param=state / sum(p.numel() for p in params))


def ours_plain_vs_paged(params, bits, timer, per) -> dict:
    """PagedAdamW with paged=False and True alternating, twice, so clock drift hits both alike."""
    times, out = {False: [], True: []}, {}
    for _ in range(2):
        for paged in (False, True):
            def make(ps, paged=paged):
                return paged_adamw.PagedAdamW(ps, lr=DEFAULTS.lr, optim_bits=bits, paged=paged)
            times[paged].append(time_optimizer(make, params, timer, per / 2)["ms"])
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
            params, timer, per)
    except Exception as e:  # noqa: BLE001
        out["torch_adamw"] = dict(error=f"{type(e).__name__}: {e}"[:200])
    for bits in (32, 8):
        try:
            out.update(ours_plain_vs_paged(params, bits, timer, per))
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
                                                      params, timer, per)
        except Exception as e:  # noqa: BLE001 - paged optimizers need CUDA; a CPU build says so here
            out["bitsandbytes"][key] = dict(error=f"{type(e).__name__}: {e}"[:200])
    del params
    reset_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# long context under a memory cap

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


def train_lines(results: dict) -> list[str]:
    est = results.get("estimate", {})
    lines = ["top kernels (one profiled step, share of kernel time):"]
    for impl, key in (("minqlora", "train"), ("hf+bnb", "baseline"), ("mq+compile", "train_compiled")):
        for c in results.get(key, {}).get("configs", [])[:1]:  # the first config (4x512, AdamW 32)
            top = c.get("profile", {}).get("top_kernels", [])
            lines.append(f"  {impl} {c['batch']}x{c['seq_len']}: " + "; ".join(
                f"{k['share'] * 100:.0f}% {k['name'][:48]} x{k['calls']}" for k in top[:3]))
    lines.append(f"{'impl':12} {'batch':7} {'optim':>5} {'tok/s':>8} {'step ms':>8} {'busy':>5} {'launch':>7} "
                 f"{'peak GB':>8} {'managed':>7} {'estimate':>8}")
    for impl, key in (("minqlora", "train"), ("hf+bnb", "baseline"), ("mq+compile", "train_compiled")):
        sec = results.get(key, {})
        if not sec.get("configs"):
            lines.append(f"{impl:12} {sec.get('skipped') or sec.get('error') or 'not run'}"[:160])
        for c in sec.get("configs", []):
            name = impl + ("+offload" if c.get("offload") else "")
            bt = f"{c['batch']}x{c['seq_len']}"
            if "tokens_per_s" not in c:
                lines.append(f"{name:12} {bt:7} {c['optim_bits']:>5} {(c.get('error') or c.get('skipped'))[:90]}")
                continue
            e = est.get(f"{results['shape']}_{bt}_adamw{c['optim_bits']}") if key != "baseline" else None
            p = c.get("profile", {})
            busy = f"{100 * p['busy_fraction']:.0f}%" if "busy_fraction" in p else "-"
            lines.append(f"{name:12} {bt:7} {c['optim_bits']:>5} {c['tokens_per_s']:8.0f} {c['step_ms_median']:8.1f} "
                         f"{busy:>5} {p.get('kernel_launches', '-'):>7} {c['peak_total_bytes'] / GB:8.2f} "
                         f"{c['managed_bytes'] / GB:7.2f} {e['total_estimate'] / GB if e else float('nan'):8.2f}")
    return lines


def ratio_lines(results: dict) -> list[str]:
    def rows(key):
        return {(c["batch"], c["seq_len"], c["optim_bits"]): c for c in results.get(key, {}).get("configs", [])
                if "tokens_per_s" in c and not c.get("offload")}
    ours, theirs, comp = rows("train"), rows("baseline"), rows("train_compiled")
    lines = []
    for k, t in theirs.items():
        o, c = ours.get(k), comp.get(k)
        speed = "; ".join(f"{label} {x['tokens_per_s'] / t['tokens_per_s']:.2f}x" for label, x in
                          (("eager", o), ("compiled", c)) if x)
        mem = f", memory {o['peak_total_bytes'] / t['peak_total_bytes']:.2f}x" if o and t["peak_total_bytes"] else ""
        lines.append(f"  vs hf+bnb {k[0]}x{k[1]} adamw{k[2]}: speed {speed or '-'} [targets 1.0 / 2.0]{mem} [<= 1.0]")
    return lines


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
    lines.append(f"  longest common length {c.get('longest_common')}; '+': bisection cut by the time budget")
    return lines


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"== bench/gpu.py: {env['device_name']}, torch {env['torch']}, shape {results['shape']}"
             f"{' (tiny CPU dry run: timings mean nothing)' if results['shape'] == 'tiny' else ''} =="]
    lines += estimate_table(results.get("estimate", {}))
    lines += ops_lines(results) + optim_lines(results) + context_lines(results)
    if any(k in results for k in ("train", "baseline", "train_compiled")):
        lines += train_lines(results) + ratio_lines(results)
    if results.get("errors"):
        lines.append(f"ERRORS in sections: {', '.join(results['errors'])} (tracebacks in the JSON)")
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    """Atomic: a temp file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, device=str(device), python=sys.version.split()[0])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   total_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
    else:
        env.update(device_name="CPU", threads=torch.get_num_threads())
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes on whatever device (automatic without CUDA): the CI smoke run")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "gpu.json",
                    help="where the full numbers go (default bench/gpu.json), rewritten after every section")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections, run in this order: {','.join(SECTIONS + EXTRA_SECTIONS)} "
                         f"(default: all but {','.join(EXTRA_SECTIONS)})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per training config (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; tiny 1)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run, shared among the sections (default 330 on a GPU, none tiny)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS + EXTRA_SECTIONS)
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS + EXTRA_SECTIONS)}")
    return args


def section_deadlines(names, budget_s, t0) -> dict:
    """Absolute deadline per section: its cumulative share of the budget (time a section leaves unused goes to
    the ones after it). Without a budget, none."""
    if budget_s is None:
        return {n: float("inf") for n in names}
    total = sum(SHARES[n] for n in names) or 1.0
    out, acc = {}, 0.0
    for n in names:
        acc += SHARES[n] / total
        out[n] = t0 + budget_s * acc
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    if device.type == "cpu":
        # tiny matrices gain nothing from threads, and spinning OpenMP workers cost several times the work
        # on a busy 2-core CI machine
        torch.set_num_threads(1)
    run = dict(RUNS["tiny" if tiny else "full"])
    run["warmup"] = run["warmup"] if args.warmup is None else args.warmup
    run["steps"] = run["steps"] if args.steps is None else args.steps
    run["vocab"] = SHAPES[run["shape"]]["vocab_size"]
    budget = args.budget_s if args.budget_s is not None else run["budget_s"]
    results = dict(shape=run["shape"], model=dict(SHAPES[run["shape"]]), lora=LORA, budget_s=budget,
                   run={k: run[k] for k in ("train", "train_compiled", "train_offload", "warmup", "steps")},
                   env=environment(device), errors={})

    def report(key, value):  # every section, and every training config as it finishes
        results[key] = value
        write_json(args.json, results)

    cuda = device.type == "cuda"
    sections = {
        "estimate": lambda progress, end: dict(estimate_rows(LORA["r"], LORA["dropout"], tiny=tiny),
                                               note="computed, not measured (bench/gpu_memory.py)"),
        "dequant": lambda progress, end: section_dequant(run, device, compiled=False),
        "optim": lambda progress, end: section_optim(run, device, end),
        "train": lambda progress, end: section_train(run, device, progress, end),
        "baseline": lambda progress, end: section_baseline(run, device, progress, end),
        "train_compiled": lambda progress, end: (
            section_train(run, device, progress, end, compiled=True) if cuda else
            dict(skipped="CUDA only (--compile auto applies on CUDA)")),
        "dequant_compiled": lambda progress, end: (
            section_dequant(run, device, compiled=True) if cuda else
            dict(skipped="CUDA only (a CPU inductor build outlasts the smoke run)")),
        "context": lambda progress, end: section_context(run, device, progress, end),
    }
    names = [s for s in SECTIONS + EXTRA_SECTIONS if s in args.only.split(",")]
    deadlines = section_deadlines(names, budget, now())
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        t0 = now()
        try:
            res = sections[name](lambda value, key=name: report(key, value), deadlines[name])
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' numbers
            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}"[:500])
            results["errors"][name] = traceback.format_exc()[-3000:]
            reset_memory(device)
        res["section_s"] = now() - t0
        report(name, res)
        print(f"[bench] {name} done in {res['section_s']:.1f} s", flush=True)
    print(table(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
