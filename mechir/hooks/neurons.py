"""Neuron ablation: set chosen FFN neurons (``blocks.{l}.mlp.hook_post`` / ``hook_pre``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from jaxtyping import Bool, Float

from mechir.hooks.ablation import activation_means, bound_to, masked_replace, part_positions
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, PartLike
from mechir.running import Hooks
from mechir.selection import select_neurons

torch = lazy_import("torch")

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
) -> Float[torch.Tensor, "n_layers d_mlp"]:
    """Mean activation of every FFN neuron over the real tokens of a reference batch (or the
    tokens of ``parts``), streamed without a cache."""
    names = [f"blocks.{layer}.mlp.hook_{_check_hook(hook)}" for layer in range(model.cfg.n_layers)]
    means = activation_means(model, reference, names, batch_size=batch_size, parts=parts)
    return torch.stack([means[n] for n in names])


def neuron_ablation_hooks(
    model: Any,
    neurons: Mapping[int, Iterable[int]] | Bool[torch.Tensor, "n_layers d_mlp"] | None = None,
    *,
    mode: NeuronMode = "zero",
    means: Float[torch.Tensor, "n_layers d_mlp"] | None = None,
    hook: NeuronHook = "post",
    parts: PartLike | Iterable[PartLike] | None = None,
    batch: CrossEncoderBatch | None = None,
) -> Hooks:
    """Hooks setting ``neurons`` (``{layer: indices}`` or a ``[n_layers, d_mlp]`` bool mask) to 0
    (``mode="zero"``, on ``hook_post`` exactly zeroing their rows of ``W_out``) or to their
    reference mean (``mode="mean"``, ``means`` from :func:`neuron_means`). With ``parts`` only the
    positions of those parts change, read from the batch the model runs on. ``batch`` is
    deprecated; when given, running the hooks on another batch raises."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"unknown mode {mode!r}: use 'zero' or 'mean'")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means=neuron_means(model, reference_batch)")
    if neurons is None:
        raise ValueError("name the neurons to ablate: neurons={layer: [indices]} or a bool mask")
    mask = select_neurons(model, neurons)
    point = _check_hook(hook)
    positions = part_positions(parts)
    check = None if batch is None else bound_to(batch, "neuron-ablation")
    hooks = []
    for layer in mask.any(-1).nonzero().flatten().tolist():
        value = means[layer] if mode == "mean" else None

        def fn(act: torch.Tensor, hook: Any, selected=mask[layer], value=value) -> torch.Tensor:
            if check is not None:
                check(hook)
            where = None if positions is None else positions(hook)
            return masked_replace(act, selected, where, value)

        hooks.append((f"blocks.{layer}.mlp.hook_{point}", fn))
    return hooks
