"""4-bit NormalFloat (NF4) and FP4 blockwise quantization, bit-exact with bitsandbytes, and the frozen
4-bit linear layer of QLoRA.

NF4 (QLoRA arXiv:2305.14314 §3). Pretrained weights are roughly zero-mean normal, so the 16 code values are
quantiles of N(0, 1) rescaled to [-1, 1]: each code is about equally likely. To hold an exact 0 the halves
are built apart (delta = 0.9677083, Phi^-1 the standard normal quantile; `normal_map`, docs/bnb_format.md §1.1):

    positive:  Phi^-1(linspace(delta, 0.5, 9)[:-1])   -> 8 values
    negative: -Phi^-1(linspace(delta, 0.5, 8)[:-1])   -> 7 values
    plus one exact 0; sort; divide by the largest; float32.

So the table is *asymmetric* (7 negative values, 0.0 at index 7, 8 positive; +0.0796 does not mirror
-0.0911); a symmetric 8+8 table is a common mistake and cannot read real checkpoints.

Blockwise absmax quantization (QLoRA §2; 8-bit optimizers arXiv:2110.02861 §2.1; docs/bnb_format.md §2).
The weight is flattened row-major and cut into blocks of `blocksize` (64) values; each block keeps its
float32 absmax and one 4-bit code per value, two codes a byte (the even element in the high nibble):

    absmax_b = max |w_i|,   code_i = nearest table entry to w_i * (1 / absmax_b),
    w_i ~= table[code_i] * absmax_b        (one float32 multiply, then one rounding to the weight's dtype)

"Nearest" means: compared with the 15 float32 midpoints, a tie taking the lower code; NaN -> code 0; an
all-zero block computes 0 * inf = NaN, so codes 0 and absmax 0 (bitsandbytes' CUDA kernel). FP4 is
bitsandbytes' E2M1-like format, decided by rounded decimal thresholds (§1.2, §2.1). Double quantization
(QLoRA §3, double_quant.py) stores the absmax in 8 bits plus one float32 per 256 blocks: 4.127 bits/param.

Reading order: the tables; the plain quantize and dequantize (shifts, a 16-entry table on the weight's
device, one multiply: the path on GPUs and under torch.compile, with no host-device synchronization and
no data-dependent Python branch, so a compiled decoder layer is one graph); the frozen linear, whose
autograd.Function saves only the packed weight and dequantizes again in backward (no float copy of W
outlives a matmul; only the input gradient, W is frozen); bitsandbytes' checkpoint layout (§4); last, the
CPU-only lookup tables behind one switch, `CPU_TABLES` (same bits, several times faster there).

Deliberately left out: bitsandbytes' fused CUDA GEMV kernels, non-uint8 quant storage on write, 8-bit
(LLM.int8) layers. The tests compare against bitsandbytes-made fixtures bit for bit.
"""
import json
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from double_quant import (BLOCKSIZES_8BIT, DYNAMIC_SIGNED, NESTED_BLOCKSIZE, cached_copy, dequantize_absmax, encode,
                          encode_tables, map_on, quantize_absmax, scale_blocks)


# ---- the code tables ----------------------------------------------------------------------------------------

