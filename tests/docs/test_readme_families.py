"""The README's "Supported families" table and its edge-circuit claim follow the registry and
the families' declarations: a family added to :data:`mechir.models.FAMILIES` without its README
row, a row naming a family mechir does not load, or a family whose declared edge support
(``Family.edge_circuits``, a model's ``abilities.edges``) disagrees with the README fails here."""

from __future__ import annotations

import re
from pathlib import Path

from mechir.models.registry import FAMILIES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
#: How the README's prose shortens a family's name.
SHORT = {"XLM-RoBERTa": "XLM-R"}


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _table_first_cells() -> list[str]:
    rows = [r for r in _section("Supported families").splitlines() if r.startswith("| ")]
    return [r.split("|")[1] for r in rows[2:]]  # the header and rule rows are not families


def test_every_registered_family_has_a_row_naming_its_model_type():
    cells = _table_first_cells()
    for family in FAMILIES:
        assert any(
            family.name.split("-")[0] in cell and f"`{t}`" in cell
            for cell in cells
            for t in family.model_types
        ), f"README family table: no row for {family.name} ({family.model_types})"


def test_every_row_names_registered_model_types_only():
    registered = {t for f in FAMILIES for t in f.model_types}
    for cell in _table_first_cells():
        named = set(re.findall(r"`([a-z0-9-]+)`", cell))
        if not named:  # a model kind built on the families (bi-encoders): named by its loader
            assert "`mechir.load_" in cell, f"README family row {cell.strip()!r}: no model_type"
            continue
        assert named <= registered, f"README family row {cell.strip()!r}: {named}"


def test_the_edge_section_names_exactly_the_families_that_declare_edges():
    intro = _section("Edge-level circuits").split("\n\n")[1]
    for family in FAMILIES:
        named = re.search(rf"\b{re.escape(SHORT.get(family.name, family.name))}\b", intro)
        assert bool(named) == family.edge_circuits, (
            f"README edge section and {family.name}'s declared edge support disagree"
        )


def test_the_layernorm_sentence_follows_the_declared_blocks():
    """ "X, Y and Z are post-LayerNorm encoders ... W is pre-LayerNorm" names every encoder family
    by the blocks its file declares (``SPEC.blocks``, a model's ``abilities.post_ln``)."""
    table_end = _section("Supported families")
    post = re.search(r"\n([^\n|]+?) are post-LayerNorm encoders", table_end)
    pre = re.search(r"; ([^;]+?) is pre-LayerNorm", table_end)
    assert post and pre, "README: the post-/pre-LayerNorm sentence after the family table moved"
    for family in FAMILIES:
        if family.kind != "encoder":
            continue
        name = SHORT.get(family.name, family.name).split("-v")[0]  # "DeBERTa-v2" -> "DeBERTa"
        blocks = family.implementation().SPEC.blocks
        where = post.group(1) if blocks == "post_ln" else pre.group(1)
        assert re.search(rf"\b{re.escape(name)}\b", where), (
            f"README: {family.name} declares {blocks} blocks but the sentence says otherwise"
        )
