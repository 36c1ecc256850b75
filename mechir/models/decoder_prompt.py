"""A decoder reranker's prompt: the template (Qwen3-Reranker's, RankLLaMA's or the user's), what
fills it, and the encoding of pairs into a batch whose parts label every token (the part rule of
every prompt-based reranker: mechir.models.prompt).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mechir.models.prompt import pad_token_id, pair_lists, token_parts
from mechir.parts import (
    CrossEncoderBatch,
    Part,
    check_max_length,
    padded_batch,
)

#: Qwen3-Reranker's prompt (system prompt, instruction, query, document, and the assistant turn
#: with the empty think block), as its model card builds it.
QWEN3_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
#: Qwen3-Reranker's default instruction.
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The default prompt of ``*ForSequenceClassification`` decoders (RankLLaMA's input format).
RANKLLAMA_TEMPLATE = "{bos}query: {query} document: {document}{eos}"
#: The default answers of yes/no rerankers: (relevant, non-relevant).
DEFAULT_ANSWERS = ("yes", "no")

_FIELDS = ("query", "document", "instruction", "bos", "eos")


# ====================================================================== prompts
@dataclass(frozen=True)
class DecoderPrompt:
    """A decoder reranker's prompt: the template and what fills it.

    Attributes:
        template: text with ``{query}`` and ``{document}`` (once each, the query first) and
            optionally ``{instruction}``, ``{bos}`` and ``{eos}`` (the tokenizer's BOS/EOS
            tokens; ``{{``/``}}`` are literal braces). Special tokens written in the text
            (``<|im_start|>``) are read as the tokenizer's special tokens.
        instruction: what fills ``{instruction}`` (None: the template has none).
        answer_tokens: ``(relevant, non-relevant)`` answers of a yes/no reranker (None for a
            classifier).
    """

    template: str
    instruction: str | None = None
    answer_tokens: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        unknown = [f for f in fields if f not in _FIELDS]
        if unknown:
            raise ValueError(
                f"template field {{{unknown[0]}}} is unknown: a template may hold {{query}}, "
                "{document}, {instruction}, {bos} and {eos} (write {{ and }} for braces)"
            )
        for name in ("query", "document"):
            if fields.count(name) != 1:
                raise ValueError(
                    f"the template must hold {{{name}}} exactly once, it holds it "
                    f"{fields.count(name)} times"
                )
        if fields.index("query") > fields.index("document"):
            raise ValueError("the template must put {query} before {document}")
        if fields.count("instruction") > 1:
            raise ValueError("the template may hold {instruction} at most once")
        if "instruction" in fields and self.instruction is None:
            raise ValueError("the template holds {instruction}: give the instruction")
        if "instruction" not in fields and self.instruction:
            raise ValueError(
                "an instruction was given but the template has no {instruction} field: add it "
                "to the template or drop the instruction"
            )

    def segments(self) -> list[Part]:
        """The parts of the prompt in reading order, one per literal text or field
        (``[CLS, INSTRUCTION, CLS, QUERY, SEP1, DOCUMENT, SEP2]`` for Qwen3-Reranker)."""
        out: list[Part] = []
        seen = Part.CLS
        for literal, name, _, _ in string.Formatter().parse(self.template):
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

    def pieces(self, tokenizer: Any) -> tuple[list[tuple[str, Part]], dict[str, str]]:
        """The prompt's text without the query and the document, in reading order, as
        ``(text, part)`` pieces with a ``("", QUERY)`` / ``("", DOCUMENT)`` marker where each
        goes, and the whitespace that joins each to the text before it (``" "`` when that text
        ends with a space, which then belongs to the field: byte-level BPE tokenizers read
        ``": what"`` as ``":"``, ``" what"``)."""
        values = {
            "instruction": self.instruction or "",
            "bos": getattr(tokenizer, "bos_token", None) or "",
            "eos": getattr(tokenizer, "eos_token", None) or "",
        }
        out: list[tuple[str, Part]] = []
        space = {"query": "", "document": ""}
        seen = Part.CLS
        for literal, name, _, _ in string.Formatter().parse(self.template):
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

    def render(
        self, query: str, document: str, tokenizer: Any
    ) -> tuple[str, dict[str, tuple[int, int]]]:
        """The prompt text and the character span of each field in it."""
        text, spans = [], {}
        at = 0
        values = {
            "query": query,
            "document": document,
            "instruction": self.instruction or "",
            "bos": getattr(tokenizer, "bos_token", None) or "",
            "eos": getattr(tokenizer, "eos_token", None) or "",
        }
        for literal, name, _, _ in string.Formatter().parse(self.template):
            text.append(literal)
            at += len(literal)
            if name is not None:
                value = values[name]
                spans[name] = (at, at + len(value))
                text.append(value)
                at += len(value)
        return "".join(text), spans


def encode_prompts(
    tokenizer: Any,
    prompt: DecoderPrompt,
    queries: str | Sequence[str],
    documents: str | Sequence[str],
    *,
    max_length: int,
    padding_side: Literal["right", "left"] = "right",
) -> CrossEncoderBatch:
    """Render and tokenize (query, document) pairs into a :class:`CrossEncoderBatch`.

    Each prompt is tokenized as one string (without added special tokens: the template writes
    them), so the tokens are exactly those of ``tokenizer(prompt_text)``; the part of each token
    is read from its character offsets (:func:`mechir.models.prompt.token_parts`). A prompt
    longer than ``max_length`` has its document cut after the last token that fits, and is
    re-tokenized.

    Raises:
        ValueError: no pairs, lists of different lengths, an empty query/document, a tokenizer
            without offsets (not a fast tokenizer), or a prompt that leaves no room for one
            document token (the message names the pair).
    """
    queries, documents = pair_lists(queries, documents)
    check_max_length(max_length)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} gives no character offsets: decoder rerankers need a "
            "fast tokenizer (tokenizer.json)"
        )
    rows = []
    for i, (q, d) in enumerate(zip(queries, documents)):
        rows.append(_encode_one(tokenizer, prompt, q, d, max_length, i))
    return padded_batch(rows, pad_token_id=pad_token_id(tokenizer), padding_side=padding_side)


def _encode_one(
    tokenizer: Any, prompt: DecoderPrompt, query: str, document: str, max_length: int, i: int
) -> tuple[list[int], list[int]]:
    while True:
        text, spans = prompt.render(query, document, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        parts = token_parts(offsets, spans)
        if len(ids) <= max_length:
            return ids, parts
        doc = [k for k, p in enumerate(parts) if p == int(Part.DOCUMENT)]
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
