"""Input parts of a cross-encoder input and the batch that carries them.

A cross-encoder reads ``[CLS] query [SEP] document [SEP]`` (BERT, ELECTRA, DistilBERT) or
``<s> query </s></s> document </s>`` (RoBERTa, XLM-RoBERTa: both middle separators are
``SEP1``); a :class:`PairLayout` describes which. Every token belongs to exactly one
:class:`Part`; the segmentation is computed once, when the batch is built, and stored as integer
part ids ``[batch, pos]`` so that hooks never need to re-tokenize.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxtyping import Bool, Int

from mechir.lazy import lazy_import

torch = lazy_import("torch")


class Part(enum.IntEnum):
    """The five parts of ``[CLS] query [SEP] document [SEP]``, plus padding.

    Prompt-based rerankers (MonoT5, LLM rerankers) fill a template around the query and the
    document; their template tokens take the same three parts by position, under the names
    ``"prefix"`` (before the query: ``CLS``), ``"middle"`` (between query and document:
    ``SEP1``) and ``"suffix"`` (after the document: ``SEP2``), so every study reads the same five
    parts for every family. An LLM reranker's instruction is a sixth real part, ``INSTRUCTION``
    (after ``PAD``, so the ids of the five parts and of padding stay those of every family)."""

    CLS = 0
    QUERY = 1
    SEP1 = 2
    DOCUMENT = 3
    SEP2 = 4
    PAD = 5
    #: The instruction of an LLM reranker's prompt (``{instruction}``); no cross-encoder has
    #: one, so it is not among :data:`PARTS` (the five parts every family has).
    INSTRUCTION = 6


#: The five real parts, in input order (padding excluded).
PARTS: tuple[Part, ...] = (Part.CLS, Part.QUERY, Part.SEP1, Part.DOCUMENT, Part.SEP2)

_PART_NAMES = {p.name.lower(): p for p in Part}
_PART_NAMES.update({"q": Part.QUERY, "d": Part.DOCUMENT, "doc": Part.DOCUMENT})
#: Names of the template parts of prompt-based rerankers (see :class:`Part`).
_PART_NAMES.update({"prefix": Part.CLS, "middle": Part.SEP1, "suffix": Part.SEP2})

PartLike = Part | str | int


def parse_part(part: PartLike) -> Part:
    """Turn a :class:`Part`, its integer value or its (case-insensitive) name into a :class:`Part`.

    >>> parse_part("Query")
    <Part.QUERY: 1>
    """
    if isinstance(part, Part):
        return part
    if isinstance(part, str):
        key = part.strip().lower()
        if key in _PART_NAMES:
            return _PART_NAMES[key]
        valid = ", ".join(repr(name) for name in _PART_NAMES if len(name) > 1)
        raise ValueError(f"unknown part name {part!r}: valid names are {valid}")
    if isinstance(part, int) and not isinstance(part, bool) and part in Part._value2member_map_:
        return Part(part)
    raise ValueError(f"cannot interpret {part!r} as a part: use Part.*, an int 0-6 or a name")


def parse_parts(parts: PartLike | Iterable[PartLike]) -> tuple[Part, ...]:
    """Normalise one part or an iterable of parts into a de-duplicated tuple (input order kept)."""
    if isinstance(parts, (Part, str, int)):
        parts = [parts]
    out: list[Part] = []
    for p in parts:
        q = parse_part(p)
        if q not in out:
            out.append(q)
    if not out:
        raise ValueError("empty part selection: name at least one part")
    return tuple(out)


@dataclass(frozen=True)
class PairLayout:
    """How a tokenizer family joins a (query, document) pair.

    Attributes:
        middle_seps: separators between query and document: 1 (``[CLS] q [SEP] d [SEP]``) or 2
            (``<s> q </s></s> d </s>``); all of them are ``Part.SEP1``.
        token_types: whether the family uses token types (then 1 on the document and the last
            separator); families without them get all-zero ``token_type_ids``.
    """

    middle_seps: int = 1
    token_types: bool = True

    @property
    def n_special(self) -> int:
        """Special tokens added to a pair: CLS, the middle separators and the final one."""
        return self.middle_seps + 2


BERT_LAYOUT = PairLayout(middle_seps=1, token_types=True)
ROBERTA_LAYOUT = PairLayout(middle_seps=2, token_types=False)


def pair_layout_of(tokenizer: Any) -> PairLayout:
    """The :class:`PairLayout` a Hugging Face tokenizer uses for pairs.

    Read from the tokenizer itself: the number of special tokens it adds to a pair (3 or 4) and
    whether ``token_type_ids`` is one of its model inputs.

    Raises:
        ValueError: the tokenizer adds neither 3 nor 4 special tokens to a pair.
    """
    n = tokenizer.num_special_tokens_to_add(pair=True)
    if n not in (3, 4):
        raise ValueError(
            f"{type(tokenizer).__name__} adds {n} special tokens to a pair; mechir supports "
            "[CLS] q [SEP] d [SEP] (3) and <s> q </s></s> d </s> (4): pass layout=... or a "
            "tokenizer with a pair post-processor"
        )
    return PairLayout(
        middle_seps=n - 2, token_types="token_type_ids" in tokenizer.model_input_names
    )


@dataclass
class CrossEncoderBatch:
    """A right-padded batch of ``[CLS] query [SEP] document [SEP]`` inputs with per-token parts.

    Attributes:
        input_ids: token ids.
        token_type_ids: 0 for CLS, query and the first SEP; 1 for the document and the last SEP
            (all 0 for families without token types, see :class:`PairLayout`).
        attention_mask: 1 for real tokens, 0 for padding.
        parts: the :class:`Part` of every token (``Part.PAD`` on padding).
        pair_ids: optional identity of every example (e.g. ``"q1/d7"``), kept through indexing,
            sub-batches and devices. Patching hooks use it to find an example's cached source
            activations (clean and corrupted inputs of one pair share its id); without it they
            match examples by their token ids.
    """

    input_ids: Int[torch.Tensor, "batch pos"]
    token_type_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    parts: Int[torch.Tensor, "batch pos"]
    pair_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        shapes = {name: tuple(getattr(self, name).shape) for name in self.TENSORS}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
            raise ValueError(f"all batch tensors must share one [batch, pos] shape, got {shapes}")
        if self.pair_ids is not None:
            self.pair_ids = tuple(str(p) for p in self.pair_ids)
            if len(self.pair_ids) != len(self):
                raise ValueError(
                    f"{len(self.pair_ids)} pair ids for {len(self)} examples: give one per example"
                )

    #: The ``[batch, pos]`` tensors of a batch.
    TENSORS: ClassVar[tuple[str, ...]] = ("input_ids", "token_type_ids", "attention_mask", "parts")

    def with_pair_ids(self, pair_ids: Sequence[str]) -> CrossEncoderBatch:
        """The same batch with these pair ids (one per example)."""
        return CrossEncoderBatch(*(getattr(self, n) for n in self.TENSORS), tuple(pair_ids))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __repr__(self) -> str:
        from mechir.display import short_list

        n, width = self.input_ids.shape
        count = lambda part: short_list((self.parts == int(part)).sum(-1).tolist())  # noqa: E731
        return (
            f"CrossEncoderBatch({n} pairs x {width} positions, lengths "
            f"{short_list(self.lengths.tolist())}, query tokens {count(Part.QUERY)}, document "
            f"tokens {count(Part.DOCUMENT)}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def lengths(self) -> Int[torch.Tensor, " batch"]:
        """Number of real (non-padding) tokens of each example."""
        return self.attention_mask.sum(-1)

    def mask(self, parts: PartLike | Iterable[PartLike]) -> Bool[torch.Tensor, "batch pos"]:
        """Boolean mask of the tokens that belong to any of ``parts``."""
        ids = torch.tensor([int(p) for p in parse_parts(parts)], device=self.device)
        return torch.isin(self.parts, ids)

    @property
    def part_masks(self) -> Bool[torch.Tensor, "batch 5 pos"]:
        """One boolean mask per real part, stacked in :data:`PARTS` order."""
        return torch.stack([self.parts == int(p) for p in PARTS], dim=1)

    def to(self, device: torch.device | str) -> CrossEncoderBatch:
        tensors = (getattr(self, name).to(device) for name in self.TENSORS)
        return CrossEncoderBatch(*tensors, self.pair_ids)

    def __getitem__(self, index: Any) -> CrossEncoderBatch:
        """Select examples (int, slice, index list or tensor); columns that are padding in every
        selected example are trimmed (on the right, and on the left of a left-padded batch)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        selected = {name: getattr(self, name)[index] for name in self.TENSORS}
        real = selected["attention_mask"].bool().any(0).nonzero().flatten()
        start = int(real[0]) if len(real) else 0
        width = int(real[-1]) + 1 if len(real) else 0
        ids = None
        if self.pair_ids is not None:
            picked = index.cpu() if isinstance(index, torch.Tensor) else index
            rows = torch.arange(len(self))[picked]
            ids = tuple(self.pair_ids[i] for i in rows.reshape(-1).tolist())
        return CrossEncoderBatch(*(v[:, start:width] for v in selected.values()), ids)

    def chunks(self, size: int | None) -> Iterable[CrossEncoderBatch]:
        """Consecutive sub-batches of at most ``size`` examples (the whole batch for None)."""
        return consecutive_chunks(self, size)


