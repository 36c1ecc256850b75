"""Neuron interventions on FFN neurons (``blocks.{l}.mlp.hook_post`` / ``hook_pre``): ablation to
zero or the reference mean, and partial scaling."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from jaxtyping import Bool, Float

from mechir.hooks.means import activation_means
from mechir.hooks.site import SITES, Mode, PartSelection, action_for, site_hooks
from mechir.hooks.towers import TowerSelection, in_tower
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, PartLike
from mechir.running import Hooks

torch = lazy_import("torch")

NeuronHook = Literal["post", "pre"]
_SITE = {"post": "neuron", "pre": "neuron_pre"}


def _site_of(hook: str) -> str:
    if hook not in _SITE:
        raise ValueError(f"unknown neuron hook {hook!r}: use 'post' (after GELU) or 'pre'")
    return _SITE[hook]


def neuron_means(
    model: HookedReranker,
    reference: CrossEncoderBatch,
    *,
    hook: NeuronHook = "post",
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> Float[torch.Tensor, "n_layers d_mlp"]:
    """Mean activation of every FFN neuron over the real tokens of a reference batch (or the
    tokens of ``parts``), streamed without a cache."""
    site = SITES[_site_of(hook)]
    names = [site.hook_name(layer) for layer in range(model.cfg.n_layers)]
    means = activation_means(model, reference, names, batch_size=batch_size, parts=parts)
    return torch.stack([means[n] for n in names])


def neuron_ablation_hooks(
    model: HookedReranker,
    neurons: Mapping[int, Iterable[int]] | Bool[torch.Tensor, "n_layers d_mlp"] | None = None,
    *,
    mode: Mode = "zero",
    means: Float[torch.Tensor, "n_layers d_mlp"] | None = None,
    factor: float | None = None,
    hook: NeuronHook = "post",
    parts: PartSelection = None,
    tower: TowerSelection = None,
) -> Hooks:
    """Hooks setting ``neurons`` (``{layer: indices}`` or a ``[n_layers, d_mlp]`` bool mask) to 0
    (``mode="zero"``, on ``hook_post`` exactly zeroing their rows of ``W_out``), to their
    reference mean (``mode="mean"``, ``means`` from :func:`neuron_means`), or scaling them by
    ``factor`` (partial ablation: ``a <- factor * a``; 1 is the identity, 0 equals
    ``mode="zero"``). With ``parts`` only the positions of those parts change, read from the
    batch the model runs on; with ``tower`` only inside one tower of a bi-encoder."""
    if neurons is None:
        raise ValueError("name the neurons to ablate: neurons={layer: [indices]} or a bool mask")
    site = SITES[_site_of(hook)]
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))):
        raise ValueError(f"factor must be a number, got {factor!r}")
    action = action_for(site, mode, means=means, factor=factor, what="neuron ablation")
    hooks = site_hooks(model, site, action=action, units=neurons, parts=parts)
    return in_tower(model, hooks, tower)
