"""Exact top-k activation patching, guided by attribution patching.

A full exact sweep costs one (partial) forward per (pair, cell); attribution patching estimates
every cell from one forward and one backward. :func:`patch_top_cells` combines them:

1. **Estimate** every cell's effect ``e_c = s_patch[c] - s_corr`` by an interval: the centre
   ``ê_c`` is attribution patching with the corrupted run's gradient
   (:func:`patching.attribution.attribution_patch`, with the AtP* softmax recomputation for
   query/key targets), the half-width ``w_c = spread * |ê_c - ê^mean_c|`` the distance to the
   estimate with the mean of the corrupted and clean runs' gradients (``= spread/2 *
   |Δa_c . (g_clean - g_corr)|``: how much the gradient changes between the two runs, a proxy of
   the second-order term that point estimates drop). Upper bound: ``U_c = |ê_c| + w_c``.
2. **Verify** cells exactly (the batched engine of :mod:`patching.sweep`, starting from the
   attribution runs' activations) in order of decreasing ``U_c``: ``k`` cells first, then
   ``step`` more per round, all pairs' rows of a round in the same expanded forward passes.
3. **Stop** a pair (or the average) when ``k`` cells are verified and the k-th largest exact
   ``|e|`` exceeds the largest bound still unverified, ``M = max_{c unverified} U_c``, by the
   safety margin::

       |e|_(k)  >  M + max(rtol * M + atol,  max_{c verified, U_c <= window*M} (|e_c - ê_c| - w_c))

   (the second term: the farthest an exact effect fell outside its interval on a verified cell
   of comparable size), or when every cell is verified. The result is then *certified*: a cell
   left unverified can only enter the top k (or tie with its k-th cell) if its exact effect lies
   outside its interval by more than the margin.

Cells are ranked by absolute effect. Why intervals: on the shared SciFact model's TFC1 pairs,
point estimates missed top-10 head x part cells of layers 0-1 whose corrupted- and mean-gradient
estimates disagree (e.g. exact +0.066, estimates +0.027 and -0.005: the mean-gradient estimate
even has the wrong sign); ranked by ``|ê|`` they came 37th-88th, were never verified, and the
wrong top 10 was certified. Their interval ranks them among the first 20.

Known failure modes of the rule (it trusts the intervals of the cells it does not verify):

* an interval that misses the exact effect by more than the margin, on a cell it never verifies:
  both gradients agree but the effect is far from linear (saturated GELU/LayerNorm/softmax
  beyond q/k, interactions that a first-order term misses). On the shared model this is layer-0
  heads underestimated about 2x (exact 0.062, both estimates 0.026-0.033); ``rtol`` is the
  guard (replaying the rule on 40 study pairs' full sweeps: 0.5 recovers all but 1 of their
  head top-10s, 1.0 all of them);
  ``attribution_error`` reports the largest ``|e - ê|`` on verified cells;
* for query/key targets both gradient rules give the same AtP* estimate (``w = 0``): point
  estimates, as before;
* near-ties at the k-th place within float32 round-off (~1e-6) of two verified cells: the set
  then follows the rounding of the exact forward passes, which differs from a sweep's;
* effects near round-off (``|e|`` ~ 1e-6): the rule then verifies nearly everything;
* ``max_cells`` stopping a pair early (reported as not certified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechir.interface import HookedReranker
from patching.attribution import GroupEstimates, group_estimates
from patching.perturbations import AlignedPairs
from patching.results import DEFAULT_MIN_DELTA
from patching.sweep import (
    DEFAULT_MEMORY_BUDGET,
    CachedGroup,
    cached_groups,
    check_batch_size,
    group_slices,
    progress_bar,
    rows_per_chunk,
    score_cells,
    start_names,
)
from patching.targets import PatchTarget


@dataclass
class TopCells:
    """Exact top-k cells per unit (a pair, or ``"mean"`` over pairs) of a patch target.

    Attributes:
        exact: ``[unit, *grid]`` exact effects of the verified cells (NaN elsewhere): score
            change ``s_patch - s_corr`` per pair, or the mean normalized metric when averaged.
        estimate: ``[unit, *grid]`` attribution-patching estimates of the same quantity.
        uncertainty: ``[unit, *grid]`` half-width ``w`` of each estimate's interval (``spread``
            times the gap between the corrupted- and mean-gradient estimates).
        verified: ``[unit, *grid]`` which cells were patched exactly.
        top: ``[unit, k]`` flat grid indices of the k largest ``|exact|``, largest first
            (-1 where a unit has fewer than k cells).
        certified: ``[unit]`` the stopping rule was met (or every cell verified).
        attribution_error: ``[unit]`` largest ``|exact - estimate|`` over verified cells.
        n_rows: exact (pair, cell) patches run; a full sweep runs ``n_cells_total``.
    """

    target: str
    dims: tuple[str, ...]
    coords: dict[str, list[Any]]
    k: int
    units: list[str]
    measure: str
    exact: Float[Tensor, "unit ..."]
    estimate: Float[Tensor, "unit ..."]
    uncertainty: Float[Tensor, "unit ..."]
    verified: Bool[Tensor, "unit ..."]
    top: Int[Tensor, "unit k"]
    certified: Bool[Tensor, " unit"]
    attribution_error: Float[Tensor, " unit"]
    clean: Float[Tensor, " pair"]
    corrupted: Float[Tensor, " pair"]
    n_rows: int
    n_cells_total: int

    def top_labels(self, unit: int = 0) -> list[tuple[Any, ...]]:
        """The top cells of ``unit`` as coordinate labels, e.g. ``[(3, 7), (5, 1), ...]``."""
        shape = self.exact.shape[1:]
        out = []
        for flat in self.top[unit].tolist():
            if flat >= 0:
                idx = np.unravel_index(flat, shape) if shape else ()
                out.append(tuple(self.coords[d][i] for d, i in zip(self.dims, idx)))
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per (unit, verified cell): coordinates, exact, estimate, rank (1 = largest)."""
        rows = []
        for u, unit in enumerate(self.units):
            ranks = {f: r + 1 for r, f in enumerate(self.top[u].tolist()) if f >= 0}
            flat_v = self.verified[u].reshape(-1)
            for f in flat_v.nonzero()[:, 0].tolist():
                idx = np.unravel_index(f, self.exact.shape[1:]) if self.dims else ()
                row = {"unit": unit}
                row.update({d: self.coords[d][i] for d, i in zip(self.dims, idx)})
                row["exact"] = float(self.exact[u].reshape(-1)[f])
                row["estimate"] = float(self.estimate[u].reshape(-1)[f])
                row["rank"] = ranks.get(f)
                rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (
            f"TopCells(target={self.target!r}, k={self.k}, units={len(self.units)}, "
            f"grid={dict(zip(self.dims, self.exact.shape[1:]))}, exact rows {self.n_rows} of "
            f"{self.n_cells_total}, certified {int(self.certified.sum())}/{len(self.units)})"
        )


