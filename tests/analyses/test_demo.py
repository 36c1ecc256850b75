"""``mechir demo`` end to end on a budgeted subset of the embedded demo (3 queries), so the
main-job command cannot rot: the study, its tables and plots, the report, the printed summary,
and resuming without recomputation."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analyses.demo import GROUPS
from mechir.cli import main
from mechir.data import load_collection
from mechir.evaluation import evaluate


@pytest.mark.slow
def test_mechir_demo_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--limit-queries", "3", "--random-shuffles", "5"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    study = out / "direction_ablation__3q"
    for name in ("summary.md", "summary.json", "table.csv", "per_query.csv", "references.csv"):
        assert (study / name).exists(), name
    assert (study / "bars_all_layers_groups.png").exists()
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in report and "no_interaction" in report

    summary = printed[printed.index("MiniLM-L6") :].strip().splitlines()
    assert len(summary) == 5
    assert "SciFact quick set" in summary[0] and "3 queries used" in summary[0]
    assert str(out / "report.html") in printed

    table = pd.read_csv(study / "table.csv")
    assert sorted(table.condition) == sorted(GROUPS)
    assert set(table.layers) == {"0-5"}
    rows = {json.loads(line)["unit"]: json.loads(line) for line in open(study / "results.jsonl")}
    qrels = load_collection("demo").qrels
    for r in table.to_dict("records"):  # the table is the stored runs, evaluated
        run = rows[r["unit"]]["run"]
        assert len(run) == 3 and all(len(docs) == 20 for docs in run.values())
        assert r["nDCG@10"] == evaluate(run, qrels).aggregate["nDCG@10"]

    lines = (study / "results.jsonl").read_text(encoding="utf-8")
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0  # resume: nothing recomputed
    assert (study / "results.jsonl").read_text(encoding="utf-8") == lines
    assert capsys.readouterr().out.count("MiniLM-L6") == 1
