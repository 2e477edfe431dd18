"""8-bit blockwise "dynamic" quantization, and double quantization of the 4-bit absmax constants.

bitsandbytes stores many float32 vectors as 8-bit codes: QLoRA's per-block absmax constants ("double
quantization", QLoRA arXiv:2305.14314 §3) and the two Adam moments of the 8-bit optimizers
(arXiv:2110.02861 §2.1, block-wise quantization). Both use the same blockwise scheme:

    absmax_b = max_{i in b} |v_i|                 (float32, one per block of `blocksize` values)
    q_i      = argmin_k |code[k] - v_i * (1/absmax_b)|     (nearest entry of a 256-value code book)
    v_i     ~= code[q_i] * absmax_b

The code book is the "dynamic" map of the 8-bit optimizers paper (§1.3 dynamic tree quantization, §2.2 its
unsigned variant; docs/bnb_format.md §1.3): a floating-point-like grid over 7 decades (1e-7 ... 1), dense
near zero and coarse near +-1, so small and large values both keep about 2 significant digits. The signed
map has 127 values per sign plus 0 and +1 (no -1); the unsigned map (Adam's second moment, which is >= 0)
spends all 254 on the positive side.

Double quantization (QLoRA §3, "Double Quantization"; docs/bnb_format.md §3): the NF4 absmax vector (one
float32 per 64 weights, 0.5 bit/parameter) is itself quantized. Its values are all positive and similar, so
it is centred first:

    offset   = mean(absmax)                                   (float32 0-d)
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, DYNAMIC_SIGNED, blocksize=256)
    absmax  ~= DYNAMIC_SIGNED[qabsmax] * nested_absmax[i // 256] + offset

which costs 8/64 + 32/(64*256) = 0.127 bit/parameter instead of 0.5 (so NF4 + DQ = 4.127 bits/param).

Exactness (bitsandbytes' CUDA kernel semantics, docs/bnb_format.md §3.2): the scale is a float32 reciprocal
then a multiply (not a division); "nearest" is decided against float32 midpoints, and a value exactly on a
midpoint takes the *even* index (the CUDA binary search always lands on an even index first and moves only when
strictly past the midpoint); an all-zero block gives 0 * inf = NaN -> code 0 with absmax 0.
bitsandbytes' CPU 8-bit quantizer (a 65536-bin lookup table) sometimes picks a non-nearest code; it is not
the reference, but its bytes dequantize with the same formula.

Speed: "nearest code" is found with two table lookups and one compare per element instead of a binary
search (see `encode_tables`; the same trick serves nf4.py), in cache-sized passes over the input.

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
_CHUNK = {"cpu": 1 << 18}  # elements per pass: the ~30 bytes/element of temporaries near the L2 on CPU;
# 1 << 24 on GPUs (few kernel launches). Either way far below the size of a big optimizer state.


# ---- exact table-driven encoding (shared with nf4.py) ---------------------------------------------------
# "Nearest code" as a comparison against sorted decision boundaries costs a binary search per element
# (torch.bucketize, ~8 dependent compares for 255 boundaries). Instead: the top 16 bits of a float32 (sign,
# exponent, 7 mantissa bits) split the floats into 65536 contiguous bins, each at most 2^-7 relative wide.
# When no bin holds two boundaries (true for the NF4/FP4 thresholds and both dynamic maps' midpoints), a
# value's code is the bin's lower or upper code depending on one compare with the bin's boundary:
#     code(x) = table[2 * bin(x) + (x > boundary[bin])]
# Two gathers and a compare per element, exact for every float32 (checked exhaustively over all 2^32).

def _bin_edges():
    """Lowest and highest float32 of each bin (bin = (bits >> 16) + 32768), and the bins' top 16 bits."""
    top = torch.arange(-32768, 32768, dtype=torch.int64)  # arithmetic-shifted top half of the int32 bits
    first = (top << 16).to(torch.int32).view(torch.float32)  # low 16 bits all 0
    last = ((top << 16) | 0xFFFF).to(torch.int32).view(torch.float32)  # low 16 bits all 1
    return torch.minimum(first, last), torch.maximum(first, last), top


