"""Patching on the shared SciFact cross-encoder (skipped when ../shared is absent)."""

from __future__ import annotations

import pytest
import torch

from patching import (
    PairBuilder,
    TermStatistics,
    attribution_patch,
    attribution_vs_exact,
    head_target,
    patch_sweep,
    patch_sweep_reference,
    resid_target,
)
from tests.helpers import SCIFACT, SHARED_MAX_LENGTH, SHARED_MODEL, requires_shared

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def shared():
    requires_shared(SHARED_MODEL)
    requires_shared(SCIFACT)
    from mechir import load_cross_encoder
    from mechir.data import load_collection

    model = load_cross_encoder(SHARED_MODEL, device="cpu")
    collection = load_collection(SCIFACT, split="quick")
    stats = TermStatistics.from_documents(collection.docs.values())
    builder = PairBuilder(model.tokenizer, max_length=SHARED_MAX_LENGTH, stats=stats)
    qid = collection.query_ids()[0]
    candidates = collection.candidates(depth=2, query_ids=[qid])
    built = builder.build(candidates, "tdc", qrels=collection.qrels)
    return model, built.batch(model.tokenizer)


def test_tdc_head_sweep_on_the_shared_model(shared):
    model, pairs = shared
    assert len(pairs) == 2 and int(pairs.lengths.max()) <= SHARED_MAX_LENGTH
    one = pairs[:1]
    fast = patch_sweep(model, one, head_target(), batch_size=24)
    ref = patch_sweep_reference(model, one, head_target())
    assert fast.patched.shape == (1, 6, 12)
    torch.testing.assert_close(fast.patched, ref.patched, atol=1e-5, rtol=0)
    full = patch_sweep(model, pairs, resid_target(by="all", layers=0))
    torch.testing.assert_close(full.patched[:, 0], full.clean, atol=1e-4, rtol=0)
    report = attribution_vs_exact(attribution_patch(model, one, head_target()), fast)
    assert report["n_values"] == 72 and -1 <= report["pearson"] <= 1
