"""Semantic BM25, the IDF side: duplicate-token heads, the SVD of the token embeddings against IDF,
and reranking with the IDF direction edited out."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from analyses.reranking import rerank_row
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def compute_duplicates(
    model: HookedReranker, dset: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Duplicate-token scores on the TFC1 documents with the term (it duplicates a query token),
    else on the candidates."""
    from patching.semantic_bm25 import duplicate_token_scores

    higher, _, _ = dset.batches(model.tokenizer)
    frame = duplicate_token_scores(model, higher, batch_size=args.batch_size)
    return {"table": frame.to_dict("list")}


def token_statistics(model: HookedReranker, collection: Any) -> tuple[Any, Any]:
    from patching.semantic_bm25 import token_idf

    d_vocab = model.embed.embed.W_E.shape[0]
    return token_idf(model.tokenizer, collection.docs.values(), d_vocab=d_vocab)


def compute_idf_svd(
    model: HookedReranker, collection: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Spearman of the leading right singular vectors of ``W_E`` with token IDF (tokens seen in
    the corpus, no special tokens), and the IDF direction."""
    from patching.semantic_bm25 import embedding_idf_svd

    idf, df = token_statistics(model, collection)
    seen = df > 0
    seen[torch.tensor(model.tokenizer.all_special_ids, dtype=torch.long)] = False
    E = model.embed.embed.W_E.detach()
    table, direction = embedding_idf_svd(E, idf, seen, k=min(args.svd_components, min(E.shape)))
    best = int(table.spearman.abs().idxmax())
    proj = (E.float().cpu()[seen] @ direction).numpy()
    sample = np.random.default_rng(args.seed).permutation(int(seen.sum()))[:2000]
    return {
        "table": table.to_dict("list"),
        "component": int(table.component[best]),
        "direction": encode_array(direction.numpy()),
        "tokens": int(seen.sum()),
        "scatter": {
            "projection": proj[sample].tolist(),
            "idf": idf[seen].numpy()[sample].tolist(),
        },
    }


def compute_rerank(
    model: HookedReranker, pairs: Sequence[Any], args: argparse.Namespace, hooks: Any
) -> dict:
    return rerank_row(model, pairs, args, hooks)


def random_direction(d: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(d, generator=gen)
    return v / v.norm()
