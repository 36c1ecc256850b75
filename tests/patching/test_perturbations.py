"""Aligned clean/corrupted pairs: TFC1, TDC, injection, swap, custom functions, IDF statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import BertTokenizerFast

from mechir import Part
from patching import AlignedPairs, PairBuilder, TermStatistics, pad_differing_span
from patching.perturbations import is_content_word

DOCS = ["the cat runs", "the dog runs", "the cat sleeps", "a bird"]


@pytest.fixture(scope="module")
def stats() -> TermStatistics:
    return TermStatistics.from_documents(DOCS)


@pytest.fixture(scope="module")
def builder(tok, stats) -> PairBuilder:
    return PairBuilder(tok, max_length=32, stats=stats)


def words(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


# ---------------------------------------------------------------------- statistics
def test_idf_from_documents_matches_the_formula(stats):
    n = len(DOCS)
    idf = lambda df: math.log1p((n - df + 0.5) / (df + 0.5))  # noqa: E731
    assert stats.n_docs == 4
    assert stats("the") == pytest.approx(idf(3))
    assert stats("cat") == pytest.approx(idf(2))
    assert stats("dog") == pytest.approx(idf(1))
    assert stats("never") == pytest.approx(idf(0)) == stats.unseen_idf
    assert stats("dog") > stats("cat") > stats("the") > 0


def test_precomputed_statistics_are_used_as_given(tok):
    stats = TermStatistics(idf={"cat": 5.0, "runs": 1.0}, unseen_idf=0.0)
    pair = PairBuilder(tok, stats=stats).tdc("blue cat runs", "the dog sleeps")
    assert pair.info["term"] == "cat" and pair.info["corrupted_term"] == "blue"


def test_idf_needs_documents():
    with pytest.raises(ValueError, match="at least one document"):
        TermStatistics.from_documents([])


# ---------------------------------------------------------------------- TFC1
def test_tfc1_appends_the_term_and_fillers(tok, builder):
    pair = builder.tfc1("what cat runs", "the dog sleeps", term="cat", pair_id="q1:d1", grade=2)
    assert words(tok, pair.query_ids) == ["what", "cat", "runs"]
    assert words(tok, pair.clean_ids) == ["the", "dog", "sleeps", "cat"]
    assert words(tok, pair.corrupted_ids) == ["the", "dog", "sleeps", "a"]
    assert (pair.pair_id, pair.grade, pair.perturbation) == ("q1:d1", 2, "tfc1")
    assert pair.info == {"term": "cat", "position": 3, "n_tokens": 1}


def test_tfc1_multi_piece_term_gets_one_filler_per_piece(tok, builder):
    pair = builder.tfc1("cats", "the dog sleeps", term="cats")
    assert words(tok, pair.clean_ids)[3:] == ["cat", "##s"]
    assert words(tok, pair.corrupted_ids)[3:] == ["a", "a"]


def test_tfc1_keeps_the_term_when_the_document_is_truncated(tok):
    builder = PairBuilder(tok, max_length=10)  # 3 query + 3 special -> 4 document tokens
    pair = builder.tfc1("what cat runs", "the dog sleeps in the house", term="cat")
    assert words(tok, pair.clean_ids) == ["the", "dog", "sleeps", "cat"]
    assert words(tok, pair.corrupted_ids) == ["the", "dog", "sleeps", "a"]


def test_tfc1_at_the_start_and_at_a_position(tok, builder):
    start = builder.tfc1("what cat", "the dog sleeps", term="cat", position="start")
    assert words(tok, start.clean_ids) == ["cat", "the", "dog", "sleeps"]
    assert words(tok, start.corrupted_ids) == ["a", "the", "dog", "sleeps"]
    mid = builder.tfc1("what cat", "the dog sleeps", term="cat", position=1)
    assert words(tok, mid.clean_ids) == ["the", "cat", "dog", "sleeps"]
    assert words(tok, mid.corrupted_ids) == ["the", "a", "dog", "sleeps"]


def test_tfc1_position_errors_name_the_pair(builder):
    with pytest.raises(ValueError, match=r"pair 'q7'.*inside a word"):
        builder.tfc1("what cat", "the dogs sleep", term="cat", position=2, pair_id="q7")
    with pytest.raises(ValueError, match=r"pair 'q8'.*outside the document"):
        builder.tfc1("what cat", "the dog", term="cat", position=5, pair_id="q8")


def test_tfc1_term_choice(tok, stats):
    b = PairBuilder(tok, stats=stats)
    query = "what is the cat dog"  # stopwords 'what', 'is', 'the' are never chosen
    assert b.candidate_terms(query) == ["cat", "dog"]
    assert b.choose_term(query, how="first") == "cat"
    assert b.choose_term(query, how="max_idf") == "dog"
    assert b.choose_term(query, how="min_idf") == "cat"
    picks = {b.choose_term(query, pair_id=str(i)) for i in range(30)}
    assert picks == {"cat", "dog"}  # random, over pair ids
    assert b.choose_term(query, pair_id="7") == b.choose_term(query, pair_id="7")  # reproducible


def test_term_choice_takes_content_words_not_number_fragments(tmp_path):
    """ "1,000" analyzes to "1" and "000"; both tokenize here, neither is a content word."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "1", "000", ",", "x", "mg", "of"]
    vocab += ["vitamin", "covid19", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    b = PairBuilder(tok, max_length=32, choose="first")
    assert b.candidate_terms("1,000 x mg of vitamin covid19") == ["mg", "vitamin", "covid19"]
    pair = b.tfc1("1,000 of vitamin", "a", pair_id="n")
    assert pair.info["term"] == "vitamin"
    assert [is_content_word(t) for t in ["1", "000", "x", "mg", "covid19"]] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="no usable term"):
        b.tfc1("1,000 of", "a", pair_id="n2")


