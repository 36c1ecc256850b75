"""Where a model's files are on this machine, and the fingerprint of its weights.

``local_model_directory`` finds a model's directory without downloading anything (a local
directory, a cached hub snapshot, or the embedded demo); ``weights_fingerprint`` hashes the
weights found there (:mod:`mechir.fingerprint`), or an in-memory model's state dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mechir.demo import is_demo, resolve_model
from mechir.fingerprint import files_fingerprint, state_dict_fingerprint, weight_files


def local_model_directory(model: str | os.PathLike) -> Path | None:
    """The directory holding ``model``'s files: the path itself when it is a directory, the
    Hugging Face cache snapshot of a hub id when one is cached, else None (nothing is
    downloaded); ``"demo"``: the embedded demo model's directory."""
    if is_demo(model):
        return Path(resolve_model(model))
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # not cached, not a valid repo id, hub library missing
        return None


def weights_fingerprint(model: str | os.PathLike | Any) -> str | None:
    """A stable fingerprint of ``model``'s weights.

    Args:
        model: a local checkpoint directory, a hub id (fingerprinted from the local cache), or
            an in-memory model with ``state_dict()``.

    Returns:
        ``"sha256:<hex>"``; None for a hub id that is not in the local cache, or a directory
        without weight files (nothing to fingerprint without downloading).
    """
    if hasattr(model, "state_dict"):
        return state_dict_fingerprint(model)
    directory = local_model_directory(model)
    if directory is None:
        return None
    files = weight_files(directory)
    return files_fingerprint(files) if files else None
