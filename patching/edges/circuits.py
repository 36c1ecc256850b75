"""Circuits: edge sets that keep the behaviour, found from edge scores and checked exactly.

Stage 5 of :mod:`patching.edges`: it takes :class:`~patching.edges.attribution.EdgeScores` (or
any ranking) and checks every circuit with the engine's exact patching
(:func:`~patching.edges.engine.patch_edge_sets`).

A **circuit** ``C`` is a set of edges; it is evaluated by patching every edge *outside* it (their
receivers read the source -- corrupted, mean or zero -- contribution), everything else clean,
as MIB does (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark", circuit
localization track). With the metric ``m`` averaged over units
(:func:`~patching.edges.sources.metric_matrix`), ``m(N)`` the clean model (no edge patched) and
``m(empty)`` every edge patched (the corrupted run):

* **faithfulness** ``f(C) = (m(C) - m(empty)) / (m(N) - m(empty))``: 1 when the circuit alone
  recovers the whole behaviour, 0 when it recovers none;
* **CPR** (circuit performance ratio, higher is better): the area under ``f`` over circuit
  sizes, ``sum`` of trapezoids over the edge fractions ``k`` of the budgets and 100% (where
  ``C = N`` and ``f = 1`` exactly);
* **CMD** (circuit-model difference, lower is better, 0 is minimal): the area between ``f`` and
  1, ``int |1 - f(C_k)| dk`` with the same trapezoids.

(MIB's released evaluation computes both with the trapezoid rule over edge fractions from 0.1% to
100%; we use the budgets ``{0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50}%`` and 100% on a linear axis, so
the areas lie in ``[0, 0.999]`` for ``f`` in ``[0, 1]``. MIB also drops edges not connected to
the input or the score before counting; we do not.)

Two searches:

* :func:`faithfulness_curve`: **top-n** circuits of a ranking (EAP, EAP-IG or exact
  single-edge effects) at every budget, each evaluated exactly;
* :func:`greedy_circuit`: a **greedy search verified by exact patching**, as guided patching
  verifies nodes (:func:`patching.patch_top_cells`): EAP-IG ranks the edges; each round takes
  the best-ranked ``window`` edges not in the circuit, patches each one's addition exactly (one
  row per pair and candidate), adds the ``step`` candidates that raise the faithfulness most and
  evaluates the grown circuit exactly. Every reported faithfulness is exact; the search itself
  is a heuristic (an edge ranked outside the window is never tried; edges interact, so adding
  the best single candidates together is not the best joint addition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechir.display import fields_repr
from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch
from mechir.running import refuse_active_hooks
from patching.edges.attribution import EdgeScores
from patching.edges.engine import patch_edge_sets, prepare_inputs, tracked_rows
from patching.edges.graph import EdgeGraph, EdgesLike, check_graph
from patching.edges.sources import Align, CorruptedLike, EdgeInputs, MetricLike, metric_matrix
from patching.perturbations import AlignedPairs
from patching.sweep import DEFAULT_MEMORY_BUDGET

#: Edge budgets of the faithfulness curves (fractions of all edges), as in MIB below 100%.
DEFAULT_BUDGETS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def budget_edges(budget: float, total: int) -> int:
    """Edges in a budget: ``floor(budget * total)`` as MIB counts, at least 1."""
    if not 0 < budget <= 1:
        raise ValueError(f"an edge budget is a fraction in (0, 1], got {budget!r}")
    return max(1, int(budget * total))


def faithfulness(
    metric: Float[Tensor, " budget"], clean: float, corrupted: float
) -> Float[Tensor, " budget"]:
    """``(m(C) - m(empty)) / (m(N) - m(empty))`` (metric means over units)."""
    gap = clean - corrupted
    if abs(gap) < 1e-12:
        raise ValueError(
            "the clean and corrupted metrics are equal: faithfulness is undefined; choose pairs "
            "whose corruption changes the score"
        )
    return (metric - corrupted) / gap


def cpr_cmd(budgets: Sequence[float], f: Sequence[float]) -> tuple[float, float]:
    """``(CPR, CMD)``: trapezoid areas of ``f`` and of ``|1 - f|`` over the edge fractions
    ``budgets`` plus 100% (where ``f = 1``) unless the last budget is 100%; see the module doc."""
    full = len(budgets) > 0 and float(budgets[-1]) == 1.0
    x = np.array([*budgets] + ([] if full else [1.0]), dtype=np.float64)
    y = np.array([*f] + ([] if full else [1.0]), dtype=np.float64)
    if np.any(np.diff(x) <= 0) or x[0] <= 0:
        raise ValueError(f"budgets must increase within (0, 1], got {list(budgets)}")
    widths = np.diff(x)
    cpr = float(np.sum(widths * (y[1:] + y[:-1]) / 2))
    gap = np.abs(1.0 - y)
    cmd = float(np.sum(widths * (gap[1:] + gap[:-1]) / 2))
    return cpr, cmd


@dataclass(repr=False)
class FaithfulnessCurve:
    """Exact faithfulness of a circuit at every edge budget.

    Attributes:
        budgets: edge fractions; n_edges: the circuit sizes.
        faithfulness: ``[budget]`` ``f(C_k)`` (module doc).
        metric: ``[budget, unit]`` the metric with each circuit.
        clean, corrupted: ``[unit]`` ``m(N)`` and ``m(empty)``.
        cpr, cmd: the areas (module doc).
        circuits: per budget, the circuit's edge indices.
        label: what ranked the edges (e.g. ``"eap_ig"``, ``"exact"``, ``"greedy(eap_ig)"``).
    """

    budgets: list[float]
    n_edges: list[int]
    faithfulness: Float[Tensor, " budget"]
    metric: Float[Tensor, "budget unit"]
    clean: Float[Tensor, " unit"]
    corrupted: Float[Tensor, " unit"]
    cpr: float
    cmd: float
    circuits: list[Tensor]
    label: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per budget: fraction, edges, faithfulness, mean metric."""
        return pd.DataFrame(
            {
                "label": self.label,
                "budget": self.budgets,
                "n_edges": self.n_edges,
                "faithfulness": self.faithfulness.numpy(),
                "metric": self.metric.mean(1).numpy(),
            }
        )