@dataclass
class _Run:
    """What the verification loops share: inputs, estimates, the rule and the budgets."""

    model: HookedReranker
    pairs: AlignedPairs
    target: PatchTarget
    rules: tuple[str, ...]
    gradient: str
    spread: float
    attribution_batch_size: int
    est_pair: Float[Tensor, "pair cell"]
    width_pair: Float[Tensor, "pair cell"]
    cells: Int[Tensor, "cell cols"]
    flat: Int[Tensor, " cell"]
    valid: Bool[Tensor, "pair cell"]
    clean: Tensor  # [pair], filled in
    corrupted: Tensor  # [pair], filled in
    k: int
    step: int
    limit: int
    rule: tuple[float, float, float]
    rows_budget: int
    show: bool
    min_delta: float


def _stop(est: Tensor, width: Tensor, exact: Tensor, verified: Tensor, k: int, rule: tuple) -> bool:
    """The stopping rule for one unit over its valid cells (1-D tensors; module docstring)."""
    if bool(verified.all()):
        return True
    if int(verified.sum()) < k:
        return False
    rtol, atol, window = rule
    bound = est.abs() + width
    kth = exact.abs()[verified].topk(k).values[-1]
    largest = bound[~verified].max()
    comparable = verified & (bound <= window * largest)
    outside = (exact - est).abs() - width  # how far an exact effect fell outside its interval
    seen = outside[comparable].max() if comparable.any() else largest.new_zeros(())
    return bool(kth > largest + torch.maximum(rtol * largest + atol, seen))


