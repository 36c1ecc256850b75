"""Validate selected neurons by pruning: zero them, rerank, and compare with random neurons.

For every selection: nDCG@10 (or another measure) of the unpruned model, of the model with the
selected neurons zeroed (:func:`mechir.hooks.neuron_ablation_hooks`), and of random controls with
the same number of neurons in every layer (several seeds: mean and spread); paired t-tests over
queries of selected vs unpruned and of selected vs the random controls' per-query mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mechir.attribution.neuron_selection import NeuronSelection, random_control
from mechir.data import Pair, Qrels
from mechir.display import fields_repr
from mechir.evaluation import evaluate, paired_ttest, rerank
from mechir.hooks.neurons import neuron_ablation_hooks
from mechir.interface import HookedReranker


@dataclass(repr=False)
class PruningResult:
    """Results of :func:`pruning_evaluation`.

    Attributes:
        conditions: one row per run: ``selection``, ``kind`` (unpruned | selected | random),
            ``seed``, ``n_neurons``, ``value``.
        summary: one row per selection: ``n_neurons``, ``unpruned``, ``selected``,
            ``random_mean``, ``random_std``, ``random_min``, ``random_max``, ``n_seeds``,
            t-tests ``t_vs_random``, ``p_vs_random``, ``t_vs_unpruned``, ``p_vs_unpruned``.
        per_query: per-query values of every condition, keyed like ``conditions`` rows.
        measure: the measure.
    """

    conditions: pd.DataFrame
    summary: pd.DataFrame
    per_query: dict[str, dict[str, float]]
    measure: str


def pruning_evaluation(
    model: HookedReranker,
    pairs: Sequence[Pair],
    qrels: Qrels,
    selections: NeuronSelection | Mapping[str, NeuronSelection],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    measure: str = "nDCG@10",
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
) -> PruningResult:
    """Rerank ``pairs`` unpruned, with each selection zeroed, and with random controls.

    Args:
        selections: one selection or ``{name: selection}``.
        seeds: one random control per seed and selection (same per-layer counts, disjoint from
            the selection).
    """
    if isinstance(selections, NeuronSelection):
        selections = {selections.label or "selection": selections}
    if not selections:
        raise ValueError("no selections to evaluate")
    if len(seeds) < 1:
        raise ValueError("give at least one seed for the random controls")

    def run(neurons: dict[int, list[int]] | None) -> dict[str, float]:
        hooks = None if neurons is None else neuron_ablation_hooks(model, neurons)
        ranking = rerank(
            model, pairs, hooks=hooks, batch_size=batch_size, max_length=max_length,
            progress=progress,
        )  # fmt: skip
        return evaluate(ranking, qrels, (measure,)).values(measure)

    per_query: dict[str, dict[str, float]] = {"unpruned": run(None)}
    rows = [("", "unpruned", None, 0, _mean(per_query["unpruned"]))]
    summary = []
    for name, sel in selections.items():
        key = name
        per_query[key] = run(sel.neurons())
        rows.append((name, "selected", None, len(sel), _mean(per_query[key])))
        controls = []
        for seed in seeds:
            ctrl = random_control(sel, seed)
            ckey = f"{name} random seed={seed}"
            per_query[ckey] = run(ctrl.neurons())
            controls.append(per_query[ckey])
            rows.append((name, "random", seed, len(ctrl), _mean(per_query[ckey])))
        random_mean = {q: float(np.mean([c[q] for c in controls])) for q in controls[0]}
        values = np.array([_mean(c) for c in controls])
        vs_random = paired_ttest(random_mean, per_query[key])
        vs_unpruned = paired_ttest(per_query["unpruned"], per_query[key])
        summary.append(
            {
                "selection": name,
                "n_neurons": len(sel),
                "unpruned": _mean(per_query["unpruned"]),
                "selected": _mean(per_query[key]),
                "random_mean": float(values.mean()),
                "random_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "random_min": float(values.min()),
                "random_max": float(values.max()),
                "n_seeds": len(values),
                "t_vs_random": vs_random.t,
                "p_vs_random": vs_random.p,
                "t_vs_unpruned": vs_unpruned.t,
                "p_vs_unpruned": vs_unpruned.p,
            }
        )
    conditions = pd.DataFrame(rows, columns=["selection", "kind", "seed", "n_neurons", "value"])
    return PruningResult(conditions, pd.DataFrame(summary), per_query, measure)


def _mean(values: Mapping[str, float]) -> float:
    return float(np.mean(list(values.values())))


PruningResult.__repr__ = fields_repr  # type: ignore[method-assign]
