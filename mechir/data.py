"""IR collections: queries, documents, relevance judgments and first-stage candidates.

One interface over local directories (``docs.tsv``, ``queries*.tsv``, ``qrels*.txt``,
``run*.trec``) and ``ir_datasets`` ids (e.g. ``msmarco-passage/trec-dl-2019/judged``).
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mechir.lazy import lazy_import
from mechir.network import offline_mode, unreachable

pd = lazy_import("pandas")

Qrels = dict[str, dict[str, int]]
#: A ranking: query id -> document id -> score (the ir_measures / pytrec_eval dict format).
Run = dict[str, dict[str, float]]


class Pair(NamedTuple):
    """One (query, document) pair with its ids."""

    qid: str
    docid: str
    query: str
    document: str

    def __repr__(self) -> str:
        from mechir.display import describe

        return (
            f"Pair(qid={self.qid!r}, docid={self.docid!r}, query={describe(self.query)}, "
            f"document={describe(self.document)} ({len(self.document)} chars))"
        )


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line without its newline)`` of a UTF-8 text file, decoding line by line so
    that an invalid byte is reported with its file and line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{n}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
            yield n, line.rstrip("\r\n")


def read_tsv(path: str | Path) -> dict[str, str]:
    """``id \\t text`` lines into a dict (text may contain no tab)."""
    out: dict[str, str] = {}
    for n, line in text_lines(path):
        if not line:
            continue
        key, sep, text = line.partition("\t")
        if not sep:
            raise ValueError(f"{path}:{n}: expected 'id<TAB>text'")
        out[key] = text
    return out


def _columns(path: str | Path, layout: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, columns)`` of the non-blank lines of a whitespace-separated file whose
    lines all have the columns named in ``layout``."""
    width = len(layout.split())
    for n, line in text_lines(path):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != width:
            raise ValueError(f"{path}:{n}: expected '{layout}', got {len(cols)} columns")
        yield n, cols


def read_qrels(path: str | Path) -> Qrels:
    """TREC qrels (``qid 0 docid rel``)."""
    qrels: Qrels = {}
    for n, cols in _columns(path, "qid 0 docid relevance"):
        try:
            rel = int(cols[3])
        except ValueError:
            raise ValueError(
                f"{path}:{n}: relevance {cols[3]!r} is not an integer (qid {cols[0]!r}, "
                f"docid {cols[2]!r})"
            ) from None
        qrels.setdefault(cols[0], {})[cols[2]] = rel
    return qrels


def read_run(path: str | Path) -> Run:
    """TREC run (``qid Q0 docid rank score tag``).

    Raises:
        ValueError: a malformed line, a score that is not a finite number, or a document listed
            twice for the same query (a run ranks each document once; which score would count
            is ambiguous); the message gives ``file:line``, the qid and the docid.
    """
    run: Run = {}
    first_line: dict[tuple[str, str], int] = {}
    for n, cols in _columns(path, "qid Q0 docid rank score tag"):
        qid, docid = cols[0], cols[2]
        try:
            score = float(cols[4])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise ValueError(
                f"{path}:{n}: score {cols[4]!r} of qid {qid!r}, docid {docid!r} is not a "
                "finite number"
            )
        if (qid, docid) in first_line:
            raise ValueError(
                f"{path}:{n}: qid {qid!r} lists docid {docid!r} twice (first at line "
                f"{first_line[qid, docid]}); a run ranks each document once: deduplicate the file"
            )
        first_line[qid, docid] = n
        run.setdefault(qid, {})[docid] = score
    return run


def format_run(run: Run, *, tag: str = "mechir", exact: bool = False) -> str:
    """A run as TREC run-file text, documents ranked by descending score (ties by doc id).
    ``exact=True`` writes each score in full precision (shortest repr that reads back to the
    same float), so tools that re-sort by score see the same ranking; otherwise scores are
    written with 6 decimals."""
    lines = []
    for qid in sorted(run):
        ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
        for rank, (docid, score) in enumerate(ranked, 1):
            text = repr(float(score)) if exact else f"{score:.6f}"
            lines.append(f"{qid} Q0 {docid} {rank} {text} {tag}\n")
    return "".join(lines)


