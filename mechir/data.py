"""IR collections: queries, documents, relevance judgments and first-stage candidates.

One interface over local directories (``docs.tsv``, ``queries*.tsv``, ``qrels*.txt``,
``run*.trec``) and ``ir_datasets`` ids (e.g. ``msmarco-passage/trec-dl-2019/judged``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

Qrels = dict[str, dict[str, int]]
#: A ranking: query id -> document id -> score (the ir_measures / pytrec_eval dict format).
Run = dict[str, dict[str, float]]


class Pair(NamedTuple):
    """One (query, document) pair with its ids."""

    qid: str
    docid: str
    query: str
    document: str


def read_tsv(path: str | Path) -> dict[str, str]:
    """``id \\t text`` lines into a dict (text may contain no tab)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            key, sep, text = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{n}: expected 'id<TAB>text'")
            out[key] = text
    return out


def read_qrels(path: str | Path) -> Qrels:
    """TREC qrels (``qid 0 docid rel``)."""
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 4:
                raise ValueError(f"{path}:{n}: expected 'qid 0 docid relevance'")
            qrels.setdefault(cols[0], {})[cols[2]] = int(cols[3])
    return qrels


def read_run(path: str | Path) -> Run:
    """TREC run (``qid Q0 docid rank score tag``)."""
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 6:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 docid rank score tag'")
            run.setdefault(cols[0], {})[cols[2]] = float(cols[4])
    return run


