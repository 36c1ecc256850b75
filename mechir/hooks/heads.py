"""Head knockout: remove the output of chosen attention heads (``blocks.{l}.attn.hook_z``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from jaxtyping import Float

from mechir.hooks.ablation import activation_means, bound_to, masked_replace, part_positions
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, PartLike
from mechir.running import Hooks
from mechir.selection import HeadSelection, LayerSelection, heads_by_layer, select_heads

torch = lazy_import("torch")

KnockoutMode = Literal["zero", "mean"]


def head_output_means(
    model: Any,
    reference: CrossEncoderBatch,
    *,
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
    """Mean ``z`` (head value-weighted output before ``W_O``) of every head over the real tokens
    of a reference batch (or the tokens of ``parts``), streamed without a cache."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    means = activation_means(model, reference, names, batch_size=batch_size, parts=parts)
    return torch.stack([means[n] for n in names])


def head_knockout_hooks(
    model: Any,
    heads: HeadSelection = None,
    *,
    layers: LayerSelection = None,
    mode: KnockoutMode = "zero",
    means: Float[torch.Tensor, "n_layers n_heads d_head"]
    | Mapping[str, torch.Tensor]
    | None = None,
    parts: PartLike | Iterable[PartLike] | None = None,
    batch: CrossEncoderBatch | None = None,
) -> Hooks:
    """Hooks knocking out ``heads`` (any form of :mod:`mechir.selection`: ``"l/h"``, ``"LlHh"``,
    ``(l, h)``, ``{l: [h]}``, or head indices with ``layers``).

    ``mode="zero"`` sets the head's ``z`` to 0, which is exactly zeroing its rows of ``W_O``;
    ``mode="mean"`` sets it to its reference mean (``means`` from :func:`head_output_means`).
    With ``parts`` only the positions of those parts change, read from the batch the model runs
    on. ``batch`` is deprecated (parts are read from the running batch); when given, running the
    hooks on another batch raises.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"unknown mode {mode!r}: use 'zero' or 'mean'")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means=head_output_means(model, reference_batch)")
    if heads is None and layers is None:
        raise ValueError("name the heads to knock out: heads=..., or layers=... (all their heads)")
    positions = part_positions(parts)
    check = None if batch is None else bound_to(batch, "head-knockout")
    hooks = []
    for layer, hs in heads_by_layer(select_heads(model, heads, layers=layers)).items():
        name = f"blocks.{layer}.attn.hook_z"
        selected = torch.zeros(model.cfg.n_heads, 1, dtype=torch.bool)
        selected[hs] = True
        value = None
        if mode == "mean":
            value = means[name] if isinstance(means, Mapping) else means[layer]

        def hook(z: torch.Tensor, hook: Any, selected=selected, value=value) -> torch.Tensor:
            if check is not None:
                check(hook)
            where = None if positions is None else positions(hook)
            return masked_replace(z, selected, where, value)

        hooks.append((name, hook))
    return hooks
