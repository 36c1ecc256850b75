"""Per-rank shards of the results store: merged in unit order, never duplicated, torn lines
dropped, and never merged while a live process still writes them."""

from __future__ import annotations

import json

import pytest

from mechir.store import (
    ResultsStore,
    StoreLockedError,
    merge_shards,
    shard_path,
    shard_paths,
)


def units(path) -> list[str]:
    return [json.loads(line)["unit"] for line in path.read_text().splitlines()]


def test_merge_in_unit_order_without_duplicates(tmp_path):
    main = tmp_path / "results.jsonl"
    assert shard_path(main, 3) == tmp_path / "results.rank3.jsonl"
    with ResultsStore(shard_path(main, 0)) as s0:
        s0.add("c", {"v": 3})
        s0.add("a", {"v": 1})
    with ResultsStore(shard_path(main, 1)) as s1:
        s1.add("b", {"v": 2})
        s1.add("x", {"v": 9})
    with open(shard_path(main, 1), "ab") as f:  # torn by a kill
        f.write(b'{"unit":"d","v":')
    (tmp_path / "results.rankings.jsonl").write_text("not a shard\n")
    assert shard_paths(main) == [shard_path(main, 0), shard_path(main, 1)]
    with ResultsStore(main) as store:
        store.add("a", {"v": 1})  # merged before a crash that left the shards behind
        assert merge_shards(store, ["a", "b", "c", "d"]) == 3
        assert store.get("b")["v"] == 2
    assert units(main) == ["a", "b", "c", "x"]  # given order first, then the rest
    assert shard_paths(main) == [] and not list(tmp_path.glob("results.rank0*"))
    assert (tmp_path / "results.rankings.jsonl").exists()


def test_a_shard_being_written_is_not_merged(tmp_path):
    main = tmp_path / "results.jsonl"
    live = ResultsStore(shard_path(main, 1))
    live.add("a", {})
    try:
        with ResultsStore(main) as store, pytest.raises(StoreLockedError):
            merge_shards(store)
    finally:
        live.close()
    assert shard_paths(main) == [shard_path(main, 1)]


def test_reorder_keeps_other_rows_in_place_and_the_lines(tmp_path):
    main = tmp_path / "results.jsonl"
    with ResultsStore(main) as store:
        for unit in ["x", "c", "y", "a", "b"]:
            store.add(unit, {"v": unit, "f": 0.1})
        lines = {json.loads(line)["unit"]: line for line in main.read_text().splitlines()}
        assert store.reorder(["a", "b", "c"]) is True
        assert store.units == ["x", "a", "y", "b", "c"]
        assert store.reorder(["a", "b", "c"]) is False
    assert units(main) == ["x", "a", "y", "b", "c"]
    assert sorted(main.read_text().splitlines()) == sorted(lines.values())  # same bytes
    with ResultsStore(main) as again:
        assert again.units == ["x", "a", "y", "b", "c"] and again.get("a")["v"] == "a"


def test_a_rank_killed_before_its_first_unit_leaves_nothing_after_the_merge(tmp_path):
    """A rank killed (SIGKILL) after opening its shard but before storing a unit leaves only the
    shard's lock file; the next merge takes that lock and removes it with the other shards."""
    import os
    import signal
    import subprocess
    import sys

    from tests.distributed_helpers import ROOT

    main = tmp_path / "results.jsonl"
    with ResultsStore(shard_path(main, 0)) as s0:
        s0.add("a", {"v": 1})
    code = (
        "import sys; from mechir.store import ResultsStore, shard_path; "
        "s = ResultsStore(shard_path(sys.argv[1], 1)); print('opened', flush=True); "
        "sys.stdin.readline()"
    )
    rank1 = subprocess.Popen(
        [sys.executable, "-c", code, str(main)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rank1.stdout.readline() == "opened\n"
        with ResultsStore(main) as store, pytest.raises(StoreLockedError):
            merge_shards(store)  # rank 1 is alive: its (empty) shard is not taken
        assert shard_path(main, 0).exists()  # and nothing was deleted
    finally:
        rank1.kill()
        rank1.communicate()
    assert rank1.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.rank0.jsonl",
        "results.rank1.jsonl.lock",
    ]
    with ResultsStore(main) as store:
        assert merge_shards(store) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
