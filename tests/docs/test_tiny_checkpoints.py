"""The tiny MonoT5 / DeBERTa recipe of ``docs/tiny_checkpoints.md`` runs offline as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def recipe() -> str:
    text = (ROOT / "docs" / "tiny_checkpoints.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the page holds one python recipe"
    return blocks[0]


def test_the_recipe_builds_checkpoints_mechir_loads(tmp_path, monkeypatch, capsys):
    from mechir import load_cross_encoder

    monkeypatch.chdir(tmp_path)
    exec(compile(recipe(), "docs/tiny_checkpoints.md", "exec"), {"__name__": "recipe"})
    printed = capsys.readouterr().out
    assert "MonoT5 tensor(" in printed and "DeBERTa-v2 tensor(" in printed
    for path, family in (("tiny/monot5", "MonoT5"), ("tiny/deberta-v3", "DeBERTa-v2")):
        model = load_cross_encoder(tmp_path / path, device="cpu")
        assert model.family.name == family
        scores = model.score(model.encode(["what do cats eat"] * 2, ["cats eat fish", "meat"]))
        assert torch.isfinite(scores).all() and scores[0] != scores[1]
