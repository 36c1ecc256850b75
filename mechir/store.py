"""Append-only JSONL results store, one line per finished unit of work, safe against kill -9.

Every line is one JSON object ``{"unit": "<id>", ...}`` (the ``"unit"`` key first, unit ids
normalised to strings) written with a single ``write`` and flushed to disk before the next unit
starts. A run killed mid-write leaves at most one torn last line: bytes without a newline that
are an incomplete line of the store's own compact form (they begin with ``{"unit":"``, or, after
at least one complete row, are a shorter piece of it) and do not parse as complete JSON. The next
*writer* (``lock=True``, holding the lock) drops it and cuts it from the file; a unit whose line is
complete is never recomputed, so rerunning after an interruption neither loses nor duplicates
rows. One process at a time may write a store (an advisory lock on ``<file>.lock``, removed
again when the store is closed; a lock file left by a killed process is taken over).

What is never modified:

- a file that is not the store's own: a complete line that is not a JSON object with a
  ``"unit"`` key (a JSON export, a TREC run, ...), or a last line without a newline that is not
  a torn store line (it parses as complete JSON, as a ``json.dump`` of ``{"unit": ...}`` does; it
  has other spacing; it is a lone ``{`` with no row before it), raises
  :class:`CorruptStoreError` naming the file, which is left as it is;
- any file opened by a *reader* (``lock=False``): it ignores an incomplete last line (a writer
  may be in the middle of it) and cannot add rows.

An empty file is an empty store; a file holding only a torn first line of the store's form
(``{"unit":"...`` without a newline, not complete JSON) is the store of a run killed during its
first write and is emptied by the next writer.
"""

from __future__ import annotations

import base64
import json
import numbers
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
    """A file is not a results store (or was edited): a complete line is not a results row, or
    an incomplete last line does not start like one. The file is left as it is."""


_NOT_A_STORE = (
    "this is not a results store, or it was edited (only a torn last line is dropped): "
    "move the file away or choose another path"
)
#: Every line the store writes starts with these bytes (a compact JSON object, ``"unit"`` first,
#: the unit id a string).
LINE_START = b'{"unit":"'


def unit_key(unit: object) -> str:
    """The stored form of a unit id: a string as it is, an integer as its decimal string (so
    ``3`` and ``"3"`` name one unit, before and after a reopen).

    Raises:
        TypeError: ``unit`` is neither a string nor an integer (bools and floats included).
    """
    if isinstance(unit, str):
        return unit
    if isinstance(unit, numbers.Integral) and not isinstance(unit, bool):
        return str(int(unit))
    raise TypeError(
        f"unit ids are str or int, got {type(unit).__name__} {unit!r}; pass a string id"
    )


def _torn_line_problem(tail: bytes, after_rows: bool) -> str | None:
    """Why ``tail`` (the bytes after the last newline, not empty) cannot be the store's own line
    torn by an interruption, or None when it can: it begins with :data:`LINE_START` (or, when
    ``after_rows``, the file already holding complete rows, is a shorter piece of it) and is
    not complete JSON (a complete object is someone's file, never cut)."""
    try:
        json.loads(tail)
    except ValueError:
        pass
    else:
        return "complete JSON without a newline, not a torn results row"
    if not (tail.startswith(LINE_START) or (after_rows and LINE_START.startswith(tail))):
        return "incomplete, and not the start of a results row"
    return None


