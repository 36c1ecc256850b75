"""Axiomatic diagnostic datasets: document pairs built so that an IR axiom says which document
must score higher, from any collection and first-stage run.

The axioms are those of Fang, Tao & Zhai, "A Formal Study of Information Retrieval Heuristics"
(SIGIR 2004; STMC1 from Fang & Zhai, "Semantic Term Matching in Axiomatic Approaches to IR",
SIGIR 2006), turned into diagnostic datasets for neural rankers as in Câmara & Hauff,
"Diagnosing BERT with Retrieval Heuristics" (ECIR 2020). Every instance starts from a real
(query, candidate document) pair; the query is kept whole (not reduced to one term, as the
axioms' single-term statement would have it; Câmara & Hauff do the same), and the documents are
built at the token level:

| axiom | higher | lower | the axiom says |
| --- | --- | --- | --- |
| TFC1 | ``d + w`` | ``d + f`` | ``s(higher) > s(lower)`` |
| TFC2 | ``d + w w`` | ``d + w f``, base ``d + f f`` | ``s(hi) - s(lo) < s(lo) - s(base)`` |
| STMC1 | ``d + t_rel`` | ``d + t_unrel`` | ``s(higher) > s(lower)`` |
| LNC1 | ``d`` | ``d + t`` | ``s(higher) >= s(lower)`` |
| LNC2 | ``d' d'`` | ``d'`` | ``s(higher) >= s(lower)`` |

``d`` is the candidate document, ``w`` a query term (:meth:`PairBuilder.choose_term`), ``f``
filler tokens of ``w``'s length, ``t_rel`` / ``t_unrel`` terms semantically related / unrelated to
``w`` (below), ``t`` a term of the document that is no query term (seeded choice), ``d'`` the
document cut at a word boundary so that its copies fit. TFC2 says each extra occurrence adds
less than the one before.

TFC1, TFC2 and STMC1 documents have equal lengths (token by token aligned, so they can be
patched: :meth:`AxiomPair.perturbed`); LNC1 and LNC2 change the length and are scored only.

**Semantically related terms, offline** (:class:`EmbeddingNeighbours`): the model's own token
embeddings ``W_E``. The related term ``t_rel`` of ``w`` is the candidate term with the largest
cosine between its token embedding and ``w``'s (the mean of ``w``'s token embeddings, each unit
length); candidates are whole words (terms that tokenize to exactly one token, by default the
collection's terms), excluding ``w`` itself, words that contain ``w`` or that ``w`` contains
(inflections and subwords: "cell"/"cells"), the query's terms and stopwords. The unrelated term
``t_unrel`` is taken among the less similar half of the candidates (cosine below the median),
as the one whose IDF is closest to ``t_rel``'s (so the pair differs in similarity, not in
rarity); without IDF statistics, the one with the median-most cosine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch, cross_encoder_batch_from_tokens, pair_layout_of
from patching.perturbations import (
    STOPWORDS,
    AlignedPairs,
    PairBuilder,
    PerturbedPair,
    TermStatistics,
    default_analyzer,
    is_content_word,
)

#: The axioms of the diagnostic datasets, in the order of the tables.
AXIOMS: tuple[str, ...] = ("TFC1", "TFC2", "STMC1", "LNC1", "LNC2")
#: Axioms whose documents are aligned token by token (they can be patched).
ALIGNED_AXIOMS: tuple[str, ...] = ("TFC1", "TFC2", "STMC1")
#: What each axiom says, for tables.
STATEMENTS: dict[str, str] = {
    "TFC1": "one more query-term occurrence scores higher",
    "TFC2": "the second occurrence adds less than the first",
    "STMC1": "a term related to a query term beats an unrelated one",
    "LNC1": "adding a non-query term does not raise the score",
    "LNC2": "repeating the document does not lower the score",
}

__all__ = [
    "ALIGNED_AXIOMS",
    "AXIOMS",
    "STATEMENTS",
    "AxiomBuilder",
    "AxiomPair",
    "DiagnosticSet",
    "EmbeddingNeighbours",
    "agreement",
    "axiom_scores",
    "check_axiom",
]


def check_axiom(axiom: str) -> str:
    """``axiom`` upper-cased, checked against :data:`AXIOMS`."""
    name = str(axiom).upper()
    if name not in AXIOMS:
        raise ValueError(f"unknown axiom {axiom!r}: choose among {', '.join(AXIOMS)}")
    return name


# ---------------------------------------------------------------------- instances
@dataclass(frozen=True)
class AxiomPair:
    """One diagnostic instance: a query and the documents the axiom orders (token ids, no
    special tokens).

    Attributes:
        axiom: ``"TFC1"``, ...
        higher_ids: the document the axiom says must score higher (LNC: not lower).
        lower_ids: the other one.
        base_ids: TFC2 only: the document without the term (the axiom compares the gains
            ``s(lower) - s(base)`` and ``s(higher) - s(lower)``).
        info: how it was built (terms, cosines, IDFs, positions).
    """

    axiom: str
    pair_id: str
    query_ids: tuple[int, ...]
    higher_ids: tuple[int, ...]
    lower_ids: tuple[int, ...]
    base_ids: tuple[int, ...] | None = None
    grade: int | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def aligned(self) -> bool:
        """Whether the documents align token by token (same length), so they can be patched."""
        return len(self.higher_ids) == len(self.lower_ids)

    def perturbed(self) -> PerturbedPair:
        """The pair for activation patching: clean = higher, corrupted = lower (TFC2: the second
        occurrence against the first)."""
        if not self.aligned:
            raise ValueError(
                f"pair {self.pair_id!r}: {self.axiom} documents differ in length "
                f"({len(self.higher_ids)} and {len(self.lower_ids)} tokens) and cannot be "
                f"patched; patch one of {', '.join(ALIGNED_AXIOMS)}"
            )
        return PerturbedPair(
            self.pair_id,
            self.query_ids,
            self.higher_ids,
            self.lower_ids,
            self.grade,
            self.axiom.lower(),
            dict(self.info),
        )


@dataclass
class DiagnosticSet:
    """The instances of one axiom built from a collection, and the candidates skipped (why)."""

    axiom: str
    pairs: list[AxiomPair]
    skipped: dict[str, str]

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"DiagnosticSet({self.axiom}: {len(self.pairs)} pairs, {len(self.skipped)} skipped)"

    def batches(
        self, tokenizer: Any
    ) -> tuple[CrossEncoderBatch, CrossEncoderBatch, CrossEncoderBatch | None]:
        """``(higher, lower, base)`` batches with the tokenizer's special tokens (``base`` only
        for TFC2); they need not align."""
        if not self.pairs:
            raise ValueError(f"no {self.axiom} pairs to batch")
        queries = [p.query_ids for p in self.pairs]

        def batch(docs: list[tuple[int, ...]]) -> CrossEncoderBatch:
            layout = pair_layout_of(tokenizer)
            width = max(len(q) + len(d) for q, d in zip(queries, docs)) + layout.n_special
            return cross_encoder_batch_from_tokens(
                queries,
                docs,
                cls_token_id=tokenizer.cls_token_id,
                sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id,
                max_length=width,
                layout=layout,
            ).with_pair_ids(tuple(p.pair_id for p in self.pairs))

        higher = batch([p.higher_ids for p in self.pairs])
        lower = batch([p.lower_ids for p in self.pairs])
        base = None
        if all(p.base_ids is not None for p in self.pairs):
            base = batch([p.base_ids for p in self.pairs])  # type: ignore[misc]
        return higher, lower, base

    def aligned(self, tokenizer: Any) -> AlignedPairs:
        """Clean (higher) / corrupted (lower) pairs for patching (aligned axioms only)."""
        if not self.pairs:
            raise ValueError(f"no {self.axiom} pairs to patch")
        return AlignedPairs.from_pairs([p.perturbed() for p in self.pairs], tokenizer)


# ---------------------------------------------------------------------- related terms
@dataclass(frozen=True, eq=False)
class EmbeddingNeighbours:
    """Semantically related and unrelated terms from a model's own token embeddings (module
    docstring).

    Args:
        embeddings: the token embedding matrix ``W_E`` ``[d_vocab, d]`` (e.g.
            ``model.embed.embed.W_E``).
        tokenizer: the model's tokenizer.
        vocabulary: candidate terms (e.g. the collection's: ``stats.idf``'s keys); only those
            that tokenize to exactly one token are kept. Default: the tokenizer's vocabulary.
        stats: IDF statistics, to match the unrelated term's IDF to the related one's.
        stopwords: never candidates.
    """

    embeddings: Float[Tensor, "d_vocab d_embed"]
    tokenizer: Any
    vocabulary: Sequence[str] | None = None
    stats: TermStatistics | None = None
    stopwords: frozenset[str] = STOPWORDS

    def __post_init__(self) -> None:
        terms, ids = self._candidates()
        if len(terms) < 2:
            raise ValueError(
                f"only {len(terms)} candidate terms for related-term search: pass a vocabulary "
                "of whole words that the tokenizer keeps as single tokens"
            )
        unit = torch.nn.functional.normalize(self.embeddings.detach().float().cpu(), dim=-1)
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "candidate_unit", unit[torch.tensor(ids)])

    def _candidates(self) -> tuple[list[str], list[int]]:
        tok = self.tokenizer
        if self.vocabulary is not None:
            words = sorted(set(self.vocabulary))
        else:
            words = sorted({tok.convert_tokens_to_string([t]).strip() for t in tok.get_vocab()})
        words = [
            w for w in words if w.isalpha() and len(w) >= 3 and w.lower() not in self.stopwords
        ]
        encoded = tok(words, add_special_tokens=False)["input_ids"] if words else []
        special = set(tok.all_special_ids)
        terms, ids = [], []
        for w, toks in zip(words, encoded):
            if len(toks) == 1 and toks[0] not in special and toks[0] != tok.unk_token_id:
                if toks[0] < self.embeddings.shape[0]:
                    terms.append(w)
                    ids.append(toks[0])
        return terms, ids

    def similarities(self, term: str) -> Float[Tensor, " n_candidates"]:
        """Cosine of every candidate's embedding with ``term``'s (mean of its unit token
        embeddings)."""
        ids = self.tokenizer(term, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"term {term!r} has no tokens")
        vector = self.unit[torch.tensor(ids)].mean(0)
        vector = vector / vector.norm().clamp_min(1e-12)
        return self.candidate_unit @ vector

    def _allowed(self, term: str, exclude: Iterable[str]) -> torch.Tensor:
        banned = {term.lower(), *(e.lower() for e in exclude)}
        low = term.lower()
        return torch.tensor(
            [
                t.lower() not in banned and low not in t.lower() and t.lower() not in low
                for t in self.terms
            ]
        )

    def pair(self, term: str, exclude: Iterable[str] = ()) -> tuple[str, float, str, float]:
        """``(related, cosine, unrelated, cosine)`` for ``term`` (module docstring), never one
        of ``exclude`` (e.g. the query's terms).

        Raises:
            ValueError: fewer than two allowed candidates.
        """
        sims = self.similarities(term)
        allowed = self._allowed(term, exclude)
        if int(allowed.sum()) < 2:
            raise ValueError(f"no related/unrelated candidates left for term {term!r}")
        masked = torch.where(allowed, sims, torch.tensor(-math.inf))
        best = int(masked.argmax())
        median = sims[allowed].median()
        low = (allowed & (sims < median)).nonzero().flatten()
        if len(low) == 0:
            low = (allowed & (torch.arange(len(sims)) != best)).nonzero().flatten()
        if self.stats is not None:
            target = self.stats(self.terms[best])
            gaps = torch.tensor([abs(self.stats(self.terms[i]) - target) for i in low.tolist()])
            key = torch.stack([gaps, -sims[low].double()])  # ties: the least similar
            order = sorted(range(len(low)), key=lambda j: (float(key[0, j]), float(key[1, j])))
            other = int(low[order[0]])
        else:
            other = int(low[(sims[low] - median).abs().argmin()])
        return self.terms[best], float(sims[best]), self.terms[other], float(sims[other])


# ---------------------------------------------------------------------- builder
@dataclass(frozen=True, eq=False)
class AxiomBuilder:
    """Builds the diagnostic instances of every axiom (module docstring) for one tokenizer.

    Args:
        pairs: the :class:`~patching.perturbations.PairBuilder` giving the tokenizer, the length
            limit, the filler, the IDF statistics and the choice of the query term ``w``.
        neighbours: related terms for STMC1.
        copies: LNC2: how many times the document is repeated (>= 2).
        position: where TFC1/TFC2/STMC1/LNC1 put the term: ``"end"`` or ``"start"``.
    """

    pairs: PairBuilder
    neighbours: EmbeddingNeighbours | None = None
    copies: int = 2
    position: Literal["start", "end"] = "end"

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 2:
            raise ValueError(
                f"copies must be an int >= 2 (LNC2 repeats the document), got {self.copies!r}"
            )
        if self.position not in ("start", "end"):
            raise ValueError(f"position must be 'start' or 'end', got {self.position!r}")

    @property
    def tokenizer(self) -> Any:
        return self.pairs.tokenizer

    def _pair(self, axiom: str, pid: str, q: list[int], hi: list[int], lo: list[int], **kw: Any):
        base = kw.pop("base", None)
        grade = kw.pop("grade", None)
        return AxiomPair(
            axiom, pid, tuple(q), tuple(hi), tuple(lo),
            None if base is None else tuple(base), grade, kw,
        )  # fmt: skip

    def tfc1(self, query: str, document: str, *, pair_id: str = "0", grade: int | None = None):
        """TFC1: ``d + w`` (higher) against ``d + fillers`` (lower)."""
        p = self.pairs.tfc1(query, document, position=self.position, pair_id=pair_id, grade=grade)
        return AxiomPair(
            "TFC1", pair_id, p.query_ids, p.clean_ids, p.corrupted_ids, None, grade, dict(p.info)
        )

    def tfc2(self, query: str, document: str, *, pair_id: str = "0", grade: int | None = None):
        """TFC2: ``d + f f`` (base), ``d + w f`` (lower), ``d + w w`` (higher)."""
        b = self.pairs
        q = b._query(query, pair_id)
        term = b.choose_term(query, pair_id)
        span = b._tokens(term)
        filler = [b.filler_id] * len(span)
        doc = b._doc(document, pair_id)
        hi, base, at = b._insert(q, doc, span + span, [], self.position, pair_id)
        lo, _, _ = b._insert(q, doc, span + filler, [], self.position, pair_id)
        return self._pair(
            "TFC2", pair_id, q, hi, lo, base=base, grade=grade, term=term, position=at,
            n_tokens=len(span),
        )  # fmt: skip

    def stmc1(self, query: str, document: str, *, pair_id: str = "0", grade: int | None = None):
        """STMC1: ``d + t_rel`` (higher) against ``d + t_unrel`` (lower)."""
        if self.neighbours is None:
            raise ValueError(
                "STMC1 needs related terms: pass neighbours=EmbeddingNeighbours(model.embed.embed"
                ".W_E, tokenizer, ...) to the AxiomBuilder"
            )
        b = self.pairs
        q = b._query(query, pair_id)
        term = b.choose_term(query, pair_id)
        analyzer = b.stats.analyzer if b.stats is not None else default_analyzer
        related, cos_rel, unrelated, cos_unrel = self.neighbours.pair(term, analyzer(query))
        hi, lo, at = b._insert(
            q, b._doc(document, pair_id), b._tokens(related), b._tokens(unrelated),
            self.position, pair_id,
        )  # fmt: skip
        info = dict(term=term, related=related, unrelated=unrelated, position=at)
        info |= {"cos_related": cos_rel, "cos_unrelated": cos_unrel}
        if b.stats is not None:
            info |= {"idf_related": b.stats(related), "idf_unrelated": b.stats(unrelated)}
        return self._pair("STMC1", pair_id, q, hi, lo, grade=grade, **info)

    def lnc1(self, query: str, document: str, *, pair_id: str = "0", grade: int | None = None):
        """LNC1: ``d`` (higher) against ``d + t`` (lower), ``t`` a non-query term of ``d``
        (seeded choice per pair)."""
        b = self.pairs
        q = b._query(query, pair_id)
        analyzer = b.stats.analyzer if b.stats is not None else default_analyzer
        query_terms = set(analyzer(query))
        pool = sorted(
            {
                t
                for t in analyzer(document)
                if t not in query_terms and t not in b.stopwords and is_content_word(t)
            }
        )
        pool = [t for t in pool if b._tokens(t) and b.tokenizer.unk_token_id not in b._tokens(t)]
        if not pool:
            raise ValueError(f"pair {pair_id!r}: the document has no non-query content term")
        term = random.Random(f"{b.seed}:lnc1:{pair_id}").choice(pool)
        span = b._tokens(term)
        doc = b._doc(document, pair_id)
        lo, padded, at = b._insert(q, doc, span, [], self.position, pair_id)
        hi = _without(padded, at, len(span))  # the same document, without the term's fillers
        return self._pair("LNC1", pair_id, q, hi, lo, grade=grade, term=term, position=at)

    def lnc2(self, query: str, document: str, *, pair_id: str = "0", grade: int | None = None):
        """LNC2: ``d'`` (lower) against ``d'`` repeated ``copies`` times (higher), ``d'`` the
        document cut at a word boundary so that the copies fit ``max_length``."""
        b = self.pairs
        q = b._query(query, pair_id)
        doc = b._doc(document, pair_id)
        n = min(len(doc), b._room(q) // self.copies)
        while n > 0 and n < len(doc) and b._continues_word(doc[n]):
            n -= 1
        if n < 1:
            raise ValueError(
                f"pair {pair_id!r}: {self.copies} copies of the document do not fit "
                f"max_length={b.max_length}"
            )
        lo = doc[:n]
        return self._pair(
            "LNC2", pair_id, q, lo * self.copies, lo, grade=grade, copies=self.copies, n_tokens=n
        )

    def method(self, axiom: str) -> Callable[..., AxiomPair]:
        """The builder of one axiom's pairs (:data:`AXIOMS`)."""
        builders: dict[str, Callable[..., AxiomPair]] = {
            "TFC1": self.tfc1,
            "TFC2": self.tfc2,
            "STMC1": self.stmc1,
            "LNC1": self.lnc1,
            "LNC2": self.lnc2,
        }
        return builders[check_axiom(axiom)]

    def build(
        self,
        items: Iterable[Any],
        axiom: str,
        *,
        qrels: Mapping[str, Mapping[str, int]] | None = None,
        limit: int | None = None,
        errors: Literal["raise", "skip"] = "skip",
    ) -> DiagnosticSet:
        """Instances of ``axiom`` from ``items`` (``Pair``-like: ``qid, docid, query, document``,
        e.g. ``collection.candidates()``, or ``(pair_id, query, document)``), at most ``limit``;
        grades from ``qrels``. Candidates that cannot be built are skipped with the reason (or
        raise, with ``errors="raise"``)."""
        name = check_axiom(axiom)
        method = self.method(name)
        out = DiagnosticSet(name, [], {})
        for item in items:
            if limit is not None and len(out.pairs) >= limit:
                break
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
                out.pairs.append(method(query, document, pair_id=str(pair_id), grade=grade))
            except ValueError as err:
                if errors == "raise":
                    raise
                out.skipped[str(pair_id)] = str(err)
        return out


def _without(ids: list[int], at: int, width: int) -> list[int]:
    """``ids`` without the ``width`` tokens at ``at`` (the inserted span's fillers)."""
    return ids[:at] + ids[at + width :]


# ---------------------------------------------------------------------- scoring
def axiom_scores(
    model: HookedReranker,
    diagnostics: DiagnosticSet,
    *,
    batch_size: int | None = 32,
    hooks: Any = None,
) -> Any:
    """Scores of every instance's documents and whether the model agrees with the axiom.

    Returns:
        A DataFrame, one row per instance: ``pair_id, grade, higher, lower`` (scores), ``base``
        (TFC2; else NaN), ``gap`` (``higher - lower``; TFC2: ``(lower - base) - (higher -
        lower)``, the drop of the gain) and ``agrees`` (TFC1, STMC1, TFC2: ``gap > 0``; LNC1,
        LNC2: ``gap >= 0``).
    """
    import pandas as pd

    higher, lower, base = diagnostics.batches(model.tokenizer)
    with torch.no_grad():
        s_hi = model.score(higher, hooks=hooks, batch_size=batch_size).double()
        s_lo = model.score(lower, hooks=hooks, batch_size=batch_size).double()
        s_base = (
            model.score(base, hooks=hooks, batch_size=batch_size).double()
            if base is not None
            else torch.full_like(s_hi, math.nan)
        )
    if diagnostics.axiom == "TFC2":
        gap = (s_lo - s_base) - (s_hi - s_lo)
    else:
        gap = s_hi - s_lo
    strict = diagnostics.axiom in ("TFC1", "TFC2", "STMC1")
    agrees = gap > 0 if strict else gap >= 0
    return pd.DataFrame(
        {
            "pair_id": [p.pair_id for p in diagnostics.pairs],
            "grade": [p.grade for p in diagnostics.pairs],
            "higher": s_hi.numpy(),
            "lower": s_lo.numpy(),
            "base": s_base.numpy(),
            "gap": gap.numpy(),
            "agrees": agrees.numpy(),
        }
    )


def agreement(scores: Any, *, tie: float = 1e-6) -> dict[str, float]:
    """Summary of :func:`axiom_scores`: ``pairs``, ``agreement`` (share of instances where the
    model agrees with the axiom), ``ties`` (share with ``|gap| <= tie``), ``mean_gap`` and the
    share and the two-sided sign-test ``p`` against chance (1/2, ties dropped)."""
    from scipy.stats import binomtest

    gap = scores["gap"].to_numpy()
    n = len(gap)
    decided = abs(gap) > tie
    wins = int((gap[decided] > 0).sum())
    p = float(binomtest(wins, int(decided.sum()), 0.5).pvalue) if decided.any() else math.nan
    return {
        "pairs": n,
        "agreement": float(scores["agrees"].mean()) if n else math.nan,
        "ties": float((~decided).mean()) if n else math.nan,
        "mean_gap": float(gap.mean()) if n else math.nan,
        "sign_test_p": p,
    }
