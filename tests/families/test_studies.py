"""``python -m analyses.direction_ablation`` end to end on a tiny model of every family, on the
shared SciFact quick split (skipped without the shared assets)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analyses import direction_ablation
from tests.families.builders import FAMILY_NAMES, save_tiny_family
from tests.helpers import SCIFACT, requires_shared

CONDITIONS = ["query_to_document", "cls_reads_nothing"]


@pytest.mark.shared
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_direction_ablation_study_runs_on_every_family(name, tmp_path):
    requires_shared(SCIFACT)
    # 512 positions: the tiny tokenizers split SciFact's words into many pieces
    model_dir = save_tiny_family(name, tmp_path / name, max_length=512)
    out = tmp_path / "out"
    argv = [
        "--model", str(model_dir), "--dataset", str(SCIFACT), "--split", "quick",
        "--limit-queries", "3", "--layers", "all", "--depth", "20", "--max-length", "256",
        "--conditions", *CONDITIONS, "--random-shuffles", "20", "--device", "cpu",
        "--no-progress", "--output", str(out),
    ]  # fmt: skip
    assert direction_ablation.main(argv) == 0
    table = pd.read_csv(out / "table.csv")
    assert sorted(table.condition) == sorted(CONDITIONS)
    assert set(table.layers) == {"0-1"} and (table.queries == 3).all()
    assert table["nDCG@10"].between(0, 1).all()
    # CLS reads nothing in every layer: a head reading [CLS] no longer depends on the pair, all
    # tied (a mean-pooling head, ModernBERT's "mean", still reads every position)
    tied = int(table.set_index("condition").loc["cls_reads_nothing", "tied_queries"])
    config = json.loads((model_dir / "config.json").read_text())
    assert tied == (3 if config.get("classifier_pooling", "cls") == "cls" else 0)
    summary = json.loads((out / "summary.json").read_text())
    assert str(model_dir) in json.dumps(summary)
