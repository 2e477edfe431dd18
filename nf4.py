"""4-bit NormalFloat (NF4) and FP4 blockwise quantization, bit-exact with bitsandbytes, and the frozen
4-bit linear layer of QLoRA.

NF4 (QLoRA arXiv:2305.14314 §3, "4-bit NormalFloat"). Pretrained weights are roughly zero-mean normal, so
the 16 code values are quantiles of N(0, 1) rescaled to [-1, 1], which makes every code equally likely.
To also represent 0 exactly, the two halves are built separately (bitsandbytes `create_normal_map`,
offset delta = 0.9677083, Phi^-1 = standard normal quantile function):

    positive:  Phi^-1(linspace(delta, 0.5, 9)[:-1])   -> 8 values
    negative: -Phi^-1(linspace(delta, 0.5, 8)[:-1])   -> 7 values
    plus one exact 0; sort; divide by the largest; float32.

So the table is *asymmetric*: 7 negative values, 0.0 at index 7, 8 positive values; +0.0796 is not the
mirror of -0.0911. (A symmetric 8+8 table is a common mistake and cannot read real checkpoints.)

Blockwise absmax quantization (QLoRA §2; 8-bit optimizers arXiv:2110.02861 §2.1). The weight is flattened
row-major and cut into blocks of `blocksize` (64) consecutive values; each block stores its float32 absmax
and 4-bit codes

    absmax_b = max |w_i|,   code_i = nearest NF4 entry to w_i * (1 / absmax_b),
    w_i ~= NF4[code_i] * absmax_b.

"Nearest" is decided by the 15 float32 midpoints between neighbouring entries (a value exactly on a
midpoint takes the lower code; NaN gives code 0; an all-zero block computes 0 * inf = NaN, so all its codes
are 0 and its absmax 0 — bitsandbytes' CUDA kernel behaviour). Two codes share a byte, the first
(even-indexed) element in the high nibble; the result is uint8 [(n + 1) // 2, 1].

Double quantization (§3, double_quant.py) turns the float32 absmax (32/64 = 0.5 bit/param) into 8-bit
codes plus one float32 per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.

FP4 is bitsandbytes' own E2M1-like format: a sign bit and 3 magnitude bits for {0, 0.0625, 8, 12, 4, 6,
2, 3} / 12. Its CUDA kernel decides with rounded decimal thresholds (not exact midpoints) and gives a
negative scaled value the sign bit even when it rounds to 0; both are reproduced here.

How it is fast in eager PyTorch (no [n, 16] distance matrix):
* quantize: a float32 value's top 16 bits (sign, exponent, 7 mantissa bits) select one of 65536 bins; no
  bin holds more than one decision threshold, so one table lookup for the bin's threshold and one compare
  give the exact code (`_encode_tables`). Work is done in chunks that stay in cache, which also keeps the
  extra memory far below the input's size.
* dequantize: every int16 word of packed bytes (4 codes) indexes a 65536 x 4 table of code values, then one
  float32 multiply by the block's absmax and one rounding cast to the output dtype.

The frozen linear (`Linear4bit`) stores only the packed codes and constants; its autograd.Function saves
exactly those for backward and dequantizes again there, so no float copy of the weight outlives a matmul
(the memory trap of a plain `F.linear(x, dequantize(W))`). Only the input gradient is computed: the
base weight is frozen, LoRA adapters (lora.py) carry the trainable parameters.

The bytes follow bitsandbytes 0.50's CUDA kernels and transformers' 4-bit checkpoint layout (keys, dtypes,
shapes, the quant_state JSON); the tests compare against bitsandbytes-made fixtures bit for bit.
Deliberately left out: bitsandbytes' fused CUDA GEMV kernels, non-uint8 quant storage on write, 8-bit
(LLM.int8) layers.
"""
import json
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from double_quant import (BLOCKSIZES_8BIT, DYNAMIC_SIGNED, NESTED_BLOCKSIZE, dequantize_absmax, encode, encode_tables,
                          quantize_absmax, scale_blocks)

