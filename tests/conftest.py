"""Shared test helpers: where the copied reference fixtures live, and the CUDA skip marker."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BNB = FIXTURES / "bnb"  # bitsandbytes test vectors (see fixtures/bnb/README.md)
HF = FIXTURES / "hf"    # transformers-written tiny Llamas and their logits (see fixtures/hf/README.md)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def with_ulp_neighbours(values, ulps=4):
    """`values` plus each one's float32 neighbours up to `ulps` steps either way: where an encoder that
    decides by comparison against thresholds is most likely to disagree with the reference rule."""
    near = [values]
    for direction in (float("inf"), -float("inf")):
        b = values
        for _ in range(ulps):
            b = torch.nextafter(b, torch.full_like(b, direction))
            near.append(b)
    return torch.cat(near)
