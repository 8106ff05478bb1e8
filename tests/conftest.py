"""Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors, so the whole
correctness grid covers them on every machine. The variable must be set before bnlab (and Triton)
are imported."""

import os
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Hypothesis profiles: "ci" (the default) is derandomized, so every run draws the same examples
settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def seed_of(nodeid: str) -> int:
    """A test's seed: the CRC-32 of its node id (parameters included) plus ``BNLAB_TEST_SEED``."""
    return (zlib.crc32(nodeid.encode()) + int(os.environ.get("BNLAB_TEST_SEED", "0"))) % 2**32


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test draws from its own seed (torch, NumPy's and Python's global generators), so that a
    failure reproduces with the same command and CI cannot fail on an unlucky draw; a different
    ``BNLAB_TEST_SEED`` draws the whole suite again (``make test-seeds``)."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture
def concat_at_any_size(monkeypatch):
    """Dense layers read their concatenation from bnlab.concat's buffer from 512K-1M values, in
    channels_last training never (``bnlab.concat.large_enough``): with this, tests' small chunks
    take the buffer in every layout and mode."""
    from bnlab import concat

    monkeypatch.setattr(concat, "_TRAIN_NCHW_FROM", 0)
    monkeypatch.setattr(concat, "_TRAIN_CHANNELS_LAST_FROM", 0)
    monkeypatch.setattr(concat, "_OTHERWISE_FROM", 0)
