"""Metrics of edge attribution and circuits: linear maps from pair scores to units.

Every metric here is linear in the pairs' scores, ``metric = A @ scores`` with ``A`` a
``[unit, pair]`` matrix, so an edge's effect on a unit is the same combination of its effects on
the pairs (pairs do not interact in an encoder):

* ``"score"``: one unit per pair, its score (the model's relevance score, e.g. the log-odds);
* ``"margin"``: one unit per query: mean score of its relevant pairs minus mean score of its
  non-relevant ones (grades from :class:`patching.AlignedPairs`, ``grade > 0`` relevant; pair ids
  ``"qid:docid"`` as :meth:`patching.PairBuilder.build` writes them);
* a ``[unit, pair]`` tensor: any other linear combination.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

MetricLike = Literal["score", "margin"] | Tensor


def metric_matrix(
    metric: MetricLike, pair_ids: list[str], grades: list[int | None]
) -> tuple[Float[Tensor, "unit pair"], list[str]]:
    """``(A, unit ids)`` of a metric (module doc)."""
    n = len(pair_ids)
    if isinstance(metric, Tensor):
        if metric.dim() != 2 or metric.shape[1] != n:
            raise ValueError(
                f"a metric matrix needs shape [units, {n} pairs], got {tuple(metric.shape)}"
            )
        return metric.double(), [str(u) for u in range(metric.shape[0])]
    if metric == "score":
        return torch.eye(n, dtype=torch.float64), list(pair_ids)
    if metric != "margin":
        raise ValueError(
            f"unknown metric {metric!r}: use 'score', 'margin' or a [unit, pair] tensor"
        )
    if any(g is None for g in grades):
        raise ValueError(
            "metric='margin' needs relevance grades: build the pairs with qrels "
            "(PairBuilder.build(..., qrels=...))"
        )
    by_query: dict[str, list[int]] = {}
    for i, pid in enumerate(pair_ids):
        if ":" not in pid:
            raise ValueError(
                f"metric='margin' groups pairs by query from ids 'qid:docid', got {pid!r}"
            )
        by_query.setdefault(pid.split(":", 1)[0], []).append(i)
    rows, units = [], []
    for qid, members in by_query.items():
        rel = [i for i in members if (grades[i] or 0) > 0]
        non = [i for i in members if (grades[i] or 0) <= 0]
        if not rel or not non:
            continue
        row = torch.zeros(n, dtype=torch.float64)
        row[rel] = 1.0 / len(rel)
        row[non] = -1.0 / len(non)
        rows.append(row)
        units.append(qid)
    if not rows:
        raise ValueError(
            "metric='margin' found no query with both a relevant and a non-relevant pair: add "
            "judged relevant and non-relevant documents per query, or use metric='score'"
        )
    return torch.stack(rows), units


__all__ = ["MetricLike", "metric_matrix"]