def write_run(run: Run, path: str | Path, *, tag: str = "mechir", exact: bool = False) -> None:
    """Write a TREC run file (:func:`format_run`) to ``path``, a file the caller chose.

    The file is replaced atomically (written beside it, then renamed), so a reader never sees
    a half-written run. (Commands write their runs through :mod:`mechir.outputs`, which never
    replaces a file mechir did not write.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(format_run(run, tag=tag, exact=exact), encoding="utf-8")
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
        run_name: where the run came from (its file), named in errors.
    """

    name: str
    queries: dict[str, str]
    docs: Mapping[str, str]
    qrels: Qrels
    run: Run | None = None
    run_name: str | None = None
    _doc_ids: list[str] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        run = "none" if self.run is None else f"{len(self.run)} queries"
        if self.run is not None and self.run_name:
            run += f" from {self.run_name}"
        return (
            f"Collection({self.name!r}: {len(self.queries)} queries "
            f"{_examples(self.queries)}, {_size(self.docs)} documents, qrels of "
            f"{len(self.qrels)} queries ({sum(map(len, self.qrels.values()))} judgments), "
            f"run: {run})"
        )

    def query_ids(self, limit: int | None = None) -> list[str]:
        """Judged query ids that have a text, in natural order, optionally the first ``limit``
        (``limit >= 1``)."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValueError(f"limit_queries must be an int >= 1 or None, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(
                f"limit_queries={limit} selects no query: use a number >= 1, or None for all"
            )
        qids = [q for q in self.queries if q in self.qrels]
        return qids[:limit] if limit is not None else qids

    def pair(self, qid: str, docid: str) -> Pair:
        """The :class:`Pair` of a query and a document of this collection.

        Raises:
            ValueError: the query or the document is not in the collection (both ids named).
        """
        if qid not in self.queries:
            raise ValueError(f"{self.name}: no query {qid!r} (asked for docid {docid!r})")
        try:
            document = self.docs[docid]
        except KeyError:
            raise ValueError(
                f"{self.name}: qid {qid!r} refers to docid {docid!r}, which is not among the "
                "collection's documents"
            ) from None
        return Pair(qid, docid, self.queries[qid], document)

    def candidates(
        self,
        *,
        depth: int = 100,
        source: str = "run",
        query_ids: Iterable[str] | None = None,
    ) -> list[Pair]:
        """Pairs to rerank: the top-``depth`` of the first-stage run (``source="run"``) or every
        judged document (``source="judged"``), for the given queries (default: all judged)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1 (documents per query), got {depth!r}")
        qids = list(query_ids) if query_ids is not None else self.query_ids()
        if source == "run":
            if self.run is None:
                raise ValueError(f"{self.name}: no first-stage run; use source='judged'")
            ranked = top_k({q: self.run.get(q, {}) for q in qids}, depth)
            run_name = self.run_name or "the first-stage run"
            for q in qids:
                missing = [d for d in ranked[q] if d not in self.docs]
                if missing:
                    raise ValueError(
                        f"{run_name}: qid {q!r} ranks docid {missing[0]!r}, which is not among "
                        f"the documents of {self.name} ({len(missing)} such in its top-{depth})"
                    )
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


def _size(mapping: Mapping[str, Any]) -> str:
    try:
        return str(len(mapping))
    except Exception:  # noqa: BLE001 - a lazy docstore may not know its size offline
        return "?"


def _examples(texts: Mapping[str, str], n: int = 2, width: int = 40) -> str:
    """A few ``id: text`` examples, each text cut to ``width`` characters."""
    shown = []
    for key, text in itertools.islice(texts.items(), n):
        text = text if len(text) <= width else text[: width - 3] + "..."
        shown.append(f"{key}: {text!r}")
    more = ", ..." if len(texts) > n else ""
    return "{" + ", ".join(shown) + more + "}"


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
        run_name=str(runs[0]) if runs else None,
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

    def __repr__(self) -> str:
        return f"<ir_datasets docstore {type(self._dataset).__name__}>"


class DatasetNotFoundError(FileNotFoundError):
    """No local collection directory, no such ir_datasets id, or its files are neither stored
    locally nor downloadable."""


