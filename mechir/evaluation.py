"""Reranking with (optionally hooked) cross-encoders and evaluation with ir_measures."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mechir.data import Pair, Qrels, Run
from mechir.display import describe
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import

pd = lazy_import("pandas")
torch = lazy_import("torch")

if TYPE_CHECKING:  # imported lazily: mechir.models pulls in TransformerLens
    from mechir.models.hooked import HooksArg


def score_pairs(
    model: HookedReranker,
    pairs: Sequence[Pair],
    *,
    hooks: HooksArg = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> torch.Tensor:
    """Scores of ``pairs`` (in input order, float32 on the CPU).

    Pairs are tokenized in blocks and scored in length-sorted sub-batches of ``batch_size`` (less
    padding, same scores). ``hooks`` is a hook list built once (part-dependent hooks read each
    sub-batch's parts, e.g. ``direction_ablation_hooks(model, ...)``), or a function
    ``sub_batch -> list`` for hooks that must be rebuilt per sub-batch.

    Under a process group of several ranks (:mod:`mechir.distributed`), each rank scores its
    share of the pairs and every rank returns all the scores, in input order.
    """
    from mechir import distributed

    if distributed.sharding():
        shown = progress and distributed.is_main()  # rank 0's share stands for all
        desc = f"{desc} (rank 0 of {distributed.world_size()})"
        kwargs = dict(hooks=hooks, batch_size=batch_size, max_length=max_length, desc=desc)
        return distributed.map_sharded(
            lambda mine: score_pairs(model, mine, progress=shown, **kwargs), pairs
        )
    from tqdm.auto import tqdm

    check_pairs(pairs)
    scores = torch.empty(len(pairs), dtype=torch.float32)
    block = max(batch_size * 16, 256)
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress) as bar:
        for start in range(0, len(pairs), block):
            chunk = pairs[start : start + block]
            batch = model.encode(
                [p.query for p in chunk], [p.document for p in chunk], max_length=max_length
            )
            order = torch.argsort(batch.lengths, descending=True, stable=True)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                scores[start + idx] = model.score(batch[idx], hooks=hooks, check_finite=False)
                bar.update(len(idx))
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        named = ", ".join(f"(qid {pairs[i].qid!r}, docid {pairs[i].docid!r})" for i in bad[:3])
        raise ValueError(
            f"{len(bad)} of {len(pairs)} scores are not finite (NaN/inf), e.g. {named}: check "
            "the model's weights and the hooks (an ablation that leaves a softmax row empty)"
        )
    return scores


def check_pairs(pairs: Sequence[Pair]) -> None:
    """Every pair has a non-empty query and document text.

    Raises:
        ValueError: naming the first pair's qid and docid (and how many are empty).
    """
    empty = [
        (p, what)
        for p in pairs
        for what, text in (("query", p.query), ("document", p.document))
        if not isinstance(text, str) or not text.strip()
    ]
    if empty:
        p, what = empty[0]
        raise ValueError(
            f"qid {p.qid!r}, docid {p.docid!r}: the {what} is empty or whitespace only "
            f"({len(empty)} empty texts among {len(pairs)} pairs); drop or fix these pairs"
        )


def rerank(
    model: HookedReranker,
    pairs: Sequence[Pair],
    *,
    hooks: HooksArg = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = True,
) -> Run:
    """Score every candidate pair and return the run ``{qid: {docid: score}}``."""
    scores = score_pairs(
        model,
        pairs,
        hooks=hooks,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        desc="reranking",
    )
    run: Run = {}
    for p, s in zip(pairs, scores.tolist()):
        run.setdefault(p.qid, {})[p.docid] = s
    return run


@dataclass
class Evaluation:
    """Mean values (``aggregate``) and per-query values (tidy: qid, measure, value)."""

    aggregate: dict[str, float]
    per_query: pd.DataFrame

    def values(self, measure: str = "nDCG@10") -> dict[str, float]:
        """Per-query values of one measure as ``{qid: value}``."""
        rows = self.per_query[self.per_query["measure"] == measure]
        return dict(zip(rows["qid"], rows["value"]))

    def __repr__(self) -> str:
        means = ", ".join(f"{m}={v:.4f}" for m, v in self.aggregate.items())
        n = self.per_query["qid"].nunique() if len(self.per_query) else 0
        return f"Evaluation({means}; {n} queries, per_query={describe(self.per_query)})"


def evaluate(
    run: Run,
    qrels: Qrels,
    measures: Iterable[str] = ("nDCG@10",),
    *,
    missing: str = "skip",
) -> Evaluation:
    """Evaluate a run with ir_measures.

    ``missing="skip"`` (default) averages over the judged queries that the run ranks, so a run
    over a subset of queries (``--limit-queries``, a resumed run) is judged on that subset;
    ``missing="zero"`` counts judged queries absent from the run as 0 (``trec_eval -c``).
    Judged queries without any relevant document (every grade <= 0) score 0 on every measure and
    are kept in the mean, with a ``UserWarning`` naming them.
    """
    import ir_measures

    if missing not in ("skip", "zero"):
        raise ValueError(f"missing must be 'skip' or 'zero', got {missing!r}")
    if missing == "skip":
        qrels = {q: docs for q, docs in qrels.items() if q in run}
    unanswerable = sorted(q for q, docs in qrels.items() if not any(r > 0 for r in docs.values()))
    if unanswerable:
        warnings.warn(
            f"{len(unanswerable)} of {len(qrels)} judged queries have no relevant document "
            f"(e.g. qid {unanswerable[0]!r}): they count as 0 in the mean of every measure; "
            "drop them from the qrels to average over answerable queries only",
            UserWarning,
            stacklevel=2,
        )
    parsed = [ir_measures.parse_measure(m) if isinstance(m, str) else m for m in measures]
    rows = [
        (m.query_id, str(m.measure), float(m.value))
        for m in ir_measures.iter_calc(parsed, qrels, run)
    ]
    per_query = pd.DataFrame(rows, columns=["qid", "measure", "value"])
    aggregate = {
        str(m): float(per_query.loc[per_query.measure == str(m), "value"].mean()) for m in parsed
    }
    return Evaluation(aggregate, per_query)


@dataclass
class PairedTest:
    """Paired t-test of per-query values (b - a); ``n`` common queries."""

    mean_a: float
    mean_b: float
    delta: float
    t: float
    p: float
    n: int


def paired_ttest(a: Mapping[str, float], b: Mapping[str, float]) -> PairedTest:
    """Two-sided paired t-test (scipy ``ttest_rel``) of ``d_q = b_q - a_q`` over the queries both
    runs evaluate: ``t = mean(d) / (std(d, ddof=1) / sqrt(n))``.

    Zero-variance differences are decided exactly, without scipy's precision warnings: identical
    runs (every ``d_q = 0``) give ``t = 0, p = 1`` (no evidence of a difference); a constant
    non-zero shift (every ``d_q = c != 0``) is the limit ``std -> 0``: ``t = sign(c) * inf, p = 0``
    (maximally significant). Differences equal up to float rounding (spread below ``1e-12`` of
    the values' scale) count as constant.
    """
    from scipy.stats import ttest_rel

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError(f"paired test needs >= 2 common queries, got {len(common)}")
    x = np.array([a[q] for q in common], dtype=np.float64)
    y = np.array([b[q] for q in common], dtype=np.float64)
    bad = [q for q, u, v in zip(common, x, y) if not (np.isfinite(u) and np.isfinite(v))]
    if bad:
        raise ValueError(f"paired test needs finite values; non-finite for queries {bad[:5]}")
    d = y - x
    tol = 1e-12 * max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))
    if float(np.ptp(d)) <= tol:  # zero variance: identical runs or a constant shift
        shift = float(d.mean())
        t, p = (0.0, 1.0) if abs(shift) <= tol else (math.copysign(math.inf, shift), 0.0)
    else:
        res = ttest_rel(y, x)
        t, p = float(res.statistic), float(res.pvalue)
    return PairedTest(float(x.mean()), float(y.mean()), float(d.mean()), t, p, len(common))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as the input), for a family of tests.

    ``p_(i)`` sorted ascending is adjusted to ``max_{j <= i} min(1, (m - j) p_(j))``.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
