"""Append-only JSONL results store, one line per finished unit of work, safe against kill -9.

Every line is one JSON object ``{"unit": <id>, ...}`` written with a single ``write`` and flushed
to disk before the next unit starts. A run killed mid-write leaves at most one torn last line,
which is dropped (and cut from the file) the next time the store is opened; a unit whose line is
complete is never recomputed, so rerunning after an interruption neither loses nor duplicates
rows. One process at a time may write a store (an advisory lock on ``<file>.lock``, removed
again when the store is closed).
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # POSIX advisory locks; elsewhere the store works without them
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def encode_array(array: Any) -> dict[str, Any]:
    """An array as a JSON-able dict (dtype, shape, base64 of the raw bytes): exact and compact
    (float32 costs 5.3 characters per value instead of ~20 as decimal text)."""
    a = np.ascontiguousarray(np.asarray(array))
    if a.dtype == object:
        raise TypeError("object arrays cannot be encoded; convert to a numeric dtype first")
    return {
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "b64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def decode_array(data: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    raw = base64.b64decode(data["b64"])
    return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()


class StoreLockedError(RuntimeError):
    """Another process is writing the same results store."""


class CorruptStoreError(ValueError):
    """A results file has an unreadable line that is not a torn last line."""


def _acquire_lock(lock_path: Path, path: Path) -> Any:
    """An exclusive, non-blocking ``flock`` on ``lock_path`` (created if needed).

    The holder removes the lock file when it closes, so a lock taken on a file that was
    unlinked in the meantime is worthless: retry until the locked inode is the path's."""
    while True:
        f = open(lock_path, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise StoreLockedError(
                f"{path} is being written by another process (lock {lock_path}); wait for it "
                "to finish or write elsewhere"
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()


class ResultsStore:
    """Finished units of a study, keyed by unit id, persisted as JSON lines.

    Args:
        path: the ``.jsonl`` file (created on the first :meth:`add`).
        lock: take an exclusive advisory lock on ``<path>.lock`` (released by :meth:`close`).

    Raises:
        StoreLockedError: another process holds the lock.
        CorruptStoreError: a line before the last one is not valid JSON (the file was edited or
            written by something else; nothing is repaired silently).

    Example::

        with ResultsStore(out / "results.jsonl") as store:
            if "a" not in store:
                store.add("a", {"value": 1.0})
    """

    def __init__(self, path: str | Path, *, lock: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        self.lock_path = self.path.with_suffix(self.path.suffix + ".lock")
        if lock and fcntl is not None:
            self._lock_file = _acquire_lock(self.lock_path, self.path)
        self._rows: dict[str, dict[str, Any]] = {}
        self.dropped_torn_line = False
        self._load()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            end = len(data) if newline < 0 else newline + 1
            line = data[pos:end]
            is_last = end == len(data)
            try:
                if newline < 0:
                    raise ValueError("no newline")
                row = json.loads(line) if line.strip() else None
                if row is not None and (not isinstance(row, dict) or "unit" not in row):
                    raise ValueError("not a unit row")
            except ValueError as err:
                if is_last:  # torn by an interruption: drop it
                    self.dropped_torn_line = True
                    break
                raise CorruptStoreError(
                    f"{self.path}: unreadable line at byte {pos} ({err}); only the last line may "
                    "be torn by an interruption. Fix or remove the file."
                ) from None
            if row is not None:
                unit = str(row["unit"])
                if unit in self._rows:
                    warnings.warn(
                        f"{self.path}: unit {unit!r} appears twice; keeping the first",
                        stacklevel=2,
                    )
                else:
                    self._rows[unit] = row
            good_end = end
            pos = end
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def __contains__(self, unit: object) -> bool:
        return unit in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows.values())

    def get(self, unit: str) -> dict[str, Any] | None:
        """The stored row of ``unit`` (with its ``"unit"`` key), or None."""
        return self._rows.get(unit)

    @property
    def units(self) -> list[str]:
        """Finished unit ids, in the order they were written."""
        return list(self._rows)

    # ------------------------------------------------------------------ writing
    def add(self, unit: str, data: dict[str, Any]) -> None:
        """Persist one finished unit (durably: flushed and fsynced before returning).

        Raises:
            ValueError: the unit is already stored (rows are never duplicated or overwritten).
        """
        if unit in self._rows:
            raise ValueError(f"unit {unit!r} is already in {self.path}")
        if "unit" in data:
            raise ValueError("data must not contain the key 'unit' (it holds the unit id)")
        row = {"unit": unit, **data}
        line = (json.dumps(row, separators=(",", ":"), allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rows[unit] = row

    def reorder(self, units: Sequence[str]) -> bool:
        """Put the rows of ``units`` in that order, in the places they occupy now (other rows
        stay put), rewriting the file atomically with the same lines; True when it changed.

        Units finished by several processes (or merged from the shards of a killed run) come in
        completion order; this restores the order a single process writes them in.
        """
        chosen = {u for u in units if u in self._rows}
        wanted = [u for u in dict.fromkeys(units) if u in chosen]
        current = list(self._rows)
        if [u for u in current if u in chosen] == wanted:
            return False
        order = iter(wanted)
        new = [next(order) if u in chosen else u for u in current]
        data = b"".join(
            (json.dumps(self._rows[u], separators=(",", ":"), allow_nan=True) + "\n").encode()
            for u in new
        )
        tmp = self.path.with_name(self.path.name + ".reorder.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._rows = {u: self._rows[u] for u in new}
        return True

    def reload(self) -> None:
        """Read the file again (a reader that does not hold the lock, after the writer added)."""
        self._rows = {}
        self._load()

    def close(self) -> None:
        """Release the lock and remove the lock file (the data is already on disk)."""
        if self._lock_file is not None:
            # unlink while still holding the lock: a process that opened the old file meanwhile
            # sees that its inode is no longer the path's and retries (see _acquire_lock)
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class ConfigMismatchError(ValueError):
    """Results on disk were computed with a different configuration."""


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: <saved> there, <current> now"`` for every key whose value differs (sorted)."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '<absent>')!r} there, {current.get(k, '<absent>')!r} now"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


def file_sha256(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, replacing ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------- per-rank shards
def shard_path(path: str | Path, rank: int) -> Path:
    """The shard that rank ``rank`` writes for the store ``path``: ``results.rank<r>.jsonl``.

    Under ``torchrun`` every rank appends to its own shard; rank 0 merges the shards into the
    store (:func:`merge_shards`) once the ranks are done, and on opening, so that shards left by
    an interrupted run, with any number of processes, are picked up by the next one.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def shard_paths(path: str | Path) -> list[Path]:
    """Every shard file next to the store ``path`` (any rank, any earlier run)."""
    path = Path(path)
    found = path.parent.glob(f"{path.stem}.rank*{path.suffix}")
    return sorted(p for p in found if p.stem[len(path.stem) + 5 :].isdigit())


def merge_shards(store: ResultsStore, order: Sequence[str] = ()) -> int:
    """Append the shards' rows that ``store`` lacks to it, then delete the shards.

    Rows come in ``order`` of unit ids first (the order a single process writes them), then the
    rest in shard order; a unit already in the store (a merge interrupted before the shards were
    deleted) is not added again. Each shard is opened with its lock, so a shard that a live
    process is still writing raises :class:`StoreLockedError`. Returns the number of rows added.
    """
    shards = [ResultsStore(p) for p in shard_paths(store.path)]
    try:
        rows: dict[str, dict[str, Any]] = {}
        for shard in shards:
            for row in shard:
                rows.setdefault(row["unit"], row)
        ordered = set(order)
        ids = [u for u in order if u in rows] + [u for u in rows if u not in ordered]
        added = 0
        for unit in ids:
            if unit not in store:
                store.add(unit, {k: v for k, v in rows[unit].items() if k != "unit"})
                added += 1
    finally:
        for shard in shards:
            shard.close()
    for shard in shards:
        shard.path.unlink()
    return added
