"""GPU benchmark: does QLoRA on a Llama-2-7B fit on one GPU, how fast does it train, and what does it cost?

One script, sized for a single device call of a few minutes (issue 9). It measures, on a Llama-2-7B-shaped
model whose random weights are quantized straight on the GPU one linear at a time (no download; the full
bf16 model never exists in memory):

  train      one QLoRA training step as train.py runs it (NF4 + double-quant base, LoRA r 64 alpha 16
             dropout 0.1 on every linear but lm_head, per-layer gradient checkpointing, train.lm_loss_sum's
             chunked cross-entropy over model.hidden_states + lm_head in bf16, gradient clipping,
             PagedAdamW 32-bit and 8-bit) at batch 4 x 512 and 1 x 2048 (and 1 x 512, where issue 9 puts
             the 7B floor), and once more at 4 x 512 with nf4.Linear4bit.compile on: tokens/s = B*T /
             median step time (CUDA events, steps after warm-up), peak torch.cuda.max_memory_allocated
             plus the CUDA managed memory the paged optimizer holds (the caching allocator does not see it).
  dequant    NF4 dequantize of a 4096 x 11008 weight to bf16, eager and torch.compile, in GB/s of bytes
             read + written, against a device-to-device copy of the bf16 weight (the achievable ceiling).
  paging     PagedAdamW step time with paged=True vs paged=False on the 7B LoRA parameters when nothing
             is paged out (target: within 5%; prefetching resident pages should cost ~nothing).
  baseline   the same step through transformers + PEFT + bitsandbytes (nf4 + double quant, LoRA r 64
             all-linear, gradient checkpointing, bnb PagedAdamW 32/8-bit), when they are importable.
  estimate   memory needed for 7B and 13B at the same settings, computed (not measured): the quantized
             base from the real NF4 + DQ size of every linear shape, bf16 embeddings/norms/lm_head, LoRA
             parameters + gradients + AdamW state, and an activation estimate for checkpointed layers.

Every section writes its numbers into the JSON (--json) as soon as it finishes, so a run cut short by a
time limit keeps what it measured; a failing section records its error and the others still run.
The short table is printed last. Without CUDA (or with --tiny) the same code runs on a tiny shape on the
CPU, which is the CI smoke test (tests/test_bench_gpu.py); its timings mean nothing.

Arithmetic behind the targets (QLoRA arXiv:2305.14314 §3-4): a 7B base in NF4 + DQ costs 4.127 bits per
linear parameter (0.5 byte packed + 1/64 byte 8-bit absmax + 4/(64*256) byte nested absmax) = 3.3 GB for
6.5e9 linear parameters, plus 0.5 GB of bf16 embeddings and lm_head; a training step costs about 6 N T
FLOPs (forward, recomputed forward, input-gradient backward: the frozen base gets no weight gradient).

Usage:  python bench/gpu.py [--tiny] [--json bench/gpu.json] [--only train,dequant,...]
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
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llama  # noqa: E402  (after the sys.path insert: the concept files live in the repo root)
import lora  # noqa: E402
import nf4  # noqa: E402
import paged_adamw  # noqa: E402
import train  # noqa: E402  (its loss, batch layout and defaults: the step measured is the step it runs)

GB = 1e9

# Model shapes (HF config.json names). Llama-2 has no GQA (kv heads = heads) and untied embeddings.
SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=176, vocab_size=512),
}
COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")

# train.py's defaults are the QLoRA recipe (§4, Appendix B: r 64, alpha 16, dropout 0.1, every linear layer
# but lm_head, max grad norm 0.3); the bench reads them rather than restating them.
DEFAULTS = train.TrainConfig()
LORA = dict(r=DEFAULTS.lora_r, alpha=DEFAULTS.lora_alpha, dropout=DEFAULTS.lora_dropout, targets=DEFAULTS.lora_targets)
INIT_STD = 0.02  # HF's initializer_range; random weights of this size keep activations finite in bf16
# Training configs: (batch, seq_len, optim_bits). Section train_compiled runs its own with nf4.Linear4bit.compile
# on (the dequantize fused by torch.compile, CUDA only), to decide whether train.py should turn it on.
RUNS = {
    "full": dict(shape="7b", train=[(4, 512, 32), (4, 512, 8), (1, 2048, 32), (1, 2048, 8), (1, 512, 32)],
                 train_compiled=[(4, 512, 32)], warmup=2, steps=5, dequant=(4096, 11008), paging_steps=(3, 20)),
    "tiny": dict(shape="tiny", train=[(2, 32, 32), (2, 32, 8), (1, 64, 32)], train_compiled=[],
                 warmup=1, steps=2, dequant=(64, 176), paging_steps=(1, 2)),
}
# Cheap and most wanted first; torch.compile (tens of seconds of compiling) last, so a time limit cuts it first.
SECTIONS = ("estimate", "dequant", "train", "paging", "baseline", "train_compiled", "dequant_compiled")
DECODER_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                   ("mlp", ("gate_proj", "up_proj", "down_proj")))


# ----------------------------------------------------------------------------------------------------------
# timing and memory

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
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn, warmup: int, reps: int) -> tuple[float, list[float]]:
        for _ in range(warmup):
            fn()
        times = [self(fn) for _ in range(reps)]
        return statistics.median(times), times


def fill_meta_parameters(model, device):
    """Give every parameter still on the meta device random bf16 values (norm weights: ones), frozen."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                data = (torch.ones(p.shape, device=device, dtype=torch.bfloat16) if p.dim() == 1 else
                        torch.randn(p.shape, device=device, dtype=torch.bfloat16) * INIT_STD)
                module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)


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


