"""Edge patching on the shared SciFact MiniLM cross-encoder (skipped when ../shared is absent):
the two identities at 1e-5, and EAP-IG against exact patching on a sample of edges."""

from __future__ import annotations

import pytest
import torch

from patching import PairBuilder
from patching.edges import edge_attribution, edge_graph, patch_edge_sets, patch_edges
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
    builder = PairBuilder(model.tokenizer, max_length=SHARED_MAX_LENGTH, choose="first")
    qid = collection.query_ids()[0]
    built = builder.build(
        collection.candidates(depth=2, query_ids=[qid]), "tfc1", qrels=collection.qrels
    )
    return model, built.batch(model.tokenizer)


def test_identities_on_the_shared_model(shared):
    model, pairs = shared
    assert int(pairs.lengths.max()) == SHARED_MAX_LENGTH
    clean, corrupted = model.score(pairs.clean), model.score(pairs.corrupted)
    assert (clean - corrupted).abs().max() > 0.05
    torch.testing.assert_close(patch_edges(model, pairs, edges=[]), clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(patch_edges(model, pairs, edges="all"), corrupted, atol=1e-5, rtol=0)
    g = edge_graph(model, parts=True)
    torch.testing.assert_close(
        patch_edges(model, pairs[:1], edges="all", graph=g), corrupted[:1], atol=1e-5, rtol=0
    )


def test_eap_ig_against_exact_on_the_top_edges(shared):
    """The 20 edges EAP-IG ranks first, patched exactly one by one: same signs and a close
    magnitude for the largest ones (a check of the scale of the estimates, not of the ranking:
    the benchmark measures that)."""
    model, pairs = shared
    one = pairs[:1]
    g = edge_graph(model)
    assert g.n_edges == 7588
    ig = edge_attribution(model, one, method="eap_ig", n_steps=8)
    top = ig.top(20)
    exact = patch_edge_sets(model, one, sets=[[int(e)] for e in top], graph=g)[0]
    effect = exact - model.score(one.clean)[0]
    estimate = ig.scores[0, top]
    agree = (torch.sign(effect) == torch.sign(estimate)).float().mean()
    assert agree >= 0.8, (effect, estimate)
    assert (effect.abs().max() - estimate.abs().max()).abs() <= 0.5 * effect.abs().max()
