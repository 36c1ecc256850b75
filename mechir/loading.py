"""Load a BERT cross-encoder (hub id, local directory or in-memory model) into mechir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mechir.model import HookedCrossEncoder, ScoreType, hooked_cross_encoder_from_hf

SUPPORTED = (
    "BERT-architecture sequence-classification cross-encoders (model_type 'bert', "
    "BertForSequenceClassification with 1 or more labels, e.g. castorini/monobert-large-msmarco "
    "or cross-encoder/ms-marco-MiniLM-L-6-v2)"
)


class UnsupportedModelError(ValueError):
    """The checkpoint is not a BERT cross-encoder that mechir can load."""


def _check_config(config: Any, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "bert":
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; mechir supports {SUPPORTED}"
        )
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{source}: decoder BERT is not supported; {SUPPORTED}")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"{source}: position_embedding_type {config.position_embedding_type!r} is not "
            "supported (absolute positions only)"
        )
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UnsupportedModelError(
            f"{source}: checkpoint architecture {archs} has no sequence-classification head; "
            f"mechir supports {SUPPORTED}"
        )


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


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
    score_type: ScoreType | None = None,
) -> HookedCrossEncoder:
    """Load a BERT cross-encoder into a :class:`~mechir.model.HookedCrossEncoder`.

    Args:
        model: a Hugging Face hub id (``"castorini/monobert-large-msmarco"``), a local directory
            (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` + tokenizer files;
            loaded fully offline), or an in-memory ``transformers.BertForSequenceClassification``.
        tokenizer: the tokenizer; required for an in-memory model, optional otherwise.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: parameter dtype.
        relevant_label: the relevant class of a multi-label model (MonoBERT: 1).
        score_type: ``"binary_logit"`` (default: the log-odds of relevance), ``"logit"``,
            ``"log_prob"`` or ``"prob"`` (see ``HookedCrossEncoder``).

    Raises:
        UnsupportedModelError: not a BERT sequence-classification checkpoint.
        ValueError: no tokenizer could be found.
    """
    from transformers import AutoConfig, BertForSequenceClassification, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        source = type(model).__name__
        _check_config(model.config, source)
        if not isinstance(model, BertForSequenceClassification):
            raise UnsupportedModelError(f"{source} is not supported; mechir supports {SUPPORTED}")
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: pass tokenizer=...")
        hf_model = model
    elif isinstance(model, (str, os.PathLike)):
        source = str(model)
        is_local = Path(source).is_dir()
        if not is_local and (source.startswith((".", "/", "~")) or os.sep + os.sep in source):
            raise FileNotFoundError(f"{source}: no such model directory")
        config = AutoConfig.from_pretrained(source)
        _check_config(config, source)
        if tokenizer is None:
            tokenizer = _load_tokenizer(source)
        hf_model, info = BertForSequenceClassification.from_pretrained(
            source, output_loading_info=True, attn_implementation="eager"
        )
        if any(k.startswith("classifier.") for k in info["missing_keys"]):
            raise UnsupportedModelError(
                f"{source}: the checkpoint has no trained classification head (classifier.* "
                f"weights missing); mechir supports {SUPPORTED}"
            )
    else:
        raise TypeError(
            f"model must be a hub id, a local directory or a BertForSequenceClassification, "
            f"got {type(model).__name__}"
        )
    return hooked_cross_encoder_from_hf(
        hf_model.eval(),
        tokenizer,
        device=device,
        dtype=dtype,
        relevant_label=relevant_label,
        score_type=score_type,
    )
