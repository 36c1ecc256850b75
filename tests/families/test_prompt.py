"""The one prompt module of prompt-based rerankers (:mod:`mechir.models.prompt`): the part rule,
the pair checks and the padding id, on hand-made prompts whose answer is written out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mechir.models.prompt import pad_token_id, pair_lists, token_parts
from mechir.parts import Part

C, Q, S1, D, S2, INS = (int(p) for p in (Part.CLS, Part.QUERY, Part.SEP1, Part.DOCUMENT,
                                       Part.SEP2, Part.INSTRUCTION))  # fmt: skip


def _spans(text: str, **fields: str) -> dict[str, tuple[int, int]]:
    return {
        name: (text.index(value), text.index(value) + len(value)) for name, value in fields.items()
    }


def _offsets(text: str, tokens: list[str]) -> list[tuple[int, int]]:
    """Character spans of ``tokens`` read left to right in ``text`` ("" = a special token)."""
    out, at = [], 0
    for token in tokens:
        if not token:
            out.append((0, 0))
            continue
        start = text.index(token, at)
        out.append((start, start + len(token)))
        at = start + len(token)
    return out


def test_monot5_prompt_with_its_added_end_token():
    text = "Query: cat food Document: cats eat meat Relevant:"
    tokens = ["Query", ":", "cat", "food", "Document", ":", "cats", "eat", "meat", "Relevant",
              ":", ""]  # fmt: skip
    parts = token_parts(
        _offsets(text, tokens), _spans(text, query="cat food", document="cats eat meat")
    )
    assert parts == [C, C, Q, Q, S1, S1, D, D, D, S2, S2, S2]  # </s>: the suffix it follows


def test_decoder_prompt_with_an_instruction_and_special_tokens_in_the_text():
    text = "<s>Instruct: judge\nQuery: cat\nDocument: a cat</s>"
    tokens = ["<s>", "Instruct", ":", " judge", "\n", "Query", ":", " cat", "\n", "Document", ":",
              " a", " cat", "</s>"]  # fmt: skip
    spans = _spans(text, instruction="judge", query="cat\n", document="a cat")
    spans["query"] = (text.index(" cat") + 1, text.index(" cat") + 4)
    parts = token_parts(_offsets(text, tokens), spans)
    assert parts == [C, C, C, INS, C, C, C, Q, S1, S1, S1, D, D, S2]


def test_a_token_straddling_a_field_belongs_to_the_field_document_first():
    # the prompt "q:ab|d:cd." with query "ab" and document "cd"
    spans = {"query": (2, 4), "document": (7, 9)}
    # "b|" straddles the query's end, "d." the document's; ":c" straddles the document's start
    assert token_parts([(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 10)], spans) == [
        C, Q, Q, S1, D, D,
    ]  # fmt: skip
    # one token over the whole middle touches query and document: the document wins
    assert token_parts([(0, 2), (3, 8), (8, 10)], spans) == [C, D, D]


def test_character_less_tokens_take_the_gap_they_sit_in():
    spans = {"query": (2, 4), "document": (6, 8)}
    assert token_parts([(0, 0), (2, 4), (0, 0), (6, 8), (0, 0)], spans) == [C, Q, S1, D, S2]


def test_an_empty_instruction_takes_no_token():
    spans = {"instruction": (3, 3), "query": (5, 7), "document": (9, 11)}
    assert token_parts([(0, 4), (5, 7), (9, 11)], spans) == [C, Q, D]


def test_pair_lists():
    assert pair_lists("q", "d") == (["q"], ["d"])
    assert pair_lists(["a", "b"], ("c", "d")) == (["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="got 2 queries but 1 documents"):
        pair_lists(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="empty batch"):
        pair_lists([], [])
    with pytest.raises(ValueError, match="pair 1: the document is empty"):
        pair_lists(["a", "b"], ["c", "  "])


def test_pair_lists_refuses_a_non_string(unchecked_shapes):
    with pytest.raises(ValueError, match="pair 0: the query is int"):
        pair_lists([3], ["c"])


@pytest.mark.parametrize(
    ("pad", "eos", "expected"), [(5, 7, 5), (None, 7, 7), (None, None, 0), (0, 7, 0)]
)
def test_pad_token_id(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected
