"""Decoder LLM rerankers end to end: the five studies on a tiny random Qwen3 yes/no reranker, the
PyTerrier stage (plain and with hooks) against ``model.score``, and torchrun with two processes
against one (the prompt recorded in the store's settings, the stored scores the model's)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from mechir import load_cross_encoder
from mechir.hooks import direction_ablation_hooks, head_knockout_hooks
from tests.analyses.conftest import common_options, write_tiny_collection
from tests.families.builders import save_tiny_decoder
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5
INSTRUCTION = "Judge whether the document answers the query"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen3_setup(tmp_path_factory):
    """A saved tiny Qwen3 yes/no reranker and a tiny collection."""
    root = tmp_path_factory.mktemp("decoder-studies")
    return save_tiny_decoder("qwen3", root / "model"), write_tiny_collection(root / "collection")


@pytest.mark.slow
def test_the_five_studies_run_on_a_qwen3_reranker(qwen3_setup, tmp_path):
    from analyses import (
        direction_ablation,
        matching_heads,
        neuron_attribution,
        patching_tfc1,
        qk_svd,
    )
    from mechir.circuits import qk_alignment

    model_dir, collection = qwen3_setup
    # the Qwen3-Reranker prompt alone is ~100 tokens: the last --max-length wins
    argv = [*common_options(model_dir, collection), "--max-length", "160"]
    argv += ["--instruction", INSTRUCTION]
    runs = {
        # causal attention: the document reads the query, never the other way round
        "da": (direction_ablation, ["--conditions", "document_to_query", "--layers",
                                    "cumulative", "--random-shuffles", "5"]),
        "mh": (matching_heads, ["--no-correct-only", "--threshold", "0.01", "--random-shuffles",
                                "5", "--knockout-top", "1", "--knockout-random", "1"]),
        "na": (neuron_attribution, ["--pairs-per-class", "4", "--per-query", "1", "--n-steps",
                                    "4", "--unit-pairs", "3", "--prune-seeds", "1", "--percents",
                                    "10", "--attribution-datasets", f"{collection}@test"]),
        "tfc1": (patching_tfc1, ["--unit-pairs", "10"]),
        "qk": (qk_svd, ["--top-heads", "2", "--directions", "2", "--tokens", "4",
                        "--cosine-pairs", "12"]),
    }  # fmt: skip
    for name, (study, extra) in runs.items():
        out = tmp_path / name
        assert study.main([*argv, *extra, "--output", str(out)]) == 0, name
        assert (out / "results.jsonl").read_text().strip(), name
        summary = json.loads((out / "summary.json").read_text())
        assert str(model_dir) in json.dumps(summary), name
    table = pd.read_csv(tmp_path / "da" / "table.csv")
    assert table["nDCG@10"].between(0, 1).all()
    model = load_cross_encoder(model_dir, device="cpu", instruction=INSTRUCTION)
    alignment = pd.read_csv(tmp_path / "qk" / "alignment.csv")
    pd.testing.assert_frame_equal(alignment, qk_alignment(model, k=3), check_dtype=False)


def test_the_query_to_document_condition_is_refused_in_one_line(qwen3_setup, tmp_path, capsys):
    from analyses import direction_ablation

    model_dir, collection = qwen3_setup
    argv = [*common_options(model_dir, collection), "--max-length", "160"]
    argv += ["--conditions", "query_to_document", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        direction_ablation.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "causal" in err.lower(), err


@pytest.mark.slow
def test_pyterrier_reranks_with_a_qwen3_reranker_and_its_hooks(qwen3_setup):
    pytest.importorskip("pyterrier", reason="python-terrier not installed")
    from mechir.pyterrier import MechirReranker

    model = load_cross_encoder(qwen3_setup[0], device="cpu")
    frame = pd.DataFrame(
        {
            "qid": ["1", "1", "2", "2"],
            "query": [QUERIES[0], QUERIES[0], QUERIES[1], QUERIES[1]],
            "docno": ["a", "b", "c", "d"],
            "text": DOCUMENTS[:4],
        }
    )
    batch = model.encode(list(frame["query"]), list(frame["text"]))
    plain = model.score(batch)
    hook_sets = (
        None,
        head_knockout_hooks(model, heads=["0/1", "1/2"]),
        direction_ablation_hooks(model, attending="document", attended="query"),
    )
    for hooks in hook_sets:
        out = MechirReranker(model, hooks=hooks).transform(frame)
        expected = model.score(batch, hooks=hooks)
        got = torch.tensor(out.set_index("docno").loc[list(frame.docno), "score"].to_numpy())
        torch.testing.assert_close(got.float(), expected, atol=ATOL, rtol=0)
        if hooks is not None:
            assert not torch.allclose(expected, plain, atol=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_on_a_qwen3_reranker(qwen3_setup, tmp_path):
    from tests.test_cli import rerank_argv
    from tests.test_cli_distributed import assert_same_rerank, run_both

    model_dir, _ = qwen3_setup
    collection = write_tiny_collection(tmp_path / "col", n_queries=5, depth=4)

    def argv_of(out):
        return rerank_argv(model_dir, collection, out, "--instruction", INSTRUCTION)

    one, two = run_both(argv_of, tmp_path)
    assert_same_rerank(one, two)
    for run in (one, two):  # the instruction is recorded in the store's settings
        meta = json.loads(run.with_name(run.name + ".mechir.json").read_text())
        assert meta["settings"]["instruction"] == INSTRUCTION
    rows = [json.loads(line) for line in one.with_name(one.name + ".mechir.jsonl").open()]
    model = load_cross_encoder(model_dir, device="cpu", instruction=INSTRUCTION)
    tsv = lambda name: dict(  # noqa: E731
        line.split("\t", 1) for line in (collection / name).read_text().splitlines()
    )
    queries, documents = tsv("queries.test.tsv"), tsv("docs.tsv")
    assert len(rows) == 5
    for row in rows[:2]:  # the stored scores are the model's
        texts = [documents[d] for d in row["docids"]]
        batch = model.encode([queries[row["unit"]]] * len(texts), texts)
        torch.testing.assert_close(
            torch.tensor(row["scores"]), model.score(batch), atol=ATOL, rtol=0
        )