# ----------------------------------------------------------------------------------------------------------
# memory estimate (no GPU needed)

def quantized_linear_bytes(out_features: int, in_features: int) -> int:
    """Device bytes of one NF4 + double-quant linear weight as nf4.Linear4bit holds it (blocksize 64):
    packed 4-bit pairs + an 8-bit absmax per 64 weights + a float32 nested absmax per 256 absmax + the
    float32 offset. (A checkpoint also stores the two code books, 16 and 256 float32, per module; the
    layer in memory does not.) The bench checks this count against the built model's real buffers."""
    n = out_features * in_features
    nblocks = -(-n // 64)
    return (n + 1) // 2 + nblocks + 4 * -(-nblocks // 256) + 4


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of every decoder linear: the LoRA targets and the quantized weights."""
    c, i = shape["hidden_size"], shape["intermediate_size"]
    d = c // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    per_layer = [(c, c), (kv, c), (kv, c), (c, c), (i, c), (i, c), (c, i)]  # q k v o gate up down
    return per_layer * shape["num_hidden_layers"]


def memory_estimate(shape: dict, batch: int, seq: int, optim_bits: int, r: int = LORA["r"],
                    dropout: float = LORA["dropout"]) -> dict:
    """Bytes a QLoRA step needs, by part. Base and adapter/optimizer bytes are exact counts of what the
    code allocates; the activation bytes are an estimate (a count of the tensors autograd keeps per token,
    listed below), so their sum is an estimate too."""
    c, i, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    shapes = linear_shapes(shape)
    base_4bit = sum(quantized_linear_bytes(o, n) for o, n in shapes)
    base_bf16 = 2 * (2 * v * c + (2 * L + 1) * c)  # embed_tokens + lm_head + norms
    lora_params = sum(r * (o + n) for o, n in shapes)
    # fp32 adapters and their fp32 gradients; AdamW state: two fp32 moments, or two uint8 moments plus a
    # float32 absmax per 256 values for tensors of >= 4096 elements (all of them at r 64)
    if optim_bits == 32:
        state = 8 * lora_params
    else:
        state = sum(2 * r * n + 2 * 4 * -(-(r * n) // 256) + 2 * r * o + 2 * 4 * -(-(r * o) // 256) for o, n in shapes)
    adapters = 4 * lora_params * 2 + state
    # Activations per token (bytes), the estimate:
    #  - checkpoints: one bf16 residual [C] per layer, kept for the whole backward
    #  - one layer recomputed during its backward: RMSNorm fp32 input + bf16 output (6C, twice), q k v (6C),
    #    rotated q k (4C), attention output (2C), residual outputs (4C), gate/up/silu/product (8I), and per
    #    LoRA target the bf16 dropout output + its bool mask (3 bytes per input feature) and the bf16 rank-r
    #    intermediate (lora.py runs the adapter matmuls in the activations' dtype)
    #  - gradients in flight through that layer: about its largest bf16 tensors (two [I] and two [C])
    #  - the loss (train.LMHeadCrossEntropy): final hidden state + the gathered rows (bf16) and the fp32
    #    dL/dh it computes in forward and keeps, plus one chunk of fp32 logits and their bf16 softmax
    per_in = 3 if dropout > 0 else 0  # without dropout the adapter reuses the base's saved input
    lora_in = sum(per_in * n + 2 * r for _, n in shapes[:7])
    layer = 2 * 6 * c + 6 * c + 4 * c + 2 * c + 4 * c + 8 * i + lora_in
    grads = 2 * (2 * i + 2 * c)
    tokens = batch * seq
    chunk = max(64, (1 << 25) // v)  # train.lm_loss_sum's chunk rows
    activations = tokens * (2 * c * L + layer + grads + 4 * c + 4 * c) + min(chunk, tokens) * v * 6
    return dict(base_4bit=base_4bit, base_bf16=base_bf16, lora_params=lora_params, optimizer_state=state,
                adapters_and_optimizer=adapters,
                activations_estimate=activations, total_estimate=base_4bit + base_bf16 + adapters + activations,
                bits_per_linear_param=8 * base_4bit / sum(o * n for o, n in shapes))


def section_estimate(run: dict) -> dict:
    out = {"note": "computed, not measured: base and adapter/optimizer bytes are exact counts, "
                   "activations an estimate (formula in bench/gpu.py memory_estimate)"}
    for name in ("7b", "13b"):
        for batch, seq in ((1, 512), (4, 512), (1, 2048)):
            for bits in (32, 8):
                out[f"{name}_{batch}x{seq}_adamw{bits}"] = memory_estimate(SHAPES[name], batch, seq, bits)
    if run["shape"] == "tiny":  # to check the exact parts against what the tiny run really allocates
        for bits in (32, 8):
            out[f"tiny_2x32_adamw{bits}"] = memory_estimate(SHAPES["tiny"], 2, 32, bits)
    return out


# ----------------------------------------------------------------------------------------------------------
# our model

def llama_config(shape: dict) -> "llama.LlamaConfig":
    return llama.LlamaConfig.from_dict({**COMMON, **shape})


def build_model(shape: dict, device: torch.device, seed: int = 0) -> "llama.Llama":
    """A Llama with random NF4 + DQ decoder linears quantized on `device`, one weight at a time.

    Built on the meta device (no memory), then each linear's random bf16 weight is drawn on the device,
    quantized and dropped before the next is drawn: the peak is the quantized model plus one bf16 weight.
    """
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = llama.Llama(llama_config(shape))
    for layer in model.model.layers:
        for block, names in DECODER_LINEARS:
            parent = getattr(layer, block)
            for name in names:
                old = getattr(parent, name)
                w = torch.randn(old.out_features, old.in_features, device=device, dtype=torch.bfloat16) * INIT_STD
                setattr(parent, name, nf4.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16))
                del w
    # what is left on meta: embeddings and lm_head (random bf16), norm weights (ones)
    fill_meta_parameters(model, device)
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


def lm_batch(ids: torch.Tensor) -> dict:
    """A train.py batch of random tokens: every next token is a target (no padding, nothing masked)."""
    targets = torch.full_like(ids, train.IGNORE)  # (B, T)
    targets[:, :-1] = ids[:, 1:]  # targets[t] = the token at t+1, as train.collate builds them
    return {"input_ids": ids, "targets": targets}


def time_steps(step, device, warmup: int, steps: int) -> dict:
    timer = Timer(device)
    t0 = time.perf_counter()
    for _ in range(warmup):  # first steps: optimizer state allocation, cuBLAS handles, torch.compile
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = [timer(step) for _ in range(steps)]
    return dict(step_ms_median=statistics.median(times), step_ms=times, warmup_s=warmup_s)


def train_config(make_step, managed, device, batch, seq, bits, warmup, steps, vocab, **record) -> dict:
    """Time one (batch, seq, optim_bits) configuration; memory counted from a clean peak."""
    reset_memory(device)
    managed_before = managed()
    before = allocated(device)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    step, opt = make_step(ids, bits)
    res = time_steps(step, device, warmup, steps)
    res.update(batch=batch, seq_len=seq, optim_bits=bits, **record,
               tokens_per_s=batch * seq / (res["step_ms_median"] / 1e3),
               allocated_before_bytes=before, peak_allocated_bytes=peak_allocated(device),
               managed_bytes=managed() - managed_before, loss=float(step.last_loss),
               optimizer_state_bytes=sum(t.numel() * t.element_size() for state in opt.state.values()
                                         for t in state.values() if torch.is_tensor(t) and t.dim() > 0))
    res["peak_total_bytes"] = res["peak_allocated_bytes"] + res["managed_bytes"]
    del step, opt
    return res


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


def section_train(run: dict, device: torch.device, progress, compiled: bool = False) -> dict:
    """Our QLoRA step at each training config; with `compiled`, nf4.Linear4bit.compile on (CUDA only)."""
    shape = SHAPES[run["shape"]]
    reset_memory(device)
    t0 = time.perf_counter()
    model, n_trainable = lora_model(shape, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # build_peak_bytes: the quantized model plus one bf16 weight in flight, never the bf16 model (13.5 GB at 7B)
    out = dict(build_s=time.perf_counter() - t0, trainable_params=n_trainable, model_bytes=allocated(device),
               build_peak_bytes=peak_allocated(device),
               quantized_linear_bytes=sum(buffer_bytes(m) for m in model.modules() if isinstance(m, nf4.Linear4bit)),
               quantized_linear_bytes_formula=sum(quantized_linear_bytes(o, n) for o, n in linear_shapes(shape)),
               configs=[])
    params = [p for p in model.parameters() if p.requires_grad]

    def make_step(ids, bits):
        # train.make_optimizer with --optim paged_adamw_{32,8}bit
        opt = paged_adamw.PagedAdamW(params, lr=DEFAULTS.lr, weight_decay=DEFAULTS.weight_decay, optim_bits=bits,
                                     paged=True)
        batch = lm_batch(ids)

        def loss():
            loss_sum, n_targets = train.lm_loss_sum(model, batch)
            return loss_sum / n_targets
        return Step(loss, opt, params), opt

    for batch, seq, bits in run["train_compiled" if compiled else "train"]:
        nf4.Linear4bit.compile = compiled  # class-wide switch, read at every forward/backward
        try:
            out["configs"].append(train_config(make_step, managed_bytes, device, batch, seq, bits, run["warmup"],
                                               run["steps"], shape["vocab_size"], compiled=compiled))
        except torch.cuda.OutOfMemoryError as e:
            out["configs"].append(dict(batch=batch, seq_len=seq, optim_bits=bits, compiled=compiled,
                                       error=f"OOM: {e}"[:300]))
            for p in params:  # a step cut short leaves its gradients behind
                p.grad = None
        finally:
            nf4.Linear4bit.compile = False
        progress(out)
    del model, params
    reset_memory(device)
    return out


def buffer_bytes(module) -> int:
    """Bytes of a module's own buffers and frozen non-bias parameters (its quantized weight and constants)."""
    own = list(module._buffers.values()) + [p for n, p in module._parameters.items() if n != "bias"]
    return sum(t.numel() * t.element_size() for t in own if t is not None)


# ----------------------------------------------------------------------------------------------------------
# NF4 dequantize bandwidth

def section_dequant(run: dict, device: torch.device, compiled: bool) -> dict:
    out_f, in_f = run["dequant"]
    torch.manual_seed(0)
    lin = nf4.Linear4bit.from_weight(
        torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * INIT_STD, compute_dtype=torch.bfloat16)
    n = out_f * in_f
    moved = buffer_bytes(lin) + 2 * n  # read: packed weight + constants; written: bf16 weight
    reps = 50 if device.type == "cuda" else 3
    timer = Timer(device)
    res = dict(shape=[out_f, in_f], bytes_read_written=moved)
    if not compiled:
        src = torch.randn(n, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms, _ = timer.median(lambda: dst.copy_(src), 5, reps)
        res.update(copy_ms=ms, copy_bytes=4 * n, copy_GBps=4 * n / ms / 1e6)
        ms, _ = timer.median(lambda: lin.dequantize(torch.bfloat16), 5, reps)
        res.update(eager_ms=ms, eager_GBps=moved / ms / 1e6,
                   eager_fraction_of_copy=(moved / ms) / (4 * n / res["copy_ms"]))
        ref = lin.dequantize(torch.float32)
        res["eager_matches_fp32"] = bool(torch.equal(lin.dequantize(torch.bfloat16), ref.to(torch.bfloat16)))
        return res
    # nf4's own compiled path (Linear4bit.compile: the elementwise dequantize fused by torch.compile), the
    # one training uses when the switch is on; the double-quant absmax restore before it stays eager
    eager = lin.dequantize(torch.bfloat16)
    lin.compile = True
    t0 = time.perf_counter()
    got = lin.dequantize(torch.bfloat16)
    torch.cuda.synchronize()
    res["compile_s"] = time.perf_counter() - t0
    # the fused kernel must compute the same function: the same fp32 product, rounded once to bf16
    res["compiled_matches_eager"] = bool(torch.equal(got, eager))
    del got, eager
    ms, _ = timer.median(lambda: lin.dequantize(torch.bfloat16), 5, reps)
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms, _ = timer.median(lambda: dst.copy_(src), 5, reps)
    res.update(compiled_ms=ms, compiled_GBps=moved / ms / 1e6, copy_GBps=4 * n / copy_ms / 1e6,
               compiled_fraction_of_copy=(moved / ms) / (4 * n / copy_ms))
    return res


# ----------------------------------------------------------------------------------------------------------
# paged vs plain optimizer step

def section_paging(run: dict, device: torch.device) -> dict:
    """AdamW step time on the LoRA parameters of the model shape, paged vs plain, nothing paged out.

    The two variants alternate (plain, paged, plain, paged) so clock drift hits both alike.
    """
    shape = SHAPES[run["shape"]]
    r = LORA["r"]
    torch.manual_seed(0)
    params = []
    for o, n in linear_shapes(shape):
        for rows, cols in ((r, n), (o, r)):  # lora_A [r, in], lora_B [out, r]
            p = torch.nn.Parameter(torch.randn(rows, cols, device=device) * 0.01)
            p.grad = torch.randn_like(p) * 1e-3
            params.append(p)
    timer = Timer(device)
    out = dict(params=sum(p.numel() for p in params))
    for bits in (32, 8):
        times = {False: [], True: []}
        for _ in range(2):
            for paged in (False, True):
                opt = paged_adamw.PagedAdamW(params, lr=DEFAULTS.lr, optim_bits=bits, paged=paged)
                ms, all_ms = timer.median(opt.step, *run["paging_steps"])  # (warm-up, timed) steps
                times[paged] += all_ms
                if paged:
                    out[f"adamw{bits}_managed_bytes"] = managed_bytes()
                del opt
                gc.collect()
        plain, paged = statistics.median(times[False]), statistics.median(times[True])
        out.update({f"adamw{bits}_plain_ms": plain, f"adamw{bits}_paged_ms": paged,
                    f"adamw{bits}_paged_over_plain": paged / plain})
    return out


# ----------------------------------------------------------------------------------------------------------
# transformers + PEFT + bitsandbytes baseline

def section_baseline(run: dict, device: torch.device, progress) -> dict:
    """The same step the way most QLoRA users run it: transformers Llama with bitsandbytes Linear4bit
    (nf4, double quant, bf16 compute), PEFT LoRA r 64 all-linear, gradient checkpointing, bnb paged AdamW.

    Built without a download: the HF model on the meta device from a LlamaConfig, each decoder linear
    replaced by a bnb Linear4bit whose random bf16 weight is quantized on the device by bnb itself (what
    transformers does when it loads a checkpoint with BitsAndBytesConfig(nf4, double quant)).
    """
    try:
        import bitsandbytes as bnb
        import peft
        import transformers
    except Exception as e:  # noqa: BLE001 - any import failure means: no baseline on this machine
        return dict(skipped=f"transformers + peft + bitsandbytes not importable: {e!r}"[:300])
    shape = SHAPES[run["shape"]]
    reset_memory(device)
    t0 = time.perf_counter()
    model = build_hf_model(shape, device, bnb, transformers)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    params = [p for p in model.parameters() if p.requires_grad]
    elsewhere = [n for n, p in model.named_parameters() if p.requires_grad and p.device.type != device.type]
    if elsewhere:  # PEFT puts adapters on the base layer's device; say so if a version does not
        raise RuntimeError(f"HF baseline: adapters not on {device}: {elsewhere[:3]}")
    out = dict(build_s=time.perf_counter() - t0, trainable_params=sum(p.numel() for p in params),
               model_bytes=allocated(device), build_peak_bytes=peak_allocated(device), configs=[],
               versions=dict(transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bnb.__version__))

    def make_step(ids, bits):
        if device.type == "cuda":
            opt = (bnb.optim.PagedAdamW32bit if bits == 32 else bnb.optim.PagedAdamW8bit)(params, lr=DEFAULTS.lr)
        else:  # bnb's paged buffers need CUDA; the CPU run only exercises this code path
            opt = torch.optim.AdamW(params, lr=DEFAULTS.lr)
        return Step(lambda: model(input_ids=ids, labels=ids).loss, opt, params), opt

    managed = bnb_managed_bytes if device.type == "cuda" else (lambda: 0)
    for batch, seq, bits in run["train"]:
        try:
            out["configs"].append(train_config(make_step, managed, device, batch, seq, bits,
                                               run["warmup"], run["steps"], shape["vocab_size"]))
        except torch.cuda.OutOfMemoryError as e:
            out["configs"].append(dict(batch=batch, seq_len=seq, optim_bits=bits, error=f"OOM: {e}"[:300]))
            for p in params:
                p.grad = None
        progress(out)
    del model, params
    reset_memory(device)
    return out


def build_hf_model(shape: dict, device: torch.device, bnb, transformers):
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
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4", device="meta")
                w = torch.randn(old.out_features, old.in_features, device=device, dtype=torch.bfloat16) * INIT_STD
                # Params4bit.to(device) quantizes (bnb's own kernel) when the weight is not yet quantized
                new._parameters["weight"] = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                                              quant_type="nf4", module=new).to(device)
                del w
                setattr(parent, name, new)
    fill_meta_parameters(model, device)
    rotary = model.model.rotary_emb  # non-persistent inv_freq: rebuilt from the config on the device
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    # flags transformers/PEFT read to know the base is 4-bit (set by from_pretrained with a quantization config)
    model.is_loaded_in_4bit = True
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"HF baseline: tensors still on meta: {leftover[:5]}")
    return model


