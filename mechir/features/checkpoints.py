"""Resumable SAE training: checkpoints of a SAELens ``SAETrainer`` run that
:func:`mechir.features.training.train_sae` writes every few steps and resumes from.

A checkpoint is a directory ``<checkpoint>/step_<n>`` holding

* what SAELens's own ``SAETrainer.save_checkpoint`` writes: the training SAE in SAELens's format
  (``cfg.json``, ``sae_weights.safetensors``), the feature sparsity, ``trainer_state.pt`` (Adam,
  the LR scheduler, step and sample counts, dead-latent counters, coefficient schedulers) and
  the activation scaler (the norm estimate, so it is not redone);
* ``mechir_state.json``: the training configuration it belongs to, the step, and the evaluation
  rows logged so far (the JSONL log is rewritten from them on resume);
* ``mechir_stream.pt``: the data stream's state (``state_dict()`` of
  :class:`mechir.features.source.RowStream` / ``ActivationStream``) and torch's RNG state.

It is written to ``step_<n>.tmp`` and renamed when complete, then older steps are removed, so an
interruption at any moment leaves the previous complete checkpoint. One process at a time may
write a checkpoint directory (an advisory lock on ``<checkpoint>/.lock``). A checkpoint written
under another configuration is refused in one line (:class:`mechir.store.ConfigMismatchError`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mechir.lazy import lazy_import
from mechir.store import ConfigMismatchError, acquire_lock, config_diff

torch = lazy_import("torch")

STATE_FILE = "mechir_state.json"
STREAM_FILE = "mechir_stream.pt"
PREFIX = "step_"


@runtime_checkable
class ResumableStream(Protocol):
    """A batch stream whose position can be saved and restored (:class:`RowStream`,
    :class:`ActivationStream`). Other streams are fast-forwarded on resume by drawing the
    batches already consumed, which is exact only for a deterministic stream."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Checkpoint:
    """A complete checkpoint found on disk: its directory, step, evaluation rows and the
    number of batches the stream had handed out."""

    path: Path
    step: int
    rows: list[dict[str, Any]]
    batches_drawn: int


@contextlib.contextmanager
def locked(root: str | Path) -> Iterator[None]:
    """Hold the advisory lock of the checkpoint directory ``root`` (created if needed).

    Raises:
        mechir.store.StoreLockedError: another process is writing it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    handle = acquire_lock(root / ".lock", root)
    try:
        yield
    finally:
        (root / ".lock").unlink(missing_ok=True)
        handle.close()


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
                out.append((int(p.name[len(PREFIX) :]), p))
    return sorted(out)


def find_checkpoint(root: str | Path, config: dict[str, Any]) -> Checkpoint | None:
    """The latest complete checkpoint under ``root``, or None when there is none.

    Raises:
        ConfigMismatchError: the checkpoint was written under another configuration.
    """
    found = _step_dirs(Path(root))
    if not found:
        return None
    step, path = found[-1]
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    diff = config_diff(state["config"], config)
    if diff:
        raise ConfigMismatchError(
            f"checkpoint {path} was written by another training configuration ("
            + "; ".join(diff)
            + "): remove the directory or pass another checkpoint path"
        )
    return Checkpoint(path, step, state["rows"], state["batches_drawn"])


def save_checkpoint(
    root: str | Path,
    trainer: Any,
    stream: Any,
    *,
    step: int,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    batches_drawn: int,
) -> Path:
    """Write the trainer's state at ``step`` under ``root`` (atomically: a ``.tmp`` directory
    renamed when complete), then remove older steps. Returns the checkpoint's directory."""
    root = Path(root)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_checkpoint(tmp.name, base_path=root)
    stream_state = stream.state_dict() if isinstance(stream, ResumableStream) else None
    torch.save({"stream": stream_state, "rng": torch.get_rng_state()}, tmp / STREAM_FILE)
    state = {"config": config, "step": step, "rows": rows, "batches_drawn": batches_drawn}
    (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for s, path in _step_dirs(root):
        if s != step:
            shutil.rmtree(path, ignore_errors=True)
    return final


def restore_checkpoint(
    checkpoint: Checkpoint, trainer: Any, stream: Any, batches: Iterator[Any]
) -> None:
    """Load ``checkpoint`` into ``trainer`` (SAE weights through SAELens's
    ``load_weights_from_checkpoint``, the trainer state through ``load_trainer_state``) and
    put ``stream`` where it was: its saved state, or (a stream without one) ``batches`` advanced
    by the number of batches drawn before the checkpoint."""
    trainer.sae.load_weights_from_checkpoint(checkpoint.path)
    trainer.load_trainer_state(checkpoint.path)
    saved = torch.load(checkpoint.path / STREAM_FILE, weights_only=False)
    torch.set_rng_state(saved["rng"])
    if saved["stream"] is not None and isinstance(stream, ResumableStream):
        stream.load_state_dict(saved["stream"])
        return
    for _ in range(checkpoint.batches_drawn):
        next(batches)


__all__ = [
    "Checkpoint",
    "ResumableStream",
    "find_checkpoint",
    "locked",
    "restore_checkpoint",
    "save_checkpoint",
]