def check_max_length(max_length: int, n_positions: int | None = None) -> int:
    """``max_length`` is an int with room for one query and one document token plus the three
    special tokens (``>= 5``) and, when the model's position limit ``n_positions`` is given,
    at most that.

    Raises:
        ValueError: naming the value and the valid range.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be an int, got {max_length!r}")
    upper = f" and <= {n_positions}" if n_positions is not None else ""
    if max_length < 5:
        raise ValueError(
            f"max_length={max_length} is too small: it must be >= 5 ([CLS] query [SEP] document "
            f"[SEP] with one query and one document token){upper}"
        )
    if n_positions is not None and max_length > n_positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's position limit: it has "
            f"{n_positions} positions, so use max_length <= {n_positions}"
        )
    return max_length


def cross_encoder_batch_from_tokens(
    query_ids: Sequence[Sequence[int]],
    document_ids: Sequence[Sequence[int]],
    *,
    cls_token_id: int,
    sep_token_id: int,
    pad_token_id: int,
    max_length: int = 512,
    layout: PairLayout = BERT_LAYOUT,
) -> CrossEncoderBatch:
    """Build a batch from already-tokenized queries and documents (no special tokens in them).

    Each example becomes ``[CLS] q [SEP] d [SEP]`` (or ``[CLS] q [SEP][SEP] d [SEP]`` with
    ``layout.middle_seps == 2``); only the document is truncated, so that the example fits
    ``max_length``. The special tokens are never dropped.

    Raises:
        ValueError: lists of different lengths, an empty query or document, or a query so long
            that not even one document token fits; the message names the pair index.
    """
    if len(query_ids) != len(document_ids):
        raise ValueError(
            f"got {len(query_ids)} queries but {len(document_ids)} documents: pass one document "
            "per query (repeat the query for several documents)"
        )
    if len(query_ids) == 0:
        raise ValueError("empty batch: pass at least one (query, document) pair")
    check_max_length(max_length)
    rows: list[tuple[list[int], list[int]]] = []
    for i, (q, d) in enumerate(zip(query_ids, document_ids)):
        q, d = list(q), list(d)
        if not q:
            raise ValueError(f"pair {i}: the query is empty")
        if not d:
            raise ValueError(f"pair {i}: the document is empty")
        room = max_length - layout.n_special - len(q)
        if room < 1:
            raise ValueError(
                f"pair {i}: the query has {len(q)} tokens, which leaves no room for the document "
                f"within max_length={max_length} (query + document + {layout.n_special} special "
                "tokens); "
                "raise max_length or shorten the query"
            )
        rows.append((q, d[:room]))
    width = max(len(q) + len(d) + layout.n_special for q, d in rows)
    seps = layout.middle_seps
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    parts = torch.full((n, width), int(Part.PAD), dtype=torch.long)
    for i, (q, d) in enumerate(rows):
        lq, ld = len(q), len(d)
        ids = [cls_token_id, *q, *[sep_token_id] * seps, *d, sep_token_id]
        length = len(ids)
        input_ids[i, :length] = torch.tensor(ids)
        if layout.token_types:
            token_type_ids[i, lq + 1 + seps : length] = 1
        attention_mask[i, :length] = 1
        parts[i, 0] = int(Part.CLS)
        parts[i, 1 : 1 + lq] = int(Part.QUERY)
        parts[i, 1 + lq : 1 + lq + seps] = int(Part.SEP1)
        parts[i, 1 + lq + seps : 1 + lq + seps + ld] = int(Part.DOCUMENT)
        parts[i, length - 1] = int(Part.SEP2)
    return CrossEncoderBatch(input_ids, token_type_ids, attention_mask, parts)


def padded_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token_id: int,
    padding_side: str = "right",
) -> CrossEncoderBatch:
    """``(ids, parts)`` rows of different lengths padded on ``padding_side`` (``"right"`` or
    ``"left"``) into one batch (token types all 0: the prompt-based rerankers')."""
    width = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    parts = torch.full((n, width), int(Part.PAD), dtype=torch.long)
    for i, (ids, row_parts) in enumerate(rows):
        at = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, at] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, at] = 1
        parts[i, at] = torch.tensor(list(row_parts), dtype=torch.long)
    return CrossEncoderBatch(input_ids, torch.zeros_like(input_ids), attention_mask, parts)


