"""Reference rankings of a fixed candidate set: first-stage order, random order and worst order.

They bound what an ablated reranker can score on the same candidates: the worst ranking puts
every relevant candidate last (the ideal order reversed); the random ranking is the mean over
seeded shuffles. (Generic evaluation helpers kept here until :mod:`mechir.evaluation` has them.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mechir.data import Collection, Pair, Qrels, Run
from mechir.evaluation import evaluate

_SEP = "\x1f"  # joins a query id and a shuffle number in the combined evaluation


def _by_query(pairs: Sequence[Pair]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in pairs:
        out.setdefault(p.qid, []).append(p.docid)
    return out


def first_stage_run(collection: Collection, pairs: Sequence[Pair]) -> Run:
    """The first-stage (e.g. BM25) scores of exactly these candidates.

    Raises:
        ValueError: the collection has no first-stage run.
    """
    if collection.run is None:
        raise ValueError(f"{collection.name}: no first-stage run")
    return {q: {d: collection.run[q][d] for d in docs} for q, docs in _by_query(pairs).items()}


def worst_ranking_run(pairs: Sequence[Pair], qrels: Qrels) -> Run:
    """Candidates in ascending order of judged relevance (unjudged count as 0): the ideal order
    reversed, the lowest score any reranking of these candidates can get."""
    return {
        q: {d: -float(qrels.get(q, {}).get(d, 0)) for d in docs}
        for q, docs in _by_query(pairs).items()
    }


@dataclass
class RandomFloor:
    """The measure of random orderings of the candidates: the mean over ``shuffles`` seeded
    shuffles (``mean``), the spread of the per-shuffle means (``min``, ``max``, ``std``) and
    the per-query means (``per_query``)."""

    mean: float
    min: float
    max: float
    std: float
    shuffles: int
    per_query: dict[str, float]


def random_ranking_floor(
    pairs: Sequence[Pair],
    qrels: Qrels,
    *,
    measure: str = "nDCG@10",
    shuffles: int = 200,
    seed: int = 0,
) -> RandomFloor:
    """Evaluate ``shuffles`` random orders of every query's candidates (one ir_measures call)."""
    if shuffles < 1:
        raise ValueError(f"shuffles must be >= 1, got {shuffles}")
    rng = np.random.default_rng(seed)
    by_query = _by_query(pairs)
    run: Run = {}
    combined_qrels: Qrels = {}
    for k in range(shuffles):
        for q, docs in by_query.items():
            scores = rng.permutation(len(docs)).astype(float)
            run[f"{q}{_SEP}{k}"] = dict(zip(docs, scores.tolist()))
            if q in qrels:
                combined_qrels[f"{q}{_SEP}{k}"] = qrels[q]
    per_query = evaluate(run, combined_qrels, [measure]).values(measure)
    table = np.full((shuffles, len(by_query)), np.nan)
    index = {q: i for i, q in enumerate(by_query)}
    for key, value in per_query.items():
        q, k = key.rsplit(_SEP, 1)
        table[int(k), index[q]] = value
    judged = ~np.isnan(table).all(axis=0)
    table = table[:, judged]
    if table.size == 0:
        raise ValueError("no judged query among the candidates")
    means = table.mean(axis=1)
    qids = [q for q, keep in zip(by_query, judged) if keep]
    return RandomFloor(
        mean=float(means.mean()),
        min=float(means.min()),
        max=float(means.max()),
        std=float(means.std()),
        shuffles=shuffles,
        per_query=dict(zip(qids, table.mean(axis=0).tolist())),
    )
