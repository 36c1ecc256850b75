"""``mechir rerank`` under ``torchrun`` (2 CPU processes, gloo): the same TREC run, store and
summary as one process; resume after rank 1 is killed, with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mechir import outputs
from mechir.data import read_run
from tests.analyses.conftest import write_tiny_collection
from tests.distributed_helpers import ROOT, kill_rank_when_stored, torchrun
from tests.helpers import SCIFACT, SHARED_MAX_LENGTH, SHARED_MODEL, requires_shared
from tests.test_cli import rerank_argv, saved_model  # noqa: F401 (fixture)


def store_rows(out: Path) -> list[dict]:
    path = out.with_name(out.name + ".mechir.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def leftovers(out: Path) -> list[Path]:
    """Shards and lock files beside the output (none once a run finished)."""
    return sorted(out.parent.glob("*.rank*")) + sorted(out.parent.glob("*.lock"))


def one_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m mechir.cli argv`` with one thread, as torchrun's workers run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "mechir.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_same_rerank(a: Path, b: Path) -> None:
    """Same TREC file, scores within 1e-6, same store rows in the same order, same CSV."""
    ra, rb = read_run(a), read_run(b)
    assert ra.keys() == rb.keys()
    for qid, docs in ra.items():
        assert docs.keys() == rb[qid].keys()
        assert max(abs(s - rb[qid][d]) for d, s in docs.items()) <= 1e-6
    assert a.read_text() == b.read_text()
    rows_a, rows_b = store_rows(a), store_rows(b)
    assert [r["unit"] for r in rows_a] == [r["unit"] for r in rows_b]
    assert len({r["unit"] for r in rows_a}) == len(rows_a)  # nothing duplicated
    assert [r["docids"] for r in rows_a] == [r["docids"] for r in rows_b]
    csv = a.with_suffix(".per_query.csv")
    assert csv.read_text() == b.with_suffix(".per_query.csv").read_text()
    assert not leftovers(a) and not leftovers(b)


def run_both(argv_of, tmp_path: Path) -> tuple[Path, Path]:
    """The same command with one plain process and with 2 torchrun processes; both succeed, the
    summary is printed once, by rank 0, and rank 1 prints rank-prefixed lines only."""
    one, two = tmp_path / "one" / "run.trec", tmp_path / "two" / "run.trec"
    ref = one_process(argv_of(one))
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = torchrun(2, "mechir.cli", argv_of(two))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(ref.stdout)
    assert json.loads(stdout) == summary  # one summary, the same numbers
    assert "[rank 1/2] scored" in stderr
    assert "[rank 1/2]" not in stdout and "mechir: error" not in stderr
    return one, two


def assert_prompt_reranker_runs_alike(model_dir: Path, tmp_path: Path, option: str, value: str):
    """A prompt-based reranker reranks a tiny collection (5 queries x 4) alike with one plain
    process and with 2 torchrun processes, ``--<option> value`` recorded in both stores'
    settings, and its first two stored rows hold the model's own scores."""
    import torch

    from mechir import load_cross_encoder

    collection = write_tiny_collection(tmp_path / "col", n_queries=5, depth=4)
    flag = "--" + option.replace("_", "-")
    one, two = run_both(lambda out: rerank_argv(model_dir, collection, out, flag, value), tmp_path)
    assert_same_rerank(one, two)
    for run in (one, two):
        meta = json.loads(run.with_name(run.name + ".mechir.json").read_text())
        assert meta["settings"][option] == value
    rows = store_rows(one)
    model = load_cross_encoder(model_dir, device="cpu", **{option: value})
    tsv = lambda name: dict(  # noqa: E731
        line.split("\t", 1) for line in (collection / name).read_text().splitlines()
    )
    queries, documents = tsv("queries.test.tsv"), tsv("docs.tsv")
    assert len(rows) == 5
    for row in rows[:2]:
        texts = [documents[d] for d in row["docids"]]
        batch = model.encode([queries[row["unit"]]] * len(texts), texts)
        torch.testing.assert_close(
            torch.tensor(row["scores"]), model.score(batch), atol=1e-5, rtol=0
        )