def encode_tables(reference, bounds: torch.Tensor, device):
    """(boundary float32 [65536], code uint8 [131072]) for `encode`, or None if some bin holds two bounds.

    `reference(x)` is the exact rule (float32 -> uint8 codes); `bounds` are the sorted float32 values b at
    which the code changes, written so that x > b is the upper side (a tie going down has b = the midpoint,
    a tie going up has b = the float just below it).
    """
    lo, hi, top = _bin_edges()
    first = torch.searchsorted(bounds, lo)  # first bound >= the bin's lowest value
    has = (first < len(bounds)) & (bounds[first.clamp(max=len(bounds) - 1)] < hi)
    second = (first + 1).clamp(max=len(bounds) - 1)
    if bool((has & (first + 1 < len(bounds)) & (bounds[second] < hi)).any()):
        return None
    boundary = torch.where(has, bounds[first.clamp(max=len(bounds) - 1)], float("inf"))
    code = torch.stack([reference(lo), reference(hi)], 1)  # (65536, 2) below / above the boundary
    special = (top & 0x7F80) == 0x7F80  # exponent 255: NaN, and the two bins starting at +-inf
    code[special] = reference(torch.full((1,), float("nan")))
    inf_bin = (top & 0x7FFF) == 0x7F80  # +-inf and signalling NaNs (arithmetic never makes those)
    code[inf_bin] = reference(torch.where(top[inf_bin] < 0, -float("inf"), float("inf"))).unsqueeze(1)
    boundary[special] = float("inf")
    return boundary.to(device), code.reshape(-1).to(device)


def encode(scaled: torch.Tensor, tables) -> torch.Tensor:
    """Codes (uint8) of 1-D float32 values through `encode_tables`' tables: equal to the reference rule."""
    boundary, code = tables
    bins = (scaled.view(torch.int32) >> 16).long().add_(32768)  # top 16 bits -> bin in [0, 65536)
    upper = scaled > torch.index_select(boundary, 0, bins)  # past the bin's boundary (most bins have none)
    return torch.index_select(code, 0, torch.add(upper, bins, alpha=2))