# bitsandbytes' tables, float32 bit-exact (index = code). NF4 is asymmetric with an exact 0 at index 7.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# FP4: bit 3 = sign, bits 2..0 = magnitude code (0, 0.0625, 8, 12, 4, 6, 2, 3) / 12. Index 8 is +0.0 as in
# bitsandbytes' `get_4bit_type`, checkpoints' quant_map and the reference dequantization.
FP4_CODE = torch.tensor([
    0.0, 0.0625 / 12, 8 / 12, 12 / 12, 4 / 12, 6 / 12, 2 / 12, 3 / 12,
    0.0, -0.0625 / 12, -8 / 12, -12 / 12, -4 / 12, -6 / 12, -2 / 12, -3 / 12,
], dtype=torch.float32)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

NF4_THRESHOLDS = (NF4_CODE[:-1] + NF4_CODE[1:]) * 0.5  # 15 float32 midpoints; code = #{t < x}
# CUDA's FP4 decision tree compares |x| with these rounded decimals (e.g. 0.583333, not 0.5833334).
FP4_THRESHOLDS = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
                              dtype=torch.float32)
FP4_RANK_TO_CODE = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3], dtype=torch.uint8)  # magnitude rank -> 3-bit code


def _check(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def encode_reference(x: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """The spec's rule, directly: 4-bit codes (uint8) of already-scaled float32 values. Slow but plain;
    the fast path's tables are built from it and the tests compare against it."""
    if quant_type == "nf4":
        code = torch.bucketize(x, NF4_THRESHOLDS.to(x.device), right=False)  # #{t : t < x}, ties -> lower
    else:
        rank = torch.bucketize(x.abs(), FP4_THRESHOLDS.to(x.device), right=False)
        code = FP4_RANK_TO_CODE.to(x.device)[rank].long() | torch.where(x < 0, 8, 0)  # -0.0 keeps sign 0
    return code.masked_fill(x.isnan(), 0).to(torch.uint8)  # every comparison with NaN is false


# ---- quantize / dequantize ---------------------------------------------------------------------------------

def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Blockwise 4-bit quantization of a float32/bfloat16/float16 tensor of any shape (flattened row-major).

    Returns (packed uint8 [(n + 1) // 2, 1], absmax float32 [ceil(n / blocksize)]) on x's device.
    """
    _check(quant_type, blocksize)
    if x.dtype not in DTYPES:
        raise ValueError(f"quantize_4bit supports {[str(d) for d in DTYPES]}, got {x.dtype}; cast the tensor first")
    flat = x.reshape(-1)  # (n,) a view when x is contiguous
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    tables = _encode_tables(quant_type, x.device)
    step = _step(n, blocksize, x.device, parts=16)
    for start in range(0, n, step):
        part = flat[start:start + step]
        amax, scaled = scale_blocks(part, blocksize)  # (nb,), (nb * blocksize,) float32
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
        pairs = encode(scaled, tables).view(-1, 2)  # (nb * blocksize / 2, 2) even element -> high nibble
        nbytes = (part.numel() + 1) // 2
        torch.add(pairs[:nbytes, 1], pairs[:nbytes, 0], alpha=16, out=packed[start // 2:start // 2 + nbytes, 0])
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                    quant_type: str = "nf4", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_4bit: table[code] * absmax[block] in float32, rounded once to `dtype`, in `shape`.

    `absmax` must be the float32 constants (restore double-quantized ones with double_quant first).
    """
    _check(quant_type, blocksize)
    if dtype not in DTYPES:
        raise ValueError(f"dequantize_4bit supports {[str(d) for d in DTYPES]}, got {dtype}")
    shape = torch.Size(shape)
    n = shape.numel()
    nblocks, nbytes = -(-n // blocksize), (n + 1) // 2
    raw = packed.reshape(-1).view(torch.uint8)  # any quant_storage dtype is the same bytes
    if raw.numel() < nbytes or absmax.numel() != nblocks:
        raise ValueError(f"packed has {raw.numel()} bytes and absmax {absmax.numel()} values; shape {tuple(shape)} "
                         f"with blocksize {blocksize} needs {nbytes} and {nblocks}")
    if absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 (restore double-quantized absmax first), got {absmax.dtype}")
    device = raw.device
    raw = raw[:nbytes]
    if raw.storage_offset() % 2:
        raw = raw.clone()  # an int16 view needs 2-byte alignment
    words = raw[:nbytes // 2 * 2].view(torch.int16)  # (nbytes // 2,) each word = 4 codes
    table = _decode_table(quant_type, device)
    # blocksize is even, so nblocks * blocksize >= 2 * nbytes: room for the pad nibble; the rest is ignored
    out = torch.empty(nblocks * blocksize, dtype=dtype, device=device)
    step = _step(n, blocksize, device)  # whole blocks: a multiple of 4 elements = whole int16 words
    work = out if dtype == torch.float32 else torch.empty(min(out.numel(), step), device=device)  # float32
    tail = 4 * words.numel()  # element index of an odd final byte's first code
    for start in range(0, out.numel(), step):
        stop = min(start + step, out.numel())
        dst = out[start:stop] if dtype == torch.float32 else work[:stop - start]
        w0, w1 = start // 4, min(stop // 4, words.numel())
        if w1 > w0:
            index = words[w0:w1].long().add_(32768)
            torch.index_select(table, 0, index, out=dst[:4 * (w1 - w0)].view(-1, 4))  # (w1 - w0, 4)
        if nbytes % 2 and start <= tail < stop:  # byte b = int16 word b (high byte 0): first two columns
            dst[tail - start:tail - start + 2] = table[raw[-1].long() + 32768, :2]
        dst.view(-1, blocksize).mul_(absmax[start // blocksize:stop // blocksize].unsqueeze(1))  # float32 multiply
        if dtype != torch.float32:
            out[start:stop].copy_(dst)  # one round-to-nearest-even cast, as torch .to()
    return out[:n].view(shape)


def _restore_absmax(absmax, nested_absmax, nested_offset, nested_blocksize):
    """float32 absmax from the stored form: as is, or double-quantized (8-bit + nested absmax + offset)."""
    if nested_absmax is None:
        return absmax
    return dequantize_absmax(absmax, nested_absmax, nested_offset, nested_blocksize)


def _dequantize_plain(packed, absmax, n, blocksize, code, dtype):
    """The same maths in simple elementwise ops, for torch.compile to fuse into one GPU kernel."""
    raw = packed.reshape(-1)
    codes = torch.stack([raw >> 4, raw & 15], dim=1).reshape(-1)  # (2 * nbytes,) high nibble first
    values = code[codes.long()]
    nblocks = absmax.numel()
    values = F.pad(values, (0, nblocks * blocksize - values.numel()))  # (nblocks * blocksize,)
    return (values.view(nblocks, blocksize) * absmax.unsqueeze(1)).view(-1)[:n].to(dtype)


_compiled_dequantize = None  # built on first use; False once compiling failed (then eager, same bytes)


def _dequantize(weight, absmax, nested_absmax, nested_offset, meta, dtype):
    global _compiled_dequantize
    shape, blocksize, quant_type, nested_blocksize, use_compile = meta
    absmax = _restore_absmax(absmax, nested_absmax, nested_offset, nested_blocksize)
    if use_compile and weight.is_cuda and _compiled_dequantize is not False:
        if _compiled_dequantize is None:
            _compiled_dequantize = torch.compile(_dequantize_plain)  # one graph per layer shape
        code = (NF4_CODE if quant_type == "nf4" else FP4_CODE).to(weight.device)
        try:
            return _compiled_dequantize(weight, absmax, shape[0] * shape[1], blocksize, code, dtype).view(shape)
        except Exception as e:  # no Triton, an Inductor bug...: a training run should not die of an optimization
            warnings.warn(f"torch.compile of the 4-bit dequantize failed ({type(e).__name__}: {e}); "
                          "using the eager path from now on (train.py --compile off silences this)")
            _compiled_dequantize = False
    return dequantize_4bit(weight, absmax, shape, blocksize, quant_type, dtype)


# ---- the frozen 4-bit linear -------------------------------------------------------------------------------

class _Linear4bitFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly. Saves only the packed codes and constants (uint8 and a
    few float32 per block), never a float W; backward dequantizes again for dx = dy W. No dW: W is frozen."""

    @staticmethod
    def forward(ctx, x, weight, absmax, nested_absmax, nested_offset, bias, meta):
        ctx.meta = meta
        ctx.save_for_backward(weight, absmax, nested_absmax, nested_offset)
        w = _dequantize(weight, absmax, nested_absmax, nested_offset, meta, x.dtype)  # (O, I) freed on return
        return F.linear(x, w, bias)  # (..., O)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(*ctx.saved_tensors, ctx.meta, grad_out.dtype)  # (O, I)
            grad_x = grad_out @ w  # (..., O) @ (O, I) -> (..., I)
        if ctx.needs_input_grad[5]:  # only if someone unfreezes the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (O,)
        return grad_x, None, None, None, None, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored 4-bit (NF4/FP4, blockwise absmax, optional double quant).

    Buffers: `weight` uint8 [(out*in + 1)//2, 1] packed codes; `absmax` float32 [nblocks], or uint8 when
    double-quantized together with `nested_absmax` float32 [ceil(nblocks/256)] and `nested_offset` float32
    0-d. `state_dict()` renames them to bitsandbytes'/transformers' checkpoint keys (weight.absmax, ...).
    `compile = True` dequantizes through torch.compile on CUDA (one fused kernel; CPU keeps the eager path).
    """

    compile = False

    def __init__(self, in_features, out_features, bias=True, quant_type="nf4", blocksize=64, double_quant=True,
                 compute_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, device=None):
        super().__init__()
        _check(quant_type, blocksize)
        if weight_dtype not in DTYPES or compute_dtype not in DTYPES:
            raise ValueError(f"weight_dtype and compute_dtype must be in {[str(d) for d in DTYPES]}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize = quant_type, blocksize
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        self.nested_blocksize = NESTED_BLOCKSIZE
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        # placeholders of the right shapes (all-zero blocks), replaced by from_* or load_state_dict
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(-(-nblocks // 256), device=device))
            self.register_buffer("nested_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(nblocks, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("nested_offset", None)
        b = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False)
        self.register_parameter("bias", b if bias else None)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight, bias=None, quant_type="nf4", blocksize=64, double_quant=True,
                    compute_dtype=torch.bfloat16):
        """Quantize a float [out, in] weight on its own device (the caller may free it afterwards)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype, weight_dtype=weight.dtype, device="meta")
        packed, absmax = quantize_4bit(weight.detach(), blocksize, quant_type)
        layer.weight = packed
        if double_quant:
            layer.absmax, layer.nested_absmax, layer.nested_offset = quantize_absmax(absmax, NESTED_BLOCKSIZE)
        else:
            layer.absmax = absmax
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type="nf4", blocksize=64, double_quant=True,
                    compute_dtype=torch.bfloat16):
        return cls.from_weight(linear.weight, linear.bias, quant_type, blocksize, double_quant, compute_dtype)

    @classmethod
    def from_quantized(cls, tensors: dict, bias=None, compute_dtype=torch.bfloat16):
        """Build from one layer's bitsandbytes checkpoint tensors, keys without the module prefix
        ("weight", "weight.absmax", ..., "weight.quant_state.bitsandbytes__nf4"; "bias" optional)."""
        tensors = dict(tensors)
        if bias is None:
            bias = tensors.pop("bias", None)
        else:
            tensors.pop("bias", None)
        state = _parse_quantized(tensors, where="from_quantized")
        out_features, in_features = state["shape"]
        layer = cls(in_features, out_features, bias=bias is not None, quant_type=state["quant_type"],
                    blocksize=state["blocksize"], double_quant=state["nested_absmax"] is not None,
                    compute_dtype=compute_dtype, weight_dtype=state["dtype"], device="meta")
        layer._assign(state, device=None)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    def _assign(self, state, device):
        self.quant_type, self.blocksize, self.weight_dtype = state["quant_type"], state["blocksize"], state["dtype"]
        self.nested_blocksize = state["nested_blocksize"]
        for name in ("weight", "absmax", "nested_absmax", "nested_offset"):
            t = state[name]
            self._buffers[name] = t if t is None or device is None else t.to(device)

    # ---- maths -------------------------------------------------------------------------------------
    def _meta(self):
        return ((self.out_features, self.in_features), self.blocksize, self.quant_type, self.nested_blocksize,
                bool(self.compile))

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The float weight [out, in] (default: the original weight's dtype), bit-exact with bitsandbytes."""
        return _dequantize(self.weight, self.absmax, self.nested_absmax, self.nested_offset, self._meta(),
                           dtype or self.weight_dtype)

    def forward(self, x):
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _Linear4bitFunction.apply(x, self.weight, self.absmax, self.nested_absmax, self.nested_offset, bias,
                                      self._meta())
        return y.to(in_dtype)

    def _apply(self, fn, recurse=True):
        # module.to(torch.bfloat16) / .half() would also cast the float32 constants (absmax, nested_absmax,
        # offset) and silently change the dequantized weight: keep them float32, follow only the device.
        keep = {k: v for k, v in self._buffers.items() if v is not None and v.dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, v in keep.items():
            if self._buffers[k].dtype != torch.float32:
                self._buffers[k] = v.to(self._buffers[k].device)
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")

    # ---- bitsandbytes / transformers checkpoint layout ---------------------------------------------
    def quant_state_json(self) -> bytes:
        offset = self.nested_offset.item() if self.double_quant else None
        return quant_state_json(self.quant_type, self.blocksize, self.weight_dtype,
                                (self.out_features, self.in_features), offset, self.nested_blocksize)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Same keys, order, dtypes and shapes as bitsandbytes' Linear4bit._save_to_state_dict.
        keep = (lambda t: t) if keep_vars else (lambda t: t.detach())
        device = self.weight.device
        destination[prefix + "weight"] = keep(self.weight)
        if self.bias is not None:
            destination[prefix + "bias"] = keep(self.bias)
        destination[prefix + "weight.absmax"] = keep(self.absmax)
        # fresh copies per layer: safetensors refuses tensors that share memory, and callers may edit them
        code = NF4_CODE if self.quant_type == "nf4" else FP4_CODE
        destination[prefix + "weight.quant_map"] = code.to(device, copy=True)
        if self.double_quant:
            destination[prefix + "weight.nested_absmax"] = keep(self.nested_absmax)
            destination[prefix + "weight.nested_quant_map"] = DYNAMIC_SIGNED.to(device, copy=True)
        blob = torch.tensor(list(self.quant_state_json()), dtype=torch.uint8)  # on the CPU, as bitsandbytes
        destination[prefix + "weight.quant_state.bitsandbytes__" + self.quant_type] = blob

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "bias" in mine:
            if self.bias is None:
                if strict:
                    unexpected_keys.append(prefix + "bias")
            elif self.bias.is_meta or local_metadata.get("assign_to_params_buffers", False):
                self.bias = nn.Parameter(mine["bias"].detach(), requires_grad=False)
            else:
                with torch.no_grad():
                    self.bias.copy_(mine["bias"])
        elif self.bias is not None:
            missing_keys.append(prefix + "bias")
        mine.pop("bias", None)
        known = {k for k in mine if k in _CHECKPOINT_SUFFIXES or k.startswith("weight.quant_state.bitsandbytes__")}
        if strict:
            unexpected_keys.extend(prefix + k for k in mine if k not in known)
        needed = ["weight", "weight.absmax"] + ([] if any(k.startswith("weight.quant_state.") for k in mine)
                                                else ["weight.quant_state.bitsandbytes__" + self.quant_type])
        absent = [prefix + k for k in needed if k not in mine]
        if absent:
            missing_keys.extend(absent)
            return
        try:
            state = _parse_quantized({k: mine[k] for k in known}, where=prefix or "state_dict")
        except ValueError as e:
            error_msgs.append(str(e))
            return
        if tuple(state["shape"]) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: the checkpoint's 4-bit weight has shape "
                              f"{state['shape']}, this layer is [{self.out_features}, {self.in_features}]")
            return
        self._assign(state, device=None if self.weight.is_meta else self.weight.device)


# ---- bitsandbytes / transformers checkpoint layout ---------------------------------------------------------

def quant_state_json(quant_type, blocksize, dtype, shape, nested_offset=None, nested_blocksize=NESTED_BLOCKSIZE):
    """The JSON blob bitsandbytes stores (as uint8) under `weight.quant_state.bitsandbytes__<type>`:
    json.dumps defaults, this key order; the offset is the exact double of the float32 (shortest repr)."""
    d = {"quant_type": quant_type, "blocksize": blocksize, "dtype": DTYPES[dtype], "shape": list(shape)}
    if nested_offset is not None:
        d.update(nested_blocksize=nested_blocksize, nested_dtype="float32", nested_offset=float(nested_offset))
    return json.dumps(d).encode("utf-8")


_CHECKPOINT_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map")


def _parse_quantized(tensors: dict, where: str) -> dict:
    """Validate one layer's checkpoint tensors (module prefix stripped) and return its decoded quant state.

    Accepts what bitsandbytes writes on GPU and CPU: uint8 or other quant_storage dtypes for the packed
    weight; float32 absmax without double quant; CPU-made quirks (code 7 / absmax 1e-38 in all-zero
    blocks, lookup-table qabsmax bytes) need nothing special, they dequantize with the same formula.
    """
    keys = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise ValueError(f"{where}: expected one 'weight.quant_state.bitsandbytes__nf4|fp4' tensor, got {keys}")
    unknown = sorted(set(tensors) - set(_CHECKPOINT_SUFFIXES) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unexpected 4-bit checkpoint tensors {unknown}")
    try:
        state = json.loads(bytes(tensors[keys[0]].detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: {keys[0]} is not a bitsandbytes quant_state JSON blob ({e})") from None
    quant_type, blocksize = state.get("quant_type"), state.get("blocksize")
    if quant_type != keys[0].rsplit("__", 1)[1]:
        raise ValueError(f"{where}: quant_state says quant_type {quant_type!r} but its key is {keys[0]}")
    _check(quant_type, blocksize)
    dtype = {name: d for d, name in DTYPES.items()}.get(state.get("dtype"))
    shape = state.get("shape")
    if dtype is None or not (isinstance(shape, list) and len(shape) == 2):
        raise ValueError(f"{where}: unsupported quant_state dtype {state.get('dtype')!r} or shape {shape!r} "
                         f"(need float32/bfloat16/float16 and [out_features, in_features])")
    if "weight" not in tensors or "weight.absmax" not in tensors:
        raise ValueError(f"{where}: missing 'weight' or 'weight.absmax'")
    n = shape[0] * shape[1]
    nblocks, nbytes = -(-n // blocksize), (n + 1) // 2
    packed = tensors["weight"].detach().contiguous().reshape(-1).view(torch.uint8)  # any quant_storage
    if packed.numel() < nbytes:
        raise ValueError(f"{where}: weight holds {packed.numel()} bytes, shape {shape} needs {nbytes}")
    absmax = tensors["weight.absmax"].detach().reshape(-1)
    code = NF4_CODE if quant_type == "nf4" else FP4_CODE
    if "weight.quant_map" in tensors and not torch.equal(tensors["weight.quant_map"].detach().float().cpu(), code):
        raise ValueError(f"{where}: weight.quant_map is not bitsandbytes' {quant_type} table")
    nested_absmax = nested_offset = None
    nested_blocksize = state.get("nested_blocksize", NESTED_BLOCKSIZE)
    if "weight.nested_absmax" in tensors:
        if absmax.dtype != torch.uint8 or "nested_offset" not in state:
            raise ValueError(f"{where}: double-quantized layer needs uint8 absmax and nested_offset in quant_state")
        nmap = tensors.get("weight.nested_quant_map")
        if nmap is not None and not torch.equal(nmap.detach().float().cpu(), DYNAMIC_SIGNED):
            raise ValueError(f"{where}: weight.nested_quant_map is not the signed dynamic map")
        if nested_blocksize not in BLOCKSIZES_8BIT or state.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"{where}: unsupported nested_blocksize/nested_dtype in {state}")
        nested_absmax = tensors["weight.nested_absmax"].detach().reshape(-1).float()
        nested_offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=absmax.device)
        if nested_absmax.numel() != -(-nblocks // nested_blocksize):
            raise ValueError(f"{where}: nested_absmax has {nested_absmax.numel()} values, expected "
                             f"{-(-nblocks // nested_blocksize)}")
    elif absmax.is_floating_point():
        absmax = absmax.float()
    else:
        raise ValueError(f"{where}: absmax is {absmax.dtype} but there is no nested_absmax (double quant)")
    if absmax.numel() != nblocks:
        raise ValueError(f"{where}: absmax has {absmax.numel()} values, shape {shape} / blocksize {blocksize} "
                         f"needs {nblocks}")
    return {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": shape,
            "weight": packed[:nbytes].reshape(nbytes, 1), "absmax": absmax, "nested_absmax": nested_absmax,
            "nested_offset": nested_offset, "nested_blocksize": nested_blocksize}


# ---- speed: large lookup tables and cache-sized passes (CPU) -----------------------------------------------

_CHUNK = {"cpu": 1 << 18}  # most elements per pass: L2-sized on CPU (measured), 1 << 24 on GPUs


def _step(n: int, blocksize: int, device: torch.device, parts: int = 1) -> int:
    """Elements per pass: whole blocks (so a multiple of 32), at most _CHUNK[device] and at most n / parts
    (quantize uses 16 parts: its ~28 bytes of temporaries per element then stay below the input's size)."""
    step = min(_CHUNK.get(device.type, 1 << 24), max(n // parts, 1 << 16))
    return max(blocksize, step // blocksize * blocksize)


_TABLES = {}


def _encode_tables(quant_type: str, device: torch.device):
    """Bin tables (double_quant.encode_tables) equal to encode_reference for every float32. The boundaries
    are written so that x > b is the upper side: NF4 ties go down (b = t); FP4's negative side counts
    x < -c, so its ties go toward zero (b = the float just below -c), and x < 0 sets the sign bit."""
    key = (quant_type, str(device))
    if key not in _TABLES:
        if quant_type == "nf4":
            bounds = NF4_THRESHOLDS
        else:
            below = lambda v: torch.nextafter(v, torch.full_like(v, -float("inf")))  # noqa: E731
            bounds = torch.cat([below(-FP4_THRESHOLDS), below(torch.zeros(1)), FP4_THRESHOLDS]).sort().values
        _TABLES[key] = encode_tables(lambda v: encode_reference(v, quant_type), bounds, device)
    return _TABLES[key]


_DECODE = {}


def _decode_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[65536, 4] float32: the 4 code values of each packed int16 word (row = int16 value + 32768)."""
    key = (quant_type, str(device))
    if key not in _DECODE:
        if sys.byteorder != "little":
            raise RuntimeError("dequantize_4bit's int16 table assumes a little-endian machine")
        # FP4 code 8 -> +0.0 as in the fixtures and bitsandbytes' torch path (its CUDA tree would give -0.0)
        values = NF4_CODE if quant_type == "nf4" else FP4_CODE
        word = torch.arange(-32768, 32768, dtype=torch.int64) & 0xFFFF
        b0, b1 = word & 0xFF, word >> 8  # little-endian: the first byte is the low one
        _DECODE[key] = values[torch.stack([b0 >> 4, b0 & 15, b1 >> 4, b1 & 15], 1)].to(device)  # (65536, 4)
    return _DECODE[key]
