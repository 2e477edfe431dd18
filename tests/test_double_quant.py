"""double_quant.py against bitsandbytes' bytes (tests/fixtures/bnb) and a brute-force nearest-code reference."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import double_quant as dq
from conftest import BNB, with_ulp_neighbours

CODEBOOKS = load_file(BNB / "codebooks.safetensors")
Q8 = load_file(BNB / "quant8bit.safetensors")
Q4 = load_file(BNB / "quant4bit.safetensors")
with safe_open(BNB / "quant4bit.safetensors", "pt") as _f:
    CASES = sorted(json.loads(_f.metadata()["cases"]))


def bits(t):
    """Integer view: torch.equal on it also distinguishes -0.0 from +0.0 and compares NaN payloads."""
    return t.contiguous().view(torch.int32)


def nearest_reference(x, code, blocksize):
    """Brute force: per block absmax, x * (1/absmax), argmin distance; a value exactly halfway between
    codes k and k+1 takes the even index (docs/bnb_format.md §3.2); NaN (all-zero block) -> 0."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    xp = torch.cat([x.float(), x.new_zeros(nblocks * blocksize - n, dtype=torch.float32)]).view(nblocks, blocksize)
    absmax = xp.abs().amax(1)
    scaled = (xp * (1.0 / absmax)[:, None]).view(-1)[:n]
    mids = (code[:-1] + code[1:]) * 0.5
    dist = (scaled[:, None].double() - code[None, :].double()).abs()  # (n, 256), fine for small n
    q = dist.argmin(1)
    k = torch.searchsorted(mids, scaled).clamp(max=254)  # a tie sits exactly on mids[k]
    on_mid = scaled == mids[k]
    q = torch.where(on_mid, k + (k % 2), q)  # the even one of k, k+1
    q = torch.where(scaled.isnan(), 0, q)
    return q.to(torch.uint8), absmax


def test_dynamic_maps_equal_bitsandbytes():
    assert torch.equal(bits(dq.DYNAMIC_SIGNED), bits(CODEBOOKS["dynamic_signed"]))
    assert torch.equal(bits(dq.DYNAMIC_UNSIGNED), bits(CODEBOOKS["dynamic_unsigned"]))
    for m in (dq.DYNAMIC_SIGNED, dq.DYNAMIC_UNSIGNED):
        assert m.dtype == torch.float32 and m.shape == (256,)
        assert bool((m[1:] > m[:-1]).all())
    assert dq.DYNAMIC_SIGNED[127] == 0 and dq.DYNAMIC_SIGNED[255] == 1 and dq.DYNAMIC_SIGNED[0] > -1  # no -1.0
    assert dq.DYNAMIC_UNSIGNED[0] == 0 and dq.DYNAMIC_UNSIGNED[255] == 1


def test_quantize_blockwise_fixture():
    q, absmax = dq.quantize_blockwise(Q8["input"], dq.DYNAMIC_SIGNED, 256)
    assert torch.equal(q, Q8["q"])
    assert torch.equal(bits(absmax), bits(Q8["absmax"]))
    assert torch.equal(bits(dq.dequantize_blockwise(q, absmax, dq.DYNAMIC_SIGNED, 256)), bits(Q8["dequant"]))
    # bitsandbytes' CPU lookup-table quantizer differs somewhere, and there our code is strictly nearer
    diff = (q != Q8["bnbcpu.q"]).nonzero().flatten()
    assert len(diff) >= 1
    scaled = Q8["input"] / Q8["absmax"].repeat_interleave(256)[:1580]
    for i in diff:
        ours = (dq.DYNAMIC_SIGNED[q[i].long()] - scaled[i]).abs()
        theirs = (dq.DYNAMIC_SIGNED[Q8["bnbcpu.q"][i].long()] - scaled[i]).abs()
        assert ours < theirs


@pytest.mark.parametrize("code", ["signed", "unsigned"])
def test_midpoint_ties_go_to_even_index(code):
    table = dq.DYNAMIC_SIGNED if code == "signed" else dq.DYNAMIC_UNSIGNED
    mids = (table[:-1] + table[1:]) * 0.5  # float32 midpoints
    below = torch.nextafter(mids, torch.full_like(mids, -2.0))
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    for probe, expect in ((mids, torch.arange(255) + torch.arange(255) % 2),
                          (below, torch.arange(255)), (above, torch.arange(1, 256))):
        x = torch.cat([torch.ones(1), probe])  # absmax exactly 1: the reciprocal is exact, x unchanged
        q, absmax = dq.quantize_blockwise(x, table, 256)
        assert absmax.item() == 1.0
        assert torch.equal(q[1:].long(), expect)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("n", [1, 255, 1000, 4097])