FaithfulnessCurve.__repr__ = fields_repr  # type: ignore[method-assign]


def _setup(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike,
    graph: EdgeGraph | None,
    metric: MetricLike,
    align: Align,
    memory_budget: float,
) -> tuple[EdgeInputs, EdgeGraph, Tensor, list[str], int]:
    graph = check_graph(model, graph)
    source = clean.clean if not isinstance(clean, CrossEncoderBatch) else clean
    rows = tracked_rows(model, source.input_ids.shape[1], memory_budget)
    inputs = prepare_inputs(model, clean, corrupted, align, rows)
    a, units = metric_matrix(metric, inputs.pair_ids, inputs.grades)
    return inputs, graph, a.float(), units, rows


def circuit_metric(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    circuits: Sequence[EdgesLike] = (),
    *,
    graph: EdgeGraph | None = None,
    metric: MetricLike = "score",
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> Float[Tensor, "circuit unit"]:
    """The exact metric of each circuit (every edge outside it patched)."""
    refuse_active_hooks(model, "circuit_metric")
    inputs, graph, a, _, rows = _setup(model, clean, corrupted, graph, metric, align, memory_budget)
    keep = _circuit_masks(graph, circuits)
    scores = patch_edge_sets(
        model, inputs, sets=~keep, graph=graph, batch_size=batch_size or rows
    )  # [pair, circuit]
    return (a @ scores).T


def _circuit_masks(graph: EdgeGraph, circuits: Sequence[EdgesLike]) -> Tensor:
    out = torch.zeros(len(circuits), graph.n_edges, dtype=torch.bool)
    for i, c in enumerate(circuits):
        out[i, graph.edge_ids(c)] = True
    return out


def faithfulness_curve(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    scores: EdgeScores | Tensor | None = None,
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    graph: EdgeGraph | None = None,
    metric: MetricLike = "score",
    absolute: bool = True,
    align: Align = "token",
    label: str | None = None,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> FaithfulnessCurve:
    """Top-n circuits of a ranking at every budget, each evaluated exactly (module doc).

    Args:
        scores: :class:`EdgeScores` (ranked by their mean effect, ``|.|`` when ``absolute``) or
            an edge ranking ``[edge]`` (most important first).
        budgets: increasing edge fractions in (0, 1).
    """
    refuse_active_hooks(model, "faithfulness_curve")
    if scores is None:
        raise ValueError("pass scores: EdgeScores from edge_attribution, or an edge ranking")
    budgets = [float(b) for b in budgets]
    inputs, graph, a, _, rows = _setup(model, clean, corrupted, graph, metric, align, memory_budget)
    if isinstance(scores, EdgeScores):
        if scores.graph.n_edges != graph.n_edges:
            raise ValueError("the scores are over another edge graph")
        ranking = scores.ranking(absolute=absolute)
        label = label or scores.method
    else:
        ranking = scores.long()
        label = label or "ranking"
    if sorted(ranking.tolist()) != list(range(graph.n_edges)):
        raise ValueError("a ranking must list every edge exactly once")
    sizes = [budget_edges(b, graph.n_edges) for b in budgets]
    circuits = [ranking[:k] for k in sizes]
    keep = _circuit_masks(graph, circuits)
    sets = torch.cat([~keep, torch.zeros(1, graph.n_edges, dtype=torch.bool)])
    sets = torch.cat([sets, torch.ones(1, graph.n_edges, dtype=torch.bool)])
    patched = patch_edge_sets(model, inputs, sets=sets, graph=graph, batch_size=batch_size or rows)
    values = (a @ patched).T  # [set, unit]
    m_circuits, m_clean, m_corrupted = values[:-2], values[-2], values[-1]
    f = faithfulness(m_circuits.mean(1), float(m_clean.mean()), float(m_corrupted.mean()))
    cpr, cmd = cpr_cmd(budgets, f.tolist())
    return FaithfulnessCurve(
        budgets, sizes, f, m_circuits, m_clean, m_corrupted, cpr, cmd, circuits, label
    )


# ---------------------------------------------------------------------- greedy, verified
def greedy_circuit(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    scores: EdgeScores | None = None,
    *,
    budgets: Sequence[float] = (0.001, 0.002, 0.005),
    step: int | None = None,
    window: int | None = None,
    objective: Literal["cmd", "cpr"] = "cmd",
    graph: EdgeGraph | None = None,
    metric: MetricLike = "score",
    absolute: bool = True,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> FaithfulnessCurve:
    """Grow a circuit greedily, EAP-IG (``scores``) proposing and exact patching choosing
    (module doc), up to the largest budget; the circuit at each budget, with its exact
    faithfulness.

    Args:
        budgets: increasing edge fractions; the search stops at the largest.
        step: edges added per round (default: a twentieth of the largest circuit, at least 1);
            rounds end on every budget exactly.
        window: candidates tried per round (default ``4 * step``).
        objective: keep the candidates whose addition brings the faithfulness closest to 1
            (``"cmd"``, default: a circuit that behaves like the model) or highest (``"cpr"``:
            may overshoot 1, which MIB's CPR rewards and its CMD penalises).

    Returns:
        A :class:`FaithfulnessCurve` (``label="greedy-<objective>(<method>)"``);
        ``meta["trace"]`` lists
        every round's circuit size and exact faithfulness, ``meta["rows"]`` the exact patched
        rows run.
    """
    refuse_active_hooks(model, "greedy_circuit")
    if scores is None:
        raise ValueError("pass scores: EdgeScores (e.g. EAP-IG) that propose the candidates")
    budgets = [float(b) for b in budgets]
    inputs, graph, a, _, rows = _setup(model, clean, corrupted, graph, metric, align, memory_budget)
    rows = batch_size or rows
    sizes = [budget_edges(b, graph.n_edges) for b in budgets]
    if any(y <= x for x, y in zip(sizes, sizes[1:])):
        raise ValueError(f"the budgets {budgets} give non-increasing circuit sizes {sizes}")
    ranking = scores.ranking(absolute=absolute).tolist()
    step = step or max(1, sizes[-1] // 20)
    window = window or 4 * step
    if objective not in ("cmd", "cpr"):
        raise ValueError(f"unknown objective {objective!r}: use 'cmd' or 'cpr'")
    if step < 1 or window < step:
        raise ValueError(f"need 1 <= step <= window, got step={step}, window={window}")

    def evaluate(circuits: list[list[int]]) -> Tensor:
        keep = _circuit_masks(graph, circuits)
        patched = patch_edge_sets(model, inputs, sets=~keep, graph=graph, batch_size=rows)
        return (a @ patched).T.mean(1)  # [circuit]

    ends = evaluate([[], list(range(graph.n_edges))])  # m(empty), m(N)
    m_empty, m_full = float(ends[0]), float(ends[1])
    faithfulness(torch.zeros(1), m_full, m_empty)  # raises when undefined
    circuit: list[int] = []
    current = m_empty
    trace: list[tuple[int, float]] = []
    recorded: dict[int, tuple[list[int], float]] = {}
    n_rows = 2 * len(inputs)
    while len(circuit) < sizes[-1]:
        target = next(k for k in sizes if k > len(circuit))
        take = min(step, target - len(circuit))
        chosen = set(circuit)
        candidates = [e for e in ranking if e not in chosen][: max(window, take)]
        f_new = (evaluate([circuit + [e] for e in candidates]) - m_empty) / (m_full - m_empty)
        # "cpr": the largest faithfulness; "cmd": the closest to 1
        gains = f_new if objective == "cpr" else -(1 - f_new).abs()
        n_rows += len(candidates) * len(inputs)
        order = torch.argsort(gains, descending=True, stable=True)[:take].tolist()
        circuit = circuit + [candidates[i] for i in order]
        current = float(evaluate([circuit])[0])
        n_rows += len(inputs)
        f_now = (current - m_empty) / (m_full - m_empty)
        trace.append((len(circuit), f_now))
        if len(circuit) in sizes:
            recorded[len(circuit)] = (list(circuit), current)
    metric_values = torch.tensor([recorded[k][1] for k in sizes])
    f = faithfulness(metric_values, m_full, m_empty)
    cpr, cmd = cpr_cmd(budgets, f.tolist())
    return FaithfulnessCurve(
        budgets=budgets,
        n_edges=sizes,
        faithfulness=f,
        metric=metric_values[:, None],
        clean=torch.tensor([m_full]),
        corrupted=torch.tensor([m_empty]),
        cpr=cpr,
        cmd=cmd,
        circuits=[torch.tensor(recorded[k][0]) for k in sizes],
        label=f"greedy-{objective}({scores.method})",
        meta={
            "trace": trace,
            "rows": n_rows,
            "step": step,
            "window": window,
            "objective": objective,
        },
    )


def circuit_edges_frame(graph: EdgeGraph, circuit: Tensor, scores: EdgeScores | None = None):
    """The edges of a circuit as a table (sender, receiver, part, mean effect when known)."""
    ids = circuit.tolist()
    frame = pd.DataFrame(
        {
            "edge": ids,
            "label": graph.edge_labels(ids),
            "sender": [graph.senders[int(graph.edge_sender[e])].label for e in ids],
            "receiver": [graph.receivers[int(graph.edge_receiver[e])].label for e in ids],
        }
    )
    if scores is not None:
        frame["effect"] = scores.mean()[circuit].numpy()
    return frame


def heads_in(graph: EdgeGraph, circuit: Int[Tensor, " n"]) -> list[tuple[int, int]]:
    """Heads that send or receive an edge of the circuit, as ``(layer, head)``."""
    out = set()
    for e in circuit.tolist():
        s = graph.senders[int(graph.edge_sender[e])]
        r = graph.receivers[int(graph.edge_receiver[e])]
        if s.kind == "head":
            out.add((s.layer, s.head))
        if r.kind in ("q", "k", "v"):
            out.add((r.layer, r.head))
    return sorted(out)


__all__ = [
    "DEFAULT_BUDGETS",
    "FaithfulnessCurve",
    "budget_edges",
    "circuit_edges_frame",
    "circuit_metric",
    "cpr_cmd",
    "faithfulness",
    "faithfulness_curve",
    "greedy_circuit",
    "heads_in",
]
