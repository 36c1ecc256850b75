"""Baseline inputs for path attributions: the real batch with some parts' tokens replaced.

A baseline keeps the real input's shape, attention mask, token types and parts; only token ids
change, so ``x' -> x`` interpolates the content of the replaced parts and nothing else.

Names: ``"<token>"`` or ``"<token>_<scope>"`` with token ``pad`` | ``unk`` | ``mask`` and scope
``query`` | ``document`` | ``all`` (every token, [CLS] and [SEP] included); without a scope the
query and the document are replaced and [CLS]/[SEP] kept (the default ``"pad"``).
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.parts import PARTS, CrossEncoderBatch, Part

BASELINE_TOKENS: tuple[str, ...] = ("pad", "unk", "mask")
BASELINE_SCOPES: dict[str, tuple[Part, ...]] = {
    "": (Part.QUERY, Part.DOCUMENT),
    "query": (Part.QUERY,),
    "document": (Part.DOCUMENT,),
    "all": PARTS,
}
BASELINES: tuple[str, ...] = tuple(
    f"{tok}_{scope}" if scope else tok for tok in BASELINE_TOKENS for scope in BASELINE_SCOPES
)


def baseline_batch(
    model: HookedReranker, batch: CrossEncoderBatch, baseline: str | CrossEncoderBatch = "pad"
) -> CrossEncoderBatch:
    """The baseline batch for ``batch``: a named baseline (see module doc) or a user batch.

    A user-supplied baseline must have the same shape and attention mask as ``batch``. Named
    baselines take their token id from ``model.tokenizer``; token ids are checked against the
    model's vocabulary (``model.cfg.d_vocab``).

    Raises:
        ValueError: unknown name, no tokenizer to look up the token id, or a mismatched batch.
    """
    if isinstance(baseline, CrossEncoderBatch):
        if baseline.input_ids.shape != batch.input_ids.shape:
            raise ValueError(
                f"baseline batch has shape {tuple(baseline.input_ids.shape)} but the input has "
                f"{tuple(batch.input_ids.shape)}: build it from the same batch (same padding)"
            )
        if not (baseline.attention_mask.cpu() == batch.attention_mask.cpu()).all():
            raise ValueError(
                "baseline batch has another attention mask than the input: a baseline keeps the "
                "input's attention mask (replace token ids only)"
            )
        _check_token_ids(model, baseline.input_ids)
        return CrossEncoderBatch(
            baseline.input_ids.to(batch.device),
            baseline.token_type_ids.to(batch.device),
            batch.attention_mask,
            batch.parts,
        )
    if not isinstance(baseline, str):
        raise ValueError(f"baseline must be a name or a CrossEncoderBatch, got {baseline!r}")
    token, _, scope = baseline.strip().lower().partition("_")
    if token not in BASELINE_TOKENS or scope not in BASELINE_SCOPES:
        raise ValueError(
            f"unknown baseline {baseline!r}: choose one of {BASELINES} or pass a batch"
        )
    tokenizer = model.tokenizer
    token_id = None
    if tokenizer is not None:
        ids = {
            "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id,
            "mask": tokenizer.mask_token_id,
        }
        token_id = ids[token]
    if token_id is None:
        raise ValueError(
            f"cannot build the {baseline!r} baseline: no tokenizer with a [{token.upper()}] token; "
            "pass a tokenizer to load_cross_encoder or give a baseline batch"
        )
    _check_token_ids(model, torch.tensor([int(token_id)]))
    replace = batch.mask(BASELINE_SCOPES[scope])
    ids = batch.input_ids.masked_fill(replace, int(token_id))
    return CrossEncoderBatch(ids, batch.token_type_ids, batch.attention_mask, batch.parts)


def _vocab_size(model: HookedReranker) -> int | None:
    """The model's vocabulary size (``cfg.d_vocab``; TransformerLens leaves -1 when unset, then
    the tokenizer's), or None when neither says."""
    if model.cfg.d_vocab > 0:
        return int(model.cfg.d_vocab)
    size = model.tokenizer.vocab_size if model.tokenizer is not None else None
    return int(size) if size else None


def _check_token_ids(model: HookedReranker, ids: Int[Tensor, "..."]) -> None:
    """Raise if a baseline token id is outside the vocabulary (an embedding lookup would fail
    or, for -1 on some back ends, silently read another row)."""
    vocab = _vocab_size(model)
    bad = (ids < 0) | (ids >= vocab) if vocab is not None else ids < 0
    if bool(bad.any()):
        token = int(ids[bad].flatten()[0])
        limit = f"the vocabulary has {vocab} ids (0-{vocab - 1})" if vocab else "ids are >= 0"
        raise ValueError(
            f"baseline token id {token} out of range: {limit}; give a real token id "
            "(e.g. the tokenizer's pad_token_id) or a named baseline such as 'pad'"
        )