def nearest_reference(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The 8-bit rule directly: nearest entry of the sorted map `code`; exactly on the float32 midpoint of
    k and k+1 -> the even one (CUDA's search lands on even indices first); NaN -> 0."""
    mids = (code[:-1] + code[1:]) * 0.5  # (255,) float32
    idx = torch.bucketize(x, mids, right=False)  # mids[idx-1] < x <= mids[idx]
    tie = (x == mids[idx.clamp(max=254)]) & (idx % 2 == 1)  # on mids[k] with k odd -> k + 1
    return (idx + tie).masked_fill(x.isnan(), 0).to(torch.uint8)


_TABLES = {}


def _tables_8bit(code: torch.Tensor):
    """Bin tables for a sorted 256-value map (cached by content and device), None if it is too dense."""
    key = (tuple(code.detach().cpu().tolist()), str(code.device))
    if key not in _TABLES:
        c = code.detach().float().cpu()
        if not bool((c[1:] > c[:-1]).all()):
            raise ValueError("code must be sorted strictly ascending")
        mids = (c[:-1] + c[1:]) * 0.5
        odd = torch.arange(255) % 2 == 1  # ties on odd k go up: the boundary is the float just below
        bounds = torch.where(odd, torch.nextafter(mids, torch.full_like(mids, -float("inf"))), mids)
        _TABLES[key] = encode_tables(lambda v: nearest_reference(v, c), bounds, code.device)
    return _TABLES[key]


def _check(code: torch.Tensor, blocksize: int) -> None:
    if blocksize not in BLOCKSIZES_8BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_8BIT}, got {blocksize}")
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(f"code must be a float32 [256] map such as DYNAMIC_SIGNED, "
                         f"got {code.dtype} {tuple(code.shape)}")


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
    tables = _tables_8bit(code)  # None for an exotic map too dense for the bins: bucketize instead
    q = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    step = max(blocksize, _CHUNK.get(flat.device.type, 1 << 24) // blocksize * blocksize)  # whole blocks
    for start in range(0, n, step):
        part = flat[start:start + step]
        m = part.numel()
        amax, scaled = scale_blocks(part, blocksize)
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
        scaled = scaled[:m]  # (m,)
        q[start:start + m] = nearest_reference(scaled, code) if tables is None else encode(scaled, tables)
    return q, absmax


def scale_blocks(part: torch.Tensor, blocksize: int):
    """absmax float32 [nb] and x * (1/absmax) float32 [nb * blocksize] of a run of blocks (shared with nf4).

    A partial last block is padded with zeros: they change neither its max nor its codes (and give an odd
    4-bit tensor its pad nibble). An all-zero block has absmax 0 and scales to 0 * inf = NaN -> code 0.
    """
    if part.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        part = part.float()  # e.g. float64: bitsandbytes works in float32
    nb = -(-part.numel() // blocksize)
    if nb * blocksize != part.numel():
        part = torch.cat([part, part.new_zeros(nb * blocksize - part.numel())])
    blocks = part.view(nb, blocksize)  # (nb, blocksize)
    amax = blocks.abs().amax(dim=1).float()  # exact in the input dtype, then widened
    if amax.isnan().any():  # CUDA's fmaxf skips NaN: a NaN element must not poison its block's absmax
        amax = blocks.float().abs().nan_to_num(nan=0.0).amax(dim=1)
    # float32 reciprocal, then one float32 multiply (not a division); bf16/f16 promote exactly
    return amax, torch.mul(blocks, (1.0 / amax).unsqueeze(1)).view(-1)


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
    values = map_on(code, flat.device)[flat.int()]  # (n,) float32
    pad = nblocks * blocksize - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    out = values.view(nblocks, blocksize) * absmax.float().view(nblocks, 1)  # (nblocks, blocksize)
    return out.view(-1)[:n]


_COPIES = {}


def cached_copy(name: str, device, make) -> torch.Tensor:
    """The constant table `make()` (a code book, thresholds) on `device`, made and copied there once, then
    cached under (name, device). Copying a host tensor to a GPU at every call would make the host wait for
    the GPU each time (a copy from pageable memory synchronizes), and would put host tensors into a
    compiled graph."""
    key = (name, torch.device(device))
    if key not in _COPIES:
        table = make()
        if table.device == key[1]:
            return table  # nothing to copy (and nothing to cache: torch.compile traces this without a side effect)
        _COPIES[key] = table.to(key[1])
    return _COPIES[key]


def map_on(code: torch.Tensor, device) -> torch.Tensor:
    """`code` on `device`; this module's two maps come from the per-device cache (no copy per call)."""
    if code is DYNAMIC_SIGNED:
        return cached_copy("dynamic_signed", device, lambda: DYNAMIC_SIGNED)
    if code is DYNAMIC_UNSIGNED:
        return cached_copy("dynamic_unsigned", device, lambda: DYNAMIC_UNSIGNED)
    return code.to(device)


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
    """Restore float32 absmax = DYNAMIC_SIGNED[qabsmax] * nested_absmax[i // 256] + offset (float32 ops).
    Elementwise ops only, the map cached on the device: cheap next to the 4-bit dequantize it feeds, free of
    host-device synchronization, and traceable by torch.compile without graph breaks."""
    restored = dequantize_blockwise(qabsmax, nested_absmax, DYNAMIC_SIGNED, blocksize)
    return restored + offset.to(device=restored.device, dtype=torch.float32)
