"""Bad input to the ``mechir`` command and to a study: exit status 2, one line on stderr naming
the offending value, no traceback, and (for the cheap checks) the model is never loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analyses.direction_ablation as direction_ablation
import mechir.loading
from mechir.cli import main
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.test_data import make_collection

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def assets(tmp_path, monkeypatch):
    """A tiny saved model (64 positions), a tiny collection, a plain file; loading is forbidden."""
    model = tmp_path / "model"
    tiny_hf_model().save_pretrained(model)
    tiny_tokenizer(tmp_path).save_pretrained(model)
    (tmp_path / "col").mkdir()
    make_collection(tmp_path / "col")
    (tmp_path / "file").write_text("not a directory\n")
    (tmp_path / "empty-doc").mkdir()
    make_collection(tmp_path / "empty-doc")
    docs = tmp_path / "empty-doc" / "docs.tsv"
    docs.write_text(docs.read_text().replace("d3\tfish swim", "d3\t "))

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before a cheap check")

    monkeypatch.setattr(mechir.loading, "load_cross_encoder", forbidden)
    monkeypatch.delenv("MECHIR_MODEL", raising=False)
    return tmp_path


#: (extra arguments, text the one-line error must contain)
BAD = [
    (["--batch-size", "0"], "--batch-size: '0'"),
    (["--limit-queries", "0"], "--limit-queries: '0'"),
    (["--limit-queries", "-1"], "--limit-queries: '-1'"),
    (["--depth", "-1"], "--depth: '-1'"),
    (["--depth", "ten"], "--depth: 'ten'"),
    (["--max-length", "0"], "--max-length: '0'"),
    (["--max-length", "9999"], "--max-length 9999"),
    pytest.param(["--device", "cuda"], "--device cuda", marks=NO_CUDA),
    (["--output", "{tmp}/file/run.trec"], "file/run.trec"),
    (["--output", "{tmp}"], "is a directory"),
    (["--model", "{tmp}/no-such-model"], "no-such-model"),
    (["--dataset", "{tmp}/no-such-collection"], "no-such-collection"),
    (["--bogus"], "--bogus"),
    (["--dataset", "{tmp}/empty-doc"], "query 'q1', document 'd3' is empty"),
]


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def model_and_data(assets, output) -> list[str]:
    model, col = str(assets / "model"), str(assets / "col")
    return ["--model", model, "--dataset", col, "--split", "test", "--output", str(output)]


def fill(args, tmp) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in args]


@pytest.mark.parametrize(("extra", "named"), BAD)
def test_cli_bad_input(assets, capsys, extra, named):
    argv = ["rerank", *model_and_data(assets, assets / "out" / "run.trec"), *fill(extra, assets)]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("mechir") and named.replace("{tmp}", str(assets)) in line


def test_cli_debug_shows_the_traceback(assets):
    with pytest.raises(ValueError, match="9999"):
        main(
            ["score", "--model", str(assets / "model"), "--query", "q", "--document", "d"]
            + ["--max-length", "9999", "--debug"]
        )


def test_cli_settings_errors_are_one_line(assets, capsys, monkeypatch):
    monkeypatch.setenv("MECHIR_BATCH_SIZE", "many")
    assert main(["rerank", "--help"]) == 2
    assert "MECHIR_BATCH_SIZE" in one_line_error(capsys)


def test_cli_process_exit_status_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mechir.cli", "rerank", "--model", "m", "--dataset", "d"]
        + ["--output", str(tmp_path / "r"), "--batch-size", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "mechir: error: argument --batch-size: '0' is not a positive integer (at least 1) "
        "(see mechir rerank --help)"
    ]


CLI_ONLY = ("file/run.trec", "is a directory", "empty-doc")  # a study's --output is a directory
STUDY_BAD = [row for row in BAD if not any(k in str(row) for k in CLI_ONLY)]
STUDY_BAD += [
    (["--output", "{tmp}/file"], "is a file"),
    (["--output", "{tmp}/file/sub"], "file/sub"),
    (["--conditions", "query->nowhere"], "nowhere"),
]


@pytest.mark.parametrize(("extra", "named"), STUDY_BAD)
def test_study_bad_input(assets, capsys, extra, named):
    argv = [*model_and_data(assets, assets / "study"), "--no-progress", *fill(extra, assets)]
    with pytest.raises(SystemExit) as exit_info:
        direction_ablation.main(argv)
    assert exit_info.value.code == 2
    line = one_line_error(capsys)
    assert str(exit_info.value) == line
    assert line.startswith("python -m analyses.direction_ablation: error:")
    assert named.replace("{tmp}", str(assets)) in line
