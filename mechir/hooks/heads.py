"""Head interventions on head outputs ``blocks.{l}.attn.hook_z``: knockout (zero or mean) and
scaling (amplify or suppress)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from jaxtyping import Float

from mechir.hooks.means import activation_means
from mechir.hooks.site import SITES, Mode, PartSelection, Scale, action_for, site_hooks
from mechir.hooks.towers import TowerSelection, in_tower
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, PartLike
from mechir.running import Hooks
from mechir.selection import HeadSelection, LayerSelection

torch = lazy_import("torch")


def head_output_means(
    model: HookedReranker,
    reference: CrossEncoderBatch,
    *,
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
    """Mean ``z`` (head value-weighted output before ``W_O``) of every head over the real tokens
    of a reference batch (or the tokens of ``parts``), streamed without a cache."""
    names = [SITES["z"].hook_name(layer) for layer in range(model.cfg.n_layers)]
    means = activation_means(model, reference, names, batch_size=batch_size, parts=parts)
    return torch.stack([means[n] for n in names])


def _check_named(heads: HeadSelection, layers: LayerSelection, what: str) -> None:
    if heads is None and layers is None:
        raise ValueError(f"name the heads to {what}: heads=..., or layers=... (all their heads)")


def head_knockout_hooks(
    model: HookedReranker,
    heads: HeadSelection = None,
    *,
    layers: LayerSelection = None,
    mode: Mode = "zero",
    means: Float[torch.Tensor, "n_layers n_heads d_head"]
    | Mapping[str, torch.Tensor]
    | None = None,
    parts: PartSelection = None,
    tower: TowerSelection = None,
) -> Hooks:
    """Hooks knocking out ``heads`` (any form of :mod:`mechir.selection`: ``"l/h"``, ``"LlHh"``,
    ``(l, h)``, ``{l: [h]}``, or head indices with ``layers``).

    ``mode="zero"`` sets the head's ``z`` to 0, which is exactly zeroing its rows of ``W_O``;
    ``mode="mean"`` sets it to its reference mean (``means`` from :func:`head_output_means`).
    With ``parts`` only the positions of those parts change, read from the batch the model runs
    on. ``tower`` (``"query"``, ``"document"``) keeps it inside one tower of a bi-encoder.
    """
    _check_named(heads, layers, "knock out")
    action = action_for(SITES["z"], mode, means=means, what="head knockout")
    hooks = site_hooks(model, "z", action=action, layers=layers, units=heads, parts=parts)
    return in_tower(model, hooks, tower)


def head_scaling_hooks(
    model: HookedReranker,
    heads: HeadSelection = None,
    *,
    factor: float,
    layers: LayerSelection = None,
    parts: PartSelection = None,
    tower: TowerSelection = None,
) -> Hooks:
    """Hooks scaling the output of ``heads`` by ``factor``: ``z_h <- factor * z_h`` (so the
    head's contribution ``z_h W_O[h]`` to the residual stream is scaled; ``b_O`` is not). 1 is
    the identity, 0 is :func:`head_knockout_hooks` with ``mode="zero"``, above 1 amplifies.
    With ``parts`` only the positions of those parts change."""
    _check_named(heads, layers, "scale")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ValueError(f"factor must be a number, got {factor!r}")
    hooks = site_hooks(model, "z", action=Scale(factor), layers=layers, units=heads, parts=parts)
    return in_tower(model, hooks, tower)
