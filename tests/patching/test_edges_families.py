"""Edge support follows each family's declaration (``Family.edge_circuits``, a model's
``abilities.edges``): on every family that declares it, the engine's two identities hold (no
edge patched = the clean run, every edge patched = the corrupted run); every other family is
refused in one line by every entry point. Families are selected by what they declare
(:func:`tests.families.builders.tiny_names`), so a new family is covered by its registry entry."""

from __future__ import annotations

import pytest
import torch

from mechir import load_cross_encoder
from mechir.attribution import baseline_batch
from patching.edges import edge_attribution, edge_graph, patch_edges, single_edge_scores
from tests.families.builders import save_tiny, tiny_names
from tests.helpers import DOCUMENTS, QUERIES

TOL = 1e-5
EDGE_FAMILIES = tiny_names(lambda family: family.edge_circuits)
OTHER_FAMILIES = tiny_names(lambda family: not family.edge_circuits)


def _loaded(name: str, tmp_path_factory):
    model = load_cross_encoder(save_tiny(name, tmp_path_factory.mktemp(name)), device="cpu")
    clean = model.encode(QUERIES, DOCUMENTS)
    return model, clean


def test_the_selection_is_not_empty():
    assert "bert" in EDGE_FAMILIES and "modernbert" in EDGE_FAMILIES
    assert "deberta" in OTHER_FAMILIES and "t5-v1.0" in OTHER_FAMILIES


@pytest.mark.parametrize("name", EDGE_FAMILIES)
def test_every_family_declaring_edges_keeps_the_identities(name, tmp_path_factory):
    model, clean = _loaded(name, tmp_path_factory)
    assert model.abilities.edges
    corrupted = baseline_batch(model, clean, "mask")  # aligned token for token
    s_clean, s_corrupted = model.score(clean), model.score(corrupted)
    assert (s_clean - s_corrupted).abs().max() > 1e-3, "the corruption must move the scores"
    none = patch_edges(model, clean, corrupted, edges=[])
    every = patch_edges(model, clean, corrupted, edges="all")
    torch.testing.assert_close(none, s_clean, atol=TOL, rtol=0)
    torch.testing.assert_close(every, s_corrupted, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_every_other_family_is_refused_in_one_line(name, tmp_path_factory):
    model, clean = _loaded(name, tmp_path_factory)
    assert not model.abilities.edges
    message = rf"edge circuits follow the blocks of .*the {model.family.name} family"
    entries = [
        lambda: patch_edges(model, clean, clean, edges=[]),
        lambda: single_edge_scores(model, clean, clean),
        lambda: edge_attribution(model, clean, clean, method="eap"),
    ]
    for call in entries:
        with pytest.raises(ValueError, match=message):
            call()
    assert edge_graph(model).n_edges > 0  # the graph itself is only the model's shape