#: The ir_datasets mirror; probed (one request, <= 3 s) before any download is attempted.
IRDS_MIRROR = "https://mirror.ir-datasets.com"
_DATA_INSTEAD = (
    "pass a local collection directory (docs.tsv, queries*.tsv, qrels*.txt) instead, or "
    "--dataset demo in the CLI"
)
_CLOSED_PORT = "http://127.0.0.1:9"


@contextmanager
def _irds_downloads(*, allowed: bool, offline: bool) -> Iterator[None]:
    """Scoped ir_datasets download settings: unchanged when the hosts answer (``allowed``);
    otherwise one try with a 2 s timeout (``IR_DATASETS_DL_TRIES`` / ``IR_DATASETS_DL_TIMEOUT``,
    unless the user set them) instead of retry loops; in offline mode the HTTP(S) proxy points at
    a closed local port, so that nothing is downloaded and locally stored files still load."""
    if allowed:
        yield
        return
    settings = {"IR_DATASETS_DL_TRIES": "1", "IR_DATASETS_DL_TIMEOUT": "2"}
    settings = {k: v for k, v in settings.items() if k not in os.environ}
    if offline:
        proxies = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
        settings.update({k: _CLOSED_PORT for k in proxies} | {"NO_PROXY": "", "no_proxy": ""})
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_irds_collection(dataset_id: str, *, run: str | Path | None = None) -> Collection:
    """Load an ``ir_datasets`` collection; candidates from its scoreddocs (e.g. BM25) when it has
    them, or from ``run`` (a TREC run file).

    Offline first: files already in the ir_datasets store (``IR_DATASETS_HOME``, default
    ``~/.ir_datasets``) load without network. Downloads are attempted only when the ir_datasets
    mirror answers a quick request and neither ``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE``
    is set; otherwise a missing file fails at once.

    Raises:
        DatasetNotFoundError: unknown id, or files neither stored nor downloadable (one line
            saying what was tried and what to pass instead).
    """
    import ir_datasets

    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise DatasetNotFoundError(
            f"dataset {dataset_id!r} not found: no local directory {Path(dataset_id).absolute()} "
            f"and not an ir_datasets id; {_DATA_INSTEAD}"
        ) from None
    offline = offline_mode()
    why = None if offline else unreachable(IRDS_MIRROR)
    try:
        with _irds_downloads(allowed=not offline and why is None, offline=offline is not None):
            queries = {q.query_id: q.text for q in ds.queries_iter()}
            qrels: Qrels = {}
            for qr in ds.qrels_iter():
                qrels.setdefault(qr.query_id, {})[qr.doc_id] = int(qr.relevance)
            first_stage: Run | None = None
            run_name: str | None = None
            if run is not None:
                first_stage, run_name = read_run(run), str(run)
            elif ds.has_scoreddocs():
                first_stage, run_name = {}, f"{dataset_id} scoreddocs"
                for sd in ds.scoreddocs_iter():
                    first_stage.setdefault(sd.query_id, {})[sd.doc_id] = float(sd.score)
    except (OSError, RuntimeError):
        if not offline and why is None:
            raise
        home = os.environ.get("IR_DATASETS_HOME", "~/.ir_datasets")
        tried = (
            f"downloads were not tried (offline: {offline})"
            if offline
            else f"the ir_datasets mirror {IRDS_MIRROR} is {why}"
        )
        raise DatasetNotFoundError(
            f"dataset {dataset_id!r}: its files are not in the local ir_datasets store ({home}) "
            f"and {tried}; {_DATA_INSTEAD}"
        ) from None
    return Collection(dataset_id, queries, _DocstoreTexts(ds), qrels, first_stage, run_name)


def load_demo_collection(
    *, split: str | None = None, run: str | os.PathLike | None = None
) -> Collection:
    """The demo collection (``load_collection("demo")``): 50 SciFact test claims, their qrels,
    their BM25 top-20 run and the documents it ranks (:mod:`mechir.demo`); ``run`` replaces the
    BM25 run.

    Raises:
        ValueError: ``split`` is not ``None`` or ``"quick"`` (the only split).
    """
    from mechir.demo import DEMO_COLLECTION_NAME, demo_collection_dir, demo_split

    demo_split(split)
    col = load_local_collection(demo_collection_dir())
    col.name = f"demo ({DEMO_COLLECTION_NAME})"
    if run is not None:
        col.run = read_run(run)
    return col


