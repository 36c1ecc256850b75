"""Edge attribution: the effect of patching each edge alone, estimated for every edge at once.

Stage 4 of :mod:`patching.edges`: it takes the graph, the checked sources and the engine's
passes (plain forwards with gradients, tracked walks), and returns :class:`EdgeScores`, which
circuits and drawings take.

For an edge ``(s, r)`` the exact effect is ``m(r reads c_s(source)) - m(clean)``: the change of
the metric ``m`` when only that edge is patched (:mod:`patching.edges.engine`). Sign convention:
**positive means patching the edge raises the metric**; with a corrupted source that lowers the
score, the edges that carry relevance have negative effects, and circuits rank edges by
``|effect|``.

* ``method="eap"`` (edge attribution patching, Syed et al. 2023): the first-order estimate at
  the clean run, ``(c_s(source) - c_s(clean))|_r . d m / d x_r``; one gradient pass of the clean
  inputs and one tracked forward of the clean and source inputs, for every edge. Exact when the
  metric is affine in the receiver's input (a test checks it on a model whose score head is
  linear).
* ``method="eap_ig"`` (EAP with integrated gradients on the inputs, Hanna et al. 2024): the same
  difference times the gradient averaged along the straight path from the clean embedding output
  to the source's (``hook_full_embed``; for ``"mean"``/``"part"``/``"zero"`` sources, their
  per-part mean embeddings or zero), with an integration rule of
  :mod:`mechir.attribution.integration`. The default ``riemann_left`` with ``n_steps=m`` uses
  ``alpha = 0, 1/m, ..., (m-1)/m`` from the clean end, which is Hanna et al.'s
  ``k/m, k = 1..m`` from the corrupted end. ``n_steps="auto"`` refines nested midpoint rules
  (grids ``8, 16, 32, ...``) until ``max |A(m) - A(m/2)| <= rtol * max |A(m)|`` per pair, as
  neuron integrated gradients do (:mod:`mechir.attribution.conductance`).
* ``method="exact"``: every edge patched alone (:func:`single_edge_scores`). With one patched
  edge, everything before its receiver is the clean run, so its receiver reads the clean input
  plus one fixed difference ``c_s(source) - c_s(clean)`` (both known from one tracked walk of the
  clean and source rows), and the rest is a plain forward from the receiver's block. Rows join
  at their receiver's block; score-receiver rows only run the score head. Checked against
  :func:`patching.edges.patch_edges` one edge at a time and against
  :func:`patching.edges.reference.patch_edges_reference`.

**Error estimates.** EAP-IG reports, per unit, ``error``: the estimated numerical error of the
path integral (fixed rules: ``c * max_e |A_e(m) - A_e(m/2)|``, with the half-step rule on nested
points and the factor ``c`` of :func:`mechir.attribution.result.error_factor`; ``"auto"``:
``max_e |A_e(m) - A_e(m/2)|``), and ``embedding_completeness``: ``m(source embedding) -
m(clean) - IG(embedding)``, how far the same path integral over the embedding output is from the
score change it should add up to. Neither bounds the *linearisation* error (how far EAP-IG is
from exact patching): only exact patching measures that (:mod:`patching.edges.circuits`
verifies circuits exactly).

**Cost and memory.** Gradients are taken at the q/k/v projections, the MLP inputs and the score
input of a plain forward (never per receiver), and summed per pair and rule level: post-LN
``(4 n_layers + 2)`` values of ``d_model`` per position and pair, pre-LN ``(3 n_heads + 1)
n_layers + 2`` (their ``ln1`` Jacobian changes along the path). A tracked forward of the clean and
source rows then contracts them with the contribution differences, layer by layer, so the
``[sender, pos, d_model]`` contributions of one layer are the largest tensor held.

Pairs are sharded across ranks when a process group is initialised (as neuron attributions
are: :mod:`mechir.distributed`) and the result is gathered in pair order on every rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechir import distributed
from mechir.attribution.common import (
    AUTO_MIN_GRID,
    AUTO_START,
    DEFAULT_MAX_STEPS,
    companion_rule,
    rows_for_memory,
)
from mechir.attribution.integration import integration_rule
from mechir.attribution.result import AUTO_SAFETY, error_factor
from mechir.display import fields_repr
from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch
from mechir.running import refuse_active_hooks
from patching.edges.engine import (
    Kept,
    PointHandler,
    Slots,
    expand_qkv_grads,
    input_grads,
    is_pre_ln,
    kept_tensors,
    patch_edge_sets,
    plain_forward,
    plain_layer,
    plain_score,
    prepare_inputs,
    tracked_rows,
    tracked_walk,
)
from patching.edges.graph import PART_NAMES, EdgeGraph, check_graph, receivers_at
from patching.edges.sources import (
    Align,
    CorruptedLike,
    EdgeInputs,
    Lockstep,
    MetricLike,
    edge_inputs,
    metric_matrix,
    part_onehot,
    take_rows,
)
from patching.perturbations import AlignedPairs
from patching.sweep import DEFAULT_MEMORY_BUDGET, check_batch_size, rows_per_chunk

Method = Literal["eap", "eap_ig", "exact"]
METHODS: tuple[str, ...] = ("eap", "eap_ig", "exact")


# ---------------------------------------------------------------------- result
@dataclass(repr=False)
class EdgeScores:
    """Per-edge effects of one attribution call.

    Attributes:
        graph: the edge graph (edge order of every ``[..., edge]`` tensor).
        method: ``"eap"``, ``"eap_ig"`` or ``"exact"``.
        scores: ``[unit, edge]`` estimated (exact for ``"exact"``) metric change when the edge
            alone is patched, ``m(patched) - m(clean)`` (sign convention: module doc).
        pair_scores: ``[pair, edge]`` the same for each pair's score.
        clean: ``[unit]`` the metric of the clean inputs.
        corrupted: ``[unit]`` the metric with every edge patched (the corrupted run itself for
            a token-aligned source).
        units, pair_ids: unit and pair labels.
        error: ``[unit]`` estimated numerical error of the path integral (max over edges);
            None for ``"eap"`` and ``"exact"``.
        embedding_completeness: ``[pair]`` ``m(source embedding) - m(clean) - IG(embedding)``
            (``"eap_ig"``; a check of the path integral, see the module doc).
        n_steps: the rule's steps (``"auto"``: the most any pair reached); n_points ``[pair]``:
            gradient passes per pair.
    """

    graph: EdgeGraph
    method: str
    scores: Float[Tensor, "unit edge"]
    pair_scores: Float[Tensor, "pair edge"]
    clean: Float[Tensor, " unit"]
    corrupted: Float[Tensor, " unit"]
    units: list[str]
    pair_ids: list[str]
    source: str
    error: Float[Tensor, " unit"] | None = None
    embedding_completeness: Float[Tensor, " pair"] | None = None
    n_steps: int = 1
    n_points: Int[Tensor, " pair"] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return self.graph.n_edges

    def mean(self) -> Float[Tensor, " edge"]:
        """Per edge, the mean effect over units."""
        return self.scores.mean(0)

    def ranking(self, *, absolute: bool = True) -> Int[Tensor, " edge"]:
        """Edges from the most to the least important by their mean effect (``absolute``: by
        ``|effect|``; else most negative first, the edges whose patching lowers the metric)."""
        key = self.mean().abs() if absolute else -self.mean()
        return torch.argsort(key, descending=True, stable=True)

    def top(self, n: int | float, *, absolute: bool = True) -> Int[Tensor, " n"]:
        """The edge indices of the ``n`` most important edges (a float in (0, 1]: that fraction
        of the edges), as circuits take them; their names: :meth:`top_edges`, or
        ``graph.edge_labels(top(n))``."""
        return self.ranking(absolute=absolute)[: n_edges_of(n, self.n_edges)]

    def top_edges(self, n: int | float, *, absolute: bool = True) -> pd.DataFrame:
        """The ``n`` most important edges by name, most important first: one row per edge with
        its ``edge`` index, ``label`` (``"2/9->3/9.v"``, as :func:`patch_edges` takes it) and
        mean ``effect`` over the units."""
        top = self.top(n, absolute=absolute)
        return pd.DataFrame(
            {
                "edge": top.numpy(),
                "label": self.graph.edge_labels(top.tolist()),
                "effect": self.mean()[top].numpy(),
            }
        )

    def relative_error(self) -> Float[Tensor, " unit"]:
        """``error / max_e |score|`` per unit."""
        if self.error is None:
            raise ValueError(f"method={self.method!r} has no error estimate (only 'eap_ig')")
        return self.error / self.scores.abs().max(1).values.clamp_min(1e-30)

    def to_frame(self, *, mean: bool = False) -> pd.DataFrame:
        """Long form: one row per (unit, edge) -- or per edge with ``mean=True`` -- with the
        sender, receiver, receiver kind, layer and part of the edge and its effect."""
        g = self.graph
        base = pd.DataFrame(
            {
                "edge": np.arange(g.n_edges),
                "sender": [g.senders[int(s)].label for s in g.edge_sender],
                "receiver": [g.receivers[int(r)].label for r in g.edge_receiver],
                "kind": [g.receivers[int(r)].kind for r in g.edge_receiver],
                "receiver_layer": [g.receivers[int(r)].layer for r in g.edge_receiver],
                "part": [PART_NAMES[int(k)] if g.parts else "all" for k in g.edge_part],
            }
        )
        if mean:
            return base.assign(effect=self.mean().numpy())
        frames = [
            base.assign(unit=u, effect=self.scores[i].numpy()) for i, u in enumerate(self.units)
        ]
        return pd.concat(frames, ignore_index=True)


EdgeScores.__repr__ = fields_repr  # type: ignore[method-assign]


def n_edges_of(n: int | float, total: int) -> int:
    """An edge budget as a count: an int as is, a float in (0, 1] as a fraction of ``total``
    (rounded, at least 1)."""
    if isinstance(n, bool):
        raise ValueError(f"edge budget must be an int or a fraction, got {n!r}")
    if isinstance(n, float):
        if not 0 < n <= 1:
            raise ValueError(f"a fractional edge budget must be in (0, 1], got {n}")
        return max(1, int(round(n * total)))
    if isinstance(n, int) and 0 <= n <= total:
        return n
    raise ValueError(f"edge budget {n!r} out of range: the graph has {total} edges")


# ---------------------------------------------------------------------- gradient sums
class _GradSums:
    """Per pair of a group, weighted sums of receiver-input gradients for one rule level."""

    def __init__(self, g: int):
        self.g = g
        self.qkv: list[Tensor] | None = None
        self.mlp: list[Tensor] | None = None
        self.score: Tensor | None = None
        self.emb: Tensor | None = None

    def add(self, who: Tensor, weight: Tensor, qkv: list, mlp: list, score: Tensor, emb: Tensor):
        def acc(old: Tensor | None, new: Tensor) -> Tensor:
            w = weight.to(new).view(-1, *([1] * (new.dim() - 1)))
            out = old if old is not None else new.new_zeros(self.g, *new.shape[1:])
            return out.index_add_(0, who, (new * w).detach())

        self.qkv = [acc(None if self.qkv is None else self.qkv[i], q) for i, q in enumerate(qkv)]
        self.mlp = [acc(None if self.mlp is None else self.mlp[i], m) for i, m in enumerate(mlp)]
        self.score = acc(self.score, score)
        self.emb = acc(self.emb, emb)


def _gradient_rows(
    model: HookedReranker,
    lock: Lockstep,
    rows: list[tuple[int, float]],
    max_rows: int,
    take: Any,
) -> None:
    """Forward + backward of (pair, alpha) rows, ``max_rows`` at a time; hands each chunk's pair
    indices, alphas and receiver-input gradients to ``take``."""
    n = lock.n
    x_clean, x_source = lock.x0[:n], lock.source_x0()
    compact = not is_pre_ln(model)
    device = x_clean.device
    for lo in range(0, len(rows), max_rows):
        chunk = rows[lo : lo + max_rows]
        who = torch.tensor([i for i, _ in chunk], device=device)
        alpha = torch.tensor([a for _, a in chunk], dtype=x_clean.dtype, device=device)
        x0 = x_clean[who] + alpha[:, None, None] * (x_source[who] - x_clean[who])
        x0 = x0.detach().requires_grad_(True)
        with torch.enable_grad():
            kept = Kept()
            scores = plain_forward(model, x0, take_rows(lock.rows, who), kept=kept)
            grads = torch.autograd.grad(scores.sum(), [*kept_tensors(kept), x0])
        qkv, mlp, score = input_grads(model, kept, list(grads[:-1]), compact=compact)
        take(who, alpha, qkv, mlp, score, grads[-1])


class _Contract(PointHandler):
    """A tracked walk of a group's clean and source rows that contracts the contribution
    differences with every level's gradient sums: per level a ``[pair, receiver, sender, part]``
    tensor of effects."""

    def __init__(
        self, model: HookedReranker, graph: EdgeGraph, lock: Lockstep, sums: list[_GradSums]
    ):
        self.model, self.graph, self.lock, self.sums = model, graph, lock, sums
        self.compact = not is_pre_ln(model)
        shape = (lock.n, len(graph.receivers), len(graph.senders), graph.n_parts)
        device = lock.x0.device
        self.dense = [torch.zeros(shape, device=device) for _ in sums]

    def _put(self, point: tuple[str, int], c: Tensor, grads: list[Tensor]) -> None:
        recv = receivers_at(self.graph, point)
        s = c.shape[1]
        for dense, g in zip(self.dense, grads):
            dense[:, recv, :s] = self.lock.dot_grads(point, c, g, self.graph.n_parts)

    def pre(self, layer: int, contributions: Tensor) -> None:
        grads = []
        for sums in self.sums:
            g = sums.qkv[layer]
            if self.compact:
                g = expand_qkv_grads(self.model, layer, g)
            grads.append(g.flatten(2, 3))
        self._put(("pre", layer), contributions, grads)

    def mid(self, layer: int, contributions: Tensor) -> None:
        self._put(("mid", layer), contributions, [s.mlp[layer][:, :, None] for s in self.sums])

    def final(self, contributions: Tensor) -> None:
        point = ("final", self.graph.n_layers)
        self._put(point, contributions, [s.score[:, :, None] for s in self.sums])


def _contract(
    model: HookedReranker, graph: EdgeGraph, lock: Lockstep, sums: list[_GradSums]
) -> list[Float[Tensor, "pair edge"]]:
    handler = _Contract(model, graph, lock, sums)
    with torch.no_grad():
        tracked_walk(model, lock.x0, lock.rows, handler)
    return [graph.flat(d).float().cpu() for d in handler.dense]


def _emb_ig(lock: Lockstep, sums: _GradSums) -> Float[Tensor, " pair"]:
    n = lock.n
    diff = lock.source_x0() - lock.x0[:n]
    return (diff * sums.emb).sum((1, 2)).float().cpu()


# ---------------------------------------------------------------------- per group
@dataclass
class _GroupResult:
    scores: Tensor  # [g, edge]
    error: Tensor  # [g]
    emb_ig: Tensor  # [g]
    n_points: Tensor  # [g]


def _fixed_rule(
    model: HookedReranker,
    graph: EdgeGraph,
    lock: Lockstep,
    alphas: list[float],
    weights: list[list[float]],
    max_rows: int,
    factor: float,
) -> _GroupResult:
    """One or two nested rules (the second the coarse one of the error estimate)."""
    g = lock.n
    sums = [_GradSums(g) for _ in weights]
    index = {a: i for i, a in enumerate(alphas)}

    def take(who, alpha, qkv, mlp, score, emb):
        for r, w in enumerate(weights):
            wt = torch.tensor([w[index[float(a)]] for a in alpha.tolist()])
            if bool((wt != 0).any()):
                sums[r].add(who, wt, qkv, mlp, score, emb)

    rows = [(i, a) for i in range(g) for a in alphas]
    _gradient_rows(model, lock, rows, max_rows, take)
    values = _contract(model, graph, lock, sums)
    error = (
        factor * (values[0] - values[1]).abs().max(1).values
        if len(values) > 1
        else torch.full((g,), float("nan"))
    )
    return _GroupResult(values[0], error, _emb_ig(lock, sums[0]), torch.full((g,), len(alphas)))


def _level(alpha: float) -> int:
    """The midpoint level ``m`` whose node ``alpha = odd / (2 m)`` is."""
    return Fraction(alpha).limit_denominator(1 << 20).denominator // 2


def _auto(
    model: HookedReranker,
    graph: EdgeGraph,
    lock: Lockstep,
    max_rows: int,
    rtol: float,
    max_steps: int,
) -> tuple[_GroupResult, Tensor]:
    """Nested midpoint rules on dyadic grids until the estimate is below ``rtol`` (module doc)."""
    g = lock.n
    levels: dict[int, _GradSums] = {}
    out = _GroupResult(
        torch.zeros(g, graph.n_edges),
        torch.zeros(g),
        torch.zeros(g),
        torch.zeros(g, dtype=torch.long),
    )
    relative = torch.zeros(g)

    def take(who, alpha, qkv, mlp, score, emb):
        for m in {_level(float(a)) for a in alpha.tolist()}:
            sel = torch.tensor([_level(float(a)) == m for a in alpha.tolist()])
            idx = sel.nonzero()[:, 0].to(who.device)
            weight = torch.full((len(idx),), 1.0 / m)
            levels.setdefault(m, _GradSums(g)).add(
                who[idx], weight, [q[idx] for q in qkv], [x[idx] for x in mlp], score[idx],
                emb[idx],
            )  # fmt: skip

    active, grid = list(range(g)), 1
    while active:
        new = AUTO_START if grid == 1 else 2 * grid
        alphas = [j / new for j in range(1, new) if grid == 1 or j % 2 == 1]
        _gradient_rows(model, lock, [(i, a) for i in active for a in alphas], max_rows, take)
        grid = new
        if grid < AUTO_MIN_GRID:
            continue
        m = grid // 2
        fine, coarse = _contract(model, graph, lock, [levels[m], levels[m // 2]])
        emb = _emb_ig(lock, levels[m])
        still = []
        for i in active:
            err = float((fine[i] - coarse[i]).abs().max()) / AUTO_SAFETY
            rel = err / max(float(fine[i].abs().max()), 1e-30)
            out.scores[i], out.error[i], out.emb_ig[i] = fine[i], err, emb[i]
            out.n_points[i], relative[i] = grid - 1, rel
            if rel > rtol and grid < max_steps:
                still.append(i)
        active = still
        for old in [k for k in levels if k < m]:
            del levels[old]
    return out, relative


# ---------------------------------------------------------------------- public entry
def edge_attribution(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs,
    corrupted: CorruptedLike = None,
    *,
    method: Method = "eap_ig",
    graph: EdgeGraph | None = None,
    parts: bool = False,
    metric: MetricLike = "score",
    align: Align = "token",
    integration: str = "riemann_left",
    n_steps: int | Literal["auto"] = 8,
    rtol: float = 0.01,
    max_steps: int = DEFAULT_MAX_STEPS,
    error_estimate: bool = True,
    max_batch: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> EdgeScores:
    """The effect of patching each edge alone, for every edge (module doc).

    Args:
        clean, corrupted: :class:`AlignedPairs` (corrupted taken from them unless given), a
            clean batch with a corrupted batch aligned token for token (or by part, with
            ``align="part"``), or ``corrupted="mean"`` / ``"zero"``. Anything else is an error.
        method: ``"eap"``, ``"eap_ig"`` (default) or ``"exact"``.
        graph: the edge graph (default ``edge_graph(model, parts=parts)``).
        metric: ``"score"``, ``"margin"`` or a ``[unit, pair]`` matrix
            (:func:`~patching.edges.sources.metric_matrix`).
        integration, n_steps: EAP-IG's rule (:func:`mechir.attribution.integration_rule`), or
            ``n_steps="auto"`` (nested midpoint rules until ``rtol``, at most ``max_steps``).
        error_estimate: fixed rules: also evaluate the half-step rule for ``error``.
        max_batch: rows (pair x path point) per gradient pass; default from ``memory_budget``.

    Returns:
        :class:`EdgeScores`.
    """
    refuse_active_hooks(model, "edge_attribution")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    graph = check_graph(model, graph, parts=parts)
    inputs = edge_inputs(model, clean, corrupted, align=align)
    width = inputs.clean.input_ids.shape[1]
    if inputs.corrupted is not None:
        width = max(width, inputs.corrupted.input_ids.shape[1])
    walk_rows = tracked_rows(model, width, memory_budget)
    inputs = prepare_inputs(model, inputs, None, align, walk_rows)
    a, units = metric_matrix(metric, inputs.pair_ids, inputs.grades)
    rule_info = _check_rule(method, integration, n_steps, rtol, max_steps)
    if max_batch is not None and (isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    grad_rows = max_batch or rows_for_memory(model, width, int(memory_budget))
    n = len(inputs)
    local = distributed.shard_indices(n) if distributed.sharding() else list(range(n))
    with distributed.local():
        part = _attribute(
            model, graph, inputs, local, method, rule_info, error_estimate, grad_rows, walk_rows,
            memory_budget, progress, rtol, max_steps,
        )  # fmt: skip
    if distributed.sharding():
        part = {k: distributed.gather_in_order(v, n) for k, v in part.items()}
    pair_scores, clean_s, source_s = part["pair_scores"], part["clean"], part["source"]
    a32 = a.float()
    error = None
    if method == "eap_ig":
        if not bool(part["error"].isnan().all()):  # n_steps=1 or no estimate asked: none
            # per unit: the pairs' estimates combined with |weights| (a sum of bounds)
            error = (a32.abs() @ part["error"].nan_to_num(nan=0.0)[:, None])[:, 0]
        relative = part["relative"]
        if n_steps == "auto" and bool((relative > rtol).any()):
            bad = (relative > rtol).nonzero()[:, 0].tolist()
            warnings.warn(
                f"n_steps='auto' stopped at max_steps={max_steps} for pairs {bad[:10]} with "
                f"estimated relative error {float(relative.max()):.3g} > rtol={rtol}; raise "
                "max_steps",
                stacklevel=2,
            )
    completeness = None
    if method == "eap_ig":
        completeness = part["source_embedding"] - clean_s - part["emb_ig"]
    return EdgeScores(
        graph=graph,
        method=method,
        scores=(a32 @ pair_scores),
        pair_scores=pair_scores,
        clean=(a32 @ clean_s),
        corrupted=(a32 @ source_s),
        units=units,
        pair_ids=list(inputs.pair_ids),
        source=inputs.kind,
        error=error,
        embedding_completeness=completeness,
        n_steps=int(part["n_points"].max())
        if method == "eap_ig" and n_steps == "auto"
        else (rule_info[1] if method == "eap_ig" else 1),
        n_points=part["n_points"].long(),
        meta={"integration": rule_info[0] if method == "eap_ig" else None, "rtol": rtol},
    )


def _check_rule(
    method: str, integration: str, n_steps: Any, rtol: float, max_steps: int
) -> tuple[str, int]:
    if method != "eap_ig":
        return ("none", 1)
    if n_steps == "auto":
        if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
            raise ValueError(f"rtol must be in (0, 1), e.g. 0.01 for 1%, got {rtol!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 16:
            raise ValueError(f"max_steps must be an int >= 16, got {max_steps!r}")
        return ("auto", 0)
    rule = integration_rule(integration, n_steps)  # raises on a bad method or n_steps
    return (rule.method, rule.n_steps)


def _attribute(
    model: HookedReranker,
    graph: EdgeGraph,
    inputs: EdgeInputs,
    local: list[int],
    method: str,
    rule_info: tuple[str, int],
    error_estimate: bool,
    grad_rows: int,
    walk_rows: int,
    memory_budget: float,
    progress: bool,
    rtol: float,
    max_steps: int,
) -> dict[str, Tensor]:
    """This rank's pairs: per-pair effects and checks (see :func:`edge_attribution`)."""
    k = len(local)
    out = {
        "pair_scores": torch.zeros(k, graph.n_edges),
        "error": torch.full((k,), float("nan")),
        "relative": torch.zeros(k),
        "emb_ig": torch.zeros(k),
        "n_points": torch.zeros(k),
        "clean": torch.zeros(k),
        "source": torch.zeros(k),
        "source_embedding": torch.zeros(k),
    }
    if not k:
        return out
    idx = torch.tensor(local)
    sub = EdgeInputs(
        take_rows(inputs.clean, idx),
        None if inputs.corrupted is None else take_rows(inputs.corrupted, idx),
        inputs.kind,
        [inputs.pair_ids[i] for i in local],
        [inputs.grades[i] for i in local],
        inputs.means,
    )
    with torch.no_grad():
        out["clean"] = model.score(sub.clean).float()
        if sub.kind == "token":  # every edge patched = the corrupted run (engine module doc)
            out["source"] = model.score(sub.corrupted).float()
        else:
            out["source"] = patch_edge_sets(
                model, sub, sets=["all"], graph=graph, batch_size=walk_rows
            )[:, 0]
    if method == "exact":
        patched = single_edge_scores(
            model, sub, graph=graph, memory_budget=memory_budget, progress=progress
        )
        out["pair_scores"] = patched - out["clean"][:, None]
        out["error"] = torch.zeros(k)
        return out
    name, steps = rule_info
    factor = error_factor(name)
    if method == "eap":
        alphas, weights = [0.0], [[1.0]]
    elif name != "auto":
        rule = integration_rule(name, steps)
        alphas_fine = rule.alphas.tolist()
        weights_fine = rule.weights.tolist()
        rules = [(alphas_fine, weights_fine)]
        if error_estimate and steps > 1:
            coarse = companion_rule(rule)
            rules.append((coarse.alphas.tolist(), coarse.weights.tolist()))
        alphas = sorted({a for al, _ in rules for a in al})
        weights = [[dict(zip(al, w)).get(a, 0.0) for a in alphas] for al, w in rules]
    per_group = max(1, grad_rows // (AUTO_START - 1 if name == "auto" else len(alphas)))
    per_group = min(per_group, max(1, walk_rows // 2))
    bar = distributed.progress_bar(k, desc=f"edge attribution ({method})", unit="pair",
                                   disable=not progress)  # fmt: skip
    for lo in range(0, k, per_group):
        pairs = torch.arange(lo, min(lo + per_group, k))
        lock = Lockstep(model, sub, pairs, torch.arange(len(pairs)))
        if method == "eap_ig" and name == "auto":
            res, relative = _auto(model, graph, lock, grad_rows, rtol, max_steps)
            out["relative"][pairs] = relative
        else:
            res = _fixed_rule(model, graph, lock, alphas, weights, grad_rows, factor)
        out["pair_scores"][pairs] = res.scores
        out["error"][pairs] = res.error
        out["emb_ig"][pairs] = res.emb_ig
        out["n_points"][pairs] = res.n_points.float()
        if method == "eap_ig":
            with torch.no_grad():
                x_source = lock.source_x0()
                out["source_embedding"][pairs] = (
                    plain_forward(model, x_source, take_rows(lock.rows, torch.arange(lock.n)))
                    .float()
                    .cpu()
                )
        bar.update(len(pairs))
    bar.close()
    return out


# ---------------------------------------------------------------------- every single edge
class _SingleEdges(PointHandler):
    """Runs, at each receiver point of a tracked walk of the clean and source rows, every single
    edge into that point's receivers as its own row (module doc)."""

    def __init__(
        self,
        model: HookedReranker,
        graph: EdgeGraph,
        lock: Lockstep,
        out: Tensor,
        rows: int,
        bar: Any,
    ):
        self.model, self.graph, self.lock, self.out, self.rows, self.bar = (
            model, graph, lock, out, rows, bar,
        )  # fmt: skip
        self.onehot = part_onehot(lock.current_parts, graph.n_parts)
        self.batch = take_rows(lock.rows, torch.arange(lock.n))
        self.offsets = torch.cat(
            [torch.zeros(1, dtype=torch.long), (graph.reach * graph.n_parts).cumsum(0)]
        )

    def pre(self, layer: int, contributions: Tensor) -> None:
        self.x_pre = contributions[: self.lock.n].sum(1)
        self.d_pre = self.lock.diffs(("pre", layer), contributions)

    def mid(self, layer: int, contributions: Tensor) -> None:
        d_mid = self.lock.diffs(("mid", layer), contributions)
        g, n_heads, k_parts = self.graph, self.graph.n_heads, self.graph.n_parts
        recv = receivers_at(g, ("pre", layer)) + receivers_at(g, ("mid", layer))
        rows = self._rows(recv)
        device = d_mid.device
        mlp_receiver = recv[-1]
        for lo in range(0, len(rows[0]), self.rows):
            i, r, s, k = (t[lo : lo + self.rows].to(device) for t in rows)
            is_mlp = r == mlp_receiver
            source = torch.where(
                is_mlp[:, None, None],
                d_mid[i, s.clamp(max=d_mid.shape[1] - 1)],
                self.d_pre[i, s.clamp(max=self.d_pre.shape[1] - 1)],
            )
            delta = source * self.onehot[i, :, k][..., None] if k_parts > 1 else source
            qkv = (~is_mlp).nonzero()[:, 0]
            j = r[qkv] - recv[0]
            slots = Slots(qkv, j // n_heads, j % n_heads, delta[qkv])
            mlp_delta = (
                torch.where(is_mlp[:, None, None], delta, 0.0) if bool(is_mlp.any()) else None
            )
            x = self.x_pre[i]

            def first(x: Tensor, additive: Tensor, slots=slots, mlp_delta=mlp_delta) -> Tensor:
                return plain_layer(self.model, layer, x, additive, slots=slots, mlp_delta=mlp_delta)

            scores = plain_forward(
                self.model, x, take_rows(self.batch, i), start=layer, first_layer=first
            )
            self._write(i, r, s, k, scores)

    def final(self, contributions: Tensor) -> None:
        g = self.graph
        x = contributions[: self.lock.n].sum(1)
        d = self.lock.diffs(("final", g.n_layers), contributions)
        rows = self._rows(receivers_at(g, ("final", g.n_layers)))
        for lo in range(0, len(rows[0]), self.rows):
            i, r, s, k = (t[lo : lo + self.rows].to(d.device) for t in rows)
            delta = d[i, s] * self.onehot[i, :, k][..., None] if g.n_parts > 1 else d[i, s]
            scores = plain_score(self.model, x[i], take_rows(self.batch, i), delta=delta)
            self._write(i, r, s, k, scores)

    def _rows(self, recv: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(pair, receiver, sender, part) of every single-edge row into ``recv``."""
        g = self.graph
        r_t = torch.tensor(recv)
        per = g.reach[r_t] * g.n_parts
        r = r_t.repeat_interleave(per)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), per.cumsum(0)[:-1]])
        within = torch.arange(int(per.sum())) - starts.repeat_interleave(per)
        s, k = within // g.n_parts, within % g.n_parts
        n = self.lock.n
        i = torch.arange(n).repeat_interleave(len(r))
        return i, r.repeat(n), s.repeat(n), k.repeat(n)

    def _write(self, i: Tensor, r: Tensor, s: Tensor, k: Tensor, scores: Tensor) -> None:
        i, r, s, k = i.cpu(), r.cpu(), s.cpu(), k.cpu()
        edge = self.offsets[r] + s * self.graph.n_parts + k
        self.out[i, edge] = scores.float().cpu()
        if self.bar is not None:
            self.bar.update(len(i))


def single_edge_scores(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    pairs_per_walk: int = 1,
    progress: bool = False,
) -> Float[Tensor, "pair edge"]:
    """Exact score of every pair with each single edge patched (``[pair, edge]``, edge order of
    ``graph``): the naive per-edge loop's values, batched (module doc)."""
    refuse_active_hooks(model, "single_edge_scores")
    graph = check_graph(model, graph)
    check_batch_size(batch_size)
    width = (clean.clean if not isinstance(clean, CrossEncoderBatch) else clean).input_ids.shape[1]
    rows = batch_size or rows_per_chunk(model, width, memory_budget)
    inputs = prepare_inputs(model, clean, corrupted, align, tracked_rows(model, width))
    n = len(inputs)
    out = torch.full((n, graph.n_edges), float("nan"))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * graph.n_edges, desc="single edges", unit="edge")
    with torch.no_grad():
        for lo in range(0, n, pairs_per_walk):
            pairs = torch.arange(lo, min(lo + pairs_per_walk, n))
            lock = Lockstep(model, inputs, pairs, torch.arange(len(pairs)))
            handler = _SingleEdges(model, graph, lock, out[lo : lo + len(pairs)], rows, bar)
            tracked_walk(model, lock.x0, lock.rows, handler)
    if bar is not None:
        bar.close()
    return out


__all__ = [
    "METHODS",
    "EdgeScores",
    "Method",
    "edge_attribution",
    "n_edges_of",
    "single_edge_scores",
]
