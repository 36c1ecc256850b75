"""Axiomatic diagnostic datasets (patching/axioms.py): each construction puts the documents in the
order the axiom states, aligned where patching needs it; related terms are the embedding nearest
neighbours without the term, its inflections, the query's terms and stopwords; scores and
agreement against independent recomputations."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from transformers import BertTokenizerFast

from mechir.parts import cross_encoder_batch_from_tokens
from patching import PairBuilder, TermStatistics
from patching.axioms import (
    ALIGNED_AXIOMS,
    AXIOMS,
    AxiomBuilder,
    EmbeddingNeighbours,
    agreement,
    axiom_scores,
)
from tests.helpers import DOCUMENTS, QUERIES

ITEMS = [(f"p{i}", q, d) for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS))]


@pytest.fixture(scope="module")
def stats():
    return TermStatistics.from_documents(DOCUMENTS)


@pytest.fixture(scope="module")
def builder(model, tok, stats):
    pairs = PairBuilder(tok, max_length=40, stats=stats, choose="first")
    neighbours = EmbeddingNeighbours(model.embed.embed.W_E, tok, stats=stats)
    return AxiomBuilder(pairs, neighbours=neighbours)


def words(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def test_tfc1_appends_the_term_against_fillers(builder, tok):
    p = builder.tfc1("what cat runs", "the dog sleeps in the house", pair_id="x", grade=2)
    assert p.axiom == "TFC1" and p.aligned and p.grade == 2 and p.info["term"] == "cat"
    assert words(tok, p.higher_ids) == "the dog sleeps in the house cat".split()
    assert words(tok, p.lower_ids) == "the dog sleeps in the house a".split()
    assert p.perturbed().clean_ids == p.higher_ids and p.perturbed().perturbation == "tfc1"


def test_tfc2_adds_the_term_once_and_twice(builder, tok):
    p = builder.tfc2("what cat runs", "the dog sleeps", pair_id="x")
    assert words(tok, p.base_ids) == "the dog sleeps a a".split()
    assert words(tok, p.lower_ids) == "the dog sleeps cat a".split()
    assert words(tok, p.higher_ids) == "the dog sleeps cat cat".split()
    assert len({len(p.base_ids), len(p.lower_ids), len(p.higher_ids)}) == 1


def test_tfc2_keeps_the_term_when_the_document_is_cut(builder, tok):
    long = " ".join(["water"] * 60)
    p = builder.tfc2("what cat runs", long, pair_id="x")
    n = 40 - 3 - len(tok("what cat runs", add_special_tokens=False)["input_ids"])
    assert len(p.higher_ids) == n and words(tok, p.higher_ids)[-2:] == ["cat", "cat"]


def test_lnc1_adds_a_document_term_that_is_no_query_term(builder, tok):
    query, doc = "what cat runs", "the dog sleeps in the big house"
    p = builder.lnc1(query, doc, pair_id="x")
    term = p.info["term"]
    assert term in {"dog", "sleeps", "big", "house"}  # content words of the document, not "cat"
    assert (
        list(p.lower_ids) == list(p.higher_ids) + tok(term, add_special_tokens=False)["input_ids"]
    )
    assert words(tok, p.higher_ids) == "the dog sleeps in the big house".split()
    assert not p.aligned
    with pytest.raises(ValueError, match="cannot be patched; patch one of TFC1, TFC2, STMC1"):
        p.perturbed()
    # the seeded choice is reproducible and depends on the pair
    assert builder.lnc1(query, doc, pair_id="x").info["term"] == term
    with pytest.raises(ValueError, match="no non-query content term"):
        builder.lnc1("what cat runs", "the cat runs", pair_id="y")


def test_lnc2_repeats_a_document_cut_at_a_word_boundary(builder, tok):
    doc = "the cat runs in the house and the dog sleeps eating " * 3  # "eating" = eat ##ing
    p = builder.lnc2("who eats", doc, pair_id="x")
    room = 40 - 3 - 2
    assert len(p.higher_ids) <= room and list(p.higher_ids) == list(p.lower_ids) * 2
    assert len(p.lower_ids) <= room // 2
    following = tok(doc, add_special_tokens=False)["input_ids"][len(p.lower_ids)]
    assert not words(tok, [following])[0].startswith("##")  # no word cut in two
    with pytest.raises(ValueError, match="copies must be an int >= 2"):
        AxiomBuilder(builder.pairs, copies=1)


def test_stmc1_documents_differ_in_the_related_and_unrelated_term(builder, tok, stats):
    p = builder.stmc1("what cat runs", "the dog sleeps in the house", pair_id="x")
    info = p.info
    assert p.aligned and info["term"] == "cat" and info["cos_related"] > info["cos_unrelated"]
    assert info["related"] not in {"what", "cat", "runs"} and info["unrelated"] != "cat"
    diff = [i for i, (a, b) in enumerate(zip(p.higher_ids, p.lower_ids)) if a != b]
    assert diff and min(diff) >= len(tok("the dog sleeps in the house")["input_ids"]) - 2
    with pytest.raises(ValueError, match="STMC1 needs related terms"):
        AxiomBuilder(builder.pairs).stmc1("what cat runs", "the dog", pair_id="x")


@pytest.fixture(scope="module")
def inflected_tok(tmp_path_factory):
    words_ = "cat cats kitten kitty dog puppy stone rock car automobile the what".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words_]
    path = tmp_path_factory.mktemp("inflected") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


def test_related_terms_are_nearest_neighbours_without_the_term_or_its_inflections(inflected_tok):
    """An embedding where "cats" is closest to "cat", then "kitten", then "kitty": the related
    term skips "cats" (contains the term) and the excluded query term "kitten"."""
    tok = inflected_tok
    vocab = tok.get_vocab()
    E = torch.zeros(len(vocab), 4)
    rows = {
        "cat": [1, 0, 0, 0], "cats": [1, 0.01, 0, 0], "kitten": [1, 0.1, 0, 0],
        "kitty": [1, 0.3, 0, 0], "dog": [0.5, 1, 0, 0], "puppy": [0.4, 1, 0, 0],
        "stone": [0, 0, 1, 0], "rock": [-0.05, 0, 1, 0.1], "car": [-0.2, 0, 0, 1],
        "automobile": [-0.3, 0, 0, 1], "what": [0, 1, 1, 1], "the": [1, 1, 1, 1],
    }  # fmt: skip
    for w, v in rows.items():
        E[vocab[w]] = torch.tensor(v)
    nb = EmbeddingNeighbours(E, tok)
    assert "the" not in nb.terms and "what" not in nb.terms  # stopwords
    related, c1, unrelated, c2 = nb.pair("cat", exclude=["kitten"])
    assert related == "kitty" and c1 == pytest.approx(1 / math.sqrt(1.09), abs=1e-6)
    sims = dict(zip(nb.terms, nb.similarities("cat").tolist()))
    median = torch.tensor([s for t, s in sims.items() if t not in {"cat", "cats", "kitten"}])
    assert sims[unrelated] < float(median.median()) and c2 == pytest.approx(sims[unrelated])
    # with IDF statistics, the unrelated term matches the related term's IDF
    stats = TermStatistics({"kitty": 2.0, "stone": 5.0, "rock": 2.1, "car": 2.5}, 9.0)
    _, _, unrelated, _ = EmbeddingNeighbours(E, tok, stats=stats).pair("cat", exclude=["kitten"])
    assert unrelated == "rock"


@pytest.mark.parametrize("axiom", AXIOMS)
def test_build_skips_with_reasons_and_respects_the_limit(builder, axiom):
    items = [*ITEMS, ("bad", "the of", "")]  # no query term, no document
    built = builder.build(items, axiom.lower(), limit=3)
    assert built.axiom == axiom and len(built) == 3 and not built.skipped
    full = builder.build(items, axiom)
    assert [p.pair_id for p in full.pairs] == [f"p{i}" for i in range(4)]
    assert "bad" in full.skipped
    with pytest.raises(ValueError):
        builder.build(items, axiom, errors="raise")
    if axiom in ALIGNED_AXIOMS:
        pairs = full.aligned(builder.tokenizer)
        assert pairs.clean.input_ids.shape == pairs.corrupted.input_ids.shape
    else:
        with pytest.raises(ValueError, match="cannot be patched"):
            full.aligned(builder.tokenizer)
    with pytest.raises(ValueError, match="unknown axiom 'tdc2'"):
        builder.build(items, "tdc2")


@pytest.mark.parametrize("axiom", AXIOMS)
def test_scores_equal_scoring_each_document_alone(model, tok, builder, axiom):
    built = builder.build(ITEMS, axiom)
    frame = axiom_scores(model, built, batch_size=3)

    def alone(q, d):
        b = cross_encoder_batch_from_tokens(
            [q], [d], cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id, max_length=64,
        )  # fmt: skip
        return float(model.score(b)[0])

    for row, p in zip(frame.itertuples(), built.pairs):
        hi, lo = alone(p.query_ids, p.higher_ids), alone(p.query_ids, p.lower_ids)
        assert row.higher == pytest.approx(hi, abs=1e-5) and row.lower == pytest.approx(
            lo, abs=1e-5
        )
        if axiom == "TFC2":
            base = alone(p.query_ids, p.base_ids)
            assert row.gap == pytest.approx((lo - base) - (hi - lo), abs=2e-5)
        else:
            assert math.isnan(row.base) and row.gap == pytest.approx(hi - lo, abs=2e-5)
        assert row.agrees == (row.gap > 0 if axiom in ALIGNED_AXIOMS else row.gap >= 0)


def test_agreement_counts_wins_ties_and_tests_against_chance():
    frame = pd.DataFrame({"gap": [0.5, 0.2, -0.1, 0.0, 0.3], "agrees": [1, 1, 0, 1, 1]})
    out = agreement(frame)
    assert out["pairs"] == 5 and out["agreement"] == pytest.approx(0.8)
    assert out["ties"] == pytest.approx(0.2) and out["mean_gap"] == pytest.approx(0.18)
    assert out["sign_test_p"] == pytest.approx(0.625)  # 3 wins of 4 decided: 2 * 5/16