def test_quantize_blockwise_matches_bruteforce(blocksize, n):
    g = torch.Generator().manual_seed(n * 7 + blocksize)
    x = torch.randn(n, generator=g) * torch.logspace(-4, 1, n).pow(torch.rand(n, generator=g))
    if n >= 2 * blocksize:
        x[blocksize:2 * blocksize] = 0  # an all-zero block: codes 0, absmax 0 (CUDA's 0 * inf = NaN)
    for table in (dq.DYNAMIC_SIGNED, dq.DYNAMIC_UNSIGNED):
        v = x if table is dq.DYNAMIC_SIGNED else x.abs()
        q, absmax = dq.quantize_blockwise(v, table, blocksize)
        q_ref, absmax_ref = nearest_reference(v, table, blocksize)
        assert torch.equal(q, q_ref)
        assert torch.equal(bits(absmax), bits(absmax_ref))
        out = dq.dequantize_blockwise(q, absmax, table, blocksize)
        assert torch.equal(bits(out), bits(table[q.long()] * absmax.repeat_interleave(blocksize)[:n]))


@pytest.mark.parametrize("code", ["signed", "unsigned"])
def test_bin_tables_equal_nearest_rule(code):
    """The 65536-bin encoder equals the nearest/ties-to-even rule on every bin edge, every midpoint +-4 ulp,
    specials and a million random values (all 2^32 float32 values were checked once offline)."""
    table = dq.DYNAMIC_SIGNED if code == "signed" else dq.DYNAMIC_UNSIGNED
    lo, hi, _ = dq._bin_edges()
    mids = (table[:-1] + table[1:]) * 0.5
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45])
    randoms = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * torch.rand(1 << 20) ** 8
    x = torch.cat([lo, hi, with_ulp_neighbours(mids), specials, randoms])
    tables = dq._tables_8bit(table)
    assert tables is not None
    assert torch.equal(dq.encode(x, tables), dq.nearest_reference(x, table))


def test_dense_map_falls_back_to_search():
    dense = torch.linspace(0.99, 1.0, 256)  # entries 4e-5 apart, bins near 1 are 4e-3 wide: no bin tables
    assert dq._tables_8bit(dense) is None
    x = 0.985 + torch.rand(1000) * 0.015
    q, absmax = dq.quantize_blockwise(x, dense, 256)
    assert torch.equal(q, nearest_reference(x, dense, 256)[0])


def test_zero_block_and_nan():
    x = torch.zeros(512)
    x[256:] = torch.linspace(-1, 1, 256)
    x[300] = float("nan")
    q, absmax = dq.quantize_blockwise(x, dq.DYNAMIC_SIGNED, 256)
    assert torch.equal(q[:256], torch.zeros(256, dtype=torch.uint8)) and absmax[0].item() == 0.0
    assert absmax[1].item() == 1.0  # NaN skipped by the block max (CUDA's fmaxf), not propagated
    assert q[300].item() == 0 and q[511].item() == 255


def test_chunked_path_equals_single_pass(monkeypatch):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    q1, a1 = dq.quantize_blockwise(x, dq.DYNAMIC_SIGNED, 64)
    monkeypatch.setitem(dq._CHUNK, "cpu", 128)
    q2, a2 = dq.quantize_blockwise(x, dq.DYNAMIC_SIGNED, 64)
    assert torch.equal(q1, q2) and torch.equal(a1, a2)


@pytest.mark.parametrize("case", CASES)
def test_double_quant_of_absmax(case):
    qabsmax, nested, offset = dq.quantize_absmax(Q4[f"{case}.absmax"])
    assert offset.dtype == torch.float32 and offset.dim() == 0
    assert torch.equal(bits(offset), bits(Q4[f"{case}.dq.offset"]))
    assert torch.equal(qabsmax, Q4[f"{case}.dq.qabsmax"])
    assert torch.equal(bits(nested), bits(Q4[f"{case}.dq.nested_absmax"]))
    restored = dq.dequantize_absmax(qabsmax, nested, offset)
    assert torch.equal(bits(restored), bits(Q4[f"{case}.dq.absmax_restored"]))


def test_clear_errors():
    x = torch.randn(300)
    with pytest.raises(ValueError, match="blocksize"):
        dq.quantize_blockwise(x, dq.DYNAMIC_SIGNED, 100)
    with pytest.raises(ValueError, match="float32 \\[256\\]"):
        dq.quantize_blockwise(x, dq.DYNAMIC_SIGNED[:16], 256)
    with pytest.raises(ValueError, match="floating-point"):
        dq.quantize_blockwise(torch.arange(10), dq.DYNAMIC_SIGNED, 256)
    q, absmax = dq.quantize_blockwise(x)
    with pytest.raises(ValueError, match="absmax has 1 entries"):
        dq.dequantize_blockwise(q, absmax[:1])
    with pytest.raises(ValueError, match="uint8"):
        dq.dequantize_blockwise(q.long(), absmax)
    with pytest.raises(ValueError, match="float32"):
        dq.quantize_absmax(absmax.double())
