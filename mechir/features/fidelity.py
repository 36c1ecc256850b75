"""Ranking-aware fidelity of an SAE spliced with its error dropped, and a PCA baseline.

For candidate pairs grouped by query, with ``s`` the model's scores, ``s'`` the scores with the
SAE spliced in (error dropped) and ``s0`` the scores with the site mean-ablated (the floor):

* ``score_fvu = E[(s' - s)^2] / Var(s)``; ``spearman`` of ``s'`` against ``s`` over all pairs;
* ``kl_score = (KL_floor - KL_sae) / KL_floor`` with ``KL_x = mean_q KL(softmax(s_q) ||
  softmax(x_q))`` over each query's candidates (SAEBench's CE-loss score, listwise): 1 is
  perfect, 0 is no better than mean ablation;
* ``kendall_tau`` (mean over queries of Kendall's tau between ``s_q`` and ``s'_q``);
* ``top10_overlap`` (mean over queries of ``|top10(s_q) & top10(s'_q)| / min(10, n_q)``);
* ``ndcg10``, ``ndcg10_change`` (SAE minus model) and the paired t-test's ``ndcg10_p`` when
  relevance judgements are given.

Reconstruction (:func:`mechir.features.training.reconstruction_metrics`) on held-out activation
rows: FVU, L0, dead and dense latents. :class:`PCABaseline` reconstructs from the top ``k``
principal components with the encode / decode interface of an SAE, so it is spliced and
measured by the same code (its "L0" is ``k``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from jaxtyping import Float

from mechir.features.source import check_site
from mechir.features.splice import sae_hooks
from mechir.features.training import evaluate_sae
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.running import Hooks, per_forward

torch = lazy_import("torch")


#: Scores per pair: a float sequence, a numpy array or a tensor.
ScoresLike = Sequence[float] | Float[np.ndarray, " n"] | Float[torch.Tensor, " n"]


class PCABaseline:
    """Reconstruction from the top ``k`` principal components of activation rows: ``encode(x)
    = (x - mu) V_k`` (``[.., k]``), ``decode(c) = mu + c V_k^T``. Spliced by
    :func:`mechir.features.splice.sae_hooks` like an SAE (dense codes: its L0 is ``k``)."""

    def __init__(self, acts: Float[torch.Tensor, "n d"], k: int, *, site: str):
        if not 1 <= k <= acts.shape[1]:
            raise ValueError(f"k must be within 1..d={acts.shape[1]}, got {k}")
        x = acts.double()
        self.mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vh[:k].T.contiguous()  # [d, k]
        self.mean, self.components = self.mean.float(), self.components.float()
        self.cfg = SimpleNamespace(
            d_in=acts.shape[1], d_sae=k, metadata=SimpleNamespace(hook_name=site)
        )
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.training = False

    def eval(self) -> PCABaseline:
        return self

    def encode(self, x: Float[torch.Tensor, "*rows d"]) -> Float[torch.Tensor, "*rows k"]:
        return (x.float() - self.mean.to(x.device)) @ self.components.to(x.device)

    def decode(self, c: Float[torch.Tensor, "*rows k"]) -> Float[torch.Tensor, "*rows d"]:
        return self.mean.to(c.device) + c @ self.components.T.to(c.device)


def mean_ablation_hooks(model: HookedReranker, site: str, mean: Float[torch.Tensor, " d"]) -> Hooks:
    """Hooks setting ``site`` to ``mean`` (flattened ``d``) at every real token."""
    check_site(model, site)
    real = per_forward(lambda b: b.attention_mask.bool())

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = act.shape
        x = act.reshape(*shape[:2], -1)
        mask = real(hook)
        if mask.shape[1] != x.shape[1]:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        out = torch.where(mask.to(x.device)[..., None], mean.to(x), x)
        return out.reshape(shape)

    return [(site, fn)]


@dataclass
class ScoreFidelity:
    """Score and ranking agreement of one spliced model (module docstring)."""

    values: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)


def _softmax_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max())
    p /= p.sum()
    lq = q_logits - q_logits.max()
    lq = lq - np.log(np.exp(lq).sum())
    lp = np.log(np.clip(p, 1e-300, None))
    return float((p * (lp - lq)).sum())


def _varies(*arrays: np.ndarray) -> bool:
    """Whether every array has two or more distinct values (a rank correlation is defined)."""
    return all(len(a) > 1 and np.ptp(a) > 0 for a in arrays)


def score_fidelity(
    clean: ScoresLike,
    spliced: ScoresLike,
    floor: ScoresLike,
    qids: Sequence[str],
    *,
    docids: Sequence[str] | None = None,
    qrels: Mapping[str, Mapping[str, int]] | None = None,
) -> ScoreFidelity:
    """Score and ranking fidelity of ``spliced`` against ``clean``, with ``floor`` (mean
    ablation) as the KL score's zero (module docstring)."""
    from scipy.stats import kendalltau, spearmanr

    s, s1, s0 = (np.asarray(v, dtype=np.float64) for v in (clean, spliced, floor))
    if not (len(s) == len(s1) == len(s0) == len(qids)):
        raise ValueError("clean, spliced, floor and qids must have one entry per pair")
    var = s.var()
    out: dict[str, float] = {
        "score_fvu": float(((s1 - s) ** 2).mean() / var) if var > 0 else float("nan"),
        "spearman": float(spearmanr(s, s1).statistic) if _varies(s, s1) else float("nan"),
    }
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        groups.setdefault(q, []).append(i)
    kl_sae, kl_floor, taus, overlaps = [], [], [], []
    per_query: dict[str, dict[str, float]] = {}
    for q, idx in groups.items():
        a, b, c = s[idx], s1[idx], s0[idx]
        kl_sae.append(_softmax_kl(a, b))
        kl_floor.append(_softmax_kl(a, c))
        tau = float(kendalltau(a, b).statistic) if _varies(a, b) else float("nan")
        taus.append(tau)
        n = min(10, len(idx))
        top_a = set(np.argsort(-a, kind="stable")[:n])
        top_b = set(np.argsort(-b, kind="stable")[:n])
        overlaps.append(len(top_a & top_b) / n)
        per_query[q] = {"kendall_tau": tau, "top10_overlap": overlaps[-1], "kl": kl_sae[-1]}
    mean_floor = float(np.mean(kl_floor))
    out["kl_sae"] = float(np.mean(kl_sae))
    out["kl_floor"] = mean_floor
    out["kl_score"] = (mean_floor - out["kl_sae"]) / mean_floor if mean_floor > 0 else float("nan")
    out["kendall_tau"] = float(np.nanmean(taus)) if np.isfinite(taus).any() else float("nan")
    out["top10_overlap"] = float(np.mean(overlaps))
    if qrels is not None:
        if docids is None:
            raise ValueError("nDCG@10 needs the docids of the pairs")
        from mechir.evaluation import evaluate, paired_ttest

        def run_of(scores: np.ndarray) -> dict[str, dict[str, float]]:
            run: dict[str, dict[str, float]] = {}
            for q, d, v in zip(qids, docids, scores.tolist()):
                run.setdefault(q, {})[d] = v
            return run

        before = evaluate(run_of(s), qrels).values("nDCG@10")
        after = evaluate(run_of(s1), qrels).values("nDCG@10")
        out["ndcg10"] = float(np.mean(list(before.values()))) if before else float("nan")
        out["ndcg10_change"] = (
            float(np.mean(list(after.values())) - out["ndcg10"]) if after else float("nan")
        )
        if len(set(before) & set(after)) >= 2:
            out["ndcg10_p"] = paired_ttest(before, after).p
    return ScoreFidelity(out, per_query)


