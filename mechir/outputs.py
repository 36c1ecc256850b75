"""Files that mechir writes for the user (tables, plots, summaries, reports, settings, runs):
written atomically, recorded with their hash, and never written over when mechir did not write
them.

Every directory mechir writes a file into holds a small record, ``.mechir-outputs.json``::

    {"mechir_outputs": 1, "files": {"summary.md": "sha256:...", "table.csv": "sha256:..."}}

the hash of what mechir last wrote under each name. A file may be written when

- it does not exist (it is created with an exclusive link, so a file that appears meanwhile is
  never replaced), or
- the record holds its current hash: mechir wrote it and nobody changed it since, so a rerun or a
  resumed run may replace it.

Any other existing file (the user's own, one mechir wrote but the user edited since, one written
by a mechir without this record) is never modified: :class:`ForeignFileError` (a
``ValueError``) names it and says what to do, in one line. A file is written to a temporary
file beside it, then renamed into place, so a reader (or a killed run) never sees half a file.

Every writer goes through :func:`output_file` (a temporary path to fill in any way: pandas,
matplotlib, numpy) or its shorthands :func:`write_text`, :func:`write_bytes`,
:func:`write_json`, :func:`write_csv` (byte-identical across identical runs, ``.gz``
included) and :func:`save_figure`; :func:`check_writable` refuses early, before the work;
:func:`remove` deletes a file mechir wrote (a foreign one stays). Append-only results stores
(:class:`mechir.store.ResultsStore`) recognise their own files by their form instead.

Example::

    from mechir import outputs

    outputs.check_writable(out / "table.csv", advice="choose another --output")  # early
    ...
    outputs.write_csv(table, out / "table.csv")
    with outputs.output_file(out / "plot.png") as tmp:
        fig.savefig(tmp, format="png")
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; elsewhere the record is updated without one
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: The record of what mechir wrote in a directory (one per directory).
RECORD_NAME = ".mechir-outputs.json"
#: What a refusal tells the user to do unless the writer says better.
DEFAULT_ADVICE = "choose another output or move the file away"
_FORMAT = 1


class ForeignFileError(ValueError):
    """A file exists that mechir did not write (or that was changed since): it is left as it
    is. The message is one line naming the file and what to do."""


def content_hash(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------- the record
def record_path(directory: str | Path) -> Path:
    """The record of what mechir wrote in ``directory``."""
    return Path(directory) / RECORD_NAME


def recorded(directory: str | Path) -> dict[str, str]:
    """``{file name: hash}`` of what mechir wrote in ``directory`` (empty without a record).

    Raises:
        ForeignFileError: ``.mechir-outputs.json`` there is not mechir's record.
    """
    path = record_path(directory)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(text)
        files = record["files"]
        if record.get("mechir_outputs") != _FORMAT or not isinstance(files, dict):
            raise ValueError
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ForeignFileError(
            f"{path} is not mechir's record of the files it wrote there (mechir never modifies "
            "a file it did not write); move it away or choose another output"
        ) from None
    return dict(files)


def _save_record(directory: Path, files: dict[str, str]) -> None:
    path = record_path(directory)
    if not files:
        path.unlink(missing_ok=True)
        return
    data = json.dumps({"mechir_outputs": _FORMAT, "files": dict(sorted(files.items()))}, indent=1)
    tmp = path.with_name(f".mechir-tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(data + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``directory`` itself (no lock file), held while its record
    is read, checked and rewritten, so two writers in one directory never lose an entry."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock on directories: go on unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------- checks
def is_mechirs(path: str | Path) -> bool:
    """Whether ``path`` exists and holds exactly what mechir last wrote there."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    known = recorded(path.parent).get(path.name)
    return known is not None and known == _file_hash(path)


def _problem(path: Path) -> str | None:
    """Why ``path`` may not be written (None: it may)."""
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        return "is a directory"
    if path.is_symlink() or not path.is_file():
        return "exists and is not a regular file mechir wrote"
    known = recorded(path.parent).get(path.name)
    if known is None:
        return "exists and was not written by mechir"
    if known != _file_hash(path):
        return "was changed since mechir wrote it"
    return None


def check_writable(path: str | Path, *, advice: str = DEFAULT_ADVICE) -> None:
    """Refuse now, before any work, to write ``path`` if it exists and mechir did not write it
    (or it was changed since). Creates nothing.

    Raises:
        ForeignFileError: one line naming the file, why, and ``advice`` (what to do).
    """
    path = Path(path)
    problem = _problem(path)
    if problem:
        raise ForeignFileError(
            f"{path} {problem}, and mechir never modifies a file it did not write; {advice}"
        )


