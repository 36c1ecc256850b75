"""Validated selections of layers, heads and neurons, in the papers' ``"layer/head"`` notation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

Head = tuple[int, int]
HeadLike = Head | str


def _cfg(model_or_cfg: Any) -> Any:
    return getattr(model_or_cfg, "cfg", model_or_cfg)


def check_layer(model_or_cfg: Any, layer: int) -> int:
    """Return ``layer`` if the model has it, else raise a ``ValueError`` that gives the range."""
    n = _cfg(model_or_cfg).n_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: model has {n} layers (0-{n - 1})")
    return layer


def check_layers(
    model_or_cfg: Any, layers: int | Iterable[int] | None, *, allow_empty: bool = False
) -> list[int]:
    """Sorted unique layers (``None`` = all layers); duplicates are fine, out-of-range is not."""
    n = _cfg(model_or_cfg).n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = sorted({check_layer(model_or_cfg, int(layer)) for layer in layers})
    if not out and not allow_empty:
        raise ValueError("empty layer selection: name at least one layer (or pass layers=None)")
    return out


def parse_head(head: HeadLike) -> Head:
    """``(layer, head)`` from a pair or a ``"15/13"`` label (0-indexed, the papers' notation)."""
    if isinstance(head, str):
        try:
            layer, h = (int(x) for x in head.split("/"))
        except ValueError:
            raise ValueError(
                f"head label {head!r} is not of the form 'layer/head', e.g. '15/13'"
            ) from None
        return layer, h
    layer, h = head
    return int(layer), int(head[1])


def head_label(layer: int, head: int) -> str:
    """The papers' label of a head: ``head_label(15, 13) == "15/13"``."""
    return f"{layer}/{head}"


def check_heads(
    model_or_cfg: Any, heads: Iterable[HeadLike], *, allow_empty: bool = False
) -> list[Head]:
    """Sorted unique ``(layer, head)`` pairs, each checked against the model."""
    cfg = _cfg(model_or_cfg)
    out: set[Head] = set()
    for item in heads:
        layer, h = parse_head(item)
        check_layer(cfg, layer)
        if not 0 <= h < cfg.n_heads:
            raise ValueError(
                f"head {h} out of range in {item!r}: model has {cfg.n_heads} heads per layer "
                f"(0-{cfg.n_heads - 1})"
            )
        out.add((layer, h))
    if not out and not allow_empty:
        raise ValueError("empty head selection: name at least one (layer, head)")
    return sorted(out)


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """Group ``(layer, head)`` pairs by layer."""
    grouped: dict[int, list[int]] = {}
    for layer, h in heads:
        grouped.setdefault(layer, []).append(h)
    return {layer: sorted(set(hs)) for layer, hs in sorted(grouped.items())}


def neuron_mask(
    model_or_cfg: Any,
    neurons: Mapping[int, Iterable[int]] | Bool[Tensor, "n_layers d_mlp"],
    *,
    allow_empty: bool = False,
) -> Bool[Tensor, "n_layers d_mlp"]:
    """A boolean ``[n_layers, d_mlp]`` mask from ``{layer: indices}`` or a mask (validated)."""
    cfg = _cfg(model_or_cfg)
    shape = (cfg.n_layers, cfg.d_mlp)
    if isinstance(neurons, Tensor):
        if tuple(neurons.shape) != shape or neurons.dtype != torch.bool:
            raise ValueError(
                f"neuron mask must be a bool tensor of shape {shape}, got "
                f"{neurons.dtype} {tuple(neurons.shape)}"
            )
        mask = neurons.cpu().clone()
    else:
        mask = torch.zeros(shape, dtype=torch.bool)
        for layer, idx in neurons.items():
            check_layer(cfg, int(layer))
            idx = torch.as_tensor(
                list(idx) if not isinstance(idx, Tensor) else idx, dtype=torch.long
            )
            if idx.numel() and (idx.min() < 0 or idx.max() >= cfg.d_mlp):
                raise ValueError(
                    f"neuron index out of range in layer {layer}: d_mlp is {cfg.d_mlp} "
                    f"(0-{cfg.d_mlp - 1})"
                )
            mask[int(layer), idx] = True
    if not mask.any() and not allow_empty:
        raise ValueError("empty neuron selection: name at least one neuron")
    return mask
