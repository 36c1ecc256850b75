"""Issue 30: a file that mechir did not write is never modified, by any study, the report or the
demo (refused in one line, exit status 2); every file a study writes goes through
:mod:`mechir.outputs`; identical runs write byte-identical results files."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from analyses.base import TIMINGS
from mechir.outputs import RECORD_NAME, content_hash
from tests.analyses.conftest import DIRECTION_ABLATION_WORK, common_options

#: Each bundled study on its quickest settings (the ones its own tests use).
STUDIES = {
    "direction_ablation": [*DIRECTION_ABLATION_WORK, "--random-shuffles", "5"],
    "matching_heads": ["--no-correct-only", "--threshold", "0.01", "--random-shuffles", "5",
                       "--knockout-top", "1", "--knockout-random", "1"],
    "neuron_attribution": ["--pairs-per-class", "4", "--per-query", "1", "--n-steps", "4",
                           "--unit-pairs", "3", "--prune-seeds", "1", "--percents", "10"],
    "patching_tfc1": ["--unit-pairs", "10"],
    "qk_svd": ["--top-heads", "2", "--directions", "2", "--tokens", "4", "--cosine-pairs", "12"],
    "axioms": ["--max-pairs", "8", "--component-pairs", "4", "--patch-pairs", "4",
               "--head-scaling", "0", "2", "--qk-ablation", "--ffn-share", "--nig-percent", "5",
               "--nig-steps", "4"],
    "circuit_discovery": ["--limit-queries", "2", "--greedy-budget", "0", "--no-matching",
                          "--budgets", "0.02", "0.1", "--n-steps", "2"],
    "features": ["--train-queries", "3", "--eval-queries", "3", "--steps", "6", "--train-batch",
                 "16", "--eval-every", "3", "--k", "4", "--d-sae", "32", "--cards", "2",
                 "--top-features", "3", "--attribution-pairs", "2", "--circuit-pairs", "2",
                 "--circuit-down-nodes", "2", "--circuit-budgets", "0.05", "0.2"],
}  # fmt: skip
#: Files a study writes that are not mechir.outputs' (append-only stores, which recognise
#: their own form) and the run's record (its times and command differ between runs).
NOT_OUTPUTS = {"results.jsonl", TIMINGS, RECORD_NAME}


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def record(directory: Path) -> dict[str, str]:
    return json.loads((directory / RECORD_NAME).read_text())["files"]


def run_study(name: str, argv: list[str], out: Path) -> int:
    module = importlib.import_module(f"analyses.{name}")
    extra = STUDIES[name]
    if name == "neuron_attribution":
        extra = [*extra, "--attribution-datasets", f"{argv[argv.index('--dataset') + 1]}@test"]
    try:
        return module.main([*argv, *extra, "--output", str(out)])
    except SystemExit as exit_:  # a user error: one line printed, status 2
        return int(exit_.code)


def last_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_study_writes_through_outputs_reproducibly_and_never_over_a_users_file(
    study, tiny_model_dir, tiny_collection_dir, tmp_path, capsys
):
    argv = common_options(tiny_model_dir, tiny_collection_dir)
    first, second, mine = tmp_path / "first", tmp_path / "second", tmp_path / "mine"
    assert run_study(study, argv, first) == 0
    written = files(first)
    # every file the study wrote went through mechir.outputs: recorded with its hash
    recorded = record(first)
    assert set(written) - NOT_OUTPUTS == set(recorded), study
    for name, digest in recorded.items():
        assert content_hash(written[name]) == digest, name
    assert "seconds" not in written["results.jsonl"].decode()
    assert written[TIMINGS].count(b'"seconds":') == written["results.jsonl"].count(b"\n")

    # two identical runs: byte-identical results, tables (.csv.gz included) and summaries
    assert run_study(study, argv, second) == 0
    again = files(second)
    for name in set(written) - {TIMINGS, RECORD_NAME, "config.json"}:
        if name.endswith(".png"):
            continue  # rendered by matplotlib: not compared
        assert again[name] == written[name], f"{study}: {name} differs between identical runs"

    # every file it writes made the user's (not recorded): the finished rerun refuses, exit 2,
    # and leaves every byte as it was
    shutil.copytree(first, mine)
    (mine / RECORD_NAME).unlink()
    for name in recorded:
        if name != "config.json":
            (mine / name).write_text(f"the user's {name}\n")
    from mechir import outputs

    (mine / "config.json").unlink()
    outputs.write_bytes(mine / "config.json", written["config.json"])  # the directory's record
    before = files(mine)
    capsys.readouterr()
    assert run_study(study, argv, mine) == 2
    line = last_error(capsys)
    assert "was not written by mechir" in line and str(mine) in line
    assert files(mine) == before


def test_l1_circuit_study_refuses_the_users_summary_before_any_work(capsys, tmp_path):
    """Issue 30, L1: a directory holding the user's summary.md and faithfulness.csv."""
    from analyses import circuit_discovery

    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.md").write_text("notes\n")
    (out / "faithfulness.csv").write_text("x,y\n")
    argv = ["--model", "demo", "--dataset", "demo", "--limit-queries", "2", "--depth", "10"]
    argv += [*STUDIES["circuit_discovery"][2:], "--output", str(out), "--no-progress"]
    for _ in range(2):
        with pytest.raises(SystemExit) as exit_:
            circuit_discovery.main(argv)
        assert exit_.value.code == 2
        line = last_error(capsys)
        assert f"{out}/summary.md exists and was not written by mechir" in line
        assert "choose another --output" in line
        assert files(out) == {"summary.md": b"notes\n", "faithfulness.csv": b"x,y\n"}
        (out / "summary.md").rename(out / "notes.md")  # then the CSV alone is refused
        with pytest.raises(SystemExit):
            circuit_discovery.main(argv)
        assert f"{out}/faithfulness.csv exists and was not written by mechir" in last_error(capsys)
        (out / "notes.md").rename(out / "summary.md")
    assert files(out) == {"summary.md": b"notes\n", "faithfulness.csv": b"x,y\n"}


