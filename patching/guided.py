"""Top-k activation patching guided by attribution patching: exact effects, a heuristic stop.

A full exact sweep costs one (partial) forward per (pair, cell); attribution patching estimates
every cell from a few forward and backward passes per pair. :func:`patch_top_cells` combines them:

1. **Estimate** every cell's effect ``e_c = s_patch[c] - s_corr`` by an interval: the centre
   ``ê_c`` is attribution patching with the corrupted run's gradient
   (:func:`patching.attribution.attribution_patch`, with the AtP* softmax recomputation for
   query/key targets); the half-width ``w_c = spread * max_j |ê_c - ê^j_c|`` is its largest
   distance to the same first-order estimate with other gradients ``j``: the mean of the
   corrupted and clean runs' gradients, and the gradients where the input embeddings are mixed
   ``corrupted + alpha (clean - corrupted)`` at each of ``path_points``
   (:func:`patching.attribution.attribution_estimates`). How much the gradient changes between
   the two runs is a proxy of what a first-order estimate drops. Score: ``U_c = |ê_c| + w_c``.
2. **Verify** cells exactly (the batched engine of :mod:`patching.sweep`, starting from the
   attribution runs' activations) in order of decreasing ``U_c``: ``k`` cells first, then
   ``step`` more per round, all pairs' rows of a round in the same expanded forward passes.
3. **Stop** a unit (a pair, or the average) when every cell is verified (``certified``), or when
   ``k`` cells are verified and the k-th largest exact ``|e|`` exceeds the largest score still
   unverified, ``M = max_{c unverified} U_c``, by the safety margin (``stopped_by_estimate``)::

       |e|_(k)  >  M + max(rtol * M + atol,  max_{c verified, U_c <= window*M} (|e_c - ê_c| - w_c))

   (the second term: the farthest an exact effect fell outside its interval on a verified cell
   of comparable size).

**What is certain and what is not.** Every effect reported for a verified cell is exact (it is
the sweep's, up to float32 round-off), and ``top`` is the exact top k *of the verified cells*.
It is the top k of *all* cells for sure only when every cell was verified: ``certified`` says
exactly that, and nothing else. A stop by estimate (``stopped_by_estimate``) trusts the intervals
of the cells left unverified, and those intervals are **not bounds**: attribution patching's
error has no bound that holds without assumptions (smoothness of GELU/LayerNorm/softmax along
the whole corrupted-to-clean path, small interactions) that real and random models violate. The
assumption a stop by estimate makes is that no unverified cell's exact ``|e_c|`` exceeds its
score ``U_c`` by more than the margin. It fails: with the earlier defaults (no path points,
``rtol=0.5``) a tiny random model's head had exact effect -0.230 against an interval of -0.076
+- 0.0018, and the returned top 3 was wrong; on the shared SciFact model, replacing the
document's embeddings (``resid_pre`` of layer 0, one cell per part) recovers the whole score
change (+4.71) while both end gradients estimate it at under 0.01 (the score saturates along the
way; the mid-path gradients see it). How often a stop by estimate returns a top k that the full
sweep does not is *measured*, not promised: ``benchmarks/bench_guided_patching.py`` replays the
search on full sweeps of the shared model for every target kind and ``k`` in {1, 3, 5, 10, 20},
50 pairs (``benchmarks/README.md``, with the cost); the defaults are chosen to have no miss on that
set, with one notch of margin to spare, which is evidence, not a guarantee. Other models, pairs
or targets can miss: when the top k must be exact, pass ``rtol=float("inf")`` (every cell
verified, a sweep's cost) or read ``certified``; :func:`simulate_top_cells` replays the search on
your own full sweep to measure the miss rate of any setting.

Cells are ranked by absolute effect. Why intervals: on the shared SciFact model's TFC1 pairs,
point estimates missed top-10 head x part cells of layers 0-1 whose corrupted- and mean-gradient
estimates disagree (e.g. exact +0.066, estimates +0.027 and -0.005: the mean-gradient estimate
even has the wrong sign); ranked by ``|ê|`` they came 37th-88th and were never verified. Their
interval ranks them among the first 20.

Known failure modes of the stop by estimate (it trusts the intervals of the cells it does not
verify):

* an interval that misses the exact effect by more than the margin, on a cell it never verifies:
  every gradient agrees but the effect is far from linear (saturated GELU/LayerNorm/softmax
  beyond q/k, interactions that a first-order term misses: on the shared model layer-0 heads
  underestimated about 2x, exact 0.062 against estimates 0.026-0.033). ``rtol`` and the path
  points are the guard; ``attribution_error`` reports the largest ``|e - ê|`` on verified cells;
* for query/key targets the corrupted- and mean-gradient rules give the same AtP* estimate: only
  the path points widen their intervals;
* near-ties at the k-th place within float32 round-off (~1e-6) of two verified cells: the set
  then follows the rounding of the exact forward passes, which differs from a sweep's (this
  holds for ``certified`` units too: their top k is as exact as the sweep, not more);
* effects near round-off (``|e|`` ~ 1e-6), or many cells tied at an exact 0 (e.g. positions the
  score cannot see): the rule then verifies nearly everything;
* ``max_cells`` stopping a unit early (``capped``: neither certified nor stopped by estimate).

Cost: the attribution passes (a clean and a corrupted forward and backward, and one forward and
backward per path point) are paid per pair whatever the grid, so on small grids (tens of cells
per pair) the search can take longer than the sweep itself; it pays off on large grids (heads x
part, positions, neurons). Measured figures: ``benchmarks/README.md``.
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
from patching.attribution import GroupEstimates, group_estimates, path_rule
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

#: The stopping rule's defaults: the settings with no miss against full sweeps on the benchmark
#: set (``benchmarks/bench_guided_patching.py``), which is evidence, not a guarantee.
DEFAULT_RTOL = 1.0
DEFAULT_WINDOW = 2.0
DEFAULT_SPREAD = 1.0
DEFAULT_PATH_POINTS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass
class TopCells:
    """Top-k cells per unit (a pair, or ``"mean"`` over pairs) of a patch target: exact effects of
    the verified cells, and how the search ended (module docstring: what is certain).

    Attributes:
        exact: ``[unit, *grid]`` exact effects of the verified cells (NaN elsewhere): score
            change ``s_patch - s_corr`` per pair, or the mean normalized metric when averaged.
        estimate: ``[unit, *grid]`` attribution-patching estimates of the same quantity.
        uncertainty: ``[unit, *grid]`` half-width ``w`` of each estimate's interval (``spread``
            times the gap between the corrupted- and mean-gradient estimates).
        verified: ``[unit, *grid]`` which cells were patched exactly.
        top: ``[unit, k]`` flat grid indices of the k largest ``|exact|`` among the verified
            cells, largest first (-1 where a unit has fewer than k cells).
        certified: ``[unit]`` every cell of the unit was verified exactly, so ``top`` is the top
            k of all its cells (as exact as a full sweep; ties within float32 round-off may be
            ordered differently). Nothing else is certified.
        stopped_by_estimate: ``[unit]`` the stopping rule ended the unit with cells left
            unverified: ``top`` is then the full sweep's top k only if no unverified cell's
            exact effect exceeds its attribution interval by more than the margin, which is
            assumed, not proven (miss rates measured in ``benchmarks/README.md``).
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
    stopped_by_estimate: Bool[Tensor, " unit"]
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

    @property
    def capped(self) -> Bool[Tensor, " unit"]:
        """``[unit]`` units that ``max_cells`` ended before either stop: ``top`` is only the top
        of the cells verified so far."""
        return ~(self.certified | self.stopped_by_estimate)

    def __repr__(self) -> str:
        n = len(self.units)
        return (
            f"TopCells(target={self.target!r}, k={self.k}, units={n}, "
            f"grid={dict(zip(self.dims, self.exact.shape[1:]))}, exact rows {self.n_rows} of "
            f"{self.n_cells_total}; all cells exact (certified) {int(self.certified.sum())}/{n}, "
            f"stopped by estimate (not certified) {int(self.stopped_by_estimate.sum())}/{n}, "
            f"capped by max_cells {int(self.capped.sum())}/{n})"
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
    path_points: tuple[float, ...]
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
    rtol, atol, window = rule
    if int(verified.sum()) < k or rtol == float("inf"):
        return False
    score = est.abs() + width
    kth = exact.abs()[verified].topk(k).values[-1]
    largest = score[~verified].max()
    comparable = verified & (score <= window * largest)
    outside = (exact - est).abs() - width  # how far an exact effect fell outside its interval
    seen = outside[comparable].max() if comparable.any() else largest.new_zeros(())
    return bool(kth > largest + torch.maximum(rtol * largest + atol, seen))


def _top_k(exact: Float[Tensor, "unit cell"], k: int) -> Int[Tensor, "unit k"]:
    """Indices of the ``k`` largest ``|exact|`` per unit (NaN: not verified), largest first,
    ties in index order; -1 where a unit has fewer than ``k``."""
    ranked = exact.abs().nan_to_num(-1.0)
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :k]
    top = order.where(torch.gather(ranked, 1, order) >= 0, torch.tensor(-1))
    if top.shape[1] < k:
        top = torch.cat([top, torch.full((len(exact), k - top.shape[1]), -1)], 1)
    return top


