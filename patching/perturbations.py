"""Clean/corrupted input pairs for activation patching, aligned token by token.

Patching copies an activation from a *clean* run into a *corrupted* run at the same position, so the
two inputs must have the same length and the same part layout (``[CLS] q [SEP] d [SEP]``). Pairs
are therefore built at the token level: the query is tokenized once, and the two documents differ
only inside one span, padded with a filler token where the perturbation adds tokens.

Perturbations (the clean document carries the signal, the corrupted one lacks it):

* **TFC1** (term-frequency constraint): clean = document + a query term, corrupted = document +
  as many filler tokens as the term has word pieces.
* **TDC** (term-discrimination constraint): clean = document + the query term with the highest
  IDF, corrupted = document + the query term with the lowest IDF (the shorter one padded with
  filler tokens).
* **Injection**: a query term inserted at a chosen document position vs fillers there.
* **Document swap**: the document vs another document of the same token length.
* **Custom**: any ``(query, doc) -> (clean_doc, corrupted_doc)`` function on texts.

IDF comes from the documents being studied (:meth:`TermStatistics.from_documents`) or is passed in.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from jaxtyping import Int
from torch import Tensor

from mechir.display import fields_repr
from mechir.interface import HookedReranker, PromptReranker
from mechir.parts import CrossEncoderBatch, cross_encoder_batch_from_tokens, pair_layout_of

#: Filler token of MechIR's data collators (``special_token="a"``).
DEFAULT_FILLER = "a"

#: A small English stop list: these query words are never chosen as TFC1/TDC terms.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have how i in is it its of on or that the this "
    "to was what when where which who whom why will with do does did can could not no".split()
)

Position = Literal["start", "end"] | int
TermChoice = Literal["random", "first", "max_idf", "min_idf"]
Align = Literal["strict", "pad", "truncate"]


def default_analyzer(text: str) -> list[str]:
    """Lower-cased word terms (``\\w+`` runs): the unit of IDF statistics and of term choice."""
    return re.findall(r"\w+", text.lower())


def is_content_word(term: str) -> bool:
    """A term worth perturbing: at least two characters, one of them a letter ("mg", "covid19";
    not "1", "000", "s")."""
    return len(term) >= 2 and any(ch.isalpha() for ch in term)


# ---------------------------------------------------------------------- term statistics
@dataclass(frozen=True)
class TermStatistics:
    """Inverse document frequencies of terms.

    ``idf(t) = ln(1 + (N - df_t + 0.5) / (df_t + 0.5))`` (BM25's, always positive) when built from
    documents; any precomputed ``idf`` mapping may be passed instead. Terms absent from the mapping
    get ``unseen_idf`` (by default the IDF of a term in no document).
    """

    idf: Mapping[str, float]
    unseen_idf: float
    n_docs: int | None = None
    analyzer: Callable[[str], list[str]] = default_analyzer

    @classmethod
    def from_documents(
        cls, documents: Iterable[str], *, analyzer: Callable[[str], list[str]] = default_analyzer
    ) -> TermStatistics:
        """Document frequencies over ``documents`` (e.g. ``collection.docs.values()``)."""
        df: Counter[str] = Counter()
        n = 0
        for text in documents:
            n += 1
            df.update(set(analyzer(text)))
        if n == 0:
            raise ValueError("no documents given: IDF needs at least one document")
        idf = {t: math.log1p((n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        return cls(idf=idf, unseen_idf=math.log1p((n + 0.5) / 0.5), n_docs=n, analyzer=analyzer)

    def __call__(self, term: str) -> float:
        return float(self.idf.get(term, self.unseen_idf))


# ---------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class PerturbedPair:
    """One aligned clean/corrupted pair at the token level (no special tokens).

    ``clean_ids`` and ``corrupted_ids`` are the two documents, already of equal length and already
    truncated so that ``[CLS] query [SEP] document [SEP]`` fits ``max_length``.
    """

    pair_id: str
    query_ids: tuple[int, ...]
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    grade: int | None = None
    perturbation: str = "custom"
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.clean_ids) != len(self.corrupted_ids):
            raise ValueError(
                f"pair {self.pair_id!r}: clean document has {len(self.clean_ids)} tokens but the "
                f"corrupted one has {len(self.corrupted_ids)}; they must be aligned token by token"
            )


@dataclass
class AlignedPairs:
    """Clean and corrupted batches with identical shapes and part layouts, plus pair metadata."""

    clean: CrossEncoderBatch
    corrupted: CrossEncoderBatch
    pair_ids: list[str]
    grades: list[int | None]

    def __post_init__(self) -> None:
        n = len(self.clean)
        if len(self.corrupted) != n or len(self.pair_ids) != n or len(self.grades) != n:
            raise ValueError(
                f"clean ({len(self.clean)}), corrupted ({len(self.corrupted)}), pair_ids "
                f"({len(self.pair_ids)}) and grades ({len(self.grades)}) need one entry per pair"
            )
        if self.clean.input_ids.shape != self.corrupted.input_ids.shape:
            raise ValueError(
                f"clean batch {tuple(self.clean.input_ids.shape)} and corrupted batch "
                f"{tuple(self.corrupted.input_ids.shape)} differ in shape: build them aligned"
            )
        fields = (
            ("parts", self.clean.parts, self.corrupted.parts),
            ("token_type_ids", self.clean.token_type_ids, self.corrupted.token_type_ids),
            ("attention_mask", self.clean.attention_mask, self.corrupted.attention_mask),
        )
        for name, clean_field, corrupted_field in fields:
            differs = (clean_field != corrupted_field).any(-1)
            if differs.any():
                bad = [self.pair_ids[i] for i in differs.nonzero()[:, 0].tolist()]
                raise ValueError(
                    f"pairs {bad[:5]} are not aligned: clean and corrupted {name} differ (the "
                    "inputs must have identical length and part layout)"
                )
        # both inputs of a pair carry its id, so patching hooks find a pair's cached source
        ids = tuple(str(p) for p in self.pair_ids)
        self.clean = self.clean.with_pair_ids(ids)
        self.corrupted = self.corrupted.with_pair_ids(ids)

    @classmethod
    def from_batches(
        cls,
        clean: CrossEncoderBatch,
        corrupted: CrossEncoderBatch,
        *,
        pair_ids: Sequence[str] | None = None,
        grades: Sequence[int | None] | None = None,
    ) -> AlignedPairs:
        """Wrap two already-aligned batches (checked). ``pair_ids`` default to the clean batch's
        own, else ``"0", "1", ...``."""
        n = len(clean)
        if pair_ids is None:
            pair_ids = clean.pair_ids or [str(i) for i in range(n)]
        return cls(
            clean,
            corrupted,
            [str(p) for p in pair_ids],
            [None] * n if grades is None else list(grades),
        )

    @classmethod
    def from_pairs(
        cls, pairs: Sequence[PerturbedPair], tokenizer: Any, *, model: HookedReranker | None = None
    ) -> AlignedPairs:
        """Batch :class:`PerturbedPair` s with the tokenizer's special tokens, or, for a
        prompt-based reranker (``model.abilities.prompt``: MonoT5, LLM rerankers), with the
        model's template (``model.batch_from_tokens``)."""
        if not pairs:
            raise ValueError("no pairs given")
        if model is not None and model.abilities.prompt:
            assemble = cast(PromptReranker, model).batch_from_tokens
            queries = [p.query_ids for p in pairs]
            width = max(len(p.query_ids) + len(p.clean_ids) for p in pairs) + model.n_special
            return cls(
                assemble(queries, [p.clean_ids for p in pairs], max_length=width),
                assemble(queries, [p.corrupted_ids for p in pairs], max_length=width),
                [p.pair_id for p in pairs],
                [p.grade for p in pairs],
            )
        layout = pair_layout_of(tokenizer)
        ids = dict(
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            layout=layout,
            max_length=max(len(p.query_ids) + len(p.clean_ids) for p in pairs) + layout.n_special,
        )
        queries = [p.query_ids for p in pairs]
        return cls(
            cross_encoder_batch_from_tokens(queries, [p.clean_ids for p in pairs], **ids),
            cross_encoder_batch_from_tokens(queries, [p.corrupted_ids for p in pairs], **ids),
            [p.pair_id for p in pairs],
            [p.grade for p in pairs],
        )

    def __len__(self) -> int:
        return len(self.clean)

    def __repr__(self) -> str:
        from mechir.display import short_list

        n, width = self.clean.input_ids.shape
        changed = (self.clean.input_ids != self.corrupted.input_ids).sum(-1).tolist()
        return (
            f"AlignedPairs({n} pairs x {width} positions, pair_ids {short_list(self.pair_ids)}, "
            f"grades {short_list(self.grades)}, changed tokens {short_list(changed)}, "
            f"device={self.clean.device})"
        )

    @property
    def lengths(self) -> Int[Tensor, " pair"]:
        return self.clean.lengths

    def __getitem__(self, index: Any) -> AlignedPairs:
        """Select pairs (int, slice, list or tensor); padding is trimmed to the longest."""
        if isinstance(index, int):
            index = [index if index >= 0 else len(self) + index]
        picked = range(len(self))[index] if isinstance(index, slice) else index
        picked = [int(i) for i in (picked.tolist() if isinstance(picked, Tensor) else picked)]
        return AlignedPairs(
            self.clean[picked],
            self.corrupted[picked],
            [self.pair_ids[i] for i in picked],
            [self.grades[i] for i in picked],
        )

    def to(self, device: torch.device | str) -> AlignedPairs:
        return AlignedPairs(
            self.clean.to(device), self.corrupted.to(device), self.pair_ids, self.grades
        )


# ---------------------------------------------------------------------- builder
@dataclass(frozen=True, eq=False)
class PairBuilder:
    """Builds aligned clean/corrupted pairs for one tokenizer.

    Args:
        tokenizer: the model's Hugging Face tokenizer (its pair layout is read from it).
        max_length: the model input length; documents are cut so that the perturbed span is kept.
        filler: the filler token (a string that is one token of the vocabulary, or a token id).
        stats: IDF statistics, needed by :meth:`tdc` and by ``choose="max_idf"/"min_idf"``.
        stopwords: query words never chosen as terms.
        choose: how :meth:`tfc1` picks the query term when none is given, among the query's
            content words (:meth:`candidate_terms`: terms the analyzer keeps that have a letter and
            at least two characters, are no stopwords and tokenize without [UNK]; so "1,000 mg"
            offers "mg", never "1" or "000"): ``"random"`` (seeded by ``seed`` and the pair id:
            reproducible), ``"first"`` (in query order), ``"max_idf"``, ``"min_idf"``.
        seed: seed of the ``"random"`` choice.
        n_special: tokens of a pair's input besides query and document (default: the
            tokenizer's pair layout; a prompt-based reranker's template, ``model.n_special``).
        tokenize: how a text becomes the token ids of the query or of the document,
            ``tokenize(text, field)`` (default: the tokenizer without special tokens; a decoder
            reranker's ``model.field_tokens``, which keeps the space that joins a field to its
            prompt).
    """

    tokenizer: Any
    max_length: int = 512
    filler: str | int = DEFAULT_FILLER
    stats: TermStatistics | None = None
    stopwords: frozenset[str] = STOPWORDS
    choose: TermChoice = "random"
    seed: int = 0
    n_special: int | None = None
    tokenize: Callable[[str, Literal["query", "document"]], list[int]] | None = None

    # ------------------------------------------------------------ helpers
    def _tokens(self, text: str, field: Literal["query", "document"] = "document") -> list[int]:
        if self.tokenize is not None:
            return list(self.tokenize(text, field))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def filler_id(self) -> int:
        if isinstance(self.filler, int):
            return self.filler
        ids = self._tokens(self.filler)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(
                f"filler {self.filler!r} is not a single known token of this tokenizer "
                f"(it tokenizes to {ids}); pass another filler word or a token id"
            )
        return ids[0]

    def _query(self, query: str, pair_id: str) -> list[int]:
        q = self._tokens(query, "query")
        if not q:
            raise ValueError(f"pair {pair_id!r}: the query is empty")
        if self._room(q) < 1:
            raise ValueError(
                f"pair {pair_id!r}: the query has {len(q)} tokens, leaving no room for the "
                f"document within max_length={self.max_length}"
            )
        return q

    def _room(self, q: list[int]) -> int:
        """Document tokens that fit next to query ``q`` and the pair's special tokens."""
        special = self.n_special
        if special is None:
            special = pair_layout_of(self.tokenizer).n_special
        return self.max_length - special - len(q)

    def candidate_terms(self, query: str) -> list[str]:
        """The query's content words, the terms TFC1/TDC are about: distinct terms of the analyzer
        (query order) with a letter and at least two characters (no numbers, number fragments
        like "000" of "1,000", or stray letters), that are no stopwords and tokenize without
        [UNK]."""
        analyzer = self.stats.analyzer if self.stats is not None else default_analyzer
        out: list[str] = []
        for term in analyzer(query):
            if term in self.stopwords or term in out or not is_content_word(term):
                continue
            ids = self._tokens(term)
            if ids and self.tokenizer.unk_token_id not in ids:
                out.append(term)
        return out

    def _need_stats(self, what: str) -> TermStatistics:
        if self.stats is None:
            raise ValueError(
                f"{what} needs IDF statistics: pass stats=TermStatistics.from_documents(docs) "
                "to the PairBuilder"
            )
        return self.stats

    def choose_term(self, query: str, pair_id: str = "0", how: TermChoice | None = None) -> str:
        """The query term that :meth:`tfc1` appends (see ``choose``)."""
        how = how or self.choose
        terms = self.candidate_terms(query)
        if not terms:
            raise ValueError(
                f"pair {pair_id!r}: the query {query!r} has no usable term (all are stopwords or "
                "unknown to the tokenizer)"
            )
        if how == "first":
            return terms[0]
        if how == "random":
            return random.Random(f"{self.seed}:{pair_id}").choice(terms)
        if how in ("max_idf", "min_idf"):
            stats = self._need_stats(f"choose={how!r}")
            key = lambda t: (stats(t), t)  # noqa: E731  (ties broken by the term, deterministic)
            return max(terms, key=key) if how == "max_idf" else min(terms, key=key)
        raise ValueError(
            f"unknown term choice {how!r}: use 'random', 'first', 'max_idf', 'min_idf'"
        )

    def _insert(
        self,
        q: list[int],
        doc: list[int],
        clean_span: list[int],
        corrupted_span: list[int],
        position: Position,
        pair_id: str,
    ) -> tuple[list[int], list[int], int]:
        """Insert two spans (padded to one length with fillers) at a document position."""
        width = max(len(clean_span), len(corrupted_span))
        filler = self.filler_id
        clean_span = clean_span + [filler] * (width - len(clean_span))
        corrupted_span = corrupted_span + [filler] * (width - len(corrupted_span))
        room = self._room(q)
        if width > room:
            raise ValueError(
                f"pair {pair_id!r}: the inserted span has {width} tokens but only {room} document "
                f"tokens fit max_length={self.max_length}"
            )
        if position == "end":
            doc = doc[: room - width]
            at = len(doc)
        elif position == "start":
            at = 0
        elif isinstance(position, int) and not isinstance(position, bool):
            if not 0 <= position <= len(doc):
                raise ValueError(
                    f"pair {pair_id!r}: insertion position {position} is outside the document "
                    f"(0-{len(doc)} tokens)"
                )
            if position < len(doc) and self._continues_word(doc[position]):
                raise ValueError(
                    f"pair {pair_id!r}: insertion position {position} falls inside a word "
                    "(the token there is a '##' continuation); choose a word boundary"
                )
            if position + width > room:
                raise ValueError(
                    f"pair {pair_id!r}: a span inserted at position {position} would be cut off "
                    f"by max_length={self.max_length} (document room {room} tokens)"
                )
            at = position
        else:
            raise ValueError(f"position must be 'start', 'end' or a token index, got {position!r}")
        clean = (doc[:at] + clean_span + doc[at:])[:room]
        corrupted = (doc[:at] + corrupted_span + doc[at:])[:room]
        return clean, corrupted, at

    def _continues_word(self, token_id: int) -> bool:
        tok = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return isinstance(tok, str) and tok.startswith("##")

    def _doc(self, document: str, pair_id: str) -> list[int]:
        d = self._tokens(document)
        if not d:
            raise ValueError(f"pair {pair_id!r}: the document is empty")
        return d

    # ------------------------------------------------------------ perturbations
    def tfc1(
        self,
        query: str,
        document: str,
        *,
        term: str | None = None,
        position: Position = "end",
        pair_id: str = "0",
        grade: int | None = None,
    ) -> PerturbedPair:
        """TFC1: clean = document + a query term; corrupted = document + as many fillers."""
        q = self._query(query, pair_id)
        term = term if term is not None else self.choose_term(query, pair_id)
        span = self._tokens(term)
        if not span:
            raise ValueError(f"pair {pair_id!r}: the term {term!r} has no tokens")
        clean, corrupted, at = self._insert(
            q, self._doc(document, pair_id), span, [], position, pair_id
        )
        info = {"term": term, "position": at, "n_tokens": len(span)}
        return PerturbedPair(pair_id, tuple(q), tuple(clean), tuple(corrupted), grade, "tfc1", info)

    def tdc(
        self,
        query: str,
        document: str,
        *,
        position: Position = "end",
        pair_id: str = "0",
        grade: int | None = None,
    ) -> PerturbedPair:
        """TDC: clean = document + highest-IDF query term; corrupted = + lowest-IDF query term."""
        stats = self._need_stats("TDC")
        q = self._query(query, pair_id)
        terms = self.candidate_terms(query)
        hi = max(terms, key=lambda t: (stats(t), t), default=None)
        lo = min(terms, key=lambda t: (stats(t), t), default=None)
        if hi is None or lo is None or stats(hi) == stats(lo):
            idfs = [round(stats(t), 4) for t in terms]
            raise ValueError(
                f"pair {pair_id!r}: TDC needs two query terms of different IDF, but the query "
                f"{query!r} has usable terms {terms} with IDFs {idfs}"
            )
        clean, corrupted, at = self._insert(
            q, self._doc(document, pair_id), self._tokens(hi), self._tokens(lo), position, pair_id
        )
        info = {"term": hi, "corrupted_term": lo, "idf": stats(hi), "corrupted_idf": stats(lo)}
        info["position"] = at
        return PerturbedPair(pair_id, tuple(q), tuple(clean), tuple(corrupted), grade, "tdc", info)

    def inject(
        self,
        query: str,
        document: str,
        term: str,
        *,
        position: Position,
        pair_id: str = "0",
        grade: int | None = None,
    ) -> PerturbedPair:
        """Query-term injection: the term at a document token position vs fillers there."""
        q = self._query(query, pair_id)
        span = self._tokens(term)
        if not span:
            raise ValueError(f"pair {pair_id!r}: the term {term!r} has no tokens")
        clean, corrupted, at = self._insert(
            q, self._doc(document, pair_id), span, [], position, pair_id
        )
        info = {"term": term, "position": at, "n_tokens": len(span)}
        return PerturbedPair(
            pair_id, tuple(q), tuple(clean), tuple(corrupted), grade, "inject", info
        )

    def swap(
        self,
        query: str,
        document: str,
        other_document: str,
        *,
        align: Literal["strict", "truncate"] = "strict",
        pair_id: str = "0",
        grade: int | None = None,
    ) -> PerturbedPair:
        """Document swap: clean = ``document``, corrupted = ``other_document``.

        ``align="strict"`` requires equal token lengths; ``"truncate"`` cuts both to the shorter.
        """
        q = self._query(query, pair_id)
        room = self._room(q)
        clean = self._doc(document, pair_id)[:room]
        corrupted = self._doc(other_document, pair_id)[:room]
        if len(clean) != len(corrupted):
            if align != "truncate":
                raise ValueError(
                    f"pair {pair_id!r} cannot be aligned: the documents have {len(clean)} and "
                    f"{len(corrupted)} tokens (within max_length={self.max_length}); pass "
                    "align='truncate' to cut both to the shorter"
                )
            n = min(len(clean), len(corrupted))
            clean, corrupted = clean[:n], corrupted[:n]
        return PerturbedPair(pair_id, tuple(q), tuple(clean), tuple(corrupted), grade, "swap", {})

    def custom(
        self,
        query: str,
        document: str,
        fn: Callable[[str, str], tuple[str, str]],
        *,
        align: Literal["strict", "pad"] = "pad",
        pair_id: str = "0",
        grade: int | None = None,
    ) -> PerturbedPair:
        """A user perturbation ``fn(query, document) -> (clean_doc, corrupted_doc)`` on texts.

        The two documents are tokenized; with ``align="pad"`` the span where they differ (after
        their common prefix and suffix) is padded with fillers on the shorter side; with
        ``"strict"`` they must already have the same number of tokens.
        """
        q = self._query(query, pair_id)
        clean_text, corrupted_text = fn(query, document)
        clean = self._doc(clean_text, pair_id)
        corrupted = self._doc(corrupted_text, pair_id)
        if len(clean) != len(corrupted):
            if align != "pad":
                raise ValueError(
                    f"pair {pair_id!r} cannot be aligned: the clean document has {len(clean)} "
                    f"tokens and the corrupted one {len(corrupted)}; pass align='pad' to pad the "
                    "differing span with fillers, or make the perturbation length-preserving"
                )
            clean, corrupted = pad_differing_span(clean, corrupted, self.filler_id)
        room = self._room(q)
        if clean != corrupted and clean[:room] == corrupted[:room]:
            raise ValueError(
                f"pair {pair_id!r} cannot be aligned within max_length={self.max_length}: the "
                f"documents differ only after token {room}, which is cut off"
            )
        return PerturbedPair(
            pair_id, tuple(q), tuple(clean[:room]), tuple(corrupted[:room]), grade, "custom", {}
        )

    # ------------------------------------------------------------ collections
    def build(
        self,
        items: Iterable[Any],
        perturbation: str | Callable[[str, str], tuple[str, str]],
        *,
        qrels: Mapping[str, Mapping[str, int]] | None = None,
        errors: Literal["raise", "skip"] = "raise",
        **kwargs: Any,
    ) -> BuiltPairs:
        """Apply one perturbation to many pairs.

        Args:
            items: ``Pair``-like objects (``qid``, ``docid``, ``query``, ``document``, e.g. from
                ``collection.candidates()``) or ``(pair_id, query, document)`` tuples.
            perturbation: ``"tfc1"``, ``"tdc"``, ``"inject"``, or a custom text function.
            qrels: relevance judgments; a pair's grade is ``qrels[qid][docid]`` (0 if unjudged).
            errors: ``"raise"`` on the first pair that cannot be built, or ``"skip"`` it and
                record why in :attr:`BuiltPairs.skipped`.
            kwargs: passed to the perturbation method (e.g. ``position``, ``term``).
        """
        methods = {"tfc1": self.tfc1, "tdc": self.tdc, "inject": self.inject}
        if callable(perturbation):
            method: Callable[..., PerturbedPair] = lambda q, d, **kw: self.custom(  # noqa: E731
                q, d, perturbation, **kw
            )
        elif perturbation in methods:
            method = methods[perturbation]
        else:
            raise ValueError(
                f"unknown perturbation {perturbation!r}: use {sorted(methods)} or a function "
                "(query, doc) -> (clean_doc, corrupted_doc)"
            )
        out = BuiltPairs([], {})
        for item in items:
            if hasattr(item, "query"):
                qid, docid = str(item.qid), str(item.docid)
                pair_id, query, document = f"{qid}:{docid}", item.query, item.document
            else:
                pair_id, query, document = item
                qid = docid = None
            grade = None
            if qrels is not None and qid is not None:
                grade = int(qrels.get(qid, {}).get(docid, 0))
            try:
                out.pairs.append(
                    method(query, document, pair_id=str(pair_id), grade=grade, **kwargs)
                )
            except ValueError as err:
                if errors == "raise":
                    raise
                out.skipped[str(pair_id)] = str(err)
        return out


@dataclass(repr=False)
class BuiltPairs:
    """Pairs built by :meth:`PairBuilder.build`, and the ones skipped with the reason."""

    pairs: list[PerturbedPair]
    skipped: dict[str, str]

    def batch(self, tokenizer: Any, *, model: HookedReranker | None = None) -> AlignedPairs:
        return AlignedPairs.from_pairs(self.pairs, tokenizer, model=model)


def pad_differing_span(
    a: Sequence[int], b: Sequence[int], filler: int
) -> tuple[list[int], list[int]]:
    """Equalize two token lists differing in one span.

    With ``a = P + X + S`` and ``b = P + Y + S`` (``P`` their longest common prefix, ``S`` the
    longest common suffix of the rest), the shorter of ``X``/``Y`` is padded with ``filler`` at
    its end, so every token of ``P`` and ``S`` keeps a common position.
    """
    a, b = list(a), list(b)
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[len(a) - 1 - s] == b[len(b) - 1 - s]:
        s += 1
    xa, xb = a[p : len(a) - s], b[p : len(b) - s]
    width = max(len(xa), len(xb))
    xa += [filler] * (width - len(xa))
    xb += [filler] * (width - len(xb))
    return a[:p] + xa + a[len(a) - s :], b[:p] + xb + b[len(b) - s :]


__all__ = [
    "DEFAULT_FILLER",
    "STOPWORDS",
    "AlignedPairs",
    "BuiltPairs",
    "PairBuilder",
    "PerturbedPair",
    "TermStatistics",
    "default_analyzer",
    "is_content_word",
    "pad_differing_span",
]


BuiltPairs.__repr__ = fields_repr  # type: ignore[method-assign]