def check_directory(directory: str | Path, *, advice: str = DEFAULT_ADVICE) -> None:
    """Refuse now if a file that mechir recorded in ``directory`` was changed since (a later
    rewrite would replace the user's edit): the early check of an output directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for name in recorded(directory):
        if (directory / name).exists():
            check_writable(directory / name, advice=advice)


# ---------------------------------------------------------------------- writing
@contextlib.contextmanager
def output_file(path: str | Path, *, advice: str = DEFAULT_ADVICE) -> Iterator[Path]:
    """A temporary path beside ``path`` (same name ending, so pandas, numpy and matplotlib read
    the format from it) to write into; on leaving the block without an error it replaces
    ``path`` atomically and its hash is recorded. Nothing is written when ``path`` exists and
    mechir did not write it (checked before the block and again before the rename).

    Raises:
        ForeignFileError: see :func:`check_writable`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path, advice=advice)
    tmp = path.with_name(f".mechir-tmp-{os.getpid()}-{path.name}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"nothing was written to {tmp} for {path}")
        digest = _file_hash(tmp)
        with _locked(path.parent):
            check_writable(path, advice=advice)
            files = recorded(path.parent)
            if os.path.lexists(path):
                os.replace(tmp, path)
            else:  # exclusive: a file that appeared meanwhile is never replaced
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ForeignFileError(
                        f"{path} appeared while mechir was writing it and was left alone; {advice}"
                    ) from None
                except OSError:  # a file system without hard links
                    os.replace(tmp, path)
            files[path.name] = digest
            _save_record(path.parent, files)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, *, advice: str = DEFAULT_ADVICE) -> Path:
    """Write ``data`` to ``path`` (see :func:`output_file`); returns ``path``."""
    with output_file(path, advice=advice) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, advice: str = DEFAULT_ADVICE) -> Path:
    """Write ``text`` (UTF-8) to ``path`` (see :func:`output_file`); returns ``path``."""
    return write_bytes(path, text.encode("utf-8"), advice=advice)


def write_json(
    path: str | Path,
    data: Any,
    *,
    indent: int | None = 2,
    advice: str = DEFAULT_ADVICE,
    **dumps: Any,
) -> Path:
    """Write ``data`` as JSON (``indent``, then a newline) to ``path``; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent, **dumps) + "\n", advice=advice)


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzip-compressed with no time stamp and no file name in the header, so equal
    data gives equal bytes."""
    return gzip.compress(data, mtime=0)


def write_csv(frame: Any, path: str | Path, *, advice: str = DEFAULT_ADVICE, **to_csv: Any) -> Path:
    """Write the DataFrame ``frame`` as CSV (``index=False`` unless given), gzip-compressed
    when ``path`` ends in ``.gz`` (reproducibly: :func:`gzip_bytes`); returns ``path``."""
    to_csv.setdefault("index", False)
    buffer = io.StringIO()
    frame.to_csv(buffer, **to_csv)
    data = buffer.getvalue().encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip_bytes(data)
    return write_bytes(path, data, advice=advice)


def save_figure(
    fig: Any, path: str | Path, *, advice: str = DEFAULT_ADVICE, **savefig: Any
) -> Path:
    """``fig.savefig`` into ``path`` (the format from its suffix unless given); returns
    ``path``."""
    path = Path(path)
    savefig.setdefault("format", path.suffix.lstrip(".") or None)
    with output_file(path, advice=advice) as tmp:
        fig.savefig(tmp, **savefig)
    return path


def remove(path: str | Path) -> bool:
    """Delete ``path`` if mechir wrote it and it is unchanged (and forget it); a file mechir
    did not write stays. True when it was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _locked(path.parent):
        files = recorded(path.parent)
        if path.name not in files:
            return False
        if path.is_file() and not path.is_symlink():
            if files[path.name] != _file_hash(path):
                return False
            path.unlink()
        del files[path.name]
        _save_record(path.parent, files)
    return True


def write_npz(path: str | Path, *, advice: str = DEFAULT_ADVICE, **arrays: Any) -> Path:
    """``numpy.savez_compressed`` of ``arrays`` into ``path``, reproducibly (every member's
    time stamp fixed), so equal arrays give equal bytes; returns ``path``."""
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return write_bytes(path, buffer.getvalue(), advice=advice)
