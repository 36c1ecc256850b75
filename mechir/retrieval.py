"""Dense first-stage retrieval with a hooked bi-encoder: a cached exact index, and search.

The documents are encoded once by the document tower into a ``[n_docs, dim]`` float32 matrix
(:func:`build_index`), kept as ``.npy`` beside a JSON record of what it was built from (the
model's weights fingerprint, its head settings and the document ids), and reused when they
match. :func:`search` embeds each query with the query tower and scores every document exactly,
``score(q, d) = sim(e_q, e_d)`` as the model scores pairs (dot, or cosine), no approximate
nearest-neighbour structure: at the demo's size (about 800 abstracts) the exact product is
instant. Hooks active while searching (``hooks=``) apply to the query tower (the index was built
without them; rebuild it to intervene on the document tower).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechir.data import Run
from mechir.interface import HookedTwoTower
from mechir.lazy import lazy_import

torch = lazy_import("torch")


@dataclass
class DenseIndex:
    """Document embeddings in ``doc_ids`` order (``embeddings[i]`` is ``doc_ids[i]``'s)."""

    doc_ids: list[str]
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_ids)


def index_settings(model: HookedTwoTower) -> dict[str, Any]:
    """What an index depends on: the weights' fingerprint and the document tower's settings."""
    from mechir.fingerprint import tensors_fingerprint

    state = {k: v.reshape(-1) for k, v in model.state_dict().items()}  # 0-dim buffers too
    return {
        "weights": tensors_fingerprint(state),
        "pooling": model.head.pooling,
        "normalize": model.head.normalize,
        "document_prefix": model.prefixes["document"],
        "max_length": model.max_length,
    }


def build_index(
    model: HookedTwoTower,
    docs: Mapping[str, str],
    *,
    cache: str | Path | None = None,
    batch_size: int = 64,
) -> DenseIndex:
    """Encode ``docs`` with the document tower (no gradients, no hooks) into a
    :class:`DenseIndex`; with ``cache`` (a path stem: ``STEM.npy`` + ``STEM.json``) an index
    built from the same weights, settings and document ids is loaded instead, and a new one is
    written (atomically) otherwise.

    Raises:
        ValueError: no documents.
    """
    from mechir import outputs

    doc_ids = list(docs)
    if not doc_ids:
        raise ValueError("no documents to index")
    settings = {**index_settings(model), "doc_ids": doc_ids}
    if cache is not None:
        stem = Path(cache)
        meta, array = stem.with_suffix(".json"), stem.with_suffix(".npy")
        if meta.is_file() and array.is_file() and json.loads(meta.read_text()) == settings:
            return DenseIndex(doc_ids, np.load(array))
    embeddings = model.embeddings([docs[d] for d in doc_ids], "document", batch_size=batch_size)
    index = DenseIndex(doc_ids, embeddings.numpy().astype(np.float32))
    if cache is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        with outputs.output_file(array) as partial:  # never over a file mechir did not write
            np.save(partial, index.embeddings)
        outputs.write_json(meta, settings)
    return index


def query_document_scores(
    model: HookedTwoTower, index: DenseIndex, queries: Mapping[str, str], *, hooks: Any = ()
) -> Any:
    """``[n_queries, n_docs]`` scores ``sim(e_q, e_d)`` of every query (in ``queries`` order)
    against every indexed document, as the model scores pairs (dot, or cosine)."""
    with model.hooks(fwd_hooks=list(hooks)):
        q = model.embeddings(list(queries.values()), "query")
    docs = torch.from_numpy(index.embeddings)
    if model.similarity == "cosine":
        q = torch.nn.functional.normalize(q, p=2, dim=-1)
        docs = torch.nn.functional.normalize(docs, p=2, dim=-1)
    return q @ docs.T


def search(
    model: HookedTwoTower,
    index: DenseIndex,
    queries: Mapping[str, str],
    *,
    k: int = 100,
    hooks: Any = (),
) -> Run:
    """The top ``k`` documents of every query by the model's similarity (exact search):
    ``{qid: {docid: score}}``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    scores = query_document_scores(model, index, queries, hooks=hooks)
    top = scores.topk(min(k, len(index)), dim=-1)
    return {
        qid: {index.doc_ids[j]: float(s) for s, j in zip(vals.tolist(), idx.tolist())}
        for qid, vals, idx in zip(queries, top.values, top.indices)
    }


def rerank_from_index(
    model: HookedTwoTower, index: DenseIndex, queries: Mapping[str, str], candidates: Run
) -> Run:
    """Each query's candidates (``{qid: {docid: ...}}``, e.g. a BM25 run's top k) scored by the
    model from the index (every candidate must be indexed): the bi-encoder as a reranker."""
    scores = query_document_scores(model, index, queries)
    column = {d: j for j, d in enumerate(index.doc_ids)}
    missing = [(q, d) for q in candidates for d in candidates[q] if d not in column]
    if missing:
        raise ValueError(f"qid {missing[0][0]!r}: docid {missing[0][1]!r} is not in the index")
    row = {q: i for i, q in enumerate(queries)}
    return {
        q: {d: float(scores[row[q], column[d]]) for d in docs} for q, docs in candidates.items()
    }


__all__ = [
    "DenseIndex",
    "build_index",
    "index_settings",
    "query_document_scores",
    "rerank_from_index",
    "search",
]