def normal_map(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 from its definition, float32 [16], as bitsandbytes' `create_normal_map(offset, use_extra_value=True)`
    computes it: float32 linspace probabilities, their normal quantiles rounded to float32 (scipy's float32
    loop evaluates in double and rounds once; so does this), one exact 0, sorted, divided by the largest in
    float32. Equal bit for bit to the literal NF4_CODE (tested); the literal stays the authority."""
    def quantiles(k):  # (k - 1,) the quantiles at linspace(offset, 0.5, k) without 0.5 itself
        return torch.special.ndtri(torch.linspace(offset, 0.5, k, dtype=torch.float32)[:-1].double()).float()
    values = torch.cat([quantiles(9), torch.zeros(1), -quantiles(8)]).sort().values  # (16,) 8 + 1 + 7
    return values / values.max()


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
# the dtype names of the quant_state JSON and the weight dtypes a 4-bit layer can stand for
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

NF4_THRESHOLDS = (NF4_CODE[:-1] + NF4_CODE[1:]) * 0.5  # 15 float32 midpoints; code = #{t < x}
# CUDA's FP4 decision tree compares |x| with these rounded decimals (e.g. 0.583333, not 0.5833334).
FP4_THRESHOLDS = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
                              dtype=torch.float32)
FP4_RANK_TO_CODE = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3], dtype=torch.uint8)  # magnitude rank -> 3-bit code


def code_table(quant_type: str, device) -> torch.Tensor:
    """The 16-entry table on `device`, copied there once per (quant_type, device), never per call."""
    return cached_copy(quant_type, device, lambda: NF4_CODE if quant_type == "nf4" else FP4_CODE)


def _check(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


# ---- quantize / dequantize, plainly ---------------------------------------------------------------------------

def encode_reference(x: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """The decision rule (docs/bnb_format.md §2.1): 4-bit codes (uint8) of already-scaled float32 values."""
    if quant_type == "nf4":
        thresholds = cached_copy("nf4_thresholds", x.device, lambda: NF4_THRESHOLDS)
        code = torch.bucketize(x, thresholds, out_int32=True)  # #{t : t < x}: a tie goes to the lower code
    else:
        thresholds = cached_copy("fp4_thresholds", x.device, lambda: FP4_THRESHOLDS)
        rank = torch.bucketize(x.abs(), thresholds, out_int32=True)
        sign = torch.where(x < 0, 8, 0).to(torch.uint8)  # -0.0 keeps sign 0, -1e-6 gets it ("-0")
        code = cached_copy("fp4_rank", x.device, lambda: FP4_RANK_TO_CODE)[rank] | sign
    return code.masked_fill(x.isnan(), 0).to(torch.uint8)  # every comparison with NaN is false -> 0


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Blockwise 4-bit quantization of a float32/bfloat16/float16 tensor of any shape (flattened row-major).

    Returns (packed uint8 [(n + 1) // 2, 1], absmax float32 [ceil(n / blocksize)]) on x's device.
    """
    _check(quant_type, blocksize)
    if x.dtype not in DTYPES.values():
        raise ValueError(f"quantize_4bit supports {list(DTYPES)}, got {x.dtype}; cast the tensor first")
    flat = x.reshape(-1)  # (n,) a view when x is contiguous
    n, encoder = flat.numel(), _encoder(quant_type, x.device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    step = _step(n, blocksize, x.device, parts=16)  # whole blocks a pass: temporaries stay a fraction of x
    for start in range(0, n, step):
        amax, scaled = scale_blocks(flat[start:start + step], blocksize)  # (nb,), (nb * blocksize,) zero-padded
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
        pairs = encoder(scaled).view(-1, 2)  # (nb * blocksize / 2, 2): even element -> high nibble
        nbytes = (min(step, n - start) + 1) // 2  # an odd n's last low nibble encodes the zero padding
        torch.add(pairs[:nbytes, 1], pairs[:nbytes, 0], alpha=16, out=packed[start // 2:start // 2 + nbytes, 0])
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                    quant_type: str = "nf4", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_4bit: table[code] * absmax[block] in float32, rounded once to `dtype`, in `shape`.

    `absmax` must be the float32 constants (restore double-quantized ones with double_quant first).
    """
    shape = torch.Size(shape)
    raw = _check_dequantize(packed, absmax, shape, blocksize, quant_type, dtype)  # (nbytes,) uint8
    if CPU_TABLES and raw.device.type == "cpu" and not torch.compiler.is_compiling():
        return _dequantize_tables(raw, absmax, shape, blocksize, quant_type, dtype)  # same bits, faster there
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).view(-1)  # (2 * nbytes,) first element = high nibble
    values = code_table(quant_type, raw.device)[codes.int()]  # (2 * nbytes,) float32
    if absmax.numel() * blocksize > values.numel():  # a partial last block: pad it (the pad is cut below)
        values = F.pad(values, (0, absmax.numel() * blocksize - values.numel()))  # (nblocks * blocksize,)
    values.view(-1, blocksize).mul_(absmax.unsqueeze(1))  # (nblocks, blocksize) one float32 multiply, in place:
    # eager mode then holds one float32 copy of the weight at a time (torch.compile fuses it all anyway)
    out = values.to(dtype)  # one round-to-nearest-even cast, over whole blocks: Inductor's CPU code for an odd
    return out[:shape.numel()].view(shape)  # length (a vector tail after the gather) gave garbage there


def _check_dequantize(packed, absmax, shape, blocksize, quant_type, dtype) -> torch.Tensor:
    """Validate dequantize_4bit's arguments (shapes and dtypes only: nothing reads tensor values) and return
    the packed bytes as uint8 [(n + 1) // 2]; any quant_storage dtype holds the same bytes."""
    _check(quant_type, blocksize)
    if dtype not in DTYPES.values():
        raise ValueError(f"dequantize_4bit supports {list(DTYPES)}, got {dtype}")
    n = shape.numel()
    nblocks, nbytes = -(-n // blocksize), (n + 1) // 2
    raw = packed.reshape(-1).view(torch.uint8)
    if raw.numel() < nbytes or absmax.numel() != nblocks:
        raise ValueError(f"packed has {raw.numel()} bytes and absmax {absmax.numel()} values; shape {tuple(shape)} "
                         f"with blocksize {blocksize} needs {nbytes} and {nblocks}")
    if absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 (restore double-quantized absmax first), got {absmax.dtype}")
    return raw[:nbytes]


# ---- the frozen 4-bit linear --------------------------------------------------------------------------------

def _dequantize_weight(weight, absmax, nested_absmax, nested_offset, meta, dtype):
    """A Linear4bit's float weight: restore double-quantized absmax (elementwise, cheap), then dequantize."""
    shape, blocksize, quant_type, nested_blocksize, _ = meta
    if nested_absmax is not None:
        absmax = dequantize_absmax(absmax, nested_absmax, nested_offset, nested_blocksize)
    return dequantize_4bit(weight, absmax, shape, blocksize, quant_type, dtype)


_compiled_dequantize = None  # built on first use; False once compiling failed (then eager, same bytes)


def _dequantize(weight, absmax, nested_absmax, nested_offset, meta, dtype):
    """_dequantize_weight, through torch.compile (one fused kernel) when the layer asks for it on CUDA in
    eager mode. Inside an outer torch.compile (a compiled decoder layer) it is simply traced."""
    global _compiled_dequantize
    if meta[-1] and weight.is_cuda and _compiled_dequantize is not False and not torch.compiler.is_compiling():
        if _compiled_dequantize is None:
            _compiled_dequantize = torch.compile(_dequantize_weight)  # one graph per layer shape
        try:
            return _compiled_dequantize(weight, absmax, nested_absmax, nested_offset, meta, dtype)
        except Exception as e:  # no Triton, an Inductor bug...: a training run should not die of an optimization
            warnings.warn(f"torch.compile of the 4-bit dequantize failed ({type(e).__name__}: {e}); "
                          "using the eager path from now on (train.py --compile off silences this)")
            _compiled_dequantize = False
    return _dequantize_weight(weight, absmax, nested_absmax, nested_offset, meta, dtype)


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
    `compile = True` (train.py sets it per layer) dequantizes through torch.compile on CUDA in eager mode (one
    fused kernel; a CPU keeps its table path); inside an outer torch.compile it changes nothing.
    """

    compile = False

    def __init__(self, in_features, out_features, bias=True, quant_type="nf4", blocksize=64, double_quant=True,
                 compute_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, device=None):
        super().__init__()
        _check(quant_type, blocksize)
        if weight_dtype not in DTYPES.values() or compute_dtype not in DTYPES.values():
            raise ValueError(f"weight_dtype and compute_dtype must be one of torch.{', torch.'.join(DTYPES)}")
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
        self._tables_to_device()
        return _dequantize(self.weight, self.absmax, self.nested_absmax, self.nested_offset, self._meta(),
                           dtype or self.weight_dtype)

    def _tables_to_device(self):
        # The constant tables reach the weight's device here, once, before any dequantize (and outside the
        # autograd.Function): a first copy inside it would be a side effect that torch.compile cannot trace.
        code_table(self.quant_type, self.weight.device), map_on(DYNAMIC_SIGNED, self.weight.device)

    def forward(self, x):
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        self._tables_to_device()
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
        destination[prefix + QUANT_STATE_KEY + self.quant_type] = blob

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
        known = {k for k in mine if k in BNB_SUFFIXES or k.startswith(QUANT_STATE_KEY)}
        if strict:
            unexpected_keys.extend(prefix + k for k in mine if k not in known)
        needed = ["weight", "weight.absmax"] + ([] if any(k.startswith("weight.quant_state.") for k in mine)
                                                else [QUANT_STATE_KEY + self.quant_type])
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


# ---- bitsandbytes / transformers checkpoint layout (docs/bnb_format.md §4) -----------------------------------

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"  # + "nf4" | "fp4": the JSON blob; marks a 4-bit layer
# a 4-bit layer's tensors in a checkpoint, after its module prefix ("model.layers.0.mlp.up_proj."); "bias"
# may come too, never quantized
BNB_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                QUANT_STATE_KEY + "nf4", QUANT_STATE_KEY + "fp4")


def quantized_modules(keys) -> set:
    """The module names stored 4-bit among checkpoint keys. bitsandbytes' own rule: a module is 4-bit iff its
    `<module>.weight.quant_state.bitsandbytes__<type>` key exists."""
    return {k[:k.index("." + QUANT_STATE_KEY)] for k in keys if "." + QUANT_STATE_KEY in k}


def quant_state_json(quant_type, blocksize, dtype, shape, nested_offset=None, nested_blocksize=NESTED_BLOCKSIZE):
    """The JSON blob bitsandbytes stores (as uint8) under `weight.quant_state.bitsandbytes__<type>`:
    json.dumps defaults, this key order; the offset is the exact double of the float32 (shortest repr)."""
    d = {"quant_type": quant_type, "blocksize": blocksize, "dtype": str(dtype).removeprefix("torch."),
         "shape": list(shape)}
    if nested_offset is not None:
        d.update(nested_blocksize=nested_blocksize, nested_dtype="float32", nested_offset=float(nested_offset))
    return json.dumps(d).encode("utf-8")


def parse_quant_state(blob, where: str = "quant_state") -> dict:
    """The JSON blob (a uint8 tensor as stored, or bytes) as a dict, checked: quant_type, blocksize, a dtype
    name of DTYPES ("bfloat16", ...), shape [out, in]; with double quant also nested_blocksize / nested_dtype /
    nested_offset. `DTYPES[state["dtype"]]` is the original weight's dtype."""
    raw = bytes(blob.detach().cpu().to(torch.uint8).tolist()) if isinstance(blob, torch.Tensor) else bytes(blob)
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not a bitsandbytes quant_state JSON blob ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{where}: not a bitsandbytes quant_state JSON blob (a {type(state).__name__})")
    _check(state.get("quant_type"), state.get("blocksize"))
    shape = state.get("shape")
    if state.get("dtype") not in DTYPES or not (isinstance(shape, list) and len(shape) == 2):
        raise ValueError(f"{where}: unsupported quant_state dtype {state.get('dtype')!r} or shape {shape!r} "
                         f"(need float32/bfloat16/float16 and [out_features, in_features])")
    if "nested_offset" in state and (state.get("nested_blocksize", NESTED_BLOCKSIZE) not in BLOCKSIZES_8BIT
                                     or state.get("nested_dtype", "float32") != "float32"):
        raise ValueError(f"{where}: unsupported nested_blocksize/nested_dtype in {state}")
    return state


def _parse_quantized(tensors: dict, where: str) -> dict:
    """Validate one layer's checkpoint tensors (module prefix stripped) and return its decoded quant state.

    Accepts what bitsandbytes writes on GPU and CPU: uint8 or other quant_storage dtypes for the packed
    weight; float32 absmax without double quant; CPU-made quirks (code 7 / absmax 1e-38 in all-zero
    blocks, lookup-table qabsmax bytes) need nothing special, they dequantize with the same formula.
    """
    keys = [k for k in tensors if k.startswith(QUANT_STATE_KEY)]
    if len(keys) != 1:
        raise ValueError(f"{where}: expected one '{QUANT_STATE_KEY}nf4|fp4' tensor, got {keys}")
    unknown = sorted(set(tensors) - set(BNB_SUFFIXES) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unexpected 4-bit checkpoint tensors {unknown}")
    state = parse_quant_state(tensors[keys[0]], where=f"{where}: {keys[0]}")
    quant_type, blocksize, shape = state["quant_type"], state["blocksize"], state["shape"]
    if quant_type != keys[0].removeprefix(QUANT_STATE_KEY):
        raise ValueError(f"{where}: quant_state says quant_type {quant_type!r} but its key is {keys[0]}")
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
    return {"quant_type": quant_type, "blocksize": blocksize, "dtype": DTYPES[state["dtype"]], "shape": shape,
            "weight": packed[:nbytes].reshape(nbytes, 1), "absmax": absmax, "nested_absmax": nested_absmax,
            "nested_offset": nested_offset, "nested_blocksize": nested_blocksize}


# ---- speed: lookup tables on the CPU --------------------------------------------------------------------------
# The one switch. True: CPU tensors outside torch.compile go through the tables below, which give the same
# bits as the plain path (tested over every fixture case) several times faster on a CPU. False: the plain
# path everywhere. GPUs always take the plain path: there a random gather into a big table is what is slow
# (measured on an H200: 95% of the old table-based dequantize's time), and a fused elementwise kernel is not.
CPU_TABLES = True
_CHUNK = {"cpu": 1 << 18}  # most elements per pass on the CPU: L2-sized temporaries (measured, 2 MB L2/core)


def _step(n: int, blocksize: int, device: torch.device, parts: int = 1) -> int:
    """Elements per pass: whole blocks (so a multiple of 32), at most _CHUNK[device] (1 << 24 on GPUs: few
    launches) and at most n / parts (quantize uses 16 parts: its ~28 bytes of temporaries per element then
    stay below the input's size)."""
    step = min(_CHUNK.get(device.type, 1 << 24), max(n // parts, 1 << 16))
    return max(blocksize, step // blocksize * blocksize)


def _encoder(quant_type: str, device: torch.device):
    """quantize_4bit's encoder (scaled float32 -> uint8 codes): the 65536-bin tables on the CPU (two gathers
    and one compare per element instead of a binary search; double_quant.encode_tables), else the rule."""
    if CPU_TABLES and device.type == "cpu":
        tables = _encode_tables(quant_type, device)
        return lambda scaled: encode(scaled, tables)
    return lambda scaled: encode_reference(scaled, quant_type)


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


def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """int64 [256]: byte b's two code values (table[b >> 4], table[b & 15]) as one 8-byte word. A 1-D gather
    of 8-byte words from this 2 KB table (it stays in L1) is the fastest gather on a CPU that torch offers:
    a gather of [k, 2] rows copies row by row, ~3x slower (measured)."""
    def make():
        b = torch.arange(256)
        pairs = (NF4_CODE if quant_type == "nf4" else FP4_CODE)[torch.stack([b >> 4, b & 15], 1)]  # (256, 2)
        return pairs.view(torch.int64).view(-1)  # (256,) each word = the pair's 8 bytes, in memory order
    return cached_copy(quant_type + "_bytes", device, make)


def _dequantize_tables(raw, absmax, shape, blocksize, quant_type, dtype):
    """dequantize_4bit on the CPU, the same bits: per cache-sized pass one gather byte -> (value, value), one
    float32 multiply by the block absmax, one rounding to the output dtype."""
    table = _byte_table(quant_type, raw.device)
    out = torch.empty(absmax.numel() * blocksize, dtype=dtype)  # (nblocks * blocksize,) the tail is cut below
    step = _step(out.numel(), blocksize, raw.device)  # whole blocks: an even number of elements
    work = torch.empty(min(step, out.numel()))  # float32
    for start in range(0, out.numel(), step):
        stop = min(start + step, out.numel())
        values = work[:stop - start]
        b0, b1 = start // 2, min(stop // 2, raw.numel())  # the bytes of this pass (fewer in a partial last block)
        torch.index_select(table, 0, raw[b0:b1].int(), out=values[:2 * (b1 - b0)].view(torch.int64))
        values[2 * (b1 - b0):].zero_()  # past the last byte: padding, cut below
        scale = absmax[start // blocksize:stop // blocksize].unsqueeze(1)  # (nb, 1)
        if dtype == torch.float32:
            torch.mul(values.view(-1, blocksize), scale, out=out[start:stop].view(-1, blocksize))
        else:  # multiply in float32 in place, then one rounding cast (a mixed-dtype mul is ~12% slower here)
            values.view(-1, blocksize).mul_(scale)
            out[start:stop].copy_(values)
    return out[:shape.numel()].view(shape)
