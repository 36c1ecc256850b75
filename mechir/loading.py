"""Load a reranker (hub id, local directory, in-memory model) into mechir.

Resolves the source offline first, then dispatches on ``config.model_type`` and the checkpoint's
architecture through the family registry (:data:`mechir.models.FAMILIES`); the family's file
loads it. Anything else is an :class:`UnsupportedModelError` listing what is supported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mechir.demo import is_demo, resolve_model
from mechir.interface import HookedReranker
from mechir.models.registry import (
    SUPPORTED,
    LoadOptions,
    UnsupportedModelError,
    family_for_config,
)
from mechir.network import offline_mode, unreachable
from mechir.settings import check_model_type


class ModelNotFoundError(FileNotFoundError):
    """No model at the given path, in the local Hugging Face cache, or on a reachable hub."""


# ---------------------------------------------------------------------------- path resolution
#: Weight files of a Hugging Face model directory (one of them must be present).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_INSTEAD = (
    "pass a local model directory (config.json + weights + tokenizer files) instead, "
    "or --model demo in the CLI"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of ``repo_id`` (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_hub_cache()))
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return None
    return path if (path / "config.json").exists() else None


def _looks_like_path(model: str | os.PathLike) -> bool:
    """A ``PathLike``, or a string that cannot be a hub id or names an existing local folder."""
    source = str(model)
    if isinstance(model, os.PathLike) or source.startswith((".", "/", "~")) or "\\" in source:
        return True
    if not _HUB_ID.match(source):
        return True
    return "/" in source and Path(source.split("/")[0]).is_dir()


def resolve_model_source(model: str | os.PathLike) -> Path | str:
    """Where to load ``model`` from, offline first, failing fast with one line.

    Order: ``"demo"`` (the embedded demo model, :mod:`mechir.demo`); an existing local
    directory; a path-like name that does not exist (``./m``, ``/m``, ``~/m``, ``models/m``
    when ``models/`` exists) is an error, never a hub id; a hub id's
    snapshot in the local Hugging Face cache (``HF_HUB_CACHE``); the hub itself, only when
    neither ``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE`` is set and a quick request (<= 3 s,
    no retries) reaches it.

    Returns:
        a local directory (checked by :func:`check_model_directory`), or the hub id to download.

    Raises:
        ModelNotFoundError: nothing usable; the message says what was tried and what to pass.
    """
    if is_demo(model):
        return Path(resolve_model(model))
    source = str(model)
    path = Path(source).expanduser()
    if path.is_dir():
        check_model_directory(path)
        return path
    if path.exists():
        raise ModelNotFoundError(f"{source}: is a file, not a model directory; {_INSTEAD}")
    if _looks_like_path(model):
        raise ModelNotFoundError(
            f"{source}: no such model directory ({path.absolute()} does not exist); {_INSTEAD}"
        )
    cached = _cached_snapshot(source)
    if cached is not None:
        check_model_directory(cached)
        return cached
    offline = offline_mode()
    if offline is not None:
        raise _not_found(source, f"the hub was not tried (offline: {offline})")
    why = unreachable(_hub_endpoint())
    if why is not None:
        raise _not_found(source, f"the hub {_hub_endpoint()} is {why}")
    return source


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _not_found(source: str, hub: str) -> ModelNotFoundError:
    """The one-line error for a hub id: what was tried (``hub`` says how the hub answered)."""
    return ModelNotFoundError(
        f"model {source!r} not found: no local directory {Path(source).absolute()}, not in the "
        f"local Hugging Face cache ({_hub_cache()}), and {hub}; {_INSTEAD}"
    )


# ---------------------------------------------------------------------------- weight checks
def check_model_directory(directory: Path) -> None:
    """A model directory has ``config.json`` naming a family mechir loads, a weight file, and
    its safetensors files are complete (header and data; read without loading the tensors).

    Raises:
        ModelNotFoundError: ``config.json`` or every weight file is missing.
        UnsupportedModelError: ``config.json``'s ``model_type`` is not a family mechir loads
            (:func:`mechir.settings.check_model_type`: the file, the type and the families).
        ValueError: a truncated or corrupted safetensors file (its path is named), or a
            ``config.json`` that is not JSON.
    """
    from safetensors import safe_open

    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(
            f"{directory}: no config.json, so this is not a Hugging Face model directory "
            "(expected config.json, model.safetensors or pytorch_model.bin, and tokenizer files)"
        )
    check_model_type(directory / "config.json")
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise ModelNotFoundError(
            f"{directory}: no weights (none of {', '.join(WEIGHT_FILES)} in the directory)"
        )
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError does not derive from OSError
            raise ValueError(
                f"{file}: truncated or corrupted safetensors file ({err}); re-download or "
                "re-save the model"
            ) from None


def check_finite_weights(hf_model: torch.nn.Module, source: str) -> None:
    """Every floating-point parameter and buffer is finite.

    Raises:
        ValueError: naming the first tensor with NaN/inf values and how many it has.
    """
    tensors = list(hf_model.named_parameters()) + list(hf_model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: weight {name!r} has {bad} non-finite values (NaN/inf) out of "
                f"{tensor.numel()}: the checkpoint is corrupted; re-download or re-save it"
            )


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
)


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{source}: no usable tokenizer found (none of {TOKENIZER_FILES} in the directory). "
            "A cross-encoder directory needs its tokenizer files; or pass tokenizer=..."
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"{source}: no usable tokenizer found ({err.__class__.__name__}: {err}). A cross-"
            "encoder directory needs its tokenizer files (tokenizer.json or vocab.txt + "
            "tokenizer_config.json); or pass tokenizer=..."
        ) from err


def load_cross_encoder(
    model: str | os.PathLike | Any,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    relevant_label: int = 1,
    score_type: str | None = None,
    template: str | None = None,
    instruction: str | None = None,
    answer_tokens: tuple[str, str] | None = None,
    progress: bool = True,
) -> HookedReranker:
    """Load a reranker into mechir: a :class:`~mechir.models.HookedCrossEncoder` for the encoder
    families, the family's own hooked model otherwise.

    Supported families: :data:`mechir.models.FAMILIES` (one file each in :mod:`mechir.models`).

    Args:
        model: a Hugging Face hub id (``"castorini/monobert-large-msmarco"``), a local directory
            (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` + tokenizer files;
            loaded fully offline), ``"demo"`` (the embedded demo model, see :mod:`mechir.demo`),
            an in-memory ``transformers`` ``*ForSequenceClassification`` model of a supported
            family, or a ``sentence_transformers.CrossEncoder`` (optional extra; its inner model
            and tokenizer are used. mechir reports the raw classifier logit by default, not
            ``CrossEncoder.predict``'s activation of it; for one label ``score_type="prob"``
            equals ``predict``'s default sigmoid).
        tokenizer: the tokenizer; required for an in-memory model, optional otherwise.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: parameter dtype.
        relevant_label: the relevant class of a multi-label model (MonoBERT: 1).
        score_type: ``"binary_logit"`` (default: the log-odds of relevance), ``"logit"``,
            ``"log_prob"`` or ``"prob"`` (see ``HookedCrossEncoder``).
        template, instruction, answer_tokens: the prompt of a prompt-based reranker (MonoT5,
            LLM rerankers; see :class:`mechir.models.LoadOptions`); each defaults to the
            family's own, and families that read no prompt refuse them.
        progress: show Hugging Face's download and "Loading weights" progress bars (False:
            silenced for this call only, see :func:`hf_progress_bars`).

    Returns:
        a model satisfying :class:`mechir.interface.HookedReranker`.

    A string is resolved offline first (:func:`resolve_model_source`): a local directory, then
    the local Hugging Face cache, then the hub only when it is reachable and not switched off
    (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``).

    Raises:
        ModelNotFoundError: no such directory, not cached, and the hub offline or unreachable;
            or a directory without ``config.json`` / weights.
        UnsupportedModelError: not a sequence-classification checkpoint of a supported family.
        ValueError: no tokenizer could be found or it joins pairs unlike the family, a
            truncated weight file, or non-finite weights (the message names the file or the
            first bad tensor).
    """
    from transformers import AutoConfig, PreTrainedModel

    options = LoadOptions(
        device=device,
        dtype=dtype,
        relevant_label=relevant_label,
        score_type=score_type,
        template=template,
        instruction=instruction,
        answer_tokens=None if answer_tokens is None else tuple(answer_tokens),
    )
    sentence_cross_encoder = _sentence_transformers_model(model)
    if sentence_cross_encoder is not None:
        model, tokenizer = sentence_cross_encoder, tokenizer or model.tokenizer
    if isinstance(model, PreTrainedModel):
        source = type(model).__name__
        family = family_for_config(model.config, source, architecture=source)
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: pass tokenizer=...")
        with hf_progress_bars(progress):
            return family.load(model, tokenizer, options)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "model must be a hub id, a local directory, a transformers model or a "
            f"sentence_transformers.CrossEncoder, got {type(model).__name__}"
        )
    source = str(model)
    location = resolve_model_source(model)
    try:
        with hf_progress_bars(progress):
            config = AutoConfig.from_pretrained(location)
    except ValueError as err:  # a downloaded config.json of a type Transformers lacks
        model_type = _unknown_model_type(str(err))
        if model_type is None:
            raise
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; mechir loads {SUPPORTED}"
        ) from None
    except OSError as err:  # the hub answered the reachability check but not this request
        if isinstance(location, Path):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _not_found(
            source, f"the hub {_hub_endpoint()} did not provide it ({reason})"
        ) from None
    family = family_for_config(config, source)
    with hf_progress_bars(progress):
        if tokenizer is None:
            tokenizer = _load_tokenizer(str(location))
        return family.load(location, tokenizer, options)


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, Hugging Face's progress bars (``transformers``' "Loading weights",
    ``huggingface_hub``'s downloads) are shown or not as ``enabled`` says; on leaving, both
    libraries' switches are restored to what they were (the switches are process-wide:
    another thread loading at the same time sees the same setting)."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    shown, hub_shown = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    if enabled == shown and enabled == hub_shown:
        yield
        return
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
        (enable_progress_bars if hub_shown else disable_progress_bars)()


def _unknown_model_type(message: str) -> str | None:
    """The type named by Transformers' "has model type `x` but Transformers does not recognize
    this architecture" error, else None."""
    match = re.search(r"model type `([^`]*)` but Transformers does not recognize", message)
    return match.group(1) if match else None


def _sentence_transformers_model(source: Any) -> Any:
    """The ``transformers`` model inside a ``sentence_transformers.CrossEncoder``, else None."""
    if type(source).__name__ != "CrossEncoder":  # never import the optional package needlessly
        return None
    try:
        from sentence_transformers import CrossEncoder
    except ImportError:
        return None
    return source.model if isinstance(source, CrossEncoder) else None
