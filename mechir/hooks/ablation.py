"""Shared pieces of the ablation hooks: streaming reference means and masked replacement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechir.parts import CrossEncoderBatch, PartLike


def activation_means(
    model: Any,
    batch: CrossEncoderBatch,
    names: Sequence[str],
    *,
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> dict[str, Float[Tensor, "..."]]:
    """Mean of each named activation over every real token of ``batch`` (or over the tokens of
    ``parts``), streamed sub-batch by sub-batch: only running sums are kept, never a cache.

    For an activation ``[batch, pos, *rest]`` the result has shape ``rest``:
    ``mean = sum_{b,p in tokens} act[b, p] / #tokens``.
    """
    sums: dict[str, Tensor] = {}
    count = 0
    for chunk in batch.chunks(batch_size):
        tokens = chunk.mask(parts) if parts is not None else chunk.attention_mask.bool()
        tokens = tokens.to(model.cfg.device)
        count += int(tokens.sum())

        def accumulate(act: Tensor, hook: Any, tokens: Tensor = tokens) -> None:
            s = act[tokens].double().sum(0)
            sums[hook.name] = sums[hook.name] + s if hook.name in sums else s

        with torch.no_grad():
            model.run_with_hooks(chunk, fwd_hooks=[(n, accumulate) for n in names])
    if count == 0:
        raise ValueError("no tokens to average over (empty batch or part selection)")
    return {n: (sums[n] / count).to(torch.float32) for n in names}


def masked_replace(
    act: Float[Tensor, "batch pos ..."],
    selected: Bool[Tensor, "..."],
    positions: Bool[Tensor, "batch pos"] | None,
    value: Float[Tensor, "..."] | None,
) -> Float[Tensor, "batch pos ..."]:
    """``act`` with the ``selected`` trailing entries replaced by ``value`` (zero when None), at
    ``positions`` only (every position when None). Out of place, so gradients flow."""
    where = selected.to(act.device)[None, None]
    if positions is not None:
        if tuple(positions.shape) != tuple(act.shape[:2]):
            raise ValueError(
                f"hooks were built for a batch of shape {tuple(positions.shape)} but the model ran "
                f"on {tuple(act.shape[:2])}; build the hooks for each batch (pass a function "
                "batch -> hooks to score/rerank)"
            )
        extra = (1,) * (act.dim() - 2)
        where = where & positions.to(act.device).view(*positions.shape, *extra)
    replacement = (
        torch.zeros_like(act) if value is None else value.to(act)[None, None].expand_as(act)
    )
    return torch.where(where, replacement, act)
