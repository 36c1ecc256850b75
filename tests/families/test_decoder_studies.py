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
from tests.analyses.conftest import common_options, run_the_five_studies, write_tiny_collection
from tests.families.builders import save_tiny_decoder
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5
INSTRUCTION = "Judge whether the document answers the query"


@pytest.fixture(scope="module")
def qwen3_setup(tmp_path_factory):
    """A saved tiny Qwen3 yes/no reranker and a tiny collection."""
    root = tmp_path_factory.mktemp("decoder-studies")
    return save_tiny_decoder("qwen3", root / "model"), write_tiny_collection(root / "collection")


@pytest.mark.slow
def test_the_five_studies_run_on_a_qwen3_reranker(qwen3_setup, tmp_path):
    from mechir.circuits import qk_alignment

    model_dir, collection = qwen3_setup
    # the Qwen3-Reranker prompt alone is ~100 tokens: the last --max-length wins
    argv = [*common_options(model_dir, collection), "--max-length", "160"]
    argv += ["--instruction", INSTRUCTION]
    # causal attention: the document reads the query, never the other way round
    conditions = ["--conditions", "document_to_query", "--layers", "cumulative"]
    outputs = run_the_five_studies(argv, collection, tmp_path, conditions)
    for name, out in outputs.items():
        summary = json.loads((out / "summary.json").read_text())
        assert str(model_dir) in json.dumps(summary), name
    table = pd.read_csv(outputs["da"] / "table.csv")
    assert table["nDCG@10"].between(0, 1).all()
    model = load_cross_encoder(model_dir, device="cpu", instruction=INSTRUCTION)
    alignment = pd.read_csv(outputs["qk"] / "alignment.csv")
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
    from tests.test_cli_distributed import assert_prompt_reranker_runs_alike

    assert_prompt_reranker_runs_alike(qwen3_setup[0], tmp_path, "instruction", INSTRUCTION)