def write_run(run: Run, path: str | Path, *, tag: str = "mechir", exact: bool = False) -> None:
    """Write a TREC run file, documents ranked by descending score (ties by doc id).

    The file is replaced atomically (written beside it, then renamed), so a reader never sees
    a half-written run. ``exact=True`` writes each score in full precision (shortest repr that
    reads back to the same float), so tools that re-sort by score see the same ranking;
    otherwise scores are written with 6 decimals."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for qid in sorted(run):
                ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
                for rank, (docid, score) in enumerate(ranked, 1):
                    text = repr(float(score)) if exact else f"{score:.6f}"
                    f.write(f"{qid} Q0 {docid} {rank} {text} {tag}\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def top_k(run: Run, k: int) -> dict[str, list[str]]:
    """The ``k`` best-scored documents of every query (ties broken by doc id)."""
    return {
        qid: [d for d, _ in sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
        for qid, docs in run.items()
    }


@dataclass
class Collection:
    """Queries, documents, judgments and (optionally) a first-stage run of one test collection.

    Attributes:
        name: where it came from (directory or ir_datasets id).
        queries: query id -> text.
        docs: document id -> text (any mapping; ir_datasets docstores are looked up lazily).
        qrels: query id -> document id -> graded relevance.
        run: first-stage run (e.g. BM25) used for candidates, or None.
    """

    name: str
    queries: dict[str, str]
    docs: Mapping[str, str]
    qrels: Qrels
    run: Run | None = None
    _doc_ids: list[str] | None = field(default=None, repr=False)

    def query_ids(self, limit: int | None = None) -> list[str]:
        """Judged query ids that have a text, in natural order, optionally the first ``limit``."""
        qids = [q for q in self.queries if q in self.qrels]
        return qids[:limit] if limit is not None else qids

    def pair(self, qid: str, docid: str) -> Pair:
        return Pair(qid, docid, self.queries[qid], self.docs[docid])

    def candidates(
        self,
        *,
        depth: int = 100,
        source: str = "run",
        query_ids: Iterable[str] | None = None,
    ) -> list[Pair]:
        """Pairs to rerank: the top-``depth`` of the first-stage run (``source="run"``) or every
        judged document (``source="judged"``), for the given queries (default: all judged)."""
        qids = list(query_ids) if query_ids is not None else self.query_ids()
        if source == "run":
            if self.run is None:
                raise ValueError(f"{self.name}: no first-stage run; use source='judged'")
            ranked = top_k({q: self.run.get(q, {}) for q in qids}, depth)
        elif source == "judged":
            ranked = {q: sorted(self.qrels.get(q, {}))[:depth] for q in qids}
        else:
            raise ValueError(f"unknown candidate source {source!r}: use 'run' or 'judged'")
        return [self.pair(q, d) for q in qids for d in ranked[q]]

    def relevant(self, qid: str, min_rel: int = 1) -> list[str]:
        """Documents judged at least ``min_rel`` for the query."""
        return sorted(d for d, r in self.qrels.get(qid, {}).items() if r >= min_rel)

    def hard_negatives(self, qid: str, min_rel: int = 1) -> list[str]:
        """Documents judged below ``min_rel``; where the qrels hold no such judgment for the query
        (e.g. DL-2019 subsets that kept only positive grades), the first-stage run's documents
        that are not judged relevant, in run order."""
        judged = self.qrels.get(qid, {})
        negatives = sorted(d for d, r in judged.items() if r < min_rel)
        if negatives or self.run is None:
            return negatives
        return [d for d in top_k({qid: self.run.get(qid, {})}, 10**9)[qid] if d not in judged]

    def easy_negatives(self, qid: str, n: int, *, seed: int = 0) -> list[str]:
        """``n`` random corpus documents not judged for the query (seeded, reproducible)."""
        if self._doc_ids is None:
            self._doc_ids = sorted(self.docs.keys())
        judged = self.qrels.get(qid, {})
        rng = random.Random(f"{seed}:{qid}")
        pool = self._doc_ids
        if len(pool) - len(judged) < n:
            raise ValueError(f"{self.name}: only {len(pool) - len(judged)} unjudged documents")
        out: list[str] = []
        seen: set[str] = set()
        while len(out) < n:
            d = pool[rng.randrange(len(pool))]
            if d not in judged and d not in seen:
                seen.add(d)
                out.append(d)
        return out


def _pick(directory: Path, stem: str, split: str | None, suffix: str) -> Path | None:
    path = directory / (f"{stem}.{split}.{suffix}" if split else f"{stem}.{suffix}")
    return path if path.exists() else None


def load_local_collection(directory: str | Path, *, split: str | None = None) -> Collection:
    """Load ``docs.tsv``, ``queries[.split].tsv``, ``qrels[.split].txt`` and ``run*[.split].trec``.

    ``split`` (``"test"``, ``"quick"``, ...) picks the files of that split; without it the
    unsplit files are used and, for the run, the test split's run if there is no unsplit one.
    """
    d = Path(directory)
    if not (d / "docs.tsv").exists():
        raise FileNotFoundError(f"{d}: no docs.tsv (expected a local collection directory)")
    queries_path = _pick(d, "queries", split, "tsv")
    qrels_path = _pick(d, "qrels", split, "txt")
    if queries_path is None or qrels_path is None:
        raise FileNotFoundError(f"{d}: no queries/qrels files for split {split!r}")
    runs = sorted(d.glob(f"run*.{split}.trec")) if split else sorted(d.glob("run*.trec"))
    if not split:
        runs = [r for r in runs if len(r.name.split(".")) == 3] or sorted(d.glob("run*.test.trec"))
    return Collection(
        name=f"{d}" + (f"[{split}]" if split else ""),
        queries=read_tsv(queries_path),
        docs=read_tsv(d / "docs.tsv"),
        qrels=read_qrels(qrels_path),
        run=read_run(runs[0]) if runs else None,
    )


class _DocstoreTexts(Mapping[str, str]):
    """Lazy ``doc id -> text`` view over an ir_datasets docstore."""

    def __init__(self, dataset: Any):
        self._dataset = dataset
        self._store = dataset.docs_store()

    def __getitem__(self, key: str) -> str:
        doc = self._store.get(key)
        return getattr(doc, "text", None) or " ".join(str(x) for x in doc[1:])

    def __iter__(self):
        return (doc.doc_id for doc in self._dataset.docs_iter())

    def __len__(self) -> int:
        return self._dataset.docs_count()


def load_irds_collection(dataset_id: str, *, run: str | Path | None = None) -> Collection:
    """Load an ``ir_datasets`` collection; candidates from its scoreddocs (e.g. BM25) when it has
    them, or from ``run`` (a TREC run file)."""
    import ir_datasets

    ds = ir_datasets.load(dataset_id)
    queries = {q.query_id: q.text for q in ds.queries_iter()}
    qrels: Qrels = {}
    for qr in ds.qrels_iter():
        qrels.setdefault(qr.query_id, {})[qr.doc_id] = int(qr.relevance)
    first_stage: Run | None = None
    if run is not None:
        first_stage = read_run(run)
    elif ds.has_scoreddocs():
        first_stage = {}
        for sd in ds.scoreddocs_iter():
            first_stage.setdefault(sd.query_id, {})[sd.doc_id] = float(sd.score)
    return Collection(dataset_id, queries, _DocstoreTexts(ds), qrels, first_stage)


def load_collection(
    source: str | Path, *, split: str | None = None, run: str | Path | None = None
) -> Collection:
    """A local collection directory or an ir_datasets id (see the two loaders)."""
    if Path(source).is_dir():
        col = load_local_collection(source, split=split)
        if run is not None:
            col.run = read_run(run)
        return col
    if str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such collection directory")
    return load_irds_collection(str(source), run=run)