def prompt_batch_from_tokens(
    pieces: Sequence[tuple[Sequence[int], Part]],
    query_ids: Sequence[Sequence[int]],
    document_ids: Sequence[Sequence[int]],
    *,
    max_length: int,
    pad_token_id: int,
    padding_side: str = "right",
) -> CrossEncoderBatch:
    """A prompt-based reranker's batch from already-tokenized queries and documents: what
    :func:`cross_encoder_batch_from_tokens` is for ``[CLS] q [SEP] d [SEP]``.

    ``pieces`` is the prompt in reading order, ``(ids, part)`` each, with one piece of part
    QUERY and one of part DOCUMENT (their ids unused) where the query and the document go; each
    document is cut so that its row fits ``max_length``.

    Raises:
        ValueError: lists of different lengths, an empty query or document, or a query leaving
            no room for a document token; the message names the pair.
    """
    n_special = sum(len(ids) for ids, part in pieces if part not in (Part.QUERY, Part.DOCUMENT))
    if len(query_ids) != len(document_ids) or not query_ids:
        raise ValueError(
            f"got {len(query_ids)} queries and {len(document_ids)} documents: pass one "
            "document per query, at least one pair"
        )
    rows = []
    for i, (q, d) in enumerate(zip(query_ids, document_ids)):
        q, d = [int(x) for x in q], [int(x) for x in d]
        if not q or not d:
            raise ValueError(f"pair {i}: the {'query' if not q else 'document'} is empty")
        room = max_length - n_special - len(q)
        if room < 1:
            raise ValueError(
                f"pair {i}: the query has {len(q)} tokens, which leaves no room for the "
                f"document within max_length={max_length} (the prompt's template takes "
                f"{n_special}); raise max_length"
            )
        fields = {Part.QUERY: q, Part.DOCUMENT: d[:room]}
        ids: list[int] = []
        parts: list[int] = []
        for piece, part in pieces:
            piece = fields.get(part, piece)
            ids += piece
            parts += [int(part)] * len(piece)
        rows.append((ids, parts))
    return padded_batch(rows, pad_token_id=pad_token_id, padding_side=padding_side)


