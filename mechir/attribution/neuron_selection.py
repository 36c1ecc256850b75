"""Selecting neurons from attribution scores: global signed top-p%, intersection, fusion, and
random controls of the same size and per-layer distribution.

Scores are ``[layer, d_mlp]`` tensors (e.g. the mean attribution of a group of examples, summed
over positions: ``AttributionMeans.mean(group)``). Selections are global: the top ``p`` percent of
*all* neurons of all layers compete, so some layers may get none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechir.display import fields_repr

Sign = Literal["positive", "negative", "absolute"]
SIGNS: tuple[str, ...] = ("positive", "negative", "absolute")


@dataclass(repr=False)
class NeuronSelection:
    """A set of FFN neurons with their scores.

    Attributes:
        mask: ``[n_layers, d_mlp]`` booleans (model layers, whatever rows the scores had).
        table: one row per selected neuron: ``layer``, ``neuron``, ``score``, ``rank`` (1 = best).
        label: a name for tables and plots.
    """

    mask: Bool[Tensor, "n_layers d_mlp"]
    table: pd.DataFrame
    label: str = ""

    def __len__(self) -> int:
        return int(self.mask.sum())

    def neurons(self) -> dict[int, list[int]]:
        """``{layer: [neuron indices]}`` (for :func:`mechir.hooks.neuron_ablation_hooks`)."""
        return {
            int(layer): self.mask[layer].nonzero().flatten().tolist()
            for layer in self.mask.any(-1).nonzero().flatten().tolist()
        }

    def per_layer(self) -> list[int]:
        """Number of selected neurons in every layer."""
        return self.mask.sum(-1).tolist()


def n_selected(total: int, percent: float) -> int:
    """``max(1, round(percent / 100 * total))``: how many neurons ``percent`` % of ``total`` is."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    return max(1, int(math.floor(percent / 100 * total + 0.5)))


def _rows_to_layers(
    scores: Tensor, layers: Sequence[int] | None, n_layers: int | None
) -> tuple[list[int], int]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [layer, d_mlp], got shape {tuple(scores.shape)}")
    rows = list(range(scores.shape[0])) if layers is None else [int(x) for x in layers]
    if len(rows) != scores.shape[0]:
        raise ValueError(f"{len(rows)} layers given for {scores.shape[0]} score rows")
    n = n_layers if n_layers is not None else max(rows) + 1
    if min(rows) < 0 or max(rows) >= n:
        raise ValueError(f"layers {rows} out of range for n_layers={n}")
    return rows, n


def _table(mask_rows: list[int], flat_idx: Tensor, values: Tensor, d_mlp: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": [mask_rows[int(i) // d_mlp] for i in flat_idx],
            "neuron": [int(i) % d_mlp for i in flat_idx],
            "score": values.tolist(),
            "rank": list(range(1, len(flat_idx) + 1)),
        }
    )


def _ranked(scores: Tensor, sign: str) -> tuple[Tensor, Tensor]:
    """Flat indices of ``scores`` best first (ties: lower layer/neuron first), and the key."""
    if sign not in SIGNS:
        raise ValueError(f"unknown sign {sign!r}: choose one of {SIGNS}")
    flat = scores.detach().float().cpu().flatten()
    key = {"positive": flat, "negative": -flat, "absolute": flat.abs()}[sign]
    order = torch.argsort(key, descending=True, stable=True)
    return order, flat


def top_neurons(
    scores: Float[Tensor, "layer d_mlp"],
    percent: float,
    *,
    sign: Sign = "positive",
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    label: str = "",
) -> NeuronSelection:
    """The top ``percent`` % of all neurons by signed score, across layers.

    ``sign="positive"`` keeps the largest scores (neurons that raise the target), ``"negative"``
    the most negative, ``"absolute"`` the largest magnitudes. ``layers`` names the model layer of
    each score row (default ``0..``); ``n_layers`` sets the mask height (default: last layer + 1).
    """
    rows, n = _rows_to_layers(scores, layers, n_layers)
    d_mlp = scores.shape[1]
    k = n_selected(scores.numel(), percent)
    order, flat = _ranked(scores, sign)
    chosen = order[:k]
    mask = torch.zeros(n, d_mlp, dtype=torch.bool)
    for i in chosen.tolist():
        mask[rows[i // d_mlp], i % d_mlp] = True
    label = label or f"top {percent:g}% {sign}"
    return NeuronSelection(mask, _table(rows, chosen, flat[chosen], d_mlp), label)


def fuse_scores(
    scores: Sequence[Float[Tensor, "layer d_mlp"]], *, normalize: bool = False
) -> Float[Tensor, "layer d_mlp"]:
    """Average score tensors (e.g. one per dataset) before selecting ("fusion").

    With ``normalize`` each is first divided by its largest magnitude, so that a dataset with
    larger attributions does not dominate.
    """
    if not scores:
        raise ValueError("no score tensors to fuse")
    shapes = {tuple(s.shape) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"score tensors differ in shape: {sorted(shapes)}")
    stacked = torch.stack([s.detach().float().cpu() for s in scores])
    if normalize:
        stacked = stacked / stacked.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None]
    return stacked.mean(0)


def intersect(selections: Sequence[NeuronSelection], *, label: str = "") -> NeuronSelection:
    """Neurons selected in every one of ``selections``; ``score`` is their mean score, ranked."""
    if not selections:
        raise ValueError("no selections to intersect")
    shapes = {tuple(s.mask.shape) for s in selections}
    if len(shapes) != 1:
        raise ValueError(f"selections have masks of different shapes: {sorted(shapes)}")
    mask = selections[0].mask.clone()
    for s in selections[1:]:
        mask &= s.mask
    keys = ["layer", "neuron"]
    frames = [s.table.set_index(keys)["score"] for s in selections]
    scores = pd.concat(frames, axis=1).mean(axis=1)
    kept = [tuple(x) for x in mask.nonzero().tolist()]
    table = (
        scores.loc[kept].rename("score").reset_index()
        if kept
        else pd.DataFrame({"layer": [], "neuron": [], "score": []})
    )
    table = table.sort_values(["score", "layer", "neuron"], ascending=[False, True, True])
    table = table.reset_index(drop=True)
    table["rank"] = range(1, len(table) + 1)
    label = label or " & ".join(s.label for s in selections)
    return NeuronSelection(mask, table, label)


def random_control(
    selection: NeuronSelection, seed: int, *, exclude_selected: bool = True
) -> NeuronSelection:
    """Random neurons with the same count in every layer as ``selection`` (seeded); by default
    none of them is in ``selection``. ``score`` is NaN and ``rank`` the draw order."""
    gen = torch.Generator().manual_seed(int(seed))
    n_layers, d_mlp = selection.mask.shape
    mask = torch.zeros_like(selection.mask)
    layers, neurons = [], []
    for layer, count in enumerate(selection.per_layer()):
        if count == 0:
            continue
        pool = ~selection.mask[layer] if exclude_selected else torch.ones(d_mlp, dtype=torch.bool)
        candidates = pool.nonzero().flatten()
        if len(candidates) < count:
            raise ValueError(f"layer {layer}: only {len(candidates)} neurons to draw {count} from")
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
        mask[layer, pick] = True
        layers += [layer] * count
        neurons += pick.tolist()
    table = pd.DataFrame(
        {
            "layer": layers,
            "neuron": neurons,
            "score": float("nan"),
            "rank": range(1, len(layers) + 1),
        }
    )
    return NeuronSelection(mask, table, f"random (seed {seed}) for {selection.label}")


NeuronSelection.__repr__ = fields_repr  # type: ignore[method-assign]
