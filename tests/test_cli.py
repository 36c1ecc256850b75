"""The ``mechir`` command on a tiny model saved to disk and a tiny collection."""

from __future__ import annotations

import json

import pytest

from mechir.cli import main
from mechir.data import read_run
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.test_data import make_collection


@pytest.fixture()
def saved_model(tmp_path):
    path = tmp_path / "model"
    tiny_hf_model().save_pretrained(path)
    tiny_tokenizer(tmp_path).save_pretrained(path)
    return path


def test_score_command(saved_model, tmp_path, capsys):
    assert (
        main(
            [
                "score",
                "--model",
                str(saved_model),
                "--device",
                "cpu",
                "--query",
                "what cat",
                "--document",
                "the cat runs",
                "--query",
                "dog",
                "--document",
                "a dog",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in rows] == ["what cat", "dog"]
    assert all(isinstance(r["score"], float) for r in rows)


def test_rerank_command_resumes(saved_model, tmp_path, capsys):
    (tmp_path / "col").mkdir()
    make_collection(tmp_path / "col")
    out = tmp_path / "out" / "run.trec"
    argv = [
        "rerank",
        "--model",
        str(saved_model),
        "--dataset",
        str(tmp_path / "col"),
        "--split",
        "test",
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    first = out.read_text()
    summary = json.loads(capsys.readouterr().out)
    assert summary["queries"] == 2 and 0 <= summary["nDCG@10"] <= 1
    # simulate an interruption: q2 complete is lost, q1 half written with a torn last line
    lines = first.splitlines()
    q1 = [line for line in lines if line.startswith("q1 ")]
    out.write_text(q1[0] + "\n" + q1[1][:7])
    assert main(argv) == 0
    (tmp_path / "first.trec").write_text(first)
    assert read_run(out) == read_run(tmp_path / "first.trec")
    assert len(out.read_text().splitlines()) == len(lines)  # no duplicate rows
    assert (tmp_path / "out" / "run.per_query.csv").exists()
