"""Patching results: scores per pair and cell, the normalized metric, tidy tables, heatmap arrays.

For a pair with clean score ``s_clean``, corrupted score ``s_corr`` and the score ``s_patch`` of the
corrupted run with one cell patched from the clean run, the metric is::

    m = (s_patch - s_corr) / (s_clean - s_corr)

0 means the cell restores nothing of the score change, 1 that it restores all of it. Pairs with
``|s_clean - s_corr| < min_delta`` are reported (:meth:`PatchingResult.excluded`) and left out of
every metric, mean and table instead of dividing by ~0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechir.display import fields_repr

#: Default threshold on ``|clean - corrupted|`` (score units) below which a pair is excluded.
DEFAULT_MIN_DELTA = 1e-3


def patching_metric(
    patched: Float[Tensor, "pair ..."],
    clean: Float[Tensor, " pair"],
    corrupted: Float[Tensor, " pair"],
    *,
    min_delta: float = DEFAULT_MIN_DELTA,
) -> tuple[Float[Tensor, "pair ..."], Bool[Tensor, " pair"]]:
    """``(patched - corrupted) / (clean - corrupted)`` per pair and cell, in float64.

    Returns the metric (NaN on excluded pairs) and the mask of included pairs
    (``|clean - corrupted| >= min_delta``).
    """
    if min_delta < 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta}")
    patched, clean, corrupted = (t.detach().double().cpu() for t in (patched, clean, corrupted))
    delta = clean - corrupted
    included = delta.abs() >= min_delta
    shape = (-1,) + (1,) * (patched.dim() - 1)
    safe = torch.where(included, delta, torch.ones_like(delta))
    metric = (patched - corrupted.view(shape)) / safe.view(shape)
    metric[~included] = float("nan")
    return metric, included


class HeatmapData(NamedTuple):
    """A 2-D array with its axis names and tick labels (rows = first dimension)."""

    values: np.ndarray
    row_dim: str
    row_labels: list[Any]
    col_dim: str
    col_labels: list[Any]
    title: str


@dataclass(repr=False)
class PatchingResult:
    """Patched scores of every (pair, cell), with the clean and corrupted scores of each pair.

    Attributes:
        target: what was patched, e.g. ``"z/all"`` or ``"resid_pre/position"``.
        dims: the cell grid's dimensions, e.g. ``("layer", "head")``.
        coords: tick labels of every dimension (layers, heads, positions, part names, ...).
        patched: ``[pair, *grid]`` scores; NaN for cells that were not patched (not selected, or
            a position beyond the pair's length).
        clean, corrupted: ``[pair]`` scores of the unpatched runs.
        method: ``"exact"`` (activation patching), ``"attribution"`` (gradient approximation:
            ``patched = corrupted + (clean act - corrupted act) . grad``) or ``"path"``.
    """

    target: str
    dims: tuple[str, ...]
    coords: dict[str, list[Any]]
    patched: Float[Tensor, "pair ..."]
    clean: Float[Tensor, " pair"]
    corrupted: Float[Tensor, " pair"]
    pair_ids: list[str]
    grades: list[int | None]
    method: str = "exact"

    def __post_init__(self) -> None:
        n = self.patched.shape[0]
        if not (len(self.clean) == len(self.corrupted) == len(self.pair_ids) == n):
            raise ValueError("patched, clean, corrupted and pair_ids need one entry per pair")
        if tuple(self.patched.shape[1:]) != tuple(len(self.coords[d]) for d in self.dims):
            raise ValueError(
                f"patched grid {tuple(self.patched.shape[1:])} does not match dims {self.dims}"
            )

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def delta(self) -> Float[Tensor, " pair"]:
        """``clean - corrupted`` per pair."""
        return self.clean - self.corrupted

    def metric(self, min_delta: float = DEFAULT_MIN_DELTA) -> Float[Tensor, "pair ..."]:
        """The normalized metric per pair and cell (NaN for excluded pairs and unpatched cells)."""
        return patching_metric(self.patched, self.clean, self.corrupted, min_delta=min_delta)[0]

    def excluded(self, min_delta: float = DEFAULT_MIN_DELTA) -> dict[str, float]:
        """Pairs left out because ``|clean - corrupted| < min_delta``: pair id -> delta."""
        small = self.delta.abs() < min_delta
        return {self.pair_ids[i]: float(self.delta[i]) for i in small.nonzero()[:, 0].tolist()}

    def mean(
        self, min_delta: float = DEFAULT_MIN_DELTA, *, grade: int | None | str = "all"
    ) -> Float[Tensor, "..."]:
        """Mean metric over the included pairs (of one relevance ``grade``, or ``"all"``)."""
        metric = self.metric(min_delta)
        if grade != "all":
            keep = torch.tensor([g == grade for g in self.grades], dtype=torch.bool)
            metric = metric[keep]
        return (
            torch.nanmean(metric, dim=0)
            if len(metric)
            else metric.new_full(metric.shape[1:], float("nan"))
        )

    def by_grade(self, min_delta: float = DEFAULT_MIN_DELTA) -> dict[int | None, Tensor]:
        """Mean metric per relevance grade (grades in increasing order; None last)."""
        return {g: self.mean(min_delta, grade=g) for g in self._grades()}

    def counts_by_grade(self, min_delta: float = DEFAULT_MIN_DELTA) -> dict[int | None, int]:
        """Number of included pairs per relevance grade."""
        ok = (self.delta.abs() >= min_delta).tolist()
        return {
            g: sum(1 for gg, k in zip(self.grades, ok) if gg == g and k) for g in self._grades()
        }

    def _grades(self) -> list[int | None]:
        known = sorted({g for g in self.grades if g is not None})
        return known + ([None] if None in self.grades else [])

    # ------------------------------------------------------------ tables
    def to_frame(
        self, min_delta: float = DEFAULT_MIN_DELTA, *, include_excluded: bool = False
    ) -> pd.DataFrame:
        """Tidy table, one row per (pair, patched cell).

        Columns: ``pair, grade, target, method``, one column per grid dimension (``layer``,
        ``head``, ``position``, ``part``, ``neuron``, ``dimension``), ``value`` (the metric),
        ``patched, clean, corrupted`` (scores) and ``excluded``.
        """
        metric = self.metric(min_delta).reshape(len(self), -1).numpy()
        patched = self.patched.detach().double().cpu().reshape(len(self), -1).numpy()
        grid = [np.asarray(self.coords[d]) for d in self.dims]
        mesh = [m.reshape(-1) for m in np.meshgrid(*grid, indexing="ij")] if grid else []
        n_cells = patched.shape[1]
        excluded = (self.delta.abs() < min_delta).cpu().numpy()
        frames = []
        for i, pair in enumerate(self.pair_ids):
            if excluded[i] and not include_excluded:
                continue
            done = ~np.isnan(patched[i])
            cols: dict[str, Any] = {
                "pair": pair,
                "grade": self.grades[i],
                "target": self.target,
                "method": self.method,
            }
            for d, m in zip(self.dims, mesh):
                cols[d] = m[done]
            cols["value"] = metric[i][done] if n_cells else metric[i]
            cols["patched"] = patched[i][done]
            cols["clean"] = float(self.clean[i])
            cols["corrupted"] = float(self.corrupted[i])
            cols["excluded"] = bool(excluded[i])
            frames.append(pd.DataFrame(cols))
        columns = ["pair", "grade", "target", "method", *self.dims]
        columns += ["value", "patched", "clean", "corrupted", "excluded"]
        if not frames:
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True)[columns]

    def heatmap(
        self,
        min_delta: float = DEFAULT_MIN_DELTA,
        *,
        grade: int | None | str = "all",
        **fixed: Any,
    ) -> HeatmapData:
        """Mean metric as a 2-D array for plotting (rows = first remaining dimension).

        Dimensions beyond two must be fixed by label, e.g. ``heatmap(layer=3)`` for a
        ``(layer, head, position)`` grid gives heads x positions of layer 3. A 1-D grid becomes
        one row.
        """
        values = self.mean(min_delta, grade=grade)
        dims = list(self.dims)
        for name, label in fixed.items():
            if name not in dims:
                raise ValueError(f"cannot fix {name!r}: this result's dimensions are {self.dims}")
            labels = self.coords[name]
            if label not in labels:
                raise ValueError(f"{name}={label!r} not in this result ({labels[:10]}...)")
            values = values.select(dims.index(name), labels.index(label))
            dims.remove(name)
        if len(dims) > 2:
            raise ValueError(
                f"{len(dims)} dimensions left ({dims}): fix all but two, e.g. "
                f"heatmap({dims[0]}={self.coords[dims[0]][0]!r})"
            )
        fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items())
        title = f"{self.target} ({self.method})" + (f", {fixed_txt}" if fixed_txt else "")
        title += "" if grade == "all" else f", grade {grade}"
        if len(dims) == 0:
            return HeatmapData(values.reshape(1, 1).numpy(), "", [""], "", [""], title)
        if len(dims) == 1:
            arr = values.reshape(1, -1).numpy()
            return HeatmapData(arr, "", [""], dims[0], list(self.coords[dims[0]]), title)
        return HeatmapData(
            values.numpy(),
            dims[0],
            list(self.coords[dims[0]]),
            dims[1],
            list(self.coords[dims[1]]),
            title,
        )


__all__ = ["DEFAULT_MIN_DELTA", "HeatmapData", "PatchingResult", "patching_metric"]


PatchingResult.__repr__ = fields_repr  # type: ignore[method-assign]