def _next_cells(score: Tensor, verified: Tensor, valid: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` unverified valid cells with the largest score ``U = |estimate| + w``."""
    free = (valid & ~verified).nonzero()[:, 0]
    order = torch.argsort(score[free], descending=True, stable=True)
    return free[order[:n]]


def patch_top_cells(
    model: HookedReranker,
    pairs: AlignedPairs,
    target: PatchTarget,
    k: int = 10,
    *,
    average: bool = False,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    window: float = DEFAULT_WINDOW,
    spread: float = DEFAULT_SPREAD,
    path_points: tuple[float, ...] = DEFAULT_PATH_POINTS,
    step: int | None = None,
    max_cells: int | None = None,
    min_delta: float = DEFAULT_MIN_DELTA,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    attribution_batch_size: int = 16,
    gradient: Literal["corrupted", "mean"] = "corrupted",
    progress: bool | None = None,
) -> TopCells:
    """The top-``k`` cells of ``target`` per pair (or averaged over pairs) by exact patching of
    the cells attribution patching does not rule out (algorithm, stopping rule and its failure
    modes: module docstring). ``certified`` units had every cell patched exactly; a unit
    ``stopped_by_estimate`` trusts the attribution intervals of the cells it left, which are
    not bounds (measured miss rates: ``benchmarks/README.md``).

    Args:
        k: cells wanted per unit.
        average: rank cells by the mean normalized metric ``(s_patch - s_corr) / (s_clean -
            s_corr)`` over the pairs with ``|s_clean - s_corr| >= min_delta`` (one unit), instead
            of the score change ``s_patch - s_corr`` of each pair (one unit per pair).
        rtol, atol, window: the safety margin of the stopping rule: relative to the largest
            unverified score ``M``; absolute, in the units of the measure; and at least the
            largest amount by which an exact effect fell outside its interval on verified cells
            whose score is at most ``window * M``. ``rtol=float("inf")``: never stop by
            estimate (every cell verified, every unit certified).
        spread: the half-width of each estimate's interval, ``w = spread * max_j |ê - ê^j|``
            over the other gradient rules ``j`` (module docstring); 0: point estimates (no path
            points and, with ``gradient="corrupted"``, no backward pass on the clean inputs).
        path_points: the points ``alpha`` in (0, 1) of the input path whose gradients widen
            the intervals (one forward and backward pass per pair each; ``()``: only the
            corrupted- and mean-gradient rules, the behaviour of earlier versions).
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
    path_points = tuple(path_points) if spread > 0 else ()
    est_pair = torch.full((n, len(cells)), float("nan"), dtype=torch.float64)
    width_pair = torch.zeros_like(est_pair)
    clean, corrupted = torch.empty(n), torch.empty(n)
    limit = max_cells or len(cells)
    show = int(valid.sum()) >= 2000 if progress is None else progress

    run = _Run(
        model, pairs, target, rules, gradient, spread, path_points, attribution_batch_size,
        est_pair, width_pair, cells, flat, valid, clean, corrupted, k, step, limit, rule,
        rows_budget, show, min_delta,
    )  # fmt: skip
    verify = _averaged if average else _per_pair
    est, w, exact, verified, unit_valid, done, units, n_rows = verify(run)
    return _result(
        target, dims, coords, shape, k, units, "metric" if average else "effect", flat,
        est, w, exact, verified, unit_valid, done, clean, corrupted, n_rows,
        int(valid.sum()),
    )  # fmt: skip


@dataclass
class SimulatedTopCells:
    """What :func:`patch_top_cells` would do on given exact effects (:func:`simulate_top_cells`).

    Attributes:
        verified: ``[unit, cell]`` the cells it would patch exactly.
        top: ``[unit, k]`` its answer: the k largest ``|effect|`` among them (-1: fewer cells).
        certified, stopped_by_estimate: ``[unit]`` as in :class:`TopCells`.
        missed: ``[unit]`` its top k differs from the top k of all cells: the k largest
            ``|effect|`` of each, sorted, differ by more than ``tie_tol`` (so a different set
            of exactly tied cells is not a miss); never true where certified.
    """

    verified: Bool[Tensor, "unit cell"]
    top: Int[Tensor, "unit k"]
    certified: Bool[Tensor, " unit"]
    stopped_by_estimate: Bool[Tensor, " unit"]
    missed: Bool[Tensor, " unit"]

    @property
    def n_verified(self) -> Int[Tensor, " unit"]:
        """``[unit]`` cells patched exactly (a full sweep patches every valid cell)."""
        return self.verified.sum(1)


def simulate_top_cells(
    effects: Float[Tensor, "unit cell"],
    estimate: Float[Tensor, "unit cell"],
    uncertainty: Float[Tensor, "unit cell"],
    k: int,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    window: float = DEFAULT_WINDOW,
    step: int | None = None,
    max_cells: int | None = None,
    tie_tol: float = 1e-6,
) -> SimulatedTopCells:
    """Replay :func:`patch_top_cells`'s search on known exact effects (a full sweep's), without
    running the model: the reference of its verification loop, and a way to measure the miss
    rate of a setting (how often a stop by estimate returns a top k the sweep does not).

    Args:
        effects: ``[unit, cell]`` every cell's exact effect (NaN: no such cell), e.g. a sweep's
            ``patched - corrupted`` flattened per pair.
        estimate, uncertainty: ``[unit, cell]`` the interval centres ``ê`` and half-widths ``w``
            (:attr:`TopCells.estimate`, :attr:`TopCells.uncertainty` flattened; the half-width
            is ``spread`` times the gap of the two gradient rules' estimates).
        k, rtol, atol, window, step, max_cells: as in :func:`patch_top_cells`.
        tie_tol: effects closer than this count as tied when deciding a miss.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if effects.shape != estimate.shape or effects.shape != uncertainty.shape:
        raise ValueError(
            f"effects {tuple(effects.shape)}, estimate {tuple(estimate.shape)} and uncertainty "
            f"{tuple(uncertainty.shape)} must have the same [unit, cell] shape"
        )
    step = step or -(-k // 5)
    effects, estimate, uncertainty = (x.double() for x in (effects, estimate, uncertainty))
    valid = ~effects.isnan()
    score = estimate.abs() + uncertainty
    verified = torch.zeros_like(valid)
    ended = torch.zeros(len(effects), dtype=torch.bool)
    limit = max_cells or effects.shape[1]
    for u in range(len(effects)):
        v, want = valid[u], k
        while True:
            room = limit - int(verified[u].sum())
            verified[u, _next_cells(score[u], verified[u], v, min(want, room))] = True
            seen = effects[u].where(verified[u], float("nan"))
            rule = (rtol, atol, window)
            done = _stop(estimate[u, v], uncertainty[u, v], seen[v], verified[u, v], k, rule)
            if done or int(verified[u].sum()) >= limit:
                ended[u] = done
                break
            want = step
    top = _top_k(effects.where(verified, float("nan")), k)
    certified = (verified | ~valid).all(1)
    want_top = effects.abs().nan_to_num(-1.0).sort(dim=1, descending=True).values[:, :k]
    got_top = effects.abs().where(verified, -1.0).sort(dim=1, descending=True).values[:, :k]
    missed = ((want_top - got_top).abs() > tie_tol).any(1) & ~certified
    return SimulatedTopCells(verified, top, certified, ended & ~certified, missed)


def _estimate(s: _Run, start: int, stop: int, keep: tuple[str, ...] = ()) -> GroupEstimates:
    """Attribution patching of pairs ``start:stop``: fills their estimates, interval half-widths
    and scores into ``s``; the runs' activations named in ``keep`` come back with the rest."""
    width = s.pairs.clean.input_ids.shape[1]
    group = group_estimates(
        s.model, s.pairs[start:stop], s.target, s.rules, keep=keep, width=width,
        path_points=s.path_points,
    )  # fmt: skip
    others = [r for r in (*s.rules, *map(path_rule, s.path_points)) if r != s.gradient]
    for i, p in enumerate(range(start, stop)):
        cs = s.valid[p].nonzero()[:, 0]

        def at(effects: Tensor, i: int = i, cs: Tensor = cs) -> Tensor:
            return effects[i].reshape(-1)[s.flat[cs]]

        centre = at(group.effects[s.gradient])
        s.est_pair[p, cs] = centre
        if s.spread > 0:  # the farthest other rule
            gaps = torch.stack([(centre - at(group.effects[r])).abs() for r in others])
            s.width_pair[p, cs] = s.spread * gaps.max(0).values
    s.clean[start:stop] = group.clean_scores.float()
    s.corrupted[start:stop] = group.corrupted_scores.float()
    return group


def _per_pair(s: _Run) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[str], int]:
    """Estimate and verify group by group (the attribution runs are the exact rows' caches), in
    rounds over the pairs of each group."""
    n = len(s.pairs)
    est, width, exact = s.est_pair, s.width_pair, torch.full_like(s.est_pair, float("nan"))
    verified = torch.zeros_like(s.valid)
    ended = torch.zeros(n, dtype=torch.bool)
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
            score = est.abs() + width
            active = list(range(len(group.index)))
            want = s.k
            while active:
                p_rows, c_rows = [], []
                for i in active:
                    p = int(group.index[i])
                    room = s.limit - int(verified[p].sum())
                    new = _next_cells(score[p], verified[p], s.valid[p], min(want, room))
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
                        ended[p] = done
                        bar.update(1)
                    else:
                        still.append(i)
                active, want = still, s.step
    return est, width, exact, verified, s.valid, ended, list(s.pairs.pair_ids), n_rows


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
    score = est.abs() + width
    exact = torch.full_like(est, float("nan"))
    verified = torch.zeros_like(unit_valid)
    ended = torch.zeros(1, dtype=torch.bool)
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
            new = _next_cells(score[0], verified[0], unit_valid[0], min(want, room))
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
                ended[0] = done
                break
            want = s.step
    return est, width, exact, verified, unit_valid, ended, ["mean"], n_rows


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
    done: Tensor,
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
    top = _top_k(g_exact, k)
    certified = (verified | ~unit_valid.expand_as(verified)).all(1)
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
        stopped_by_estimate=done & ~certified,
        attribution_error=torch.nan_to_num(error, nan=-1.0).max(1).values.clamp(min=0).float(),
        clean=clean,
        corrupted=corrupted,
        n_rows=n_rows,
        n_cells_total=n_total,
    )


__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_SPREAD",
    "DEFAULT_WINDOW",
    "SimulatedTopCells",
    "TopCells",
    "patch_top_cells",
    "simulate_top_cells",
]
