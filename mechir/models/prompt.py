"""Prompts of prompt-based rerankers (MonoT5, decoder LLM rerankers, any later one): the template
and its rendering with the character span of every field, the part of every token, the cut of a
long document, the answer tokens, and the encoding of pairs into a padded batch. A family keeps
only its defaults, as data: its templates and answer words, and a :class:`PromptStyle`.

**Templates** (:class:`Prompt`): text with ``{query}`` and ``{document}`` (once each, the query
first) and, where the family's style allows them, ``{instruction}`` (at most once) and ``{bos}`` /
``{eos}`` (the tokenizer's own BOS/EOS text); ``{{`` and ``}}`` are literal braces.

**The part rule** (:func:`token_parts`), one for every family: a token whose characters overlap a
field's span belongs to that field (the document first, then the query, then the instruction, for
a token straddling two); a token with no characters (a special token the tokenizer adds itself,
T5's final ``</s>``) belongs to the template gap of the token before it; any other token is
template text: ``CLS`` (the prefix) when it starts before the query, ``SEP1`` (the middle) when it
starts before the document, else ``SEP2`` (the suffix).

**The cut** (:func:`encode_prompts`): only the document is ever cut, from its end. A prompt ``n``
tokens over ``max_length`` keeps the document's text up to the end of the last document token
before its final ``n`` (one token earlier where that token reaches past the document into the
template), is tokenized again, and is cut again until it fits. The template and the query are
never cut: a prompt without room for one document token is refused.

**Padding** (:func:`pad_token_id`): the tokenizer's pad token, else its EOS token (decoder
tokenizers often have no pad token), else 0, on the side the caller asks; the batch is assembled
by :func:`mechir.parts.padded_batch`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mechir.parts import CrossEncoderBatch, Part, check_max_length, padded_batch, pair_lists

#: A field's character span ``[start, end)`` in the rendered prompt.
Span = tuple[int, int]

#: Every field a template may hold (a family's style allows a subset).
FIELDS: tuple[str, ...] = ("query", "document", "instruction", "bos", "eos")

#: The template gap that follows each part: where a character-less token after it goes.
_GAP = {
    Part.CLS: Part.CLS,
    Part.INSTRUCTION: Part.CLS,
    Part.QUERY: Part.SEP1,
    Part.SEP1: Part.SEP1,
    Part.DOCUMENT: Part.SEP2,
    Part.SEP2: Part.SEP2,
}


# ---------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class PromptStyle:
    """What a family fixes about its prompts (its defaults live beside it, as data).

    Attributes:
        family: the name in messages (``"MonoT5"``).
        fields: the fields its templates may hold (``query`` and ``document`` always).
        add_special_tokens: whether the tokenizer adds its own special tokens to the prompt
            (T5's final ``</s>``); False where the template writes them.
        answers_from_vocabulary: how an answer word becomes a token id: True, the vocabulary
            entry of that exact text when there is one (Qwen3-Reranker's
            ``convert_tokens_to_ids("yes")``), else the tokenizer's encoding; False, the
            tokenizer's encoding of the word (MonoT5's ``"▁true"``).
    """

    family: str
    fields: tuple[str, ...] = FIELDS
    add_special_tokens: bool = True
    answers_from_vocabulary: bool = False


@dataclass(frozen=True)
class Prompt:
    """A prompt: the template, what fills its ``{instruction}``, the answers, and the style.

    Attributes:
        template: see the module docstring. Special tokens written in the text
            (``<|im_start|>``) are read as the tokenizer's special tokens.
        instruction: what fills ``{instruction}`` (None: the template has none).
        answer_tokens: ``(relevant, non-relevant)`` answers of a yes/no reranker (None for a
            classifier head).
        style: the family's :class:`PromptStyle`.

    Raises:
        ValueError: a template that breaks the rules above or the style's fields, an
            instruction without its field or a field without its instruction (one line).
    """

    template: str
    instruction: str | None = None
    answer_tokens: tuple[str, str] | None = None
    style: PromptStyle = PromptStyle("prompt-based reranker")

    def __post_init__(self) -> None:
        t = self.template
        if not isinstance(t, str):
            raise ValueError(f"template must be a string, got {type(t).__name__}")
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(t) if n is not None]
        except ValueError as err:
            raise ValueError(f"template {t!r}: {err} (write {{{{ and }}}} for braces)") from None
        allowed = self.style.fields
        unknown = [n for n in names if n not in allowed]
        if unknown:
            slots = ", ".join(f"{{{n}}}" for n in allowed)
            raise ValueError(
                f"template {t!r}: {self.style.family} prompts have no {{{unknown[0]}}} slot (a "
                f"template may hold {slots}; write other words into the template, {{{{ and }}}} "
                "for braces)"
            )
        counts = {n: names.count(n) for n in ("query", "document")}
        if any(c != 1 for c in counts.values()):
            raise ValueError(
                f"template {t!r} must hold {{query}} and {{document}} once each (found "
                f"{counts['query']} and {counts['document']})"
            )
        if names.index("query") > names.index("document"):
            raise ValueError(
                f"template {t!r}: {{query}} must come before {{document}} (parts are prefix, "
                "query, middle, document, suffix)"
            )
        if names.count("instruction") > 1:
            raise ValueError(f"template {t!r} may hold {{instruction}} at most once")
        if "instruction" in names and self.instruction is None:
            raise ValueError(f"template {t!r} holds {{instruction}}: give the instruction")
        if "instruction" not in names and self.instruction:
            raise ValueError(
                "an instruction was given but the template has no {instruction} field: add it "
                "to the template or drop the instruction"
            )

    def _parse(self) -> list[tuple[str, str | None]]:
        return [(literal, name) for literal, name, _, _ in string.Formatter().parse(self.template)]

    def _values(self, tokenizer: Any) -> dict[str, str]:
        """What fills the fields besides the query and the document."""
        return {
            "instruction": self.instruction or "",
            "bos": (tokenizer.bos_token or "") if "bos" in self.style.fields else "",
            "eos": (tokenizer.eos_token or "") if "eos" in self.style.fields else "",
        }

    def segments(self) -> list[Part]:
        """The parts of the prompt in reading order, one per literal text or field
        (``[CLS, INSTRUCTION, CLS, QUERY, SEP1, DOCUMENT, SEP2]`` for Qwen3-Reranker)."""
        out: list[Part] = []
        seen = Part.CLS
        for literal, name in self._parse():
            if literal:
                out.append(seen)
            if name == "query":
                out.append(Part.QUERY)
                seen = Part.SEP1
            elif name == "document":
                out.append(Part.DOCUMENT)
                seen = Part.SEP2
            elif name == "instruction" and self.instruction:
                out.append(Part.INSTRUCTION)
            elif name in ("bos", "eos"):
                out.append(seen)
        return out

    def render(self, query: str, document: str, tokenizer: Any) -> tuple[str, dict[str, Span]]:
        """The prompt text and the character span of each field in it."""
        values = {"query": query, "document": document, **self._values(tokenizer)}
        text: list[str] = []
        spans: dict[str, Span] = {}
        at = 0
        for literal, name in self._parse():
            text.append(literal)
            at += len(literal)
            if name is not None:
                value = values[name]
                spans[name] = (at, at + len(value))
                text.append(value)
                at += len(value)
        return "".join(text), spans

    def around(self, tokenizer: Any) -> tuple[str, str, str]:
        """The template's text before the query, between query and document, and after the
        document (the instruction and BOS/EOS filled in)."""
        text, spans = self.render("", "", tokenizer)
        (q0, q1), (d0, d1) = spans["query"], spans["document"]
        return text[:q0], text[q1:d0], text[d1:]

    def pieces(self, tokenizer: Any) -> tuple[list[tuple[str, Part]], dict[str, str]]:
        """The prompt's text without the query and the document, in reading order, as
        ``(text, part)`` pieces with a ``("", QUERY)`` / ``("", DOCUMENT)`` marker where each
        goes, and the whitespace that joins each to the text before it (``" "`` when that text
        ends with a space, which then belongs to the field: byte-level BPE tokenizers read
        ``": what"`` as ``":"``, ``" what"``)."""
        values = self._values(tokenizer)
        out: list[tuple[str, Part]] = []
        space = {"query": "", "document": ""}
        seen = Part.CLS
        for literal, name in self._parse():
            if name in space and literal.endswith(" "):
                literal, space[name] = literal[:-1], " "
            if literal:
                out.append((literal, seen))
            if name == "query":
                out.append(("", Part.QUERY))
                seen = Part.SEP1
            elif name == "document":
                out.append(("", Part.DOCUMENT))
                seen = Part.SEP2
            elif name == "instruction" and self.instruction:
                out.append((values[name], Part.INSTRUCTION))
            elif name in ("bos", "eos") and values[name]:
                out.append((values[name], seen))
        return out, space

    def answer_ids(self, tokenizer: Any) -> tuple[int, int]:
        """Token ids of the ``(relevant, non-relevant)`` answers, by the style's rule
        (:attr:`PromptStyle.answers_from_vocabulary`).

        Raises:
            ValueError: no answers (a classifier head), two equal answers, an answer that is
                not one token of this tokenizer or is its unknown token (one line).
        """
        answers = self.answer_tokens
        if answers is None or len(answers) != 2 or answers[0] == answers[1]:
            raise ValueError(
                f"answer_tokens {answers!r}: give two different answers, the relevant one first"
            )
        unk = tokenizer.unk_token_id
        ids = []
        for word in answers:
            if self.style.answers_from_vocabulary:
                token_id = tokenizer.convert_tokens_to_ids(word)
                if token_id is not None and token_id != unk:
                    ids.append(int(token_id))
                    continue
            encoded = list(tokenizer(word, add_special_tokens=False)["input_ids"])
            if len(encoded) != 1:
                pieces = tokenizer.convert_ids_to_tokens(encoded)
                raise ValueError(
                    f"answer token {word!r} is {len(encoded)} tokens ({pieces}) in this "
                    "tokenizer: give answers that are single tokens"
                )
            if unk is not None and encoded[0] == unk:
                raise ValueError(
                    f"answer token {word!r} is not in this tokenizer's vocabulary (it reads as "
                    "the unknown token): give answers from the vocabulary"
                )
            ids.append(int(encoded[0]))
        return ids[0], ids[1]


# ---------------------------------------------------------------------------- parts
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


# ---------------------------------------------------------------------------- encoding
def encode_prompts(
    tokenizer: Any,
    prompt: Prompt,
    queries: str | Sequence[str],
    documents: str | Sequence[str],
    *,
    max_length: int,
    padding_side: Literal["right", "left"] = "right",
) -> CrossEncoderBatch:
    """Render and tokenize (query, document) pairs into a :class:`CrossEncoderBatch` padded on
    ``padding_side`` with :func:`pad_token_id`, its parts from :func:`token_parts`.

    Each prompt is tokenized as one string (with the tokenizer's own special tokens where the
    style says so), so the ids are exactly ``tokenizer(prompt_text)``'s; a prompt longer than
    ``max_length`` has its document cut (the module docstring) and is tokenized again.

    Raises:
        ValueError: no pairs, lists of different lengths, an empty query or document, a slow
            tokenizer (offsets are needed), a prompt with no query token, or one that leaves
            no room for a document token; the message names the pair.
    """
    queries, documents = pair_lists(queries, documents)
    check_max_length(max_length)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not getattr(tokenizer, "is_fast", False):  # any object may come in as a tokenizer
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: {prompt.style.family} needs a fast "
            "one (with offsets, tokenizer.json) to find the query and document tokens"
        )
    rows = [
        _encode_one(tokenizer, prompt, q, d, max_length, i)
        for i, (q, d) in enumerate(zip(queries, documents))
    ]
    return padded_batch(rows, pad_token_id=pad_token_id(tokenizer), padding_side=padding_side)


def _encode_one(
    tokenizer: Any, prompt: Prompt, query: str, document: str, max_length: int, i: int
) -> tuple[list[int], list[int]]:
    """One pair's ids and parts, its document cut until the prompt fits ``max_length``."""
    while True:
        text, spans = prompt.render(query, document, tokenizer)
        enc = tokenizer(
            text, add_special_tokens=prompt.style.add_special_tokens, return_offsets_mapping=True
        )
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        parts = token_parts(offsets, spans)
        doc = [k for k, p in enumerate(parts) if p == int(Part.DOCUMENT)]
        found = {"query": int(Part.QUERY) in parts, "document": bool(doc)}
        missing = [name for name, there in found.items() if not there]
        if missing:
            raise ValueError(
                f"pair {i}: no token of the prompt is the {missing[0]}'s (the tokenizer drops "
                "its characters, or one token spans the query and the document): give text the "
                "tokenizer keeps, and template text between {query} and {document}"
            )
        if len(ids) <= max_length:
            return ids, parts
        keep = len(doc) - (len(ids) - max_length)
        if keep < 1:
            raise ValueError(
                f"pair {i}: the prompt without its document has {len(ids) - len(doc)} tokens, "
                f"which leaves no room for the document within max_length={max_length}: raise "
                "max_length or shorten the query (or the template)"
            )
        cut = offsets[doc[keep - 1]][1] - spans["document"][0]
        if cut >= len(document):  # a token reaching past the document: drop one more
            cut = offsets[doc[max(keep - 2, 0)]][1] - spans["document"][0]
        if cut <= 0 or cut >= len(document):
            raise ValueError(
                f"pair {i}: cannot cut the document to fit max_length={max_length}: raise "
                "max_length"
            )
        document = document[:cut]


__all__ = [
    "FIELDS",
    "Prompt",
    "PromptStyle",
    "Span",
    "encode_prompts",
    "pad_token_id",
    "token_parts",
]
