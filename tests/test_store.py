"""The lossless results store: torn last lines, corruption, locks (shared by the studies and
``mechir rerank``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mechir.store import (
    CorruptStoreError,
    ResultsStore,
    StoreLockedError,
    decode_array,
    encode_array,
    unit_key,
)

ROOT = Path(__file__).resolve().parents[1]


def test_store_drops_a_torn_last_line_and_never_duplicates(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsStore(path) as store:
        store.add("a", {"x": 1})
        store.add("b", {"x": [1.5, float("nan")]})
        with pytest.raises(ValueError, match="already"):
            store.add("a", {"x": 2})
    with open(path, "ab") as f:
        f.write(b'{"unit":"c","x":')  # killed mid-write
    with ResultsStore(path) as store:
        assert store.dropped_torn_line and store.units == ["a", "b"] and "c" not in store
        assert path.read_text().count("\n") == 2  # the torn bytes are cut from the file
        store.add("c", {"x": 3})
    with ResultsStore(path) as store:
        assert store.units == ["a", "b", "c"] and store.get("b")["x"][0] == 1.5
        assert not store.dropped_torn_line


def test_store_refuses_corruption_and_a_second_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"unit":"a"}\nnot json\n{"unit":"b"}\n')
    with pytest.raises(CorruptStoreError, match="only a torn last line is dropped"):
        ResultsStore(path)
    path.write_text('{"unit":"a"}\n')
    with ResultsStore(path), pytest.raises(StoreLockedError, match="another process"):
        ResultsStore(path)


def test_lock_file_is_removed_on_close_and_a_new_writer_can_lock(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path)
    assert store.lock_path.exists()
    store.add("a", {"x": 1})
    store.close()
    assert not store.lock_path.exists() and path.exists()
    with ResultsStore(path) as again:  # the lock is free again, the data is kept
        assert again.units == ["a"]
        with pytest.raises(StoreLockedError, match=str(path)):
            ResultsStore(path)
    assert not (tmp_path / "r.jsonl.lock").exists()


def test_array_encoding_is_exact():
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    b = decode_array(encode_array(a))
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    with pytest.raises(TypeError, match="object arrays"):
        encode_array(np.array([object()]))


# ---------------------------------------------------------------------- foreign files
FOREIGN = {
    "one JSON line without a unit": b'{"qid": "q1", "score": 3.5}\n',
    "minified JSON without a newline": b'{"model": "x", "depth": 20}',
    "a TREC run": b"q1 Q0 d1 1 3.5 bm25\nq1 Q0 d2 2 3.1 bm25\n",
    "a JSON list": b'[{"unit": "a"}]\n',
    "store rows, then a foreign tail": b'{"unit":"a"}\nq1 Q0 d1 1 3.5 bm25',
    "store rows, then a foreign line": b'{"unit":"a"}\n{"qid":"q1"}\n{"unit":"b"}\n',
    "a unit id that is a float": b'{"unit":1.5}\n',
    "text": b"hello",
    # issue 30: tails that look like a row but are someone's complete file, never cut
    "json.dump of a unit object, no newline": b'{"unit": "run-1", "ndcg@10": 0.71}',
    "a compact complete unit object, no newline": b'{"unit":"run-1","ndcg@10":0.71}',
    "a lone brace": b"{",
    "a piece of a row start, no row before": b'{"un',
    "store rows, then a complete row without its newline": b'{"unit":"a","x":1}\n{"unit":"b"}',
    "store rows, then a spaced unit object": b'{"unit":"a"}\n{"unit": "b", "x": [1,',
}


@pytest.mark.parametrize("content", FOREIGN.values(), ids=FOREIGN.keys())
@pytest.mark.parametrize("lock", [True, False])
def test_a_foreign_file_is_refused_in_one_line_and_never_modified(tmp_path, content, lock):
    path = tmp_path / "other.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorruptStoreError, match="not a results store") as err:
        ResultsStore(path, lock=lock)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == content
    assert not (tmp_path / "other.jsonl.lock").exists()  # the refused writer let go of the lock


@pytest.mark.parametrize(
    ("content", "units"),
    [
        (b"", []),
        (b'{"unit":"a","x":1}\n{"un', ["a"]),  # torn inside the first bytes of a line
        (b'{"unit":"a","x":1}\n{', ["a"]),  # torn after the first byte of a line
        (b'{"unit":"a","x":1}\n{"unit":"b","x":2', ["a"]),  # torn just before the brace
        (b'{"unit":"a","x":[1.5,', []),  # torn first line: the store of a run killed at once
        (b'{"unit":"', []),
    ],
)
def test_a_writer_cuts_only_a_torn_line_of_the_stores_own_form(tmp_path, content, units):
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    with ResultsStore(path) as store:
        assert store.units == units
        assert store.dropped_torn_line == (not content.endswith(b"\n") and content != b"")
        store.add("z", {"x": 0})
    kept = content[: content.rfind(b"\n") + 1]
    assert path.read_bytes() == kept + b'{"unit":"z","x":0}\n'


def test_a_reader_never_truncates_and_cannot_write(tmp_path):
    """A reader (lock=False) beside a writer in the middle of a line: it sees the complete rows,
    leaves the partial line where it is, and refuses to add or reorder."""
    path = tmp_path / "r.jsonl"
    writer = ResultsStore(path)
    writer.add("a", {"x": 1})
    writer.add("b", {"x": 2})
    partial = b'{"unit":"big","data":"' + b"x" * 1000
    with open(path, "ab") as f:
        f.write(partial)  # the writer's line, half written
    before = path.read_bytes()
    reader = ResultsStore(path, lock=False)
    assert reader.units == ["a", "b"] and reader.ignored_partial_line
    assert not reader.dropped_torn_line and path.read_bytes() == before
    with pytest.raises(ValueError, match="opened to read"):
        reader.add("c", {})
    with pytest.raises(ValueError, match="opened to read"):
        reader.reorder(["b", "a"])
    with open(path, "ab") as f:
        f.write(b'"}\n')  # the writer finishes its line
    reader.reload()
    assert reader.units == ["a", "b", "big"] and not reader.ignored_partial_line
    writer.close()
    reader.close()
    assert path.read_bytes() == before + b'"}\n'


def test_integer_unit_ids_survive_a_reopen(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsStore(path) as store:
        store.add(3, {"v": 1})
        store.add(4, {"v": 2})
        assert 3 in store and "3" in store and store.get(4)["v"] == 2
        with pytest.raises(ValueError, match="already"):
            store.add("3", {"v": 9})
    with ResultsStore(path) as store:
        assert 3 in store and "4" in store and store.units == ["3", "4"]
        assert store.get(3) == {"unit": "3", "v": 1}
        assert store.reorder([4, 3]) and store.units == ["4", "3"]
        for bad in (1.5, True, None, ("q", "d")):
            with pytest.raises(TypeError, match="unit ids are str or int"):
                unit_key(bad)
            with pytest.raises(TypeError):  # (under the test type checker, its own error)
                store.add(bad, {})
        assert unit_key(np.int64(7)) == "7" and unit_key("07") == "07"
    assert [json.loads(line)["unit"] for line in path.read_text().splitlines()] == ["4", "3"]


def test_integer_unit_ids_written_by_an_older_version_load_as_strings(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"unit":3,"v":1}\n{"v":2,"unit":"b"}\n')  # "unit" not first: still a row
    with ResultsStore(path) as store:
        assert store.units == ["3", "b"] and 3 in store and store.get("3")["unit"] == "3"
        store.reorder(["b", "3"])
    assert path.read_text() == '{"unit":"b","v":2}\n{"unit":"3","v":1}\n'


# ---------------------------------------------------------------------- two processes
WRITER = r"""
import os, sys
from mechir import store as S

