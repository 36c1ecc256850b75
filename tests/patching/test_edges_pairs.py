"""Pairs with the query's content words replaced (patching.edges.sources)."""

from __future__ import annotations

import pytest

from mechir.data import Pair
from mechir.parts import Part
from patching.edges import replace_query_words


def test_content_words_become_fillers(tok):
    items = [
        Pair("q1", "d1", "what cat runs", "the cat runs in the house"),
        Pair("q1", "d2", "what cat runs", "a small fish is blue"),
        Pair("q2", "d3", "how is the", "the dog sleeps"),  # stopwords only: skipped
    ]
    pairs, skipped = replace_query_words(tok, items, max_length=64, qrels={"q1": {"d2": 2}})
    assert pairs.pair_ids == ["q1:d1", "q1:d2"] and pairs.grades == [0, 2]
    assert list(skipped) == ["q2:d3"] and "no content word" in skipped["q2:d3"]
    filler = tok.convert_tokens_to_ids("a")
    query = pairs.clean.parts[0] == int(Part.QUERY)
    clean_q = pairs.clean.input_ids[0][query].tolist()
    corrupted_q = pairs.corrupted.input_ids[0][query].tolist()
    assert tok.convert_ids_to_tokens(clean_q) == ["what", "cat", "runs"]
    assert corrupted_q == [clean_q[0], filler, filler]  # "what" is a stopword: kept
    # everything but the query's content words is identical: aligned token for token
    same = pairs.clean.input_ids == pairs.corrupted.input_ids
    assert int((~same).sum()) == 4


def test_no_pair_at_all_is_an_error(tok):
    with pytest.raises(ValueError, match="no pair could be built"):
        replace_query_words(tok, [Pair("q", "d", "the of", "cat")], max_length=64)
