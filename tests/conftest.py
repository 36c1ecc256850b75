from __future__ import annotations

import pytest

from tests.helpers import DOCUMENTS, QUERIES, tiny_cross_encoder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random 1-label cross-encoder: ``(model, hf_model, tokenizer)``."""
    return tiny_cross_encoder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_batch(tiny):
    model, _, _ = tiny
    return model.encode(QUERIES, DOCUMENTS, max_length=64)
