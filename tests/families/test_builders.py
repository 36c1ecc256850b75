"""The tiny builders follow the registry: every registered family has one, and what a built
model declares (its family, ``abilities.edges``, causal attention, cross-attention) is what its
registry entry says, so tests may select builders by declaration (:func:`tiny_names`)."""

from __future__ import annotations

import pytest

from mechir import load_cross_encoder
from mechir.models.registry import FAMILIES
from tests.families.builders import pre_ln, save_tiny, tiny_builders, tiny_names


def test_every_registered_family_has_a_tiny_builder():
    built = {family.name for family, _ in tiny_builders().values()}
    missing = [f.name for f in FAMILIES if f.name not in built]
    assert not missing, f"no tiny builder in tests/families/builders.py for {missing}"


def test_selection_by_declaration():
    assert set(tiny_names(lambda f: f.edge_circuits)) >= {"bert", "modernbert"}
    assert "deberta" not in tiny_names(lambda f: f.edge_circuits)
    assert set(tiny_names(lambda f: f.kind == "decoder")) == {
        "qwen3", "qwen2", "llama-seqcls", "mistral",
    }  # fmt: skip
    assert set(tiny_names(lambda f: f.edge_circuits and pre_ln(f))) == {
        "modernbert", "modernbert-cls",
    }  # fmt: skip


@pytest.mark.parametrize("name", tiny_names())
def test_a_built_model_declares_what_its_registry_entry_says(name, tmp_path):
    family, _ = tiny_builders()[name]
    model = load_cross_encoder(save_tiny(name, tmp_path / name), device="cpu")
    assert model.family == family
    assert model.abilities.edges == family.edge_circuits
    assert model.abilities.causal == (family.kind == "decoder")
    assert model.abilities.cross_attention == (family.kind == "encoder-decoder")
    if family.kind == "encoder":
        assert model.abilities.post_ln == (not pre_ln(family))
