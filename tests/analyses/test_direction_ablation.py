"""``python -m analyses.direction_ablation`` end to end on a tiny model and collection: outputs,
resume after an interruption, config checks; and the reference values on the shared assets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analyses import direction_ablation as da
from mechir.parts import Part
from tests.analyses.conftest import DIRECTION_ABLATION_WORK as WORK
from tests.analyses.conftest import run_direction_ablation as run_study

ROOT = Path(__file__).resolve().parents[2]


def results_units(out: Path) -> list[str]:
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- parsing
def test_conditions_are_deduplicated_and_named():
    conds = da.parse_conditions(["groups", "directions"])
    assert len(conds) == 6 + 25 - 3  # Q->D, D->Q and D->D are groups and single directions
    q2d = da.parse_conditions(["query->document"])[0]
    assert q2d.names == ["query_to_document", "QUERY->DOCUMENT"]
    assert da.condition_from_key(q2d.key) == q2d
    cls = da.parse_conditions(["cls->query+document"])[0]
    assert cls.name == "cls_reads_query_document"
    assert cls.pairs == {(Part.CLS, Part.QUERY), (Part.CLS, Part.DOCUMENT)}
    with pytest.raises(ValueError, match="unknown condition 'everything'"):
        da.parse_conditions(["everything"])
    with pytest.raises(ValueError, match="unknown part name"):
        da.parse_conditions(["query->title"])


def test_layer_ranges():
    assert da.parse_layer_ranges(["cumulative"], 3) == [[0], [0, 1], [0, 1, 2]]
    assert da.parse_layer_ranges(["window:2", "all", "0-2"], 3) == [[0, 1], [1, 2], [0, 1, 2]]
    assert da.parse_layer_ranges(["window:2:2", "1,2"], 4) == [[0, 1], [2, 3], [1, 2]]
    assert [da.layers_label(x) for x in ([0], [0, 1, 2], [0, 2])] == ["0", "0-2", "0,2"]
    with pytest.raises(ValueError, match="layer 6 out of range: model has 6 layers"):
        da.parse_layer_ranges(["0-6"], 6)
    with pytest.raises(ValueError, match="unknown layer range 'last'"):
        da.parse_layer_ranges(["last"], 6)


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_outputs(direction_ablation_run, tiny_model_dir, tiny_collection_dir):
    out = direction_ablation_run
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 4 * 3 and not table.unit.duplicated().any()
    assert sorted(table.layers.unique()) == ["0", "0-1", "1"]
    units = results_units(out)
    assert len(units) == len(set(units)) == 13 and units[0] == "none"
    # the pooler reads only [CLS]: removing Q->D attention in the last layer changes nothing
    last = table[(table.condition == "query_to_document") & (table.layers == "1")]
    assert last["delta"].item() == 0 and last["p"].item() == 1
    assert table.p_holm.between(0, 1).all() and (table.p_holm >= table.p).all()
    # [CLS] reading nothing in every layer makes every score the same constant: all 6 queries
    # are ties, flagged in the table and the summary
    tied = table.set_index(["condition", "layers"]).tied_queries
    assert tied[("cls_reads_nothing", "0-1")] == 6 and tied[("query_to_document", "0")] == 0
    assert "**Ties**" in (out / "summary.md").read_text()

    # the baseline is exactly the library's rerank + evaluate
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from mechir.evaluation import evaluate, rerank

    col = load_collection(tiny_collection_dir, split="test")
    model = load_cross_encoder(tiny_model_dir, device="cpu")
    expected = evaluate(
        rerank(model, col.candidates(depth=6), max_length=48, progress=False), col.qrels
    ).aggregate["nDCG@10"]
    refs = pd.read_csv(out / "references.csv").set_index("ranking")["nDCG@10"]
    assert refs["unablated model"] == pytest.approx(expected, abs=1e-12)
    assert refs["worst order (ideal order reversed)"] <= refs.filter(like="random").item()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["title"] == "Attention direction ablation"
    images = [b["path"] for b in summary["blocks"] if b["type"] == "image"]
    assert {"heatmap_all_layers.png", "curve_cumulative_groups.png"} <= set(images)
    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Reference rankings" in (out / "summary.md").read_text()
    # issue 30: t-tests over the tiny collection's 6 queries carry the small-sample warning
    assert (
        "**Small sample:** the paired t-tests rest on 6 queries" in (out / "summary.md").read_text()
    )
    assert "- **score type**: binary_logit" in (out / "summary.md").read_text()  # the default
    per_query = pd.read_csv(out / "per_query.csv")
    assert set(per_query.unit) == set(units) and per_query.qid.nunique() == 6


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_table(
    direction_ablation_run, common_argv, tmp_path
):
    full, parts = direction_ablation_run, tmp_path / "parts"
    argv = [*common_argv, *WORK]
    assert run_study([*argv, "--output", str(parts), "--max-units", "3"]) == 0
    assert results_units(parts) == ["none", *results_units(full)[1:3]]
    assert not (parts / "summary.md").exists()
    with open(parts / "results.jsonl", "ab") as f:  # a line torn by kill -9
        f.write(b'{"unit":"QUERY->DOCUMENT@0-1","seconds":0.1,"run":{"q0":{"d1":0.')
    assert run_study([*argv, "--output", str(parts), "--max-units", "4"]) == 0
    assert len(results_units(parts)) == 7
    assert run_study([*argv, "--output", str(parts)]) == 0
    units = results_units(parts)
    assert len(units) == len(set(units)) == 13
    pd.testing.assert_frame_equal(
        pd.read_csv(parts / "table.csv"), pd.read_csv(full / "table.csv"), check_exact=False
    )
    assert (parts / "summary.md").read_text() == (full / "summary.md").read_text()


@pytest.mark.slow
def test_kill_9_then_resume(direction_ablation_run, common_argv, tmp_path):
    """A real SIGKILL while units are being computed; the rerun completes the same table."""
    out = tmp_path / "killed"
    argv = [*common_argv, *WORK, "--output", str(out)]
    argv = [a for a in argv if a != "--no-progress"]
    env = {**os.environ, "TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "analyses.direction_ablation", *argv],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    seen = b""
    while proc.poll() is None:  # read the progress bar until 3 units are done, then kill -9
        seen += proc.stderr.read(1)
        found = re.findall(rb"(\d+)/13 \[", seen)
        if found and int(found[-1]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 3 <= len(results_units(out)) < 13
    assert run_study([*common_argv, *WORK, "--output", str(out)]) == 0
    units = results_units(out)
    assert len(units) == len(set(units)) == 13
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "table.csv"),
        pd.read_csv(direction_ablation_run / "table.csv"),
        check_exact=False,
    )


@pytest.mark.slow
def test_config_mismatch_is_an_error(common_argv, tmp_path):
    out = tmp_path / "out"
    argv = [
        *common_argv,
        "--conditions",
        "query_to_document",
        "--layers",
        "0",
        "--output",
        str(out),
    ]
    assert run_study(argv) == 0
    with pytest.raises(SystemExit, match=r"other options \(depth: 6 there, 5 now\)"):
        run_study([*argv, "--depth", "5"])
    with pytest.raises(SystemExit, match="mode: 'zero' there, 'renormalize' now"):
        run_study([*argv, "--mode", "renormalize"])
    # the work list may grow: finished units are reused, new ones computed
    assert run_study([*argv[:-4], "--layers", "0", "1", "--output", str(out)]) == 0
    assert len(results_units(out)) == 3
    # another study's directory, or results of unknown setting, are refused too
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "study": "qk_svd"}))
    with pytest.raises(SystemExit, match="study 'qk_svd'"):
        run_study(argv)
    (out / "config.json").unlink()
    with pytest.raises(SystemExit, match="no config.json"):
        run_study(argv)


def test_renormalize_mode_has_its_own_directory(common_argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*common_argv, "--conditions", "cls_reads_nothing", "--layers", "all"]
    assert run_study([*argv, "--mode", "renormalize"]) == 0
    (out,) = (tmp_path / "results" / "direction_ablation").iterdir()
    assert out.name.endswith("__renormalize")
    table = pd.read_csv(out / "table.csv")
    assert table.condition.tolist() == ["cls_reads_nothing"]


# ---------------------------------------------------------------------- shared assets
REFERENCE = {  # ../shared/README.md, computed by an independent implementation
    "bm25": 0.7923,
    "random": 0.2143,
    "none": 0.7684,
    "query_to_document@0-5": 0.3957,
}


@pytest.mark.shared
def test_reproduces_shared_reference_values(tmp_path):
    from tests.helpers import SCIFACT, SHARED_MAX_LENGTH, SHARED_MODEL, requires_shared

    requires_shared(SHARED_MODEL)
    requires_shared(SCIFACT)
    out = tmp_path / "shared"
    argv = [
        "--model", str(SHARED_MODEL), "--dataset", str(SCIFACT), "--split", "quick",
        "--depth", "20", "--max-length", str(SHARED_MAX_LENGTH), "--device", "cpu",
        "--batch-size", "50", "--no-progress", "--conditions", "query_to_document",
        "--layers", "0-5", "--output", str(out),
    ]  # fmt: skip
    assert da.main(argv) == 0
    refs = pd.read_csv(out / "references.csv").set_index("ranking")["nDCG@10"]
    assert refs["first-stage order (e.g. BM25)"] == pytest.approx(REFERENCE["bm25"], abs=0.002)
    assert refs["unablated model"] == pytest.approx(REFERENCE["none"], abs=0.002)
    # a different set of 200 shuffles: the mean's standard error is about 0.003
    assert refs.filter(like="random").item() == pytest.approx(REFERENCE["random"], abs=0.01)
    (row,) = pd.read_csv(out / "table.csv").to_dict("records")
    assert row["condition"] == "query_to_document" and row["layers"] == "0-5"
    assert row["nDCG@10"] == pytest.approx(REFERENCE["query_to_document@0-5"], abs=0.002)
    assert row["p_holm"] < 0.001
