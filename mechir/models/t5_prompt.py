"""MonoT5's prompt: the template around the query and the document, its answers, and the encoding
of pairs into a batch whose parts label every token (the part rule of every prompt-based
reranker: mechir.models.prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mechir.models.prompt import pad_token_id, pair_lists, token_parts
from mechir.parts import (
    CrossEncoderBatch,
    Part,
    check_max_length,
    padded_batch,
)

#: MonoT5's prompt (Nogueira et al. 2020); ``{query}`` and ``{document}`` are filled in.
DEFAULT_TEMPLATE = "Query: {query} Document: {document} Relevant:"
#: The relevant and the non-relevant answer: the score is ``logit(true) - logit(false)``.
DEFAULT_ANSWERS: tuple[str, str] = ("true", "false")
#: The input length MonoT5 was trained with (T5 has no position table to bound it).
DEFAULT_MAX_LENGTH = 512


# ---------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A template split around its slots: ``prefix {query} middle {document} suffix``."""

    template: str
    prefix: str
    middle: str
    suffix: str

    @classmethod
    def parse(cls, template: str, family: str = "MonoT5") -> Prompt:
        """Raises ``ValueError`` (one line) for a template without exactly one ``{query}`` before
        exactly one ``{document}``, or with ``{instruction}``."""
        if not isinstance(template, str):
            raise ValueError(f"template must be a string, got {type(template).__name__}")
        if "{instruction}" in template:
            raise ValueError(
                f"template {template!r}: {family} prompts have no {{instruction}} slot; write "
                "the words into the template"
            )
        counts = {slot: template.count(slot) for slot in ("{query}", "{document}")}
        if any(n != 1 for n in counts.values()):
            raise ValueError(
                f"template {template!r} must hold {{query}} and {{document}} once each (found "
                f"{counts['{query}']} and {counts['{document}']}), e.g. {DEFAULT_TEMPLATE!r}"
            )
        q, d = template.index("{query}"), template.index("{document}")
        if d < q:
            raise ValueError(
                f"template {template!r}: {{query}} must come before {{document}} (parts are "
                "prefix, query, middle, document, suffix)"
            )
        return cls(template, template[:q], template[q + 7 : d], template[d + 10 :])

    def text(self, query: str, document: str) -> tuple[str, tuple[int, int, int, int]]:
        """The prompt and the character spans ``(q0, q1, d0, d1)`` of query and document."""
        q0 = len(self.prefix)
        q1 = q0 + len(query)
        d0 = q1 + len(self.middle)
        return f"{self.prefix}{query}{self.middle}{document}{self.suffix}", (
            q0, q1, d0, d0 + len(document),
        )  # fmt: skip


def encode_prompts(
    tokenizer: Any,
    prompt: Prompt,
    queries: str | Sequence[str],
    documents: str | Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> CrossEncoderBatch:
    """Tokenize (query, document) pairs filled into ``prompt`` into a right-padded
    :class:`CrossEncoderBatch` whose parts label the template's tokens ``prefix`` / ``middle`` /
    ``suffix`` and the query and document tokens (see the module docstring).

    ``input_ids`` are ``tokenizer(prompt_text)["input_ids"]`` (with its special tokens, T5's final
    ``</s>``). A prompt longer than ``max_length`` has its document cut at a token boundary and is
    tokenized again, so the template's suffix is kept.

    Raises:
        ValueError: no pairs, lists of different lengths, an empty query or document, a slow
            tokenizer (offsets are needed), or a pair whose query and template leave no room
            for a document token, or without a query token; the message names the pair.
    """
    queries, documents = pair_lists(queries, documents)
    check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: MonoT5 needs a fast one (with "
            "offsets, tokenizer.json) to find the query and document tokens"
        )
    rows = [
        _encode_one(tokenizer, prompt, q, d, max_length, i)
        for i, (q, d) in enumerate(zip(queries, documents))
    ]
    return padded_batch(rows, pad_token_id=pad_token_id(tokenizer))


def _encode_one(
    tokenizer: Any, prompt: Prompt, query: str, document: str, max_length: int, i: int
) -> tuple[list[int], list[int]]:
    """One pair's ids and parts, its document cut until the prompt fits ``max_length``."""
    doc = document
    while True:
        text, spans = prompt.text(query, doc)
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        parts = token_parts(offsets, {"query": spans[:2], "document": spans[2:]})
        if int(Part.QUERY) not in parts:
            raise ValueError(
                f"pair {i}: no token of the query {query!r} in the prompt (the template's "
                "tokens absorb it); put a space between the template and {query}"
            )
        doc_tokens = [j for j, p in enumerate(parts) if p == int(Part.DOCUMENT)]
        excess = len(ids) - max_length
        if excess <= 0 and doc_tokens:
            return ids, parts
        if len(doc_tokens) <= max(excess, 0):
            raise ValueError(
                f"pair {i}: the query and the template take {len(ids) - len(doc_tokens)} tokens, "
                f"which leaves no room for the document within max_length={max_length}; raise "
                "max_length or shorten the query"
            )
        first_cut = doc_tokens[len(doc_tokens) - excess]
        cut = offsets[first_cut][0] - spans[2]
        shorter = doc[:cut].rstrip()
        doc = shorter if len(shorter) < len(doc) else doc[:-1]
