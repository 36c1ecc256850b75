"""What every prompt-based reranker (MonoT5, decoder LLM rerankers, any later one) shares: the
checks of the pairs it is given, the part of every token of a rendered prompt, and the padding id.

**The part rule** (:func:`token_parts`), one for every family: a rendered prompt is the template
with the fields (``query``, ``document``, optionally ``instruction``) filled in, and the character
span of each field is known. A token whose characters overlap a field's span belongs to that
field (the document first, then the query, then the instruction, for a token straddling two); a
token with no characters (a special token the tokenizer adds itself, T5's final ``</s>``)
belongs to the template gap of the token before it; any other token is template text: ``CLS``
(the prefix) when it starts before the query, ``SEP1`` (the middle) when it starts before the
document, else ``SEP2`` (the suffix).

**Padding** (:func:`pad_token_id`): the tokenizer's pad token, else its EOS token (decoder
tokenizers often have no pad token), else 0; the batch itself is assembled by
:func:`mechir.parts.padded_batch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mechir.parts import Part

#: A field's character span ``[start, end)`` in the rendered prompt.
Span = tuple[int, int]

#: The template gap that follows each part: where a character-less token after it goes.
_GAP = {
    Part.CLS: Part.CLS,
    Part.INSTRUCTION: Part.CLS,
    Part.QUERY: Part.SEP1,
    Part.SEP1: Part.SEP1,
    Part.DOCUMENT: Part.SEP2,
    Part.SEP2: Part.SEP2,
}


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


def token_parts(offsets: Sequence[tuple[int, int]], spans: Mapping[str, Span]) -> list[int]:
    """The part of every token of one rendered prompt (the rule in the module docstring).

    Args:
        offsets: each token's character span ``(start, end)`` (a fast tokenizer's
            ``offset_mapping``); ``end <= start`` for a token with no characters.
        spans: the character span of ``"query"`` and ``"document"``, and of ``"instruction"``
            when the prompt has one.
    """
    q0, d0 = spans["query"][0], spans["document"][0]
    fields = [(Part.DOCUMENT, spans["document"]), (Part.QUERY, spans["query"])]
    if "instruction" in spans and spans["instruction"][1] > spans["instruction"][0]:
        fields.append((Part.INSTRUCTION, spans["instruction"]))
    parts: list[Part] = []
    for start, end in offsets:
        if end <= start:
            parts.append(_GAP[parts[-1]] if parts else Part.CLS)
            continue
        part = next((p for p, (a, b) in fields if start < b and end > a), None)
        if part is None:
            part = Part.CLS if start < q0 else Part.SEP1 if start < d0 else Part.SEP2
        parts.append(part)
    return [int(p) for p in parts]


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a prompt batch: the pad token, else the EOS token, else 0."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


__all__ = ["Span", "pad_token_id", "pair_lists", "token_parts"]
