"""Semantic BM25, the fit: each top head's effect against soft-TF x IDF features (R² on held-out
queries)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def fit_pairs(candidates: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    qids = list(dict.fromkeys(p.qid for p in candidates))
    keep = set(qids[: args.fit_queries]) if args.fit_queries else set(qids)
    return [p for p in candidates if p.qid in keep]


def compute_fit(
    model: HookedReranker,
    pairs: Sequence[Any],
    heads: list[str],
    idf: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per pair: the soft-TF x IDF features and each top head's effect ``s - s(head zeroed)``."""
    from mechir.hooks import head_knockout_hooks
    from patching.semantic_bm25 import soft_tf_idf

    batch = model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=args.max_length
    )
    with torch.no_grad():
        base = model.score(batch, batch_size=args.batch_size).double()
        effects = {
            h: (
                base
                - model.score(
                    batch, hooks=head_knockout_hooks(model, [h]), batch_size=args.batch_size
                ).double()
            ).tolist()
            for h in heads
        }
    stop = _stopword_ids(model.tokenizer)
    feats = soft_tf_idf(model.embed.embed.W_E, idf, batch, power=args.soft_tf_power, exclude=stop)
    return {
        "qids": [p.qid for p in pairs],
        "score": base.tolist(),
        "effects": effects,
        "features": feats.drop(columns="query_tokens").to_dict("list"),
    }


def _stopword_ids(tokenizer: Any) -> list[int]:
    from patching import STOPWORDS

    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in sorted(STOPWORDS)]
    return sorted({i[0] for i in ids if len(i) == 1})


def fit_table(row: dict[str, Any], args: argparse.Namespace) -> pd.DataFrame:
    """Linear fits ``effect ~ feature`` per head and feature; R² on held-out queries (every
    other query, in query order, is held out)."""
    from patching.semantic_bm25 import linear_fit

    qids = row["qids"]
    order = list(dict.fromkeys(qids))
    train = np.array([order.index(q) % 2 == 0 for q in qids])
    rows = []
    targets = {"score": row["score"], **{f"head {h}": v for h, v in row["effects"].items()}}
    for target, y in targets.items():
        for feature, x in row["features"].items():
            try:
                fit = linear_fit(x, y, train)
            except ValueError:
                fit = {"r2_heldout": math.nan}
            rows.append({"target": target, "feature": feature, **fit})
    return pd.DataFrame(rows)
