"""Streaming attention statistics, exact matches, matching-head deltas and pair building."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from mechir import cross_encoder_batch_from_tokens, load_cross_encoder
from mechir import matching as M
from mechir.data import Collection, matching_pairs
from tests.helpers import (
    DOCUMENTS,
    QUERIES,
    SCIFACT,
    SHARED_MAX_LENGTH,
    SHARED_MODEL,
    requires_shared,
    tiny_hf_model,
    tiny_tokenizer,
)

CONTENT = "cat dog bird fish tree house car road water fire stone light dark red blue green".split()
FILLER = (
    "protein cell gene cancer drug study patients risk effect increase decrease blood brain "
    "small big quick slow runs jumps sleeps eats reads"
).split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def model(tok):
    return load_cross_encoder(tiny_hf_model(1), tokenizer=tok, device="cpu")


@pytest.fixture(scope="module")
def batch(model):
    queries = ["the cats runs", *QUERIES, "blue fish"]
    docs = ["the dogs runs and the cat", *DOCUMENTS[::-1], "a fish is a fish"]
    return model.encode(queries, docs, max_length=64)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- exact matches
def test_wordpiece_words():
    assert M.wordpiece_words(["the", "cat", "##s", "Run", "##ing", "##s"]) == [
        "the",
        "cats",
        "cats",
        "runings",
        "runings",
        "runings",
    ]
    assert M.wordpiece_words(["##s", "cat"]) == ["##s", "cat"]  # a leading piece starts a word
    assert M.wordpiece_words([]) == []


def test_exact_match_mask_on_hand_made_sequences(tok):
    # query: cat ##s runs | document: the dog ##s runs cat
    q = ids(tok, "cats runs")
    d = ids(tok, "the dogs runs cat")
    assert tok.convert_ids_to_tokens(q) == ["cat", "##s", "runs"]
    b = cross_encoder_batch_from_tokens(
        [q, q[:1]], [d, d[:2]], cls_token_id=2, sep_token_id=3, pad_token_id=0, max_length=32
    )
    # positions: 0 CLS, 1 cat, 2 ##s, 3 runs, 4 SEP, 5 the, 6 dog, 7 ##s, 8 runs, 9 cat, 10 SEP
    token = M.exact_match_mask(b)
    expected = {(1, 9), (2, 7), (3, 8)}
    got = {(i, j) for i, j in token[0].nonzero().tolist() if i < j}
    assert got == expected
    assert torch.equal(token, token.transpose(1, 2))  # symmetric, Q-Q / D-D / specials excluded
    assert token[0].sum() == 2 * len(expected)
    # whole words: "cats" is not "dogs" (##s) nor "cat"; only "runs" is the same word
    words = M.exact_match_mask(b, whole_words=True, tokenizer=tok)
    assert {(i, j) for i, j in words[0].nonzero().tolist() if i < j} == {(3, 8)}
    # second pair: query "cat", document "the dog": no match, padding never matches
    assert not token[1].any() and not words[1].any()
    with pytest.raises(ValueError, match="needs the tokenizer"):
        M.exact_match_mask(b, whole_words=True)


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("batch_size", "whole_words", "layers", "sort"),
    [(None, False, None, True), (2, True, None, True), (3, False, [1], False)],
)
def test_streaming_statistics_match_full_cache(model, batch, batch_size, whole_words, layers, sort):
    fast = M.attention_statistics(
        model,
        batch,
        batch_size=batch_size,
        whole_words=whole_words,
        layers=layers,
        sort_by_length=sort,
    )
    ref = M.attention_statistics_reference(model, batch, whole_words=whole_words, layers=layers)
    assert fast.layers == ref.layers
    for name in M.STATISTICS:
        a, b = fast.values[name], ref.values[name]
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(
        fast.pairs.drop(columns="score"), ref.pairs.drop(columns="score"), check_dtype=False
    )
    np.testing.assert_allclose(fast.pairs.score, ref.pairs.score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(fast.pairs.score.to_numpy()), model.score(batch))


def test_statistics_identities_and_table(model, batch):
    stats = M.attention_statistics(model, batch, batch_size=2)
    v = stats.values
    for d in ("qd", "dq"):
        torch.testing.assert_close(v[f"{d}_mass"], v[f"{d}_match_mass"] + v[f"{d}_nonmatch_mass"])
        assert ((v[f"{d}_mass"] >= 0) & (v[f"{d}_mass"] <= 1 + 1e-6)).all()
    # "blue fish" vs "a fish is a fish" has matches; "who eats" vs "slow car..." has none
    n_matches = stats.pairs.n_matches.to_numpy()
    assert n_matches[5] == 2 and n_matches[3] == 0
    assert v["qd_match_max"][3].isnan().all() and not v["qd_match_max"][5].isnan().any()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        M.attention_statistics(model, batch, batch_size=0)
    # attention rows sum to 1, so the no-op masses together are a fraction
    assert ((v["cls_mass"] + v["sep1_mass"] + v["sep2_mass"]) <= 1 + 1e-6).all()
    table = stats.table()
    assert len(table) == len(batch) * 2 * 4
    assert list(table.columns[:4]) == ["pair", "layer", "head", "label"]
    row = table[(table["pair"] == 5) & (table["layer"] == 1) & (table["head"] == 2)].iloc[0]
    assert row.label == "1/2" and row.qd_max == pytest.approx(float(v["qd_max"][5, 1, 2]))


# ---------------------------------------------------------------------------- deltas
def test_matching_head_deltas_by_hand():
    # head 0/0: per-(query, kind) means rel {q1: .8, q2: .6, q3: .9}, easy {q1: .1, q2: .3}
    rows = [
        ("q1", "relevant", [0.7, 0.9]),
        ("q1", "easy_negative", [0.1]),
        ("q2", "relevant", [0.6]),
        ("q2", "easy_negative", [0.2, 0.4]),
        ("q3", "relevant", [0.9]),
    ]
    pairs, stat = [], []
    for qid, kind, values in rows:
        for value in values:
            pairs.append({"pair": len(pairs), "qid": qid, "kind": kind})
            stat.append(value)
    pairs = pd.DataFrame(pairs)
    table = pd.DataFrame(
        {"pair": pairs.pair, "layer": 0, "head": 0, "label": "0/0", "qd_max": stat}
    )
    common = dict(statistics=["qd_max"], negatives=["easy_negative"])
    unpaired = M.matching_head_deltas(table, pairs, **common).iloc[0]
    assert unpaired.positive_median == pytest.approx(0.8)
    assert unpaired.negative_median == pytest.approx(0.2)
    assert unpaired.delta == pytest.approx(0.6) and unpaired.matching
    assert (unpaired.n_positive_queries, unpaired.n_negative_queries) == (3, 2)
    paired = M.matching_head_deltas(table, pairs, paired=True, **common).iloc[0]
    assert paired.delta == pytest.approx(np.median([0.8 - 0.1, 0.6 - 0.3]))  # q3 has no negative
    assert (paired.n_positive_queries, paired.n_negative_queries) == (2, 2)
    assert paired.positive_median == pytest.approx(0.7)  # median over q1, q2 only
    high = M.matching_head_deltas(table, pairs, threshold=0.7, **common)
    assert not high.matching.any()
    assert M.matching_head_labels(high, threshold=0.7) == []
    with pytest.raises(ValueError, match="unknown statistics"):
        M.matching_head_deltas(table, pairs, statistics=["nope"])
    with pytest.raises(ValueError, match="no 'hard_negative' pairs"):
        M.matching_head_deltas(table, pairs, statistics=["qd_max"])


def test_filter_correct():
    pairs = pd.DataFrame({"pair": [0, 1, 2, 3], "kind": ["relevant"] * 2 + ["easy_negative"] * 2})
    pred = pd.DataFrame({"pair": [3, 2, 1, 0], "predicted_relevant": [False, True, False, True]})
    stats = M.AttentionStatistics({}, [], pred)
    assert list(M.filter_correct(pairs, stats).pair) == [0, 3]


# ---------------------------------------------------------------------------- pairs
def toy_collection(n_queries: int = 6, seed: int = 0) -> Collection:
    """Query ``i`` asks for two content words of its own; its relevant documents contain them
    among filler words. Every other document (its judged-0 one, other queries' documents and
    unjudged ones) has two *spare* content words instead, so that relevant and non-relevant
    documents differ by the exact matches only, not by the kind of words they contain."""
    rng = random.Random(seed)
    spare = CONTENT[2 * n_queries :]
    queries, docs, qrels = {}, {}, {}
    for i in range(n_queries):
        qid, words = f"q{i}", CONTENT[2 * i : 2 * i + 2]
        queries[qid] = " ".join(words)
        qrels[qid] = {}
        for r in range(1 + i % 2):
            docs[f"{qid}-rel{r}"] = " ".join(rng.sample(words + rng.sample(FILLER, 6), 8))
            qrels[qid][f"{qid}-rel{r}"] = 1
        docs[f"{qid}-hard"] = " ".join(rng.sample(rng.sample(spare, 2) + rng.sample(FILLER, 6), 8))
        qrels[qid][f"{qid}-hard"] = 0
    for j in range(12):
        docs[f"other{j}"] = " ".join(rng.sample(rng.sample(spare, 2) + rng.sample(FILLER, 6), 8))
    queries["unjudged"] = "cat"
    return Collection("toy", queries, docs, qrels)


def test_hand_made_matching_head_comes_out_on_top(tok):
    """Head 0/1 gets ``W_Q = W_K = c R`` (orthonormal ``R``, no biases) on position-free
    embeddings, so its scores are ``c^2 (R^T x_q) . (R^T x_k)``: a query token attends to
    itself and to identical document tokens. It must have the largest matching delta."""
    model = load_cross_encoder(tiny_hf_model(0, d_model=64, n_heads=4), tokenizer=tok, device="cpu")
    layer, head = 0, 1
    with torch.no_grad():
        model.embed.pos_embed.W_pos.zero_()
        model.embed.token_type_embed.W_token_type.zero_()
        model.embed.ln.w.fill_(1.0)
        model.embed.ln.b.zero_()
        basis = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))[0]
        attn = model.blocks[layer].attn
        attn.W_Q[head] = 3 * basis
        attn.W_K[head] = 3 * basis
        attn.b_Q[head] = 0
        attn.b_K[head] = 0
    pairs = matching_pairs(toy_collection(), max_hard=1)
    deltas, stats = M.matching_heads(model, pairs, max_length=64, batch_size=8)
    for negative in ("easy_negative", "hard_negative"):
        # on top of the Q->D scores, the paper's criterion ...
        labels = M.matching_head_labels(deltas, statistic="qd_max", negative=negative)
        assert labels[0] == "0/1", (negative, labels)
        # ... and the largest positive D->Q delta (position-free random heads can have large
        # negative ones: a duplicated token splits the attention that it receives)
        dq = deltas[(deltas.statistic == "dq_max") & (deltas.negative == negative)]
        assert dq.loc[dq.delta.idxmax(), "label"] == "0/1"
    qd = deltas[(deltas.statistic == "qd_max") & (deltas.negative == "easy_negative")]
    assert qd.iloc[0].delta > 0.45 and qd.iloc[0].delta > qd.delta.iloc[1:].abs().max() + 0.2
    # relevant pairs match lexically: the head's Q->D attention goes to exact matches
    rel = pairs.kind.to_numpy() == "relevant"
    v = stats.values
    assert (v["qd_match_mass"][rel, 0, head] > 10 * v["qd_nonmatch_mass"][rel, 0, head]).all()
    assert not math.isnan(float(v["qd_match_max"][rel, 0, head].min()))


# ---------------------------------------------------------------------------- shared assets
@pytest.mark.shared
def test_shared_model_streaming_statistics_on_scifact():
    requires_shared(SHARED_MODEL)
    requires_shared(SCIFACT)
    from mechir.data import load_collection

    col = load_collection(SCIFACT, split="quick")
    pairs = matching_pairs(col, n_queries=2, max_relevant=1, max_hard=1, n_easy=1)
    model = load_cross_encoder(SHARED_MODEL, device="cpu")
    batch = model.encode(
        list(pairs["query"]), list(pairs["document"]), max_length=SHARED_MAX_LENGTH
    )
    fast = M.attention_statistics(model, batch, batch_size=3, whole_words=True)
    ref = M.attention_statistics_reference(model, batch, whole_words=True)
    for name in M.STATISTICS:
        torch.testing.assert_close(
            fast.values[name].nan_to_num(), ref.values[name].nan_to_num(), rtol=1e-4, atol=1e-5
        )
    assert (fast.pairs.n_matches > 0).any()
    kept = M.filter_correct(pairs, fast)
    assert set(kept.pair) <= set(pairs.pair)
