"""Studies under ``torchrun`` (2 CPU processes, gloo): the same results as one process, and
resume after one rank is killed, with a different number of processes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.analyses.conftest import DIRECTION_ABLATION_WORK as WORK
from tests.analyses.conftest import common_options, write_tiny_collection
from tests.analyses.conftest import run_direction_ablation as run_study
from tests.distributed_helpers import kill_rank_when_stored, torchrun


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def assert_same_results(a: Path, b: Path) -> None:
    """Same units in the same order, every score within 5e-6, same tables and summary.

    Not bit-equal: two ranks batch other pairs together, and the fused attention kernel (used
    when no hook watches the pattern) rounds differently at another padded width (~1e-6 on
    these scores); a sharding or gathering error would move scores by far more."""
    ra, rb = rows(a), rows(b)
    assert [r["unit"] for r in ra] == [r["unit"] for r in rb]
    assert len({r["unit"] for r in ra}) == len(ra)
    for x, y in zip(ra, rb):
        assert x["run"].keys() == y["run"].keys()
        for qid, docs in x["run"].items():
            assert docs.keys() == y["run"][qid].keys()
            assert max(abs(s - y["run"][qid][d]) for d, s in docs.items()) <= 5e-6
    for table in ("table.csv", "per_query.csv", "references.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(a / table), pd.read_csv(b / table))
    assert (a / "summary.md").read_text() == (b / "summary.md").read_text()
    assert not list(a.glob("results.rank*")) and not list(b.glob("results.rank*"))


@pytest.mark.slow  # torchrun: over 9 s here
def test_two_processes_equal_one(direction_ablation_run, common_argv, tmp_path):
    out = tmp_path / "two"
    argv = [*common_argv, *WORK, "--random-shuffles", "20", "--output", str(out)]
    proc = torchrun(2, "analyses.direction_ablation", argv)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("summary.md") == 1  # rank 0 alone wrote the outputs
    assert_same_results(out, direction_ablation_run)


@pytest.fixture(scope="module")
def slow_collection(tmp_path_factory) -> Path:
    """Units that take a while (30 queries x 20 candidates), so that a kill lands mid-run."""
    return write_tiny_collection(
        tmp_path_factory.mktemp("slow"), n_queries=30, n_docs=200, depth=20
    )


@pytest.mark.slow  # torchrun: over 9 s here
def test_kill_one_rank_then_resume_with_one_process(tiny_model_dir, slow_collection, tmp_path):
    pytest.importorskip("psutil", reason="psutil finds the PID of rank 1 (pip install psutil)")
    argv = common_options(tiny_model_dir, slow_collection)
    argv[argv.index("--depth") + 1] = "20"
    argv = [*argv, *WORK]
    reference, out = tmp_path / "one", tmp_path / "killed"
    assert run_study([*argv, "--output", str(reference)]) == 0

    proc = torchrun(
        2, "analyses.direction_ablation", [*argv, "--random-shuffles", "20", "--output", str(out)]
    )
    killed = kill_rank_when_stored(proc, out / "results.rank1.jsonl", 1, timeout=240)
    proc.communicate(timeout=120)
    assert killed is not None, "the run finished before rank 1 could be killed"
    assert proc.returncode != 0 and not (out / "summary.md").exists()
    stored = sum(1 for _ in out.glob("results*.jsonl") for _ in _.read_text().splitlines())
    assert 1 <= stored < 13  # killed mid-run

    assert run_study([*argv, "--output", str(out)]) == 0  # one process this time
    assert_same_results(out, reference)
