"""What bench/gpu.py measures, built without a download: our QLoRA model and step, and the same step through
transformers + PEFT + bitsandbytes, both on random Llama-shaped weights quantized on the device one linear at a
time (the bf16 model never exists in memory); plus the clock and memory counters every section shares.

Our step is train.py's (LoRA r 64 alpha 16 dropout 0.1 on every linear but lm_head, per-layer gradient
checkpointing, train.lm_loss_sum's chunked loss, gradient clipping, PagedAdamW); theirs is what most QLoRA
users run (bnb Linear4bit nf4 + double quant, PEFT LoRA all-linear, transformers' gradient checkpointing, bnb
PagedAdamW). bitsandbytes, PEFT and transformers are optional: `import_baseline` says which one is missing.
"""
import gc
import statistics
import time

import torch

import llama
import lora
import nf4
import paged_adamw
import train  # its loss, batch layout and defaults: the step measured is the step it runs


COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")
# train.py's defaults are the QLoRA recipe (§4, Appendix B); the bench reads them rather than restating them.
DEFAULTS = train.TrainConfig()
LORA = dict(r=DEFAULTS.lora_r, alpha=DEFAULTS.lora_alpha, dropout=DEFAULTS.lora_dropout, targets=DEFAULTS.lora_targets)
INIT_STD = 0.02  # HF's initializer_range; random weights of this size keep activations finite in bf16
DECODER_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                   ("mlp", ("gate_proj", "up_proj", "down_proj")))


# ----------------------------------------------------------------------------------------------------------
# clock and memory

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


def is_oom(e: BaseException) -> bool:
    """An allocation that did not fit: the caching allocator's error, or a library's failed workspace."""
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


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


# ----------------------------------------------------------------------------------------------------------
# our model and step

def fill_meta_parameters(model, device):
    """Give every parameter still on the meta device random bf16 values (norm weights: ones), frozen."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                data = (torch.ones(p.shape, device=device, dtype=torch.bfloat16) if p.dim() == 1 else
                        torch.randn(p.shape, device=device, dtype=torch.bfloat16) * INIT_STD)
                module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)


def quantize_random_linears(model, device, to_4bit):
    """Swap each decoder linear for `to_4bit(w)` of a random bf16 weight w, drawn on the device one at a
    time and dropped before the next (ours and bitsandbytes' models get the same treatment)."""
    for layer in model.model.layers:
        for block, names in DECODER_LINEARS:
            parent = getattr(layer, block)
            for name in names:
                old = getattr(parent, name)
                w = torch.randn(old.out_features, old.in_features, device=device, dtype=torch.bfloat16) * INIT_STD
                setattr(parent, name, to_4bit(w))
                del w


def build_model(shape: dict, device: torch.device, seed: int = 0) -> "llama.Llama":
    """A Llama with random NF4 + DQ decoder linears quantized on `device`, one weight at a time: built on the
    meta device, each linear's bf16 weight drawn, quantized and dropped before the next is drawn."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.from_dict({**COMMON, **shape}))
    quantize_random_linears(model, device, lambda w: nf4.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16))
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
    """What train.load_model does with --compile auto on CUDA (on) or --compile off, on a fresh model: the
    compiled dequantize in every 4-bit linear, and each decoder layer compiled (train.compile_layers, when
    train.py has it). Compiling a layer replaces its forward: a model is compiled once, never switched back."""
    for module in model.modules():
        if isinstance(module, nf4.Linear4bit):
            module.compile = on
    if on and hasattr(train, "compile_layers"):
        train.compile_layers(model)


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
    quantize_random_linears(model, device, lambda w: bnb_linear(bnb, w))
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
