"""8-bit blockwise "dynamic" quantization, and double quantization of the 4-bit absmax constants.

bitsandbytes stores many float32 vectors as 8-bit codes: QLoRA's per-block absmax constants ("double
quantization", QLoRA arXiv:2305.14314 §3) and the two Adam moments of the 8-bit optimizers
(arXiv:2110.02861 §2). Both use the same blockwise scheme:

    absmax_b = max_{i in b} |v_i|                 (float32, one per block of `blocksize` values)
    q_i      = argmin_k |code[k] - v_i * (1/absmax_b)|     (nearest entry of a 256-value code book)
    v_i     ~= code[q_i] * absmax_b

The code book is the "dynamic" map of the 8-bit optimizers paper (§2.3): a dynamic-tree / floating-point
like grid with 7 decades (1e-6 ... 1), dense near zero and coarse near +-1, so small and large values both
keep about 2 significant digits. The signed map has 127 values per sign plus 0 and +1 (no -1); the unsigned
map (Adam's second moment, which is >= 0) spends all 254 on the positive side.

Double quantization (QLoRA §3, "Double Quantization"): the NF4 absmax vector (one float32 per 64 weights,
0.5 bit/parameter) is itself quantized. Its values are all positive and similar, so it is centred first:

    offset   = mean(absmax)                                   (float32 0-d)
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, DYNAMIC_SIGNED, blocksize=256)
    absmax  ~= DYNAMIC_SIGNED[qabsmax] * nested_absmax[i // 256] + offset

which costs 8/64 + 32/(64*256) = 0.127 bit/parameter instead of 0.5 (so NF4 + DQ = 4.127 bits/param).

Exactness (see the spec, bitsandbytes' CUDA kernel semantics): the scale is a float32 reciprocal then a
multiply (not a division); "nearest" is decided against float32 midpoints, and a value exactly on a midpoint
takes the *even* index (the CUDA binary search always lands on an even index first and moves only when
strictly past the midpoint); an all-zero block gives 0 * inf = NaN -> code 0 with absmax 0.
bitsandbytes' CPU 8-bit quantizer (a 65536-bin lookup table) sometimes picks a non-nearest code; it is not
the reference, but its bytes dequantize with the same formula.

Deliberately left out: bitsandbytes' other maps (linear, quantile, FP8) and stochastic rounding.
"""
import torch


def _dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`, float32 [256].

    Must use torch.linspace in float32: numpy's float32 linspace differs by 1 ulp in a few entries.
    """
    data = []
    for i in range(7):  # decade i covers 10^(i-6) * [0.1, 1)
        k = 2**i if signed else 2 ** (i + 1)  # fraction values in this decade (signed: one bit for the sign)
        bounds = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # float32 midpoints of the linspace intervals
        scaled = (10 ** (i - 6)) * means  # python-float scalar times float32 tensor, as bitsandbytes does
        data += scaled.tolist()
        if signed:
            data += (-scaled).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_SIGNED = _dynamic_map(signed=True)  # [256]; [0] = -0.99296874, [127] = 0, [255] = +1
DYNAMIC_UNSIGNED = _dynamic_map(signed=False)  # [256]; [0] = 0, [255] = +1

BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes always double-quantizes absmax in blocks of 256
_CHUNK = 1 << 22  # elements per pass: bounds the int64/float32 temporaries for big optimizer states


def _check(code: torch.Tensor, blocksize: int) -> None:
    if blocksize not in BLOCKSIZES_8BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_8BIT}, got {blocksize}")
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(f"code must be a float32 [256] map such as DYNAMIC_SIGNED, got {code.dtype} {tuple(code.shape)}")


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor = DYNAMIC_SIGNED, blocksize: int = 256):
    """Quantize `x` (any shape, flattened row-major) to 8-bit codes of `code` in blocks of `blocksize`.

    Returns (q uint8 [n], absmax float32 [ceil(n / blocksize)]), on x's device.
    """
    _check(code, blocksize)
    if not x.is_floating_point():
        raise ValueError(f"quantize_blockwise needs a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1)  # (n,)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    code = code.to(flat.device)
    mids = (code[:-1] + code[1:]) * 0.5  # (255,) float32 decision thresholds between neighbours
    q = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    step = max(blocksize, _CHUNK // blocksize * blocksize)  # chunk boundaries on block boundaries
    for start in range(0, n, step):
        part = flat[start:start + step].float()
        m = part.numel()
        b0, nb = start // blocksize, -(-m // blocksize)
        if m % blocksize:  # partial last block: zero padding changes neither its max nor its codes
            part = torch.cat([part, part.new_zeros(nb * blocksize - m)])
        blocks = part.view(nb, blocksize)  # (nb, blocksize)
        amax = blocks.abs().amax(dim=1)
        if amax.isnan().any():  # CUDA's fmaxf skips NaN: a NaN element must not poison its block's absmax
            amax = blocks.abs().nan_to_num(nan=0.0).amax(dim=1)
        absmax[b0:b0 + nb] = amax
        # reciprocal then multiply, in float32 (an all-zero block: 0 * inf = NaN, handled below)
        scaled = (blocks * (1.0 / amax).unsqueeze(1)).view(-1)[:m]  # (m,)
        idx = torch.bucketize(scaled, mids, right=False)  # mids[idx-1] < x <= mids[idx]
        # x exactly on mids[k] -> bucketize gives k; the CUDA search picks the even one of k, k+1
        tie = (scaled == mids[idx.clamp(max=254)]) & (idx % 2 == 1)
        idx = idx + tie
        idx = idx.masked_fill(scaled.isnan(), 0)  # every comparison with NaN is false -> index 0
        q[start:start + m] = idx.to(torch.uint8)
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor = DYNAMIC_SIGNED,
                         blocksize: int = 256) -> torch.Tensor:
    """Inverse of quantize_blockwise: float32 [n] = code[q] * absmax[i // blocksize] (float32 multiply)."""
    _check(code, blocksize)
    if q.dtype != torch.uint8:
        raise ValueError(f"q must be uint8 codes, got {q.dtype}")
    flat = q.reshape(-1)  # (n,)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected ceil({n}/{blocksize}) = {nblocks}")
    values = code.to(flat.device)[flat.long()]  # (n,) float32
    pad = nblocks * blocksize - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    out = values.view(nblocks, blocksize) * absmax.float().view(nblocks, 1)  # (nblocks, blocksize)
    return out.view(-1)[:n]


def quantize_absmax(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Double quantization of a float32 absmax vector.

    Returns (qabsmax uint8 [nblocks], nested_absmax float32 [ceil(nblocks/256)], offset float32 0-d).
    The offset's last bit follows torch.mean's reduction order on the quantizing device, as in bitsandbytes.
    """
    if absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32, got {absmax.dtype}")
    offset = absmax.mean()  # float32 0-d; centring makes the signed map's resolution near 0 useful
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, DYNAMIC_SIGNED, blocksize)
    return qabsmax, nested_absmax, offset


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Restore float32 absmax = DYNAMIC_SIGNED[qabsmax] * nested_absmax[i // 256] + offset (float32 ops)."""
    restored = dequantize_blockwise(qabsmax, nested_absmax, DYNAMIC_SIGNED, blocksize)
    return restored + offset.to(device=restored.device, dtype=torch.float32)