# ----------------------------------------------------------------------------------------------------------
# report

def table(results: dict) -> str:
    lines = []
    env = results["env"]
    lines.append(f"== bench/gpu.py: {env['device_name']}, torch {env['torch']}, shape {results['shape']}"
                 f"{' (tiny CPU smoke run: timings mean nothing)' if results['shape'] == 'tiny' else ''} ==")
    est = results.get("estimate", {})
    if "7b_1x512_adamw32" in est:
        lines.append("memory ESTIMATES (computed, not measured; GB = 1e9 bytes; base = NF4+DQ linears + bf16 "
                     "embed/lm_head/norms; lora+opt = fp32 adapters, grads, AdamW state):")
        lines.append(f"  {'model':5} {'batch':7} {'base':>6} {'lora+opt32':>10} {'lora+opt8':>9} {'activ.':>7} "
                     f"{'total32':>8} {'total8':>7}")
        for name in ("7b", "13b"):
            for b, t in ((1, 512), (4, 512), (1, 2048)):
                e32, e8 = est[f"{name}_{b}x{t}_adamw32"], est[f"{name}_{b}x{t}_adamw8"]
                lines.append(f"  {name:5} {f'{b}x{t}':7} {(e32['base_4bit'] + e32['base_bf16']) / GB:6.2f} "
                             f"{e32['adapters_and_optimizer'] / GB:10.2f} {e8['adapters_and_optimizer'] / GB:9.2f} "
                             f"{e32['activations_estimate'] / GB:7.2f} {e32['total_estimate'] / GB:8.2f} "
                             f"{e8['total_estimate'] / GB:7.2f}")
    d = results.get("dequant", {})
    if "eager_GBps" in d:
        dc = results.get("dequant_compiled", {})
        comp = (f"compiled {dc['compiled_GBps']:.0f} GB/s ({100 * dc['compiled_fraction_of_copy']:.0f}%)"
                if "compiled_GBps" in dc else f"compiled: {dc.get('skipped') or dc.get('error') or 'not run'}")
        lines.append(f"dequant NF4 {d['shape'][0]}x{d['shape'][1]} -> bf16: copy {d['copy_GBps']:.0f} GB/s; eager "
                     f"{d['eager_GBps']:.0f} GB/s ({100 * d['eager_fraction_of_copy']:.0f}% of copy); {comp} "
                     f"[target >= 80%]")
    p = results.get("paging", {})
    if "adamw32_paged_over_plain" in p:
        lines.append(f"paged/plain AdamW step: 32-bit {p['adamw32_paged_over_plain']:.3f} "
                     f"({p['adamw32_paged_ms']:.2f}/{p['adamw32_plain_ms']:.2f} ms), 8-bit "
                     f"{p['adamw8_paged_over_plain']:.3f} [target <= 1.05]")
    lines.append(f"{'impl':12} {'batch':7} {'optim':>5} {'tok/s':>8} {'step ms':>8} {'peak alloc GB':>13} "
                 f"{'managed GB':>10} {'total GB':>8} {'estimate':>8}")
    for impl, key in (("minqlora", "train"), ("hf+bnb", "baseline"), ("mq+compile", "train_compiled")):
        sec = results.get(key, {})
        if not sec.get("configs"):
            lines.append(f"{impl:12} {sec.get('skipped') or sec.get('error') or 'not run'}"[:160])
        for c in sec.get("configs", []):
            bt = f"{c['batch']}x{c['seq_len']}"
            if "error" in c:
                lines.append(f"{impl:12} {bt:7} {c['optim_bits']:>5} {c['error'][:80]}")
                continue
            e = est.get(f"{results['shape']}_{bt}_adamw{c['optim_bits']}") if key != "baseline" else None
            lines.append(f"{impl:12} {bt:7} {c['optim_bits']:>5} {c['tokens_per_s']:8.0f} {c['step_ms_median']:8.1f} "
                         f"{c['peak_allocated_bytes'] / GB:13.2f} {c['managed_bytes'] / GB:10.2f} "
                         f"{c['peak_total_bytes'] / GB:8.2f} {e['total_estimate'] / GB if e else float('nan'):8.2f}")
    ours = {(c["batch"], c["seq_len"], c["optim_bits"]): c for c in results.get("train", {}).get("configs", [])
            if "error" not in c}
    for c in results.get("baseline", {}).get("configs", []):
        o = ours.get((c["batch"], c["seq_len"], c["optim_bits"]))
        if o and "error" not in c and c["peak_total_bytes"] > 0:  # (no device memory counts on the CPU)
            lines.append(f"  vs hf+bnb {c['batch']}x{c['seq_len']} adamw{c['optim_bits']}: speed "
                         f"{o['tokens_per_s'] / c['tokens_per_s']:.2f}x [target >= 1.5], memory "
                         f"{o['peak_total_bytes'] / c['peak_total_bytes']:.2f}x [target <= 0.6]")
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
                    help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per training config (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; tiny 1)")
    ap.add_argument("--baseline-on-cpu", action="store_true",
                    help="run the transformers+PEFT+bnb baseline on the CPU too (tiny; checks its code path)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


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
    results = dict(shape=run["shape"], model=dict(SHAPES[run["shape"]]), lora=LORA,
                   run={k: run[k] for k in ("train", "train_compiled", "warmup", "steps")},
                   env=environment(device), errors={})

    def report(key, value):  # every section, and every training config as it finishes
        results[key] = value
        write_json(args.json, results)

    cuda = device.type == "cuda"
    sections = {
        "estimate": lambda progress: section_estimate(run),
        "dequant": lambda progress: section_dequant(run, device, compiled=False),
        "train": lambda progress: section_train(run, device, progress),
        "paging": lambda progress: section_paging(run, device),
        "baseline": lambda progress: (
            section_baseline(run, device, progress) if cuda or args.baseline_on_cpu else
            dict(skipped="baseline runs on CUDA only (bitsandbytes' paged optimizers need it)")),
        "train_compiled": lambda progress: (
            section_train(run, device, progress, compiled=True) if cuda else
            dict(skipped="nf4.Linear4bit.compile applies on CUDA only")),
        "dequant_compiled": lambda progress: (
            section_dequant(run, device, compiled=True) if cuda else
            dict(skipped="torch.compile timed on CUDA only (a CPU inductor build outlasts the smoke run)")),
    }
    assert tuple(sections) == SECTIONS
    for name in (s for s in SECTIONS if s in args.only.split(",")):
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = sections[name](lambda value, key=name: report(key, value))
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' numbers
            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}"[:500])
            results["errors"][name] = traceback.format_exc()[-3000:]
            reset_memory(device)
        res["section_s"] = time.perf_counter() - t0
        report(name, res)
        print(f"[bench] {name} done in {res['section_s']:.1f} s", flush=True)
    print(table(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
