"""bench/quality.py: its pieces against independent references, and a --quick run on the tiny fixture model.

The full run's numbers (SmolLM2-135M, minutes) are not reproduced here. What is checked: the int4
round-to-nearest quantizer equals a brute-force nearest-grid-point search and loses to NF4 on Gaussian
weights (QLoRA Table 2's ordering, which the bench's claim rests on); the Q4_1 round trip is idempotent
(the "weights already on a 4-bit grid" measurement relies on it); the held-out perplexity of a padded
batch equals the unpadded per-row reference; the topic split never puts a topic on both sides; and a
--quick run produces every row of the table, finite, with the exact bits per parameter, and training
lowers the held-out perplexity of every base.
"""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HF, ROOT

spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_int4_rtn_is_the_nearest_grid_point():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w[3, :64] = 0.0  # an all-zero block stays zero (no 0/0)
    got = quality.int4_rtn(w, blocksize=64)
    blocks = w.reshape(-1, 64)  # (nblocks, 64)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7  # (nblocks, 1)
    grid = torch.arange(-7, 8, dtype=torch.float32)  # the 15 codes
    # brute force: every element against every code (ties have probability 0 for Gaussian data)
    codes = grid[((blocks / scale.clamp(min=1e-30))[..., None] - grid).abs().argmin(dim=-1)]  # (nblocks, 64)
    expected = (codes * scale).reshape(w.shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(got[3, :64], torch.zeros(64))
    # each block's absmax element is reproduced to float32 rounding (code +-7 times absmax / 7)
    torch.testing.assert_close(got.reshape(-1, 64).abs().amax(dim=1), blocks.abs().amax(dim=1), rtol=1e-6, atol=0)


def test_nf4_beats_int4_beats_fp4_on_gaussian_weights():
    """QLoRA §3: NF4 is information-theoretically matched to normal weights. Relative errors here are ~0.0085
    (NF4), ~0.0115 (int4), ~0.0148 (FP4) on 1M Gaussian values; the margins are >20x the sampling noise."""
    w = [torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))]
    err = {}
    for kind in ("nf4", "fp4"):
        err[kind] = quality.relative_error(w, lambda x: quality.nf4.Linear4bit.from_weight(
            x, quant_type=kind, blocksize=64, double_quant=False, compute_dtype=torch.float32).dequantize(torch.float32))
    err["int4"] = quality.relative_error(w, lambda x: quality.int4_rtn(x, 64))
    assert err["nf4"] < 0.9 * err["int4"] < 0.9 * err["fp4"], err


def test_q4_1_roundtrip_is_idempotent_and_has_16_levels():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    once = quality.q4_1_roundtrip(w)
    assert quality.relative_error([w], quality.q4_1_roundtrip) > 1e-3  # a real 4-bit error on Gaussian data
    assert quality.relative_error([once], quality.q4_1_roundtrip) < 1e-10  # none on values already on its grid
    assert max(len(torch.unique(b)) for b in once.reshape(-1, 32)) <= 16


@pytest.fixture(scope="module")
def tiny_model():
    return quality.llama.from_pretrained(str(HF / "tied"), quant=None, dtype=torch.float32, device="cpu")


def test_heldout_nll_matches_unpadded_rows(tiny_model):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 2)]
    total, count = quality.heldout_nll(tiny_model, rows, batch_size=3, chunk=7)  # padding and chunk edges
    ref_total = 0.0
    with torch.no_grad():
        for r in rows:
            logits = tiny_model(torch.tensor([r]))[0].float()  # (T, V)
            ref_total += F.cross_entropy(logits[:-1], torch.tensor(r[1:]), reduction="sum").item()
    assert count == sum(len(r) - 1 for r in rows)
    assert math.isclose(total, ref_total, rel_tol=1e-5)  # fp32 model; only the summation order differs


def test_topic_split_is_disjoint():
    tok = quality.Tokenizer.from_file(str(HF / "tied" / "tokenizer.json"))
    by_topic = quality.topic_rows(tok, 56)
    train, heldout, held_topics = quality.split_rows(by_topic, 20)
    assert len(heldout) == 20 and held_topics
    held_rows = {r for t in held_topics for r in by_topic[t]}
    assert set(heldout) <= held_rows
    # every row of every other topic trains, and none of the held-out topics' rows
    assert train == [r for t in sorted(by_topic) if t not in held_topics for r in by_topic[t]]
    longest = max(len(tok.encode(r, add_special_tokens=False).ids) for r in train + heldout)
    assert longest <= 56 + 8, longest  # the bench leaves 8 tokens of slack below --seq-len for this


def test_quick_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        results, study = quality.main(["--quick", "--threads", "1", "--out", str(tmp_path / "q.md")])
    finally:
        torch.set_num_threads(threads)
    assert list(results) == list(quality.BASES)
    saved = json.loads((tmp_path / "q.json").read_text())
    assert set(saved["results"]) == set(quality.BASES)
    # bits: the formats' layouts (the tiny model's few blocks make DQ's per-256-block float count a bit more)
    assert results["16-bit"]["bits"] == 16.0  # --dtype bfloat16
    assert results["nf4"]["bits"] == results["int4"]["bits"] == 4.5
    assert 4.127 <= results["nf4+dq"]["bits"] == results["fp4+dq"]["bits"] < 4.5
    for base, r in results.items():
        assert math.isfinite(r["before"]) and r["before"] > 1
        for run in r["runs"].values():
            steps, ppl = zip(*run["curve"])
            assert steps == (0, 2, 4) and all(math.isfinite(p) for p in ppl)
            assert ppl[-1] < ppl[0], (base, ppl)  # the fine-tune lowers held-out perplexity
    report = (tmp_path / "q.md").read_text()
    for base in quality.BASES:
        assert f"| {base} |" in report
    assert set(study["error"]) == {"q4_1 (GGUF, blocks of 32)", "nf4+dq", "nf4", "fp4+dq", "int4"}
