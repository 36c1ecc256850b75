"""Reranking units shared by the studies that intervene and measure ranking quality (direction
ablation, head knockout, neuron pruning): one unit = one intervention over every candidate,
stored as its full run; then per-query values, the comparison with the unintervened model
(paired t-test, Holm) and the reference rankings (first stage, random, worst)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from analyses.floors import first_stage_run, random_ranking_floor, worst_ranking_run
from mechir.data import Pair, Qrels, Run
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import

pd = lazy_import("pandas")

if TYPE_CHECKING:  # imported lazily: mechir.models pulls in TransformerLens
    from mechir.models.hooked import HooksArg


def rerank_row(
    model: HookedReranker, pairs: Sequence[Pair], args: argparse.Namespace, hooks: HooksArg = None
) -> dict[str, Any]:
    """Rerank ``pairs`` under ``hooks``; the stored row: ``{"run"}`` (the unit's time goes to
    ``timings.jsonl``, apart from the results, see :func:`analyses.common.run_units`)."""
    from mechir.evaluation import rerank

    run = rerank(
        model,
        pairs,
        hooks=hooks,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=False,
    )
    return {"run": run}


def per_query_values(
    runs: Mapping[str, Run], qrels: Qrels, measure: str = "nDCG@10"
) -> dict[str, dict[str, float]]:
    """``{unit: {qid: value}}`` of one measure for every stored run."""
    from mechir.evaluation import evaluate

    return {unit: evaluate(run, qrels, [measure]).values(measure) for unit, run in runs.items()}


def tied_queries(run: Run, *, tol: float = 1e-5) -> int:
    """Queries whose candidates all score within ``tol`` of each other: their ranking, and so
    their measure, is decided by tie-breaking and floating-point noise, not by the model."""
    return sum(
        1
        for docs in run.values()
        if len(docs) > 1 and max(docs.values()) - min(docs.values()) < tol
    )


def compare_to_baseline(
    values: Mapping[str, Mapping[str, float]],
    baseline: str,
    units: Iterable[str],
    *,
    measure: str = "nDCG@10",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per unit: mean ``measure``, ``delta`` against ``baseline``, paired t-test over
    queries (``t``, ``p``), Holm-adjusted ``p_holm`` over the given units (one family),
    ``significant`` (``p_holm < alpha``) and the number of ``queries``."""
    from mechir.evaluation import holm, paired_ttest

    rows = []
    for unit in units:
        test = paired_ttest(values[baseline], values[unit])
        rows.append(
            {
                "unit": unit,
                measure: test.mean_b,
                "delta": test.delta,
                "t": test.t,
                "p": test.p,
                "queries": test.n,
            }
        )
    frame = pd.DataFrame(rows, columns=["unit", measure, "delta", "t", "p", "queries"])
    frame.insert(5, "p_holm", holm(frame["p"].tolist()) if len(frame) else [])
    frame.insert(6, "significant", frame["p_holm"] < alpha)
    return frame


def reference_rankings(
    collection: Any,
    pairs: Sequence[Pair],
    *,
    model_value: float,
    measure: str = "nDCG@10",
    shuffles: int = 200,
    seed: int = 0,
    model_label: str = "unablated model",
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The reference rankings of the candidates: first-stage order (when the collection has a
    run), the model, random order (mean of ``shuffles``, with min and max) and the worst order.

    Returns:
        ``(table, levels)``: a table ``ranking, <measure>, note`` and ``{label: value}`` of the
        model and the two floors, for plots.
    """
    from mechir.evaluation import evaluate

    qrels = collection.qrels
    floor = random_ranking_floor(pairs, qrels, measure=measure, shuffles=shuffles, seed=seed)
    worst = evaluate(worst_ranking_run(pairs, qrels), qrels, [measure]).aggregate[measure]
    rows = [(model_label, model_value, "")]
    if collection.run is not None:
        first = evaluate(first_stage_run(collection, pairs), qrels, [measure]).aggregate[measure]
        rows.insert(0, ("first-stage order (e.g. BM25)", first, ""))
    rows += [
        (
            f"random order (mean of {floor.shuffles} shuffles)",
            floor.mean,
            f"min {floor.min:.4f}, max {floor.max:.4f}",
        ),
        ("worst order (ideal order reversed)", worst, ""),
    ]
    levels = {model_label: model_value, "random floor": floor.mean, "worst floor": worst}
    return pd.DataFrame(rows, columns=["ranking", measure, "note"]), levels
