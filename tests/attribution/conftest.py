from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_cross_encoder


@pytest.fixture(scope="session")
def tiny2(tmp_path_factory):
    """A tiny random 2-label (MonoBERT-style) cross-encoder: ``(model, hf_model, tokenizer)``."""
    return tiny_cross_encoder(tmp_path_factory.mktemp("tiny2"), seed=1, num_labels=2)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these tests on one intra-op thread (restored afterwards): tiny models gain nothing
    from threads, and on a busy 2-core machine thread contention made them ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