def test_tfc1_query_without_usable_terms_names_the_pair(builder):
    with pytest.raises(ValueError, match=r"pair 'q3'.*no usable term"):
        builder.tfc1("what is the", "the dog", pair_id="q3")


def test_filler_must_be_one_known_token(tok):
    with pytest.raises(ValueError, match="not a single known token"):
        PairBuilder(tok, filler="zebra").tfc1("cat", "the dog", term="cat")
    by_id = PairBuilder(tok, filler=tok.mask_token_id).tfc1("cat", "the dog", term="cat")
    assert words(tok, by_id.corrupted_ids) == ["the", "dog", "[MASK]"]


# ---------------------------------------------------------------------- TDC
def test_tdc_appends_highest_vs_lowest_idf_term(tok, builder):
    pair = builder.tdc("blue cat runs", "the dog sleeps", pair_id="q2")
    # blue: unseen (highest IDF); cat and runs tie (df 2) -> the alphabetically first, cat
    assert pair.info["term"] == "blue" and pair.info["corrupted_term"] == "cat"
    assert words(tok, pair.clean_ids) == ["the", "dog", "sleeps", "blue"]
    assert words(tok, pair.corrupted_ids) == ["the", "dog", "sleeps", "cat"]
    assert pair.info["idf"] > pair.info["corrupted_idf"]


def test_tdc_pads_the_shorter_term(tok, builder):
    pair = builder.tdc("cats dog", "the bird")  # cats: 2 pieces, unseen; dog: df 1
    assert words(tok, pair.clean_ids) == ["the", "bird", "cat", "##s"]
    assert words(tok, pair.corrupted_ids) == ["the", "bird", "dog", "a"]


def test_tdc_needs_two_terms_of_different_idf(tok, builder):
    with pytest.raises(ValueError, match=r"pair 'q9': TDC needs two query terms"):
        builder.tdc("what cat", "the dog", pair_id="q9")
    with pytest.raises(ValueError, match="needs IDF statistics"):
        PairBuilder(tok).tdc("blue cat", "the dog")


# ---------------------------------------------------------------------- other perturbations
def test_inject_at_a_position(tok, builder):
    pair = builder.inject("red car", "slow car on the road", "red", position=1)
    assert words(tok, pair.clean_ids)[:3] == ["slow", "red", "car"]
    assert words(tok, pair.corrupted_ids)[:3] == ["slow", "a", "car"]


def test_document_swap(tok, builder):
    pair = builder.swap("cat", "the cat runs", "a dog sleeps", pair_id="q1:d2")
    assert words(tok, pair.clean_ids) == ["the", "cat", "runs"]
    assert words(tok, pair.corrupted_ids) == ["a", "dog", "sleeps"]
    with pytest.raises(ValueError, match=r"pair 'q1:d3' cannot be aligned: .* 3 and 5 tokens"):
        builder.swap("cat", "the cat runs", "the big red dog sleeps", pair_id="q1:d3")
    cut = builder.swap("cat", "the cat runs", "the big red dog sleeps", align="truncate")
    assert words(tok, cut.corrupted_ids) == ["the", "big", "red"]