def load_collection(
    source: str | Path, *, split: str | None = None, run: str | Path | None = None
) -> Collection:
    """A local collection directory, an ir_datasets id (see the two loaders) or ``"demo"`` (the
    embedded SciFact quick set, :func:`load_demo_collection`)."""
    if source == "demo":
        return load_demo_collection(split=split, run=run)
    if Path(source).is_dir():
        col = load_local_collection(source, split=split)
        if run is not None:
            col.run, col.run_name = read_run(run), str(run)
        return col
    if isinstance(source, os.PathLike) or str(source).startswith((".", "/", "~")):
        raise DatasetNotFoundError(
            f"{source}: no such collection directory ({Path(source).absolute()} does not "
            f"exist); {_DATA_INSTEAD}"
        )
    return load_irds_collection(str(source), run=run)


# ---------------------------------------------------------------------------- sampled pairs
#: The kinds of pairs built by :func:`matching_pairs`.
PAIR_KINDS: tuple[str, ...] = ("relevant", "hard_negative", "easy_negative")


def matching_pairs(
    collection: Any,
    *,
    query_ids: Iterable[str] | None = None,
    n_queries: int | None = None,
    min_rel: int = 1,
    max_relevant: int | None = None,
    max_hard: int | None = None,
    n_easy: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """(query, document) pairs of three kinds for the matching-head analysis.

    - ``relevant``: judged ``>= min_rel`` (``collection.relevant(qid, min_rel)``);
    - ``hard_negative``: judged non-relevant (``collection.hard_negatives(qid)``: judged 0;
      :class:`mechir.data.Collection` falls back to unjudged first-stage results for queries
      whose qrels hold no grade 0, e.g. SciFact or the DL-2019 subset);
    - ``easy_negative``: random corpus passages (``collection.easy_negatives(qid, n, seed=)``).

    Args:
        collection: a :class:`mechir.data.Collection` or anything with ``queries``, ``docs``,
            ``qrels``, ``relevant``, ``hard_negatives`` and ``easy_negatives``.
        query_ids: queries to use (default: every query with a text and a relevant document).
        n_queries: keep only the first ``n_queries`` of them.
        max_relevant, max_hard: at most this many of each per query (seeded sample).
        n_easy: easy negatives per query (default: as many as relevant pairs kept).
        seed: for sampling.

    Returns:
        One row per pair: ``pair`` (0..n-1, the row of the batch built from this table),
        ``qid, docid, kind, relevance`` (the judgment, -1 for unjudged easy negatives),
        ``query, document``. Queries without a relevant document are skipped.
    """
    qids = list(query_ids) if query_ids is not None else list(collection.queries)
    rng = random.Random(seed)

    def sample(items: list[str], cap: int | None) -> list[str]:
        return items if cap is None or len(items) <= cap else sorted(rng.sample(items, cap))

    rows = []
    used = 0
    for qid in qids:
        if n_queries is not None and used >= n_queries:
            break
        if qid not in collection.queries:
            raise ValueError(f"query {qid!r} is not in the collection")
        relevant = sample(list(collection.relevant(qid, min_rel)), max_relevant)
        if not relevant:
            continue
        used += 1
        hard = sample(list(collection.hard_negatives(qid)), max_hard)
        n = len(relevant) if n_easy is None else n_easy
        easy = list(collection.easy_negatives(qid, n, seed=seed)) if n else []
        judged = collection.qrels.get(qid, {})
        for kind, docids in zip(PAIR_KINDS, (relevant, hard, easy)):
            for docid in docids:
                rows.append(
                    {
                        "qid": qid,
                        "docid": docid,
                        "kind": kind,
                        "relevance": int(judged.get(docid, -1)),
                        "query": collection.queries[qid],
                        "document": collection.docs[docid],
                    }
                )
    if not rows:
        raise ValueError(f"no query has a document judged >= {min_rel}: no pairs to build")
    frame = pd.DataFrame(rows)
    frame.insert(0, "pair", np.arange(len(frame)))
    return frame