def infer_parts(
    input_ids: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    *,
    cls_token_id: int,
    sep_token_id: int,
) -> Int[torch.Tensor, "batch pos"]:
    """Part ids of already-built ``[CLS] q [SEP]+ d [SEP]`` inputs, from their special tokens.

    Position 0 is CLS; the tokens before the first separator are the query; that separator and
    any separators right after it are SEP1 (RoBERTa-style ``</s></s>``); the last real token is
    SEP2; everything between is the document; padding is PAD.

    Raises:
        ValueError: an example that does not start with CLS or has fewer than two separators.
    """
    parts = torch.full_like(input_ids, int(Part.PAD))
    for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        length = sum(mask)
        seps = [i for i in range(1, length) if ids[i] == sep_token_id]
        if length < 1 or ids[0] != cls_token_id or len(seps) < 2 or seps[-1] != length - 1:
            raise ValueError(
                f"example {b} is not '[CLS] query [SEP] document [SEP]' (CLS id {cls_token_id}, "
                f"SEP id {sep_token_id}); build it with encode()/model.encode()"
            )
        first = seps[0]
        doc_start = first + 1
        while doc_start < length - 1 and ids[doc_start] == sep_token_id:
            doc_start += 1
        row = [int(Part.CLS)] + [int(Part.QUERY)] * (first - 1)
        row += [int(Part.SEP1)] * (doc_start - first)
        row += [int(Part.DOCUMENT)] * (length - 1 - doc_start) + [int(Part.SEP2)]
        parts[b, :length] = torch.tensor(row)
    return parts