def test_custom_function_length_preserving_and_padded(tok, builder):
    replace = lambda q, d: (d, d.replace("cat", "dog"))  # noqa: E731
    same = builder.custom("cat", "the cat runs", replace, align="strict")
    assert words(tok, same.corrupted_ids) == ["the", "dog", "runs"]
    longer = lambda q, d: (d.replace("cat", "big red cat"), d)  # noqa: E731
    padded = builder.custom("cat", "the cat runs", longer)
    assert words(tok, padded.clean_ids) == ["the", "big", "red", "cat", "runs"]
    # common prefix "the", common suffix "cat runs": the fillers stand in for "big red"
    assert words(tok, padded.corrupted_ids) == ["the", "a", "a", "cat", "runs"]


def test_custom_pair_that_cannot_be_aligned_names_the_pair(builder):
    longer = lambda q, d: (d + " and the dog", d)  # noqa: E731
    with pytest.raises(ValueError, match=r"pair 'q5:d9' cannot be aligned: .* 6 tokens .* 3"):
        builder.custom("cat", "the cat runs", longer, align="strict", pair_id="q5:d9")


def test_custom_difference_cut_off_by_max_length(tok):
    builder = PairBuilder(tok, max_length=8)  # 1 query token -> 4 document tokens
    late = lambda q, d: (d + " cat", d + " dog")  # noqa: E731
    with pytest.raises(ValueError, match=r"pair 'x'.*differ only after token 4"):
        builder.custom("cat", "the big red house", late, pair_id="x")


def test_pad_differing_span():
    a, b = pad_differing_span([1, 2, 3, 4], [1, 9, 9, 9, 4], filler=0)
    assert a == [1, 2, 3, 0, 4] and b == [1, 9, 9, 9, 4]
    a, b = pad_differing_span([1, 2], [1, 2, 7, 8], filler=0)  # pure insertion at the end
    assert a == [1, 2, 0, 0] and b == [1, 2, 7, 8]
    a, b = pad_differing_span([5, 5], [5, 5], filler=0)
    assert a == b == [5, 5]


# ---------------------------------------------------------------------- batches
def test_aligned_pairs_have_identical_layouts(tok, builder):
    built = [
        builder.tfc1("what cat runs", "the dog sleeps", term="cat", pair_id="a"),
        builder.tfc1("cat", "a small fish is blue", term="cat", pair_id="b"),
    ]
    pairs = AlignedPairs.from_pairs(built, tok)
    assert torch.equal(pairs.clean.parts, pairs.corrupted.parts)
    assert pairs.clean.parts[0].tolist()[:5] == [Part.CLS, Part.QUERY, Part.QUERY, Part.QUERY, 2]
    assert (pairs.clean.input_ids != pairs.corrupted.input_ids).sum(-1).tolist() == [1, 1]
    assert pairs.lengths.tolist() == [3 + 4 + 3, 1 + 6 + 3]
    assert pairs[1].pair_ids == ["b"] and pairs[1].clean.input_ids.shape == (1, 10)


def test_misaligned_batches_are_rejected_by_name(tok):
    from mechir import encode

    clean = encode(tok, ["cat", "dog"], ["the cat runs", "the dog"])
    corrupted = encode(tok, ["cat", "dog"], ["the cat runs", "the dog runs"])
    with pytest.raises(ValueError, match=r"pairs \['y'\] are not aligned"):
        AlignedPairs.from_batches(clean, corrupted, pair_ids=["x", "y"])


def test_build_over_a_collection(tok, builder):
    items = [
        SimpleNamespace(qid="1", docid="d1", query="what cat", document="the dog runs"),
        SimpleNamespace(qid="1", docid="d2", query="what cat", document="a bird"),
        SimpleNamespace(qid="2", docid="d1", query="what is", document="the dog runs"),
    ]
    qrels = {"1": {"d1": 2}}
    with pytest.raises(ValueError, match="pair '2:d1'"):
        builder.build(items, "tfc1", qrels=qrels)
    built = builder.build(items, "tfc1", qrels=qrels, errors="skip")
    assert [p.pair_id for p in built.pairs] == ["1:d1", "1:d2"]
    assert [p.grade for p in built.pairs] == [2, 0]
    assert list(built.skipped) == ["2:d1"] and "no usable term" in built.skipped["2:d1"]
    assert len(built.batch(tok)) == 2
    custom = builder.build([("x", "cat", "the cat")], lambda q, d: (d, d.replace("cat", "dog")))
    assert custom.pairs[0].pair_id == "x" and custom.pairs[0].grade is None
    with pytest.raises(ValueError, match="unknown perturbation"):
        builder.build(items, "tfc9")
