"""Direction ablation on the shared cross-encoder reproduces the independent reference values
of ../shared/README.md (plain HF with attention probabilities multiplied by a 0/1 mask)."""

from __future__ import annotations

import pytest

from mechir.hooks import direction_ablation

# (condition, directions, layers, nDCG@10); "no ablation" (0.7684) is checked through the
# `mechir rerank` command in tests/test_evaluation.py.
REFERENCE = [
    ("Query<->Document, layers 0-5", "no_interaction", range(6), 0.3219),
    ("Document->Query, layers 0-5", "document_to_query", range(6), 0.7722),
    ("Query->Document, layers 0-5", "query_to_document", range(6), 0.3957),
    ("Document->Document, layer 0", "document_to_document", [0], 0.7313),
    ("CLS->everything, layers 0-5", "cls_reads_nothing", range(6), 0.1868),
]


@pytest.fixture(scope="module")
def shared_setup():
    from tests.helpers import SCIFACT, SHARED_MODEL, requires_shared

    requires_shared(SHARED_MODEL)
    requires_shared(SCIFACT)
    from mechir import load_cross_encoder
    from mechir.data import load_collection

    col = load_collection(SCIFACT, split="quick")
    return load_cross_encoder(SHARED_MODEL, device="cpu"), col


@pytest.mark.shared
@pytest.mark.parametrize(
    "name,directions,layers,expected", REFERENCE, ids=[r[0] for r in REFERENCE]
)
def test_reference_ndcg(shared_setup, name, directions, layers, expected):
    from mechir.evaluation import evaluate, rerank
    from tests.helpers import SHARED_MAX_LENGTH

    model, col = shared_setup
    hooks = lambda b: direction_ablation(b, directions=directions, layers=layers)  # noqa: E731
    run = rerank(
        model,
        col.candidates(depth=20),
        hooks=hooks,
        max_length=SHARED_MAX_LENGTH,
        batch_size=50,
        progress=False,
    )
    assert evaluate(run, col.qrels).aggregate["nDCG@10"] == pytest.approx(expected, abs=0.002)
