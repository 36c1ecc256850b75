"""Matplotlib heatmaps of patching results (layer x head, layer x position, ...).

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, no GUI), so
they work headless: ``fig.savefig("heads.png")``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from patching.results import DEFAULT_MIN_DELTA, HeatmapData, PatchingResult


def plot_heatmap(
    data: HeatmapData,
    *,
    ax: Axes | None = None,
    cmap: str = "RdBu_r",
    vmax: float | None = None,
    colorbar: bool = True,
    max_ticks: int = 40,
) -> Axes:
    """Draw one heatmap, colours centred on 0 (symmetric range ``[-vmax, vmax]``).

    ``vmax`` defaults to the largest absolute finite value (1 when there is none).
    """
    if ax is None:
        ax = Figure(figsize=(6, 4), layout="constrained").subplots()
    values = np.asarray(data.values, dtype=float)
    finite = values[np.isfinite(values)]
    if vmax is None:
        vmax = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    xticks = _ticks(data.col_labels, max_ticks)
    yticks = _ticks(data.row_labels, max_ticks)
    ax.set_xticks(xticks, [str(data.col_labels[t]) for t in xticks])
    ax.set_yticks(yticks, [str(data.row_labels[t]) for t in yticks])
    ax.set_xlabel(data.col_dim)
    ax.set_ylabel(data.row_dim)
    ax.tick_params(axis="x", labelrotation=90 if len(data.col_labels) > 12 else 0)
    ax.set_title(data.title, fontsize="medium")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.8)
    return ax


def _ticks(labels: list[Any], max_ticks: int) -> list[int]:
    return list(range(0, len(labels), max(1, math.ceil(len(labels) / max_ticks))))


def plot_patching(
    result: PatchingResult,
    *,
    by_grade: bool = True,
    min_delta: float = DEFAULT_MIN_DELTA,
    ncols: int = 3,
    panel_size: tuple[float, float] = (5.0, 3.6),
    **fixed: Any,
) -> Figure:
    """Heatmaps of the mean metric: one panel for all pairs, plus one per relevance grade.

    ``fixed`` selects a slice of grids with more than two dimensions (see
    :meth:`PatchingResult.heatmap`), e.g. ``plot_patching(result, layer=3)``. Every panel shares
    one colour range; panel titles give the number of pairs.
    """
    panels: list[tuple[str, int | None | str, int]] = [
        ("all pairs", "all", _n_all(result, min_delta))
    ]
    if by_grade:
        counts = result.counts_by_grade(min_delta)
        panels += [(f"grade {g}", g, counts[g]) for g in counts]
    data = [result.heatmap(min_delta, grade=g, **fixed) for _, g, _ in panels]
    finite = [np.abs(d.values[np.isfinite(d.values)]) for d in data]
    peak = max((float(f.max()) for f in finite if f.size), default=0.0)
    vmax = peak if peak > 0 else 1.0
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    base = data[0].title
    for ax, (label, _, count), d in zip(axes, panels, data):
        d = d._replace(title=f"{base}\n{label} (n={count})")
        plot_heatmap(d, ax=ax, vmax=vmax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig


def _n_all(result: PatchingResult, min_delta: float) -> int:
    return int((result.delta.abs() >= min_delta).sum())


__all__ = ["plot_heatmap", "plot_patching"]
