"""``python -m analyses.circuit_discovery`` end to end on a tiny model and collection: the stored
units reassemble the library's results, resume after an interruption, torchrun (2 processes)
equals one process."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
import torch

from analyses import circuit_discovery as cd
from tests.distributed_helpers import torchrun

WORK = ["--limit-queries", "3", "--greedy-budget", "0.05", "--greedy-step", "2"]
WORK += ["--budgets", "0.02", "0.05", "0.2", "0.5", "--draw-budget", "0.05"]


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_model_dir, tiny_collection_dir):
    from tests.analyses.conftest import common_options

    out = tmp_path_factory.mktemp("cd") / "run"
    argv = [*common_options(tiny_model_dir, tiny_collection_dir), *WORK, "--exact-queries", "1"]
    assert cd.main([*argv, "--output", str(out)]) == 0
    return out, argv


@pytest.mark.slow
def test_study_reassembles_the_library(study_run, tiny_model_dir, tiny_collection_dir):
    out, argv = study_run
    queries = [u.split(":", 1)[1] for u in units(out) if u.startswith("attr:")]
    assert len(queries) >= 2
    assert units(out)[len(queries)] == f"exact:{queries[0]}"
    assert units(out)[-2:] == ["greedy", "matching"]
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from patching.edges import edge_attribution, faithfulness_curve

    model = load_cross_encoder(tiny_model_dir, device="cpu")
    args = cd.build_parser().parse_args(argv)
    pairs, _ = cd.build_pairs(model, load_collection(tiny_collection_dir, split="test"), args)
    ig = edge_attribution(model, pairs, method="eap_ig", metric="margin")
    edges = pd.read_csv(out / "edges.csv.gz")
    torch.testing.assert_close(
        torch.tensor(edges.eap_ig.to_numpy()), ig.mean().double(), atol=1e-5, rtol=0
    )
    curve = faithfulness_curve(
        model, pairs, scores=ig, budgets=(0.02, 0.05, 0.2, 0.5), metric="margin"
    )
    table = pd.read_csv(out / "faithfulness.csv")
    got = table[table.ranking == "eap_ig"].faithfulness.to_numpy()
    torch.testing.assert_close(torch.tensor(got), curve.faithfulness.double(), atol=1e-4, rtol=0)
    assert set(table.ranking) == {"eap_ig", "eap", "exact", "greedy (eap_ig + exact)"}
    root = ET.fromstring((out / "circuit.svg").read_text())
    assert len(root.findall("{http://www.w3.org/2000/svg}path")) >= 1
    text = (out / "summary.md").read_text()
    for heading in ("## Edges", "## Faithfulness", "## The circuit", "## Heads shared"):
        assert heading in text
    assert "EAP-IG vs exact" in text


@pytest.mark.slow
def test_resume_and_two_processes(study_run, tmp_path):
    out, argv = study_run
    parts = tmp_path / "parts"
    assert cd.main([*argv, "--output", str(parts), "--max-units", "2"]) == 0
    assert len(units(parts)) == 2
    assert cd.main([*argv, "--output", str(parts)]) == 0
    assert units(parts) == units(out)
    pd.testing.assert_frame_equal(
        pd.read_csv(parts / "faithfulness.csv"), pd.read_csv(out / "faithfulness.csv")
    )
    two = tmp_path / "two"
    proc = torchrun(2, "analyses.circuit_discovery", [*argv, "--output", str(two)])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("summary.md") == 1
    assert units(two) == units(out)
    a, b = pd.read_csv(two / "faithfulness.csv"), pd.read_csv(out / "faithfulness.csv")
    pd.testing.assert_frame_equal(a, b, atol=1e-5)
    with pytest.raises(SystemExit, match="metric"):
        cd.main([*argv, "--output", str(parts), "--metric", "score"])


def test_bad_options(common_argv, tmp_path):
    with pytest.raises(SystemExit):
        cd.main([*common_argv, "--budgets", "0.5", "0.1", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        cd.main([*common_argv, "--n-steps", "0", "--output", str(tmp_path / "y")])
