"""Bad input to the ``mechir`` command and to a study: exit status 2, one line on stderr naming
the offending value, no traceback, and (for the cheap checks) the model is never loaded and no
file is created. A run that fails after the model loaded leaves nothing behind either (except a
store holding real results), so the corrected command runs (issue 25)."""

from __future__ import annotations

import json
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
    (tmp_path / "no-queries").mkdir()
    make_collection(tmp_path / "no-queries")
    (tmp_path / "no-queries" / "queries.test.tsv").write_text("\n")
    unknown = tmp_path / "unknown-type"
    tiny_hf_model().save_pretrained(unknown)
    tiny_tokenizer(tmp_path).save_pretrained(unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    (tmp_path / "pairs-empty.tsv").write_text("\n  \n")
    (tmp_path / "pairs-blank-doc.tsv").write_text("cat\tthe cat\ndog\t \n")
    (tmp_path / "precious.txt").write_text("precious user data\n")
    (tmp_path / "pairs-latin1.tsv").write_bytes("cat\tthe cat\ncafé\tle café\n".encode("latin-1"))
    # issue 30: output directories holding files mechir did not write
    for name, content in (
        ("config-not-json", b"not json\n"),
        ("config-latin-1", b"caf\xe9\n"),
        ("config-foreign", b'{"a":1}'),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes(content)
    (tmp_path / "user-summary").mkdir()
    (tmp_path / "user-summary" / "summary.md").write_text("notes\n")
    (tmp_path / "user-settings").mkdir()
    (tmp_path / "user-settings" / "r.trec.mechir.json").write_text('{"mine":true}\n')

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
    (["--answer-tokens", "yes"], "give the relevant and the non-relevant answer token"),
    (["--template", "{query} {document}"], "template: BERT reads no prompt"),
    (["--dataset", "{tmp}/empty-doc"], "query 'q1', document 'd3' is empty"),
    # issue 25: each refused before the output is claimed
    (["--max-length", "3"], "--max-length 3 is too small"),
    (["--max-length", "4"], "use --max-length 5 or more"),
    (
        ["--model", "{tmp}/unknown-type"],
        "{tmp}/unknown-type/config.json: model_type 'frobnicator' is not supported; mechir loads "
        "rerankers of the families BERT (bert), ELECTRA",
    ),
    (
        ["--dataset", "{tmp}/no-queries"],
        "the queries file {tmp}/no-queries/queries.test.tsv holds no queries",
    ),
    (["--measures", "nDCG@10", "bogus"], "--measures 'bogus' is not an ir_measures measure"),
    # issue 30, L2: the user's file where rerank keeps its settings
    (
        ["--output", "{tmp}/user-settings/r.trec"],
        "{tmp}/user-settings/r.trec.mechir.json exists and was not written by mechir, and mechir "
        "never modifies a file it did not write; choose another --output or move the file away",
    ),
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


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize(("extra", "named"), BAD)
def test_cli_bad_input(assets, capsys, extra, named):
    argv = ["rerank", *model_and_data(assets, assets / "out" / "run.trec"), *fill(extra, assets)]
    before = files_under(assets)
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("mechir") and named.replace("{tmp}", str(assets)) in line
    assert files_under(assets) == before  # nothing claimed, no stub left


#: ``mechir score``: (arguments, text the one-line error must contain)
SCORE_BAD = [
    (["--query", "a"], "1 --query but 0 --document"),
    (
        ["--query", "a", "--document", "b", "--output", "{tmp}/precious.txt"],
        "{tmp}/precious.txt exists and was not written by mechir",
    ),
    (["--pairs", "{tmp}/pairs-empty.tsv"], "--pairs {tmp}/pairs-empty.tsv holds no pairs"),
    (
        ["--query", "a", "--document", "b", "--pairs", "{tmp}/pairs-empty.tsv"],
        "--pairs {tmp}/pairs-empty.tsv holds no pairs",
    ),
    (["--pairs", "{tmp}/pairs-blank-doc.tsv"], "pairs-blank-doc.tsv:2: the document is empty"),
    # issue 30: a byte that is not UTF-8 is named with its file and line
    (["--pairs", "{tmp}/pairs-latin1.tsv"], "{tmp}/pairs-latin1.tsv:2: not valid UTF-8 (byte 0xe9"),
    (["--query", " ", "--document", "b"], "--query/--document pair 1: the query is empty"),
    ([], "nothing to score: give --query/--document or --pairs"),
    (["--query", "a", "--document", "b", "--max-length", "2"], "--max-length 2 is too small"),
]


@pytest.mark.parametrize(("extra", "named"), SCORE_BAD)
def test_score_bad_input(assets, capsys, extra, named):
    """Issue 25, cases 1 and 5: a foreign --output is refused and left untouched; an empty
    --pairs file is named; all before the model loads."""
    before = {p: p.read_bytes() for p in assets.rglob("*") if p.is_file()}
    assert main(["score", "--model", str(assets / "model"), *fill(extra, assets)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("mechir: error: ") and named.replace("{tmp}", str(assets)) in line
    assert {p: p.read_bytes() for p in assets.rglob("*") if p.is_file()} == before


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


# a study's --output is a directory; it has no --measures; it finds an empty queries file after
# the model loaded (test_failed_study_leaves_nothing_behind)
CLI_ONLY = (
    "file/run.trec", "is a directory", "empty-doc", "--measures", "no-queries", "user-settings"
)  # fmt: skip
STUDY_BAD = [row for row in BAD if not any(k in str(row) for k in CLI_ONLY)]
STUDY_BAD += [
    (["--output", "{tmp}/file"], "is a file"),
    (["--output", "{tmp}/file/sub"], "file/sub"),
    (["--conditions", "query->nowhere"], "nowhere"),
    # issue 30: the summary's paired t-tests need 2 queries: refused before the model loads
    (
        ["--limit-queries", "1"],
        "--limit-queries 1 selects 1 judged query with candidates; the summary's paired t-tests "
        "need at least 2: use --limit-queries 2 or more",
    ),
    # issue 30: a config.json that is not a study record, named with its cause
    (
        ["--output", "{tmp}/config-not-json"],
        "{tmp}/config-not-json/config.json is not JSON (Expecting value: line 1 column 1 (char 0))"
        ", so not a mechir study record; choose another --output or move the file away",
    ),
    (["--output", "{tmp}/config-latin-1"], "{tmp}/config-latin-1/config.json is not JSON ("),
    (
        ["--output", "{tmp}/config-foreign"],
        '{tmp}/config-foreign/config.json is JSON but not a mechir study record (no "study" and '
        '"config" entries); choose another --output or move the file away',
    ),
    # issue 30: the user's summary in the output directory, refused before any work
    (
        ["--output", "{tmp}/user-summary"],
        "{tmp}/user-summary/summary.md exists and was not written by mechir",
    ),
]


def test_demo_with_one_query_is_refused_before_running(tmp_path, capsys, monkeypatch):
    """Issue 30: ``mechir demo --limit-queries 1`` cannot produce its paired tests: one line at
    parse time, nothing run, nothing left behind."""
    import analyses.direction_ablation

    monkeypatch.setattr(analyses.direction_ablation, "main", None)  # never started
    assert main(["demo", "--output", str(tmp_path / "d"), "--limit-queries", "1"]) == 2
    line = one_line_error(capsys)
    assert "argument --limit-queries: '1' is too few: the summary's paired t-tests" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("extra", "named"), STUDY_BAD)
def test_study_bad_input(assets, capsys, extra, named):
    argv = [*model_and_data(assets, assets / "study"), "--no-progress", *fill(extra, assets)]
    before = files_under(assets)
    with pytest.raises(SystemExit) as exit_info:
        direction_ablation.main(argv)
    assert exit_info.value.code == 2
    line = one_line_error(capsys)
    assert str(exit_info.value) == line
    assert line.startswith("python -m analyses.direction_ablation: error:")
    assert named.replace("{tmp}", str(assets)) in line
    assert files_under(assets) == before  # no config.json, lock or results.jsonl left


# ---------------------------------------------------------------------- after the model loaded
@pytest.fixture()
def loadable(tmp_path):
    """The ``assets`` files, with loading allowed, plus broken models that fail only at load."""
    model = tmp_path / "model"
    tiny_hf_model().save_pretrained(model)
    tiny_tokenizer(tmp_path).save_pretrained(model)
    (tmp_path / "col").mkdir()
    make_collection(tmp_path / "col")
    (tmp_path / "no-queries").mkdir()
    make_collection(tmp_path / "no-queries")
    (tmp_path / "no-queries" / "queries.test.tsv").write_text("")
    truncated = tmp_path / "truncated"
    tiny_hf_model().save_pretrained(truncated)
    tiny_tokenizer(tmp_path).save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_hf_model().save_pretrained(no_tokenizer)
    return tmp_path


def rerank(root: Path, out: Path, *extra: str, model: str = "model") -> list[str]:
    return [
        "rerank", "--model", str(root / model), "--dataset", str(root / "col"), "--split", "test",
        "--device", "cpu", "--no-progress", "--output", str(out), *extra,
    ]  # fmt: skip


def last_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip().splitlines()[-1]


#: (failing model and options, the error, the corrected options): each fails after the model
#: directory passed the cheap checks (``cats``/``dogs`` are 2 tokens: 5 leaves no room)
AFTER_LOAD = [
    ("truncated", [], "truncated or corrupted safetensors file", "model", []),
    ("no-tokenizer", [], "no usable tokenizer", "model", []),
    ("model", ["--max-length", "5"], "query 'q1': the query has 2 tokens", "model",
     ["--max-length", "6"]),
]  # fmt: skip


@pytest.mark.parametrize("existing_dir", [False, True], ids=["new-dir", "existing-dir"])
@pytest.mark.parametrize(("model", "extra", "error", "fixed_model", "fixed"), AFTER_LOAD)
def test_failed_rerank_leaves_nothing_and_the_corrected_command_runs(
    loadable, capsys, existing_dir, model, extra, error, fixed_model, fixed
):
    """Issue 25, case 2: a run that fails after the model loaded leaves no settings file, lock
    or directory behind, so the corrected command is not refused as "other settings"."""
    parent = loadable / "results" / ("kept" if existing_dir else "new")
    if existing_dir:
        parent.mkdir(parents=True)
    before = files_under(loadable)
    out = parent / "run.trec"
    assert main(rerank(loadable, out, *extra, model=model)) == 2
    assert error in last_error_line(capsys)
    assert files_under(loadable) == before
    assert main(rerank(loadable, out, *fixed, model=fixed_model)) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 2


def test_a_store_without_results_adopts_the_new_settings(loadable, capsys):
    """A settings file a killed run left without any stored query does not block the command:
    its settings are replaced (mechir wrote it; a settings file the user wrote is refused, see
    test_a_foreign_settings_file_is_refused_and_left_alone)."""
    from mechir import outputs

    out = loadable / "run.trec"
    stub = {"settings": {"model": "elsewhere", "max_length": 3, "score_type": "prob"}}
    meta = out.with_name(out.name + ".mechir.json")
    outputs.write_json(meta, stub)
    assert main(rerank(loadable, out, "--max-length", "6")) == 0
    saved = json.loads(meta.read_text())["settings"]
    assert saved["max_length"] == 6 and saved["score_type"] == "binary_logit"
    assert saved["model"] == str((loadable / "model").resolve())
    assert json.loads(capsys.readouterr().out)["queries"] == 2


def test_a_failed_rerank_keeps_a_store_with_results(loadable, capsys, monkeypatch):
    """A failure after a query was stored keeps the store and its settings: the same command
    resumes; other settings are refused."""
    import mechir.evaluation

    real = mechir.evaluation.score_pairs

    def fail_on_q2(model, pairs, **kwargs):
        if pairs[0].qid == "q2":
            raise ValueError("simulated failure")
        return real(model, pairs, **kwargs)

    out = loadable / "new" / "run.trec"
    monkeypatch.setattr(mechir.evaluation, "score_pairs", fail_on_q2)
    assert main(rerank(loadable, out)) == 2
    assert "query q2: simulated failure" in last_error_line(capsys)
    store = out.with_name(out.name + ".mechir.jsonl")
    assert [json.loads(line)["unit"] for line in store.read_text().splitlines()] == ["q1"]
    assert out.with_name(out.name + ".mechir.json").exists()
    assert not store.with_suffix(".jsonl.lock").exists()
    assert main(rerank(loadable, out, "--max-length", "6")) == 2
    assert "other settings" in last_error_line(capsys)
    monkeypatch.setattr(mechir.evaluation, "score_pairs", real)
    assert main(rerank(loadable, out)) == 0
    assert "resuming: 1 of 2" in capsys.readouterr().err


def study(root: Path, out: Path, *extra: str, model: str = "model", dataset: str = "col") -> list:
    return [
        "--model", str(root / model), "--dataset", str(root / dataset), "--split", "test",
        "--device", "cpu", "--no-progress", "--output", str(out), "--conditions",
        "no_interaction", "--layers", "0", "--random-shuffles", "5", *extra,
    ]  # fmt: skip


STUDY_AFTER_LOAD = [
    ({"model": "truncated"}, [], "truncated or corrupted safetensors file"),
    ({}, ["--max-length", "5"], "the query has 2 tokens"),
    ({"dataset": "no-queries"}, [], "the queries file {tmp}/no-queries/queries.test.tsv holds"),
]


@pytest.mark.parametrize(("where", "extra", "error"), STUDY_AFTER_LOAD)
def test_failed_study_leaves_nothing_behind(loadable, capsys, where, extra, error):
    """A study that fails after opening its output directory removes the config.json, lock and
    directories it created (no unit was stored)."""
    before = files_under(loadable)
    with pytest.raises(SystemExit) as info:
        direction_ablation.main(study(loadable, loadable / "runs" / "da", *extra, **where))
    assert info.value.code == 2
    assert error.replace("{tmp}", str(loadable)) in last_error_line(capsys)
    assert files_under(loadable) == before


def test_corrected_study_runs_after_a_failed_one(loadable, capsys):
    out = loadable / "da"
    with pytest.raises(SystemExit):
        direction_ablation.main(study(loadable, out, "--max-length", "5"))
    assert not out.exists()
    assert direction_ablation.main(study(loadable, out, "--max-length", "6")) == 0
    assert json.loads((out / "config.json").read_text())["config"]["max_length"] == 6


def test_a_study_directory_with_results_is_kept_after_a_failure(loadable, capsys, monkeypatch):
    """A study that fails after storing a unit keeps the config.json and results.jsonl it
    created (real results), releases the lock, and the same command resumes."""
    study_class = direction_ablation.DirectionAblation
    real = study_class.compute
    calls = []

    def fail_second(self, unit):
        calls.append(unit.id)
        if len(calls) == 2:
            raise ValueError("simulated failure")
        return real(self, unit)

    out = loadable / "new" / "da"
    monkeypatch.setattr(study_class, "compute", fail_second)
    with pytest.raises(SystemExit):
        direction_ablation.main(study(loadable, out, "--max-length", "6"))
    assert "simulated failure" in last_error_line(capsys)
    stored = [json.loads(x)["unit"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert stored == calls[:1]
    assert json.loads((out / "config.json").read_text())["config"]["max_length"] == 6
    assert not (out / "results.jsonl.lock").exists()
    monkeypatch.setattr(study_class, "compute", real)
    assert direction_ablation.main(study(loadable, out, "--max-length", "6")) == 0


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "bert"])
def test_max_length_range_is_the_families_before_loading(tmp_path, capsys, monkeypatch, family):
    """The cheap --max-length checks use the family read from config.json: RoBERTa/XLM-R lose
    ``pad_token_id + 1`` positions to their offset and need 4 special tokens. The position
    limit agrees with the loaded model's own (``HookedCrossEncoder.max_length``)."""
    from mechir.cli_common import resolve_max_length
    from mechir.loading import load_cross_encoder
    from tests.families.builders import save_tiny_family

    model = save_tiny_family(family, tmp_path / family)
    limit = load_cross_encoder(model, device="cpu").max_length
    special = 3 if family == "bert" else 4
    assert resolve_max_length(str(model), limit) == limit
    assert resolve_max_length(str(model), special + 2) == special + 2
    capsys.readouterr()
    monkeypatch.setattr(mechir.loading, "load_cross_encoder", None)  # never loaded again
    for bad, named in [(limit + 1, f"has {limit} positions"), (special + 1, f"{special + 2} or")]:
        argv = ["score", "--model", str(model), "--query", "a", "--document", "b"]
        assert main([*argv, "--max-length", str(bad)]) == 2
        assert named in one_line_error(capsys)