def acquire_lock(lock_path: Path, path: Path) -> Any:
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
        lock: ``True`` (a writer): take an exclusive advisory lock on ``<path>.lock`` (released
            by :meth:`close`) and cut a torn last line from the file. ``False`` (a reader):
            no lock, the file is never modified (an incomplete last line is ignored, see
            :attr:`ignored_partial_line`) and :meth:`add` / :meth:`reorder` refuse. Where
            ``fcntl`` is missing (Windows) a writer takes no lock: run one writer at a time.

    Unit ids are strings; integers are accepted everywhere and stored as their decimal string
    (:func:`unit_key`).

    Raises:
        StoreLockedError: another process holds the lock.
        CorruptStoreError: the file is not a results store or was edited (see the module
            docstring); nothing is repaired silently and the file is not modified.

    Example::

        with ResultsStore(out / "results.jsonl") as store:
            if "a" not in store:
                store.add("a", {"value": 1.0})
    """

    def __init__(self, path: str | Path, *, lock: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        self.writable = lock
        self.lock_path = self.path.with_suffix(self.path.suffix + ".lock")
        if lock and fcntl is not None:
            self._lock_file = acquire_lock(self.lock_path, self.path)
        self._rows: dict[str, dict[str, Any]] = {}
        #: A writer found a torn last line and cut it from the file.
        self.dropped_torn_line = False
        #: A reader found an incomplete last line (being written, or torn) and ignored it.
        self.ignored_partial_line = False
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        rows: dict[str, dict[str, Any]] = {}
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            if newline < 0:  # an incomplete last line: torn by a kill, or being written
                problem = _torn_line_problem(data[pos:], after_rows=bool(rows))
                if problem:
                    raise CorruptStoreError(
                        f"{self.path}: unreadable line at byte {pos} ({problem}); {_NOT_A_STORE}"
                    )
                break
            line = data[pos : newline + 1]
            if line.strip():
                self._add_row(rows, self._parse(line, pos))
            pos = newline + 1
        self._rows = rows
        if pos < len(data):
            if not self.writable:
                self.ignored_partial_line = True
                return
            with open(self.path, "r+b") as f:  # only the lock holder cuts
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
            self.dropped_torn_line = True

    def _parse(self, line: bytes, pos: int) -> dict[str, Any]:
        """One complete line as a row whose unit id is normalised (:func:`unit_key`)."""
        try:
            row = json.loads(line)
        except ValueError as err:
            reason = f"not JSON ({err})"
        else:
            if not isinstance(row, dict) or "unit" not in row:
                reason = 'not a JSON object with a "unit" key'
            elif isinstance(row["unit"], bool) or not isinstance(row["unit"], (str, int)):
                reason = f"unit id {row['unit']!r} is not a string or an integer"
            else:
                row["unit"] = unit_key(row["unit"])
                return row
        raise CorruptStoreError(
            f"{self.path}: unreadable line at byte {pos} ({reason}); {_NOT_A_STORE}"
        )

    def _add_row(self, rows: dict[str, dict[str, Any]], row: dict[str, Any]) -> None:
        unit = row["unit"]
        if unit in rows:
            warnings.warn(
                f"{self.path}: unit {unit!r} appears twice; keeping the first", stacklevel=4
            )
        else:
            rows[unit] = row

    def __contains__(self, unit: object) -> bool:
        return unit_key(unit) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows.values())

    def get(self, unit: str | int) -> dict[str, Any] | None:
        """The stored row of ``unit`` (with its ``"unit"`` key, a string), or None."""
        return self._rows.get(unit_key(unit))

    @property
    def units(self) -> list[str]:
        """Finished unit ids (strings), in the order they were written."""
        return list(self._rows)

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if not self.writable:
            raise ValueError(
                f"{self.path} was opened to read (lock=False); open it with lock=True to write"
            )

    def add(self, unit: str | int, data: dict[str, Any]) -> None:
        """Persist one finished unit (durably: flushed and fsynced before returning).

        Raises:
            ValueError: the unit is already stored (rows are never duplicated or overwritten),
                or the store was opened to read.
            TypeError: ``unit`` is neither a string nor an integer.
        """
        self._check_writable()
        key = unit_key(unit)
        if key in self._rows:
            raise ValueError(f"unit {key!r} is already in {self.path}")
        if "unit" in data:
            raise ValueError("data must not contain the key 'unit' (it holds the unit id)")
        row = {"unit": key, **data}
        line = _line(row)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rows[key] = row

    def reorder(self, units: Sequence[str | int]) -> bool:
        """Put the rows of ``units`` in that order, in the places they occupy now (other rows
        stay put), rewriting the file atomically with the same lines; True when it changed.

        Units finished by several processes (or merged from the shards of a killed run) come in
        completion order; this restores the order a single process writes them in.
        """
        self._check_writable()
        keys = [unit_key(u) for u in units]
        chosen = {u for u in keys if u in self._rows}
        wanted = [u for u in dict.fromkeys(keys) if u in chosen]
        current = list(self._rows)
        if [u for u in current if u in chosen] == wanted:
            return False
        order = iter(wanted)
        new = [next(order) if u in chosen else u for u in current]
        data = b"".join(_line(self._rows[u]) for u in new)
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
        self.dropped_torn_line = self.ignored_partial_line = False
        self._load()

    def close(self) -> None:
        """Release the lock and remove the lock file (the data is already on disk)."""
        if self._lock_file is not None:
            # unlink while still holding the lock: a process that opened the old file meanwhile
            # sees that its inode is no longer the path's and retries (see acquire_lock)
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


def _line(row: dict[str, Any]) -> bytes:
    """A row as the store writes it: compact JSON, ``"unit"`` first, one newline."""
    row = {"unit": row["unit"], **{k: v for k, v in row.items() if k != "unit"}}
    return (json.dumps(row, separators=(",", ":"), allow_nan=True) + "\n").encode()


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
    """Write ``data`` as indented JSON, replacing ``path`` atomically: kept for callers of
    earlier versions, it is :func:`mechir.outputs.write_json` (never over a file mechir did not
    write); use that."""
    from mechir import outputs

    outputs.write_json(path, data)


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
    """Every shard file next to the store ``path`` (any rank, any earlier run), by rank."""
    return [p for p in _shards(path) if p.exists()]


def _shards(path: str | Path) -> list[Path]:
    """The shards of ``path`` that exist or whose lock file exists (a rank killed before it
    stored its first unit leaves only ``results.rank<r>.jsonl.lock``), by rank."""
    path = Path(path)
    ranks = set()
    for suffix in (path.suffix, path.suffix + ".lock"):
        prefix, n = f"{path.stem}.rank", len(path.stem) + 5
        for p in path.parent.glob(f"{prefix}*{suffix}"):
            rank = p.name[n : len(p.name) - len(suffix)]
            if rank.isdigit():
                ranks.add(int(rank))
    return [shard_path(path, r) for r in sorted(ranks)]


def merge_shards(store: ResultsStore, order: Sequence[str | int] = ()) -> int:
    """Append the shards' rows that ``store`` lacks to it, then delete the shards.

    Rows come in ``order`` of unit ids first (the order a single process writes them), then the
    rest in shard order; a unit already in the store (a merge interrupted before the shards were
    deleted) is not added again. Each shard is opened with its lock, so a shard that a live
    process is still writing raises :class:`StoreLockedError` (and nothing is merged); the lock
    files that killed ranks left (with or without a shard) are removed with their shards.
    Returns the number of rows added.
    """
    shards: list[ResultsStore] = []
    try:
        for p in _shards(store.path):
            shards.append(ResultsStore(p))
        rows: dict[str, dict[str, Any]] = {}
        for shard in shards:
            for row in shard:
                rows.setdefault(row["unit"], row)
        keys = [unit_key(u) for u in order]
        ordered = set(keys)
        ids = [u for u in keys if u in rows] + [u for u in rows if u not in ordered]
        added = 0
        for unit in dict.fromkeys(ids):
            if unit not in store:
                store.add(unit, {k: v for k, v in rows[unit].items() if k != "unit"})
                added += 1
        for shard in shards:  # merged: delete the data, then release and remove the lock
            shard.path.unlink(missing_ok=True)
    finally:
        for shard in shards:
            shard.close()
    return added
