"""Neuron ablation: set chosen FFN neurons (``blocks.{l}.mlp.hook_post`` / ``hook_pre``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechir.hooks.ablation import activation_means, masked_replace
from mechir.parts import CrossEncoderBatch, PartLike
from mechir.selection import neuron_mask

NeuronMode = Literal["zero", "mean"]
NeuronHook = Literal["post", "pre"]


def _check_hook(hook: str) -> str:
    if hook not in ("post", "pre"):
        raise ValueError(f"unknown neuron hook {hook!r}: use 'post' (after GELU) or 'pre'")
    return hook


def neuron_means(
    model: Any,
    reference: CrossEncoderBatch,
    *,
    hook: NeuronHook = "post",
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> Float[Tensor, "n_layers d_mlp"]:
    """Mean activation of every FFN neuron over the real tokens of a reference batch (or the
    tokens of ``parts``), streamed without a cache."""
    names = [f"blocks.{layer}.mlp.hook_{_check_hook(hook)}" for layer in range(model.cfg.n_layers)]
    means = activation_means(model, reference, names, batch_size=batch_size, parts=parts)
    return torch.stack([means[n] for n in names])


def neuron_ablation_hooks(
    model: Any,
    neurons: Mapping[int, Iterable[int]] | Bool[Tensor, "n_layers d_mlp"],
    *,
    mode: NeuronMode = "zero",
    means: Float[Tensor, "n_layers d_mlp"] | None = None,
    hook: NeuronHook = "post",
    batch: CrossEncoderBatch | None = None,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> list[tuple[str, Any]]:
    """Hooks setting ``neurons`` (``{layer: indices}`` or a ``[n_layers, d_mlp]`` bool mask) to 0
    (``mode="zero"``, on ``hook_post`` exactly zeroing their rows of ``W_out``) or to their
    reference mean (``mode="mean"``, ``means`` from :func:`neuron_means`). With ``parts`` (and
    the ``batch`` they refer to) only the positions of those parts change."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"unknown mode {mode!r}: use 'zero' or 'mean'")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means=neuron_means(model, reference_batch)")
    if parts is not None and batch is None:
        raise ValueError("parts=... needs the batch the hooks will run on (batch=...)")
    mask = neuron_mask(model, neurons)
    positions = batch.mask(parts) if parts is not None else None
    hooks = []
    for layer in mask.any(-1).nonzero().flatten().tolist():
        value = means[layer] if mode == "mean" else None

        def fn(act: Tensor, hook: Any, selected=mask[layer], value=value) -> Tensor:
            return masked_replace(act, selected, positions, value)

        hooks.append((f"blocks.{layer}.mlp.hook_{_check_hook(hook)}", fn))
    return hooks