def _next_cells(bound: Tensor, verified: Tensor, valid: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` unverified valid cells with the largest bound ``|estimate| + w``."""
    free = (valid & ~verified).nonzero()[:, 0]
    order = torch.argsort(bound[free], descending=True, stable=True)
    return free[order[:n]]


def patch_top_cells(
    model: HookedReranker,
    pairs: AlignedPairs,
    target: PatchTarget,
    k: int = 10,
    *,
    average: bool = False,
    rtol: float = 0.5,
    atol: float = 0.0,
    window: float = 2.0,
    spread: float = 1.0,
    step: int | None = None,
    max_cells: int | None = None,
    min_delta: float = DEFAULT_MIN_DELTA,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    attribution_batch_size: int = 16,
    gradient: Literal["corrupted", "mean"] = "corrupted",
    progress: bool | None = None,
) -> TopCells:
    """The exact top-``k`` cells of ``target`` per pair (or averaged over pairs), patching only
    the cells attribution patching cannot rule out (algorithm, stopping rule and its failure
    modes: module docstring).

    Args:
        k: cells wanted per unit.
        average: rank cells by the mean normalized metric ``(s_patch - s_corr) / (s_clean -
            s_corr)`` over the pairs with ``|s_clean - s_corr| >= min_delta`` (one unit), instead
            of the score change ``s_patch - s_corr`` of each pair (one unit per pair).
        rtol, atol, window: the safety margin of the stopping rule: relative to the largest
            unverified bound ``M``; absolute, in the units of the measure; and at least the
            largest amount by which an exact effect fell outside its interval on verified cells
            whose bound is at most ``window * M``.
        spread: the half-width of each estimate's interval, ``w = spread * |ê_corr - ê_mean|``
            (the corrupted- and the mean-gradient estimates); 0: point estimates (and, with
            ``gradient="corrupted"``, no backward pass on the clean inputs).
        step: cells verified per unit in each round after the first ``k`` (default ``ceil(k/5)``).
        max_cells: at most this many cells verified per unit (default: no limit).
        batch_size, memory_budget: rows per exact forward pass (as in :func:`patch_sweep`).
        gradient: the centre of the intervals (:func:`~patching.attribution.attribution_patch`):
            the corrupted run's gradient (default; on the shared model's head and head x part
            cells a third of the mean absolute error of ``"mean"``) or the mean of the corrupted
            and clean runs' gradients.
        progress: a bar over pairs done (over cells verified when averaged); None: shown for
            sweeps of >= 2000 (pair, cell)s.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rtol < 0 or atol < 0 or window < 0 or spread < 0:
        raise ValueError(
            f"the safety margin must be >= 0, got rtol={rtol}, atol={atol}, window={window}, "
            f"spread={spread}"
        )
    rule = (rtol, atol, window)
    check_batch_size(batch_size)
    step = step or -(-k // 5)
    width = pairs.clean.input_ids.shape[1]
    dims, coords = target.grid(model, width)
    shape = tuple(len(coords[d]) for d in dims)
    cells = target.cell_rows(model, width)
    flat = target.flat_index(model, cells, width)
    valid = target.valid(cells, pairs.lengths)  # [pair, cell]
    rows_budget = batch_size or rows_per_chunk(model, width, memory_budget)
    n = len(pairs)

    rules = ("corrupted", "mean") if spread > 0 else (gradient,)
    est_pair = torch.full((n, len(cells)), float("nan"), dtype=torch.float64)
    width_pair = torch.zeros_like(est_pair)
    clean, corrupted = torch.empty(n), torch.empty(n)
    limit = max_cells or len(cells)
    show = int(valid.sum()) >= 2000 if progress is None else progress

    run = _Run(
        model, pairs, target, rules, gradient, spread, attribution_batch_size, est_pair,
        width_pair, cells, flat, valid, clean, corrupted, k, step, limit, rule, rows_budget, show,
        min_delta,
    )  # fmt: skip
    verify = _averaged if average else _per_pair
    est, w, exact, verified, unit_valid, certified, units, n_rows = verify(run)
    return _result(
        target, dims, coords, shape, k, units, "metric" if average else "effect", flat,
        est, w, exact, verified, unit_valid, certified, clean, corrupted, n_rows,
        int(valid.sum()),
    )  # fmt: skip


def _estimate(s: _Run, start: int, stop: int, keep: tuple[str, ...] = ()) -> GroupEstimates:
    """Attribution patching of pairs ``start:stop``: fills their estimates, interval half-widths
    and scores into ``s``; the runs' activations named in ``keep`` come back with the rest."""
    width = s.pairs.clean.input_ids.shape[1]
    group = group_estimates(s.model, s.pairs[start:stop], s.target, s.rules, keep=keep, width=width)
    for i, p in enumerate(range(start, stop)):
        cs = s.valid[p].nonzero()[:, 0]

        def at(effects: Tensor, i: int = i, cs: Tensor = cs) -> Tensor:
            return effects[i].reshape(-1)[s.flat[cs]]

        s.est_pair[p, cs] = at(group.effects[s.gradient])
        if s.spread > 0:
            s.width_pair[p, cs] = (
                s.spread * (at(group.effects["corrupted"]) - at(group.effects["mean"])).abs()
            )
    s.clean[start:stop] = group.clean_scores.float()
    s.corrupted[start:stop] = group.corrupted_scores.float()
    return group


def _per_pair(s: _Run) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[str], int]:
    """Estimate and verify group by group (the attribution runs are the exact rows' caches), in
    rounds over the pairs of each group."""
    n = len(s.pairs)
    est, width, exact = s.est_pair, s.width_pair, torch.full_like(s.est_pair, float("nan"))
    verified = torch.zeros_like(s.valid)
    certified = torch.zeros(n, dtype=torch.bool)
    n_rows = 0
    first = torch.minimum(s.valid.sum(1), torch.tensor(2 * s.k))
    keep = tuple(start_names(s.model, s.target))
    slices = [
        (lo, min(lo + s.attribution_batch_size, stop))
        for start, stop in group_slices(first, s.rows_budget)
        for lo in range(start, stop, s.attribution_batch_size)
    ]
    with progress_bar(n, s.show, f"top-{s.k} {s.target.name}", "pair") as bar:
        for start, stop in slices:
            runs = _estimate(s, start, stop, keep)
            group = CachedGroup(
                s.pairs[start:stop], torch.arange(start, stop), s.clean[start:stop],
                s.corrupted[start:stop], runs.clean, runs.corrupted,
            )  # fmt: skip
            bound = est.abs() + width
            active = list(range(len(group.index)))
            want = s.k
            while active:
                p_rows, c_rows = [], []
                for i in active:
                    p = int(group.index[i])
                    room = s.limit - int(verified[p].sum())
                    new = _next_cells(bound[p], verified[p], s.valid[p], min(want, room))
                    p_rows.append(torch.full((len(new),), i))
                    c_rows.append(new)
                pr, cr = torch.cat(p_rows), torch.cat(c_rows)
                scores = score_cells(s.model, group, s.target, s.cells, pr, cr, s.rows_budget)
                n_rows += len(pr)
                pairs_of = group.index[pr]
                exact[pairs_of, cr] = scores.double() - group.corrupted_scores.double()[pr]
                verified[pairs_of, cr] = True
                still = []
                for i in active:
                    p = int(group.index[i])
                    v = s.valid[p]
                    done = _stop(est[p, v], width[p, v], exact[p, v], verified[p, v], s.k, s.rule)
                    if done or int(verified[p].sum()) >= s.limit:
                        certified[p] = done
                        bar.update(1)
                    else:
                        still.append(i)
                active, want = still, s.step
    return est, width, exact, verified, s.valid, certified, list(s.pairs.pair_ids), n_rows


def _averaged(s: _Run) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[str], int]:
    """Verify the mean normalized metric: every included pair patched for each chosen cell (the
    mean's interval half-width is the mean of the pairs' ``w / |s_clean - s_corr|``)."""
    n = len(s.pairs)
    for start in range(0, n, s.attribution_batch_size):
        _estimate(s, start, min(start + s.attribution_batch_size, n))
    delta = s.clean.double() - s.corrupted.double()
    keep = delta.abs() >= s.min_delta
    if not keep.any():
        raise ValueError(
            f"no pair has |clean - corrupted| >= min_delta={s.min_delta}: nothing to average"
        )
    weights = (s.valid & keep[:, None]).double()
    count = weights.sum(0)
    unit_valid = (count > 0)[None]
    scale = delta.where(keep, 1.0)[:, None]
    metric_est = (s.est_pair / scale).nan_to_num() * weights
    est = (metric_est.sum(0) / count.clamp(min=1))[None]
    width = ((s.width_pair / scale.abs()).nan_to_num() * weights).sum(0)[None] / count.clamp(min=1)
    bound = est.abs() + width
    exact = torch.full_like(est, float("nan"))
    verified = torch.zeros_like(unit_valid)
    certified = torch.zeros(1, dtype=torch.bool)
    kept = s.pairs[keep.nonzero()[:, 0].tolist()]
    kept_index = keep.nonzero()[:, 0]
    groups = list(cached_groups(s.model, kept, s.target, s.valid[keep].sum(1), s.rows_budget))
    for group in groups:
        s.clean[kept_index[group.index]] = group.clean_scores
        s.corrupted[kept_index[group.index]] = group.corrupted_scores
    n_rows, want = 0, s.k
    with progress_bar(len(s.cells), s.show, f"top-{s.k} {s.target.name} (mean)", "cell") as bar:
        while True:
            room = s.limit - int(verified.sum())
            new = _next_cells(bound[0], verified[0], unit_valid[0], min(want, room))
            total = torch.zeros(len(new), dtype=torch.float64)
            for group in groups:
                g_pairs = kept_index[group.index]
                ok = s.valid[g_pairs][:, new]
                pr, cr = ok.nonzero(as_tuple=True)
                scores = score_cells(s.model, group, s.target, s.cells, pr, new[cr], s.rows_budget)
                n_rows += len(pr)
                d = delta[g_pairs][pr]
                metric = (scores.double() - group.corrupted_scores.double()[pr]) / d
                total.index_add_(0, cr, metric)
            exact[0, new] = total / count[new]
            verified[0, new] = True
            bar.update(len(new))
            v = unit_valid[0]
            done = _stop(est[0, v], width[0, v], exact[0, v], verified[0, v], s.k, s.rule)
            if done or int(verified.sum()) >= s.limit:
                certified[0] = done
                break
            want = s.step
    return est, width, exact, verified, unit_valid, certified, ["mean"], n_rows


def _result(
    target: PatchTarget,
    dims: tuple[str, ...],
    coords: dict[str, list[Any]],
    shape: tuple[int, ...],
    k: int,
    units: list[str],
    measure: str,
    flat: Tensor,
    est: Tensor,
    width: Tensor,
    exact: Tensor,
    verified: Tensor,
    unit_valid: Tensor,
    certified: Tensor,
    clean: Tensor,
    corrupted: Tensor,
    n_rows: int,
    n_total: int,
) -> TopCells:
    """Scatter per-cell tensors ``[unit, cell]`` onto the grid and rank the verified cells."""
    u, size = len(units), int(np.prod(shape)) if shape else 1

    def grid(values: Tensor, fill: Any) -> Tensor:
        out = torch.full((u, size), fill, dtype=values.dtype)
        out[:, flat] = values
        return out

    est = est.where(unit_valid.expand_as(est), float("nan"))
    width = width.where(unit_valid.expand_as(width), float("nan"))
    g_exact = grid(exact, float("nan"))
    ranked = g_exact.abs().nan_to_num(-1.0)
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :k]
    top = order.where(torch.gather(ranked, 1, order) >= 0, torch.tensor(-1))
    if top.shape[1] < k:
        top = torch.cat([top, torch.full((u, k - top.shape[1]), -1)], 1)
    error = (exact - est).abs().where(verified, float("nan"))
    return TopCells(
        target=target.name,
        dims=dims,
        coords=coords,
        k=k,
        units=units,
        measure=measure,
        exact=g_exact.float().reshape(u, *shape),
        estimate=grid(est, float("nan")).float().reshape(u, *shape),
        uncertainty=grid(width, float("nan")).float().reshape(u, *shape),
        verified=grid(verified, False).reshape(u, *shape),
        top=top,
        certified=certified,
        attribution_error=torch.nan_to_num(error, nan=-1.0).max(1).values.clamp(min=0).float(),
        clean=clean,
        corrupted=corrupted,
        n_rows=n_rows,
        n_cells_total=n_total,
    )


__all__ = ["TopCells", "patch_top_cells"]