def fidelity_table(
    model: HookedReranker,
    pairs: Sequence[Any],
    codecs: Mapping[str, Any],
    *,
    site: str,
    eval_acts: Float[torch.Tensor, "n d"],
    mean: Float[torch.Tensor, " d"],
    qrels: Mapping[str, Mapping[str, int]] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """One row per codec (SAE or :class:`PCABaseline`) of ``codecs``: reconstruction metrics on
    ``eval_acts`` and score fidelity over ``pairs`` (:class:`mechir.data.Pair`: qid, docid,
    query, document) with the error dropped, the floor being mean ablation of ``site``."""
    from mechir.evaluation import score_pairs

    qids = [p.qid for p in pairs]
    docids = [p.docid for p in pairs]
    kw = dict(batch_size=batch_size, max_length=max_length, progress=False)
    clean = score_pairs(model, pairs, **kw)
    floor = score_pairs(model, pairs, hooks=mean_ablation_hooks(model, site, mean), **kw)
    rows = []
    for name, codec in codecs.items():
        spliced = score_pairs(
            model, pairs, hooks=sae_hooks(model, {site: codec}, error="drop"), **kw
        )
        fid = score_fidelity(clean, spliced, floor, qids, docids=docids, qrels=qrels)
        rows.append({"codec": name, **evaluate_sae(codec, eval_acts), **fid.values})
    return rows


__all__ = [
    "PCABaseline",
    "ScoreFidelity",
    "fidelity_table",
    "mean_ablation_hooks",
    "score_fidelity",
]
