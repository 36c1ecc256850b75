from __future__ import annotations

import pytest

from tests.helpers import tiny_cross_encoder


@pytest.fixture(scope="session")
def tiny2(tmp_path_factory):
    """A tiny random 2-label (MonoBERT-style) cross-encoder: ``(model, hf_model, tokenizer)``."""
    return tiny_cross_encoder(tmp_path_factory.mktemp("tiny2"), seed=1, num_labels=2)
