"""Short reprs of the library's data and result classes (a REPL must not flood)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechir.circuits import qk_svd
from mechir.data import Pair
from mechir.display import describe, short_list
from mechir.evaluation import evaluate
from mechir.matching import attention_statistics
from patching.perturbations import AlignedPairs
from tests.helpers import DOCUMENTS, QUERIES

LIMIT = 1000


@pytest.fixture(scope="module")
def big_batch(tiny):
    model, _, _ = tiny
    n = 200
    return model.encode(QUERIES * (n // 4), DOCUMENTS * (n // 4), max_length=64)


def test_describe():
    assert describe(torch.zeros(4, 2, 12)) == "float32[4, 2, 12]"
    assert describe(pd.DataFrame({"qid": [1, 2], "v": [0.1, 0.2]})) == "DataFrame[2 x 2: qid, v]"
    assert describe("x" * 100) == repr("x" * 37 + "...")
    assert describe({str(i): i for i in range(10)}) == "dict[10]: {'0': 0, '1': 1, '2': 2, ...}"
    assert describe(list(range(10))) == "list[10]: [0, 1, 2, ...]"
    assert (
        short_list(list(range(3))) == "[0, 1, 2]" and short_list(list(range(9)), 2) == "[0, 1, ...]"
    )


def test_batch_repr(big_batch):
    text = repr(big_batch)
    n, width = big_batch.input_ids.shape
    assert len(text) < LIMIT and text.startswith(f"CrossEncoderBatch({n} pairs x {width} positions")
    first = big_batch.lengths[:5].tolist()
    assert f"lengths [{', '.join(map(str, first))}, ...]" in text


def test_aligned_pairs_repr(big_batch):
    corrupted = big_batch.input_ids.clone()
    corrupted[:, 1] = 7  # the first query token of every pair
    changed = (corrupted != big_batch.input_ids).sum(-1)
    pairs = AlignedPairs.from_batches(
        big_batch,
        type(big_batch)(
            corrupted, big_batch.token_type_ids, big_batch.attention_mask, big_batch.parts
        ),
        pair_ids=[f"q{i}-d{i}" for i in range(len(big_batch))],
    )
    text = repr(pairs)
    assert len(text) < LIMIT and text.startswith(f"AlignedPairs({len(big_batch)} pairs x ")
    assert "pair_ids [q0-d0, q1-d1, q2-d2, q3-d3, q4-d4, ...]" in text
    assert f"changed tokens {short_list(changed.tolist())}" in text


def test_attention_statistics_repr(tiny, big_batch):
    model, _, _ = tiny
    stats = attention_statistics(model, big_batch)
    text = repr(stats)
    assert len(text) < LIMIT
    assert text.startswith(
        f"AttentionStatistics({len(big_batch)} pairs x 2 layers [0, 1] x 4 heads"
    )


def test_qk_svd_repr(tiny):
    model, _, _ = tiny
    text = repr(qk_svd(model))
    assert len(text) < LIMIT
    assert text == (
        "QKSVD(2 layers x 4 heads, d_model 32, rank 8; U=float32[2, 4, 32, 8], "
        "S=float32[2, 4, 8], V=float32[2, 4, 32, 8])"
    )


def test_evaluation_repr():
    run = {str(q): {f"d{i}": float(-i) for i in range(20)} for q in range(300)}
    qrels = {str(q): {f"d{q % 20}": 1} for q in range(300)}
    result = evaluate(run, qrels, ["nDCG@10", "RR"])
    text = repr(result)
    assert len(text) < LIMIT and "300 queries" in text
    assert text.startswith(f"Evaluation(nDCG@10={result.aggregate['nDCG@10']:.4f}, RR=")


def test_pair_repr():
    pair = Pair("q1", "d1", "what cat runs", "cat " * 500)
    assert repr(pair) == (
        f"Pair(qid='q1', docid='d1', query='what cat runs', document={'cat ' * 9 + 'c...'!r} "
        "(2000 chars))"
    )


def test_attribution_and_patching_result_reprs(tiny, big_batch):
    from mechir.attribution import neuron_integrated_gradients
    from mechir.attribution.neuron_selection import top_neurons
    from patching import head_target, patch_sweep

    model, _, _ = tiny
    batch = big_batch[:40]
    result = neuron_integrated_gradients(model, batch, n_steps=2, aggregate="position")
    selection = top_neurons(result.attributions.sum((0, 2)), 5.0)
    sweep = patch_sweep(
        model, AlignedPairs.from_batches(batch, batch), head_target(), progress=False
    )
    for obj in (result, selection, sweep):
        text = repr(obj)
        assert len(text) < LIMIT and "tensor(" not in text, text[:300]
        assert type(obj).__name__ in text
