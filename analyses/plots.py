"""Matplotlib plots of the studies' tables, written as PNG files.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, rendered by Agg),
never through ``pyplot``: no global state, no display needed, safe in worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

DPI = 120
#: Line styles of reference levels drawn across curve plots.
REFERENCE_STYLES = ("--", ":", "-.", (0, (1, 3)))


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG through :mod:`mechir.outputs` (never over a file mechir did not
    write)."""
    from mechir import outputs

    return outputs.save_figure(fig, path, dpi=DPI, bbox_inches="tight", format="png")


def _limits(values: np.ndarray, center: float | None) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if center is None or finite.size == 0:
        return None, None
    span = float(np.max(np.abs(finite - center))) or 1e-9
    return center - span, center + span


def heatmap(
    values: Sequence[Sequence[float]] | np.ndarray,
    path: str | Path,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
    center: float | None = 0.0,
    cmap: str | None = None,
    annotate: bool | None = None,
    fmt: str = "+.3f",
    highlight: Sequence[tuple[int, int]] = (),
) -> Path:
    """A labelled heatmap (NaN cells blank). With ``center``, a diverging colour map symmetric
    around it; ``annotate`` (default: when at most 150 cells) writes each value in its cell;
    ``highlight`` outlines cells ``(row, col)``."""
    data = np.asarray(values, dtype=float)
    n_rows, n_cols = data.shape
    cmap = cmap or ("RdBu_r" if center is not None else "viridis")
    vmin, vmax = _limits(data, center)
    fig = Figure(figsize=(max(4.0, 0.5 * n_cols + 2.5), max(3.0, 0.38 * n_rows + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in col_labels], rotation=45 if n_cols > 8 else 0)
    ax.set_yticks(range(n_rows), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=colorbar_label, shrink=0.85)
    if annotate if annotate is not None else n_rows * n_cols <= 150:
        finite = data[np.isfinite(data)]
        scale = float(np.max(np.abs(finite - (center or 0)))) if finite.size else 1.0
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(data[i, j]):
                    strong = abs(data[i, j] - (center or 0)) > 0.6 * scale
                    ax.text(
                        j,
                        i,
                        format(data[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if strong else "black",
                    )
    for i, j in highlight:
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5)
        )
    return _save(fig, path)


def heatmap_grid(
    panels: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    colorbar_label: str = "",
    center: float | None = 0.0,
    ncols: int = 4,
) -> Path:
    """Small multiples: one heatmap per panel (same colour scale), titled by its key."""
    names = list(panels)
    data = np.stack([np.asarray(panels[n], dtype=float) for n in names])
    vmin, vmax = _limits(data, center)
    cols = min(ncols, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(2.8 * cols + 1, 2.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    im = None
    for ax, name, panel in zip(axes, names, data):
        im = ax.imshow(
            np.ma.masked_invalid(panel),
            cmap="RdBu_r" if center is not None else "viridis",
            vmin=vmin,
            vmax=vmax,
        )
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(col_labels)), col_labels, fontsize=6, rotation=90)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=6)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[: len(names)]), label=colorbar_label, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    references: Mapping[str, float] | None = None,
    xticks: tuple[Sequence[float], Sequence[str]] | None = None,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None,
    logx: bool = False,
) -> Path:
    """Curves ``{label: (x, y)}`` with optional horizontal reference levels ``{label: y}``
    (e.g. unablated model, random floor) and shaded bands ``{label: (x, low, high)}``."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", markersize=3, linewidth=1.4, label=label)
    for label, (x, low, high) in (bands or {}).items():
        ax.fill_between(list(x), list(low), list(high), alpha=0.2, label=label)
    for (label, level), style in zip((references or {}).items(), REFERENCE_STYLES * 4):
        ax.axhline(
            level, color="grey", linestyle=style, linewidth=1.0, label=f"{label} {level:.3f}"
        )
    if xticks is not None:
        ax.set_xticks(list(xticks[0]), list(xticks[1]))
    elif all(float(v).is_integer() for x, _ in series.values() for v in x):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def scatter_plot(
    x: Sequence[float],
    y: Sequence[float],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    label_top: int = 8,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    diagonal: bool = False,
) -> Path:
    """A scatter plot; the ``label_top`` points farthest from the origin are labelled."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    ax.scatter(xs, ys, s=12, alpha=0.7)
    if diagonal and xs.size:
        lo = float(np.nanmin([xs.min(), ys.min()]))
        hi = float(np.nanmax([xs.max(), ys.max()]))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    if labels is not None and xs.size:
        order = np.argsort(-np.nan_to_num(np.hypot(xs, ys), nan=-1))[:label_top]
        for i in order:
            ax.annotate(
                labels[i], (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bar_plot(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Bars with optional horizontal reference levels."""
    fig = Figure(figsize=(max(5.0, 0.35 * len(labels) + 2), 4.0))
    ax = fig.subplots()
    ax.bar(range(len(labels)), list(values))
    ax.set_xticks(range(len(labels)), list(labels), rotation=60, ha="right", fontsize=7)
    for (label, level), style in zip((references or {}).items(), REFERENCE_STYLES * 4):
        ax.axhline(
            level, color="grey", linestyle=style, linewidth=1.0, label=f"{label} {level:.3f}"
        )
    if references:
        ax.legend(fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
