"""Fingerprints of model weights, so results computed with one set of weights are never mixed
with results of another (a model directory whose weights were replaced in place, a retrained
checkpoint saved under the same name).

A fingerprint is ``"sha256:<hex>"`` over the weight files of a model directory (their names,
sizes and bytes, in name order), or over the state dict of an in-memory model (parameter names,
dtypes, shapes and bytes). Both are stable across processes and machines; file hashes are
cached per process by (path, size, mtime, inode), so asking twice costs nothing. The fingerprint
of a model named by path, hub id or ``demo`` is :func:`mechir.model_files.weights_fingerprint`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Files holding a checkpoint's weights (safetensors shards, PyTorch pickles).
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")

_CHUNK = 1 << 22
_file_cache: dict[tuple[str, int, int, int], str] = {}


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, sorted by name (empty if none)."""
    d = Path(directory)
    found = {p for pattern in WEIGHT_GLOBS for p in d.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _file_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _file_cache[key] = h.hexdigest()
    return _file_cache[key]


def files_fingerprint(paths: list[Path]) -> str:
    """``sha256:`` over each file's name, size and content digest, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}\0{p.stat().st_size}\0{_file_digest(p)}\n".encode())
    return "sha256:" + h.hexdigest()


def tensors_fingerprint(state: Mapping[str, Any]) -> str:
    """``sha256:`` over a state dict's tensors: names (sorted), dtypes, shapes and raw bytes."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def state_dict_fingerprint(module: Any) -> str:
    """``sha256:`` over a module's state dict: names (sorted), dtypes, shapes and raw bytes.

    Accepts anything with ``state_dict()`` (a ``torch.nn.Module``, a HookedCrossEncoder)."""
    return tensors_fingerprint(module.state_dict())
