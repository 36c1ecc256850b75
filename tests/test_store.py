"""The lossless results store: torn last lines, corruption, locks (shared by the studies and
``mechir rerank``)."""

from __future__ import annotations

import numpy as np
import pytest

from mechir.store import (
    CorruptStoreError,
    ResultsStore,
    StoreLockedError,
    decode_array,
    encode_array,
)


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
    with pytest.raises(CorruptStoreError, match="only the last line may be torn"):
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
