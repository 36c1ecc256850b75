"""Part ids against hand-computed positions; truncation, padding, HF tokenizer parity, errors."""

from __future__ import annotations

import os

import pytest
import torch

from mechir import CrossEncoderBatch, Part, cross_encoder_batch_from_tokens, parse_part, parse_parts
from tests.helpers import DOCUMENTS, QUERIES

C, Q, S1, D, S2, P = (int(p) for p in list(Part)[:6])


def build(queries, docs, max_length=32):
    return cross_encoder_batch_from_tokens(
        queries, docs, cls_token_id=101, sep_token_id=102, pad_token_id=0, max_length=max_length
    )


def test_parts_hand_computed_with_padding():
    b = build([[7, 8], [9]], [[20, 21, 22], [23]])
    assert b.input_ids.tolist() == [
        [101, 7, 8, 102, 20, 21, 22, 102],
        [101, 9, 102, 23, 102, 0, 0, 0],
    ]
    assert b.parts.tolist() == [[C, Q, Q, S1, D, D, D, S2], [C, Q, S1, D, S2, P, P, P]]
    assert b.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert b.mask("document").tolist() == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0, 0]]
    assert b.part_masks.shape == (2, 5, 8)
    assert b.part_masks.sum(1).eq(b.attention_mask).all()  # every real token in exactly one part


def test_truncation_only_document_keeps_specials():
    b = build([[7, 8, 9]], [list(range(20, 40))], max_length=10)
    assert b.input_ids.tolist() == [[101, 7, 8, 9, 102, 20, 21, 22, 23, 102]]
    assert b.parts.tolist() == [[C, Q, Q, Q, S1, D, D, D, D, S2]]


def test_query_too_long_is_an_error_naming_the_pair():
    with pytest.raises(ValueError, match="pair 1: the query has 8 tokens"):
        build([[1], list(range(8))], [[2], [3]], max_length=10)


@pytest.mark.parametrize(
    "queries,docs,match",
    [
        (["a", "  "], ["x", "y"], "pair 1: the query is empty"),
        (["a", "b"], ["x", "\t\n"], "pair 1: the document is empty"),
        (["a"], ["x", "y"], "1 queries but 2 documents"),
    ],
)
def test_bad_text_input(tiny, queries, docs, match):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=match):
        model.encode(queries, docs)


def test_encode_matches_hf_pair_tokenization(tiny):
    model, _, tok = tiny
    for max_length in (64, 12):
        b = model.encode(QUERIES, DOCUMENTS, max_length=max_length)
        ref = tok(
            QUERIES,
            DOCUMENTS,
            truncation="only_second",
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        assert torch.equal(b.input_ids, ref["input_ids"])
        assert torch.equal(b.token_type_ids, ref["token_type_ids"])
        assert torch.equal(b.attention_mask, ref["attention_mask"])


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_select_and_chunk_trim_padding(tiny_batch):
    sub = tiny_batch[[1]]
    assert sub.input_ids.shape[1] == int(tiny_batch.lengths[1])
    assert sum(len(c) for c in tiny_batch.chunks(3)) == len(tiny_batch)
    with pytest.raises(ValueError, match="share one"):
        CrossEncoderBatch(sub.input_ids, sub.token_type_ids, sub.attention_mask, sub.parts[:, :1])


def test_part_names():
    assert parse_part("Document") is Part.DOCUMENT and parse_part(1) is Part.QUERY
    assert parse_parts(["cls", Part.SEP2, "cls"]) == (Part.CLS, Part.SEP2)
    with pytest.raises(ValueError, match="valid names are 'cls', 'query'"):
        parse_part("passage")


@pytest.mark.skipif(os.environ.get("MECHIR_TYPECHECK") == "0", reason="MECHIR_TYPECHECK=0")
def test_shapes_are_checked_in_the_test_suite():
    """tests/conftest.py wraps mechir and patching in jaxtyping + beartype: a tensor whose shape
    contradicts its annotation fails at the call."""
    from jaxtyping import TypeCheckError

    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeCheckError, match="parts"):
        CrossEncoderBatch(ids, ids, ids, ids[:, :3])


def test_template_part_names_of_prompt_rerankers():
    """MonoT5 / LLM prompt templates: prefix, middle and suffix are CLS, SEP1 and SEP2."""
    assert parse_part("prefix") is Part.CLS
    assert parse_part("Middle") is Part.SEP1
    assert parse_part("suffix") is Part.SEP2