def pair_lists(
    queries: str | Sequence[str], documents: str | Sequence[str]
) -> tuple[list[str], list[str]]:
    """``queries`` and ``documents`` as two lists of the same length (a string is one pair).

    Raises:
        ValueError: lists of different lengths, no pairs, a query or document that is not a
            string or is empty (whitespace only); the message names the pair.
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    documents = [documents] if isinstance(documents, str) else list(documents)
    if len(queries) != len(documents):
        raise ValueError(
            f"got {len(queries)} queries but {len(documents)} documents: pass one document per "
            "query (repeat the query for several documents)"
        )
    if not queries:
        raise ValueError("empty batch: pass at least one (query, document) pair")
    for i, (q, d) in enumerate(zip(queries, documents)):
        for what, text in (("query", q), ("document", d)):
            if not isinstance(text, str):
                raise ValueError(f"pair {i}: the {what} is {type(text).__name__}, not a string")
            if not text.strip():
                raise ValueError(f"pair {i}: the {what} is empty or whitespace only")
    return queries, documents


def encode(
    tokenizer: Any,
    queries: str | Sequence[str],
    documents: str | Sequence[str],
    *,
    max_length: int = 512,
    layout: PairLayout | None = None,
) -> CrossEncoderBatch:
    """Tokenize (query, document) pairs into a :class:`CrossEncoderBatch`.

    Equivalent to ``tokenizer(queries, documents, truncation="only_second", padding=True,
    max_length=max_length)`` (query and document are tokenized separately, then joined), with
    the part of every token recorded. ``layout`` defaults to the tokenizer's own
    (:func:`pair_layout_of`).

    Raises:
        ValueError: no pairs, ``max_length < 5``, an empty or whitespace-only query/document,
            lists of different lengths, or a query that leaves no room for the document; the
            message names the pair index.
    """
    queries, documents = pair_lists(queries, documents)
    check_max_length(max_length)
    tok = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
    return cross_encoder_batch_from_tokens(
        tok(queries),
        tok(documents),
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=max_length,
        layout=pair_layout_of(tokenizer) if layout is None else layout,
    )


def consecutive_chunks(batch: Any, size: int | None) -> Iterator[Any]:
    """Consecutive slices ``batch[start : start + size]`` of any sliceable batch with a length
    (the whole batch for None or a size at least its length).

    Raises:
        ValueError: ``size`` below 1.
    """
    if size is None or size >= len(batch):
        yield batch
        return
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(batch), size):
        yield batch[start : start + size]