@pytest.mark.slow  # torchrun: over 9 s here
def test_two_processes_equal_one(saved_model, tmp_path):  # noqa: F811
    collection = write_tiny_collection(tmp_path / "col", n_queries=7, depth=5)
    one, two = run_both(lambda out: rerank_argv(saved_model, collection, out), tmp_path)
    assert len(store_rows(two)) == 7
    assert_same_rerank(two, one)


@pytest.mark.slow  # torchrun: over 9 s here
def test_kill_rank_one_then_resume_with_one_process(saved_model, tmp_path):  # noqa: F811
    pytest.importorskip("psutil", reason="psutil finds the PID of rank 1 (pip install psutil)")
    n_queries = 120  # small batches over many queries: the kill lands mid-run
    collection = write_tiny_collection(tmp_path / "col", n_queries=n_queries, n_docs=200, depth=20)
    reference, out = tmp_path / "one" / "run.trec", tmp_path / "killed" / "run.trec"
    ref = one_process(rerank_argv(saved_model, collection, reference, "--batch-size", "2"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = torchrun(2, "mechir.cli", rerank_argv(saved_model, collection, out, "--batch-size", "2"))
    shard = out.with_name("run.trec.mechir.rank1.jsonl")
    killed = kill_rank_when_stored(proc, shard, 2)
    proc.communicate(timeout=120)
    assert killed is not None, "the run finished before rank 1 could be killed"
    assert proc.returncode != 0 and not out.exists()
    assert shard.exists()  # rank 1's finished queries wait in its shard
    stored = sum(len(p.read_text().splitlines()) for p in out.parent.glob("*.mechir*.jsonl"))
    assert 2 <= stored < n_queries  # killed mid-run

    resumed = one_process(rerank_argv(saved_model, collection, out, "--batch-size", "2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from the shards of an earlier run" in resumed.stderr
    assert json.loads(resumed.stdout) == json.loads(ref.stdout)
    assert len(store_rows(out)) == n_queries
    assert_same_rerank(out, reference)


@pytest.mark.shared
def test_scifact_quick_two_processes_equal_one(tmp_path):
    requires_shared()
    requires_shared(SCIFACT)

    def argv_of(out: Path) -> list[str]:
        extra = ("--depth", "20", "--max-length", str(SHARED_MAX_LENGTH), "--limit-queries", "5")
        return rerank_argv(SHARED_MODEL, SCIFACT, out, *extra, split="quick")

    one, two = run_both(argv_of, tmp_path)
    assert len(store_rows(two)) == 5
    assert_same_rerank(two, one)


@pytest.mark.slow  # torchrun: over 9 s here
def test_leftover_shards_of_another_world_size_resume_with_two(saved_model, tmp_path):  # noqa: F811
    """A store and shards left by a killed 4-process run (ranks 0 and 3 had written) resume
    with 2 processes: merged in query order, the rest split over the 2 ranks, same output."""
    collection = write_tiny_collection(tmp_path / "col", n_queries=9, depth=5)
    reference, out = tmp_path / "one" / "run.trec", tmp_path / "left" / "run.trec"
    ref = one_process(rerank_argv(saved_model, collection, reference))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out.parent.mkdir()
    meta = reference.with_name("run.trec.mechir.json")
    outputs.write_json(out.with_name(meta.name), json.loads(meta.read_text()))  # mechir's own
    lines = reference.with_name("run.trec.mechir.jsonl").read_text().splitlines(keepends=True)
    out.with_name("run.trec.mechir.jsonl").write_text(lines[1])
    out.with_name("run.trec.mechir.rank0.jsonl").write_text(lines[4] + lines[0])
    out.with_name("run.trec.mechir.rank3.jsonl").write_text(lines[3] + lines[7][:25])  # torn

    proc = torchrun(2, "mechir.cli", rerank_argv(saved_model, collection, out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "merged 3 queries from the shards" in stderr and "resuming: 4 of 9" in stderr
    assert json.loads(stdout) == json.loads(ref.stdout)
    assert_same_rerank(out, reference)
