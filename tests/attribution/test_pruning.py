from __future__ import annotations

import pytest
import torch

from mechir.attribution import pruning_evaluation, random_control, top_neurons
from mechir.data import Pair
from mechir.evaluation import evaluate, rerank
from mechir.hooks.neurons import neuron_ablation_hooks
from tests.helpers import DOCUMENTS, QUERIES


@pytest.fixture(scope="module")
def toy_collection():
    pairs = [
        Pair(f"q{i}", f"d{j}", q, d) for i, q in enumerate(QUERIES) for j, d in enumerate(DOCUMENTS)
    ]
    qrels = {f"q{i}": {f"d{i}": 1, f"d{(i + 1) % 4}": 0} for i in range(len(QUERIES))}
    return pairs, qrels


def test_pruning_evaluation_matches_direct_reranking(tiny, toy_collection):
    model, _, _ = tiny
    pairs, qrels = toy_collection
    gen = torch.Generator().manual_seed(0)
    sel = top_neurons(torch.randn(2, model.cfg.d_mlp, generator=gen), 10, label="top")
    result = pruning_evaluation(model, pairs, qrels, {"top": sel}, seeds=(0, 1), max_length=64)

    def ndcg(neurons):
        hooks = neuron_ablation_hooks(model, neurons) if neurons else None
        run = rerank(model, pairs, hooks=hooks, max_length=64, progress=False)
        return evaluate(run, qrels).aggregate["nDCG@10"]

    cond = result.conditions
    assert cond["kind"].tolist() == ["unpruned", "selected", "random", "random"]
    assert cond["n_neurons"].tolist() == [0, len(sel), len(sel), len(sel)]
    assert cond["value"].iloc[0] == pytest.approx(ndcg(None))
    assert cond["value"].iloc[1] == pytest.approx(ndcg(sel.neurons()))
    assert cond["value"].iloc[3] == pytest.approx(ndcg(random_control(sel, 1).neurons()))
    row = result.summary.iloc[0]
    assert row["selection"] == "top" and row["n_seeds"] == 2
    assert row["random_mean"] == pytest.approx(cond["value"].iloc[2:].mean())
    assert 0 <= row["p_vs_random"] <= 1 and 0 <= row["p_vs_unpruned"] <= 1
    assert set(result.per_query) == {"unpruned", "top", "top random seed=0", "top random seed=1"}


def test_pruning_evaluation_needs_seeds(tiny, toy_collection):
    model, _, _ = tiny
    pairs, qrels = toy_collection
    sel = top_neurons(torch.ones(2, model.cfg.d_mlp), 1)
    with pytest.raises(ValueError, match="at least one seed"):
        pruning_evaluation(model, pairs, qrels, sel, seeds=())