def test_a_foreign_file_met_at_summary_time_keeps_the_finished_units(
    direction_ablation_run, tiny_model_dir, tiny_collection_dir, tmp_path, capsys
):
    """A file named from the options (a plot) is checked when it is written: the rerun stops
    there, in one line, the user's file intact and every unit kept."""
    out = tmp_path / "run"
    shutil.copytree(direction_ablation_run, out)
    pngs = sorted(out.glob("*.png"))
    assert pngs
    entries = record(out)
    del entries[pngs[-1].name]
    (out / RECORD_NAME).write_text(json.dumps({"mechir_outputs": 1, "files": entries}))
    pngs[-1].write_bytes(b"the user's picture")
    results = (out / "results.jsonl").read_bytes()
    argv = common_options(tiny_model_dir, tiny_collection_dir)
    assert run_study("direction_ablation", argv, out) == 2
    assert f"{pngs[-1]} exists and was not written by mechir" in last_error(capsys)
    assert pngs[-1].read_bytes() == b"the user's picture"
    assert (out / "results.jsonl").read_bytes() == results


def test_l3_demo_refuses_the_users_report_before_any_work(tmp_path, capsys):
    """Issue 30, L3: ``mechir demo --output d`` with the user's d/report.html."""
    from mechir.cli import main

    out = tmp_path / "d"
    out.mkdir()
    (out / "report.html").write_text("<html>mine</html>")
    assert main(["demo", "--limit-queries", "2", "--output", str(out), "--no-progress"]) == 2
    line = last_error(capsys)
    assert f"{out}/report.html exists and was not written by mechir" in line
    assert "choose another --output" in line
    assert files(out) == {"report.html": b"<html>mine</html>"}
    assert [p.name for p in out.iterdir()] == ["report.html"]  # no study directory either


def test_l4_report_refuses_the_users_page(direction_ablation_run, tmp_path, capsys, monkeypatch):
    """Issue 30, L4: ``python -m analyses.report results/ -o mine.html``; a page mechir wrote is
    rewritten."""
    from analyses import report

    monkeypatch.chdir(tmp_path)
    Path("mine.html").write_text("mine\n")
    root = str(direction_ablation_run.parent)
    with pytest.raises(SystemExit) as exit_:
        report.main([root, "-o", "mine.html"])
    assert exit_.value.code == 2
    line = last_error(capsys)
    assert "mine.html exists and was not written by mechir" in line and "-o/--output" in line
    assert Path("mine.html").read_text() == "mine\n"
    assert report.main([root, "-o", "ours.html"]) == 0
    assert report.main([root, "-o", "ours.html"]) == 0  # mechir's own page: rewritten
    assert "<html" in Path("ours.html").read_text()
