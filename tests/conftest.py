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