path, n, torn_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


class TornWrite:
    "os for mechir.store, whose write stops half-way through the line and waits to be killed"

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        written = os.write(fd, bytes(data[: len(data) // 2]))
        print("torn", flush=True)
        sys.stdin.readline()  # blocks until the parent kills this process
        return written


with S.ResultsStore(path) as store:
    print("dropped" if store.dropped_torn_line else "clean", len(store), flush=True)
    for i in range(n):
        if f"u{i}" in store:
            continue
        if i == torn_at:
            S.os = TornWrite()
        store.add(f"u{i}", {"i": i, "payload": f"{i}:" + "x" * (500 + 37 * i)})
        print("stored", i, flush=True)
print("done", flush=True)
"""


def _writer(path, n: int, torn_at: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(n), str(torn_at)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_9_mid_line_then_another_process_resumes_without_loss_or_mix(tmp_path):
    """A writer process is killed (SIGKILL) in the middle of writing a line while holding the
    lock; meanwhile a second writer is refused and a reader changes nothing. A new process then
    resumes: every unit is stored exactly once, with its own data, in order."""
    path, n, torn_at = tmp_path / "r.jsonl", 12, 5
    first = _writer(path, n, torn_at)
    try:
        lines = [first.stdout.readline().split() for _ in range(torn_at + 2)]
        assert lines[0] == ["clean", "0"] and lines[-1] == ["torn"]
        assert lines[1:-1] == [["stored", str(i)] for i in range(torn_at)]
        with pytest.raises(StoreLockedError, match="another process"):
            ResultsStore(path)  # the first process holds the lock
        before = path.read_bytes()
        assert not before.endswith(b"\n")  # half a line is on disk
        reader = ResultsStore(path, lock=False)
        assert reader.units == [f"u{i}" for i in range(torn_at)] and reader.ignored_partial_line
        assert path.read_bytes() == before
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        first.communicate()
    assert first.returncode == -signal.SIGKILL and path.with_suffix(".jsonl.lock").exists()

    second = _writer(path, n, -1)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0
    assert out.split("\n")[0] == f"dropped {torn_at}"
    assert [line.split()[1] for line in out.splitlines()[1:-1]] == [
        str(i) for i in range(torn_at, n)
    ]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["unit"] for r in rows] == [f"u{i}" for i in range(n)]
    for i, row in enumerate(rows):
        assert row == {"unit": f"u{i}", "i": i, "payload": f"{i}:" + "x" * (500 + 37 * i)}
    assert not path.with_suffix(".jsonl.lock").exists()
