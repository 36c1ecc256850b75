"""Head knockout: remove the output of chosen attention heads (``blocks.{l}.attn.hook_z``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechir.hooks.ablation import activation_means, masked_replace
from mechir.parts import CrossEncoderBatch, PartLike
from mechir.selection import HeadLike, check_heads, heads_by_layer

KnockoutMode = Literal["zero", "mean"]


def head_output_means(
    model: Any,
    reference: CrossEncoderBatch,
    *,
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Mean ``z`` (head value-weighted output before ``W_O``) of every head over the real tokens
    of a reference batch (or the tokens of ``parts``), streamed without a cache."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    means = activation_means(model, reference, names, batch_size=batch_size, parts=parts)
    return torch.stack([means[n] for n in names])


def head_knockout_hooks(
    model: Any,
    heads: Iterable[HeadLike],
    *,
    mode: KnockoutMode = "zero",
    means: Float[Tensor, "n_layers n_heads d_head"] | Mapping[str, Tensor] | None = None,
    batch: CrossEncoderBatch | None = None,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> list[tuple[str, Any]]:
    """Hooks knocking out ``heads`` (``(layer, head)`` pairs or ``"l/h"`` labels, 0-indexed).

    ``mode="zero"`` sets the head's ``z`` to 0, which is exactly zeroing its rows of ``W_O``;
    ``mode="mean"`` sets it to its reference mean (``means`` from :func:`head_output_means`).
    With ``parts`` (and the ``batch`` they refer to) only the positions of those parts change.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"unknown mode {mode!r}: use 'zero' or 'mean'")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means=head_output_means(model, reference_batch)")
    if parts is not None and batch is None:
        raise ValueError("parts=... needs the batch the hooks will run on (batch=...)")
    positions = batch.mask(parts) if parts is not None else None
    hooks = []
    for layer, hs in heads_by_layer(check_heads(model, heads)).items():
        name = f"blocks.{layer}.attn.hook_z"
        selected = torch.zeros(model.cfg.n_heads, 1, dtype=torch.bool)
        selected[hs] = True
        value = None
        if mode == "mean":
            value = means[name] if isinstance(means, Mapping) else means[layer]

        def hook(z: Tensor, hook: Any, selected=selected, value=value) -> Tensor:
            return masked_replace(z, selected, positions, value)

        hooks.append((name, hook))
    return hooks
