"""The ``mechir`` command on a tiny model saved to disk and a tiny collection: scoring, and a
rerank output that is lossless, locked, settings-checked and never adopts a foreign file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import mechir
from mechir.cli import main
from mechir.data import load_collection, read_run
from mechir.evaluation import score_pairs
from mechir.store import ResultsStore
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.test_data import make_collection


@pytest.fixture()
def saved_model(tmp_path):
    path = tmp_path / "model"
    tiny_hf_model().save_pretrained(path)
    tiny_tokenizer(tmp_path).save_pretrained(path)
    return path


def rerank_argv(
    model: Path, collection: Path, out: Path, *extra: str, split: str = "test"
) -> list[str]:
    """``mechir rerank`` of ``collection``'s ``split`` on the CPU, no progress bar, into ``out``."""
    return [
        "rerank",
        "--model",
        str(model),
        "--dataset",
        str(collection),
        "--split",
        split,
        "--device",
        "cpu",
        "--no-progress",
        *extra,
        "--output",
        str(out),
    ]


@pytest.fixture(name="rerank_argv")
def rerank_argv_fixture(saved_model, tmp_path):
    (tmp_path / "col").mkdir()
    make_collection(tmp_path / "col")
    out = tmp_path / "out" / "run.trec"
    return rerank_argv(saved_model, tmp_path / "col", out), out


def store_of(out):
    return out.with_name(out.name + ".mechir.jsonl")


def test_lazy_package_exports_every_public_name():
    assert set(mechir.__all__) == set(mechir._LAZY)
    for name in mechir.__all__:
        assert getattr(mechir, name) is getattr(
            __import__(mechir._LAZY[name], fromlist=[name]), name
        )
    assert mechir.hooks.head_knockout_hooks  # submodules on attribute access
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mechir.nope  # noqa: B018


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
    model = mechir.load_cross_encoder(saved_model, device="cpu")
    expected = model.score(model.encode(["what cat", "dog"], ["the cat runs", "a dog"]))
    assert [r["score"] for r in rows] == expected.tolist()


def test_rerank_scores_are_exact_and_resume_is_identical(rerank_argv, saved_model, capsys):
    argv, out = rerank_argv
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["queries"] == 2 and 0 <= summary["nDCG@10"] <= 1
    assert summary["score_type"] == "binary_logit"
    first = out.read_text()
    # the TREC file holds the full-precision scores of the same forward pass (no rounding)
    model = mechir.load_cross_encoder(saved_model, device="cpu")
    col = load_collection(out.parents[1] / "col", split="test")
    pairs = [p for p in col.candidates(depth=100) if p.qid == "q1"]
    expected = score_pairs(model, pairs, batch_size=32, progress=False).tolist()
    assert [read_run(out)["q1"][p.docid] for p in pairs] == expected
    # interruption: q2 lost, q1's line torn mid-write, the TREC run not yet written
    lines = store_of(out).read_text().splitlines()
    store_of(out).write_text(lines[0] + "\n" + lines[1][:20])
    out.unlink()
    assert main(argv) == 0
    assert "resuming: 1 of 2" in capsys.readouterr().err
    assert out.read_text() == first  # byte-identical to the uninterrupted run
    assert len(store_of(out).read_text().splitlines()) == 2  # no duplicates
    assert out.with_suffix(".per_query.csv").exists()
    assert not store_of(out).with_suffix(".jsonl.lock").exists()  # removed on a clean finish


def test_smaller_limit_queries_keeps_finished_work(rerank_argv, capsys):
    argv, out = rerank_argv
    assert main(argv) == 0
    full = read_run(out)
    capsys.readouterr()
    assert main([*argv, "--limit-queries", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["queries"] == 1 and summary["queries_in_output"] == 2
    assert read_run(out) == full  # nothing deleted
    assert len(ResultsStore(store_of(out), lock=False)) == 2


def test_foreign_output_file_is_refused_and_left_alone(rerank_argv, capsys):
    argv, out = rerank_argv
    out.parent.mkdir()
    bm25 = "q1 Q0 d2 1 3.0 bm25\nq1 Q0 d1 2 2.0 bm25\n"
    out.write_text(bm25)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not written by mechir" in err
    assert out.read_text() == bm25 and not store_of(out).exists()


def test_edited_output_is_refused_and_no_line_is_lost(rerank_argv, capsys):
    argv, out = rerank_argv
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    lines[1] = "garbage"
    edited = "\n".join(lines) + "\n"
    out.write_text(edited)
    for _ in range(2):
        assert main(argv) == 2
        assert "changed since mechir wrote it" in capsys.readouterr().err
        assert out.read_text() == edited


def test_corrupt_store_line_is_an_error_and_nothing_is_cut(rerank_argv, capsys):
    argv, out = rerank_argv
    assert main(argv) == 0
    out.unlink()
    lines = store_of(out).read_text().splitlines()
    corrupt = "not json\n" + lines[1] + "\n"
    store_of(out).write_text(corrupt)
    for _ in range(2):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unreadable line" in err and "Traceback" not in err
        assert store_of(out).read_text() == corrupt


@pytest.mark.parametrize(
    ("change", "named"),
    [(["--max-length", "32"], "max_length"), (["--depth", "2"], "depth")],
)
def test_other_settings_on_resume_are_refused(rerank_argv, capsys, change, named):
    argv, out = rerank_argv
    assert main([*argv, "--max-length", "64"] if named == "depth" else argv) == 0
    before = store_of(out).read_text()
    capsys.readouterr()
    assert main([*argv, *change]) == 2
    err = capsys.readouterr().err
    assert named in err and "other settings" in err
    assert store_of(out).read_text() == before


def test_weights_replaced_in_place_are_a_mismatch(rerank_argv, saved_model, capsys):
    argv, out = rerank_argv
    assert main(argv) == 0
    tiny_hf_model(seed=1).save_pretrained(saved_model)  # same path, new weights
    capsys.readouterr()
    assert main(argv) == 2
    assert "weights" in capsys.readouterr().err


def test_a_second_writer_is_refused(rerank_argv, capsys):
    argv, out = rerank_argv
    out.parent.mkdir()
    with ResultsStore(store_of(out)):  # another run holds the lock
        assert main(argv) == 2
    assert "another process" in capsys.readouterr().err
    assert not out.exists()


HEAVY = ("torch", "transformers", "transformer_lens", "pandas", "matplotlib")
STUDIES = ("direction_ablation", "neuron_attribution", "patching_tfc1", "matching_heads", "qk_svd")


def imported_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after running ``code`` (a module
    bound by :func:`mechir.lazy.lazy_import` but never used does not count: it did not run)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    loaded = "m in sys.modules and type(sys.modules[m]).__name__ != '_LazyModule'"
    check = f"{code}\nimport sys\nprint('\\n' + ' '.join(m for m in {HEAVY!r} if {loaded}))"
    proc = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return proc.stdout.splitlines()[-1].split() if proc.stdout.strip() else []


def test_import_and_help_load_no_model_library():
    """Issue 15: ``import mechir``, ``mechir --help`` and argument errors stay instant because
    they import none of torch / transformers / TransformerLens (timings: benchmarks/)."""
    assert imported_after("import mechir, mechir.cli") == []
    code = (
        "from mechir.cli import main\n"
        "for argv in (['--help'], ['rerank', '--help'], ['rerank', '--depth', '0'],\n"
        "             ['demo', '--help'], ['demo', '--limit-queries', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert imported_after(code) == []


@pytest.mark.parametrize("study", STUDIES)
def test_study_help_and_argument_errors_load_no_heavy_library(study):
    """Issue 15: a study's ``--help`` and argument errors answer before torch, pandas or
    matplotlib load (each is bound lazily and loads on first use; timings: benchmarks/)."""
    code = (
        f"from analyses.{study} import main\n"
        "for argv in (['--help'], ['--batch-size', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert imported_after(code) == []


def test_lazy_modules_load_on_first_use():
    """The lazily bound modules are the real ones once used (no proxy left behind)."""
    code = (
        "import mechir.hooks, mechir.parts, analyses.summary\n"
        "import mechir.parts as parts\n"
        "assert parts.torch.ones(2).sum().item() == 2\n"
        "import torch\n"
        "assert parts.torch is torch and type(torch).__name__ == 'module'"
    )
    assert "torch" in imported_after(code)


# ---------------------------------------------------------------------- commands of other packages
ROOT = Path(__file__).resolve().parents[1]


def test_the_library_never_imports_the_studies():
    """Issue 21: no import statement in mechir/ names analyses/ or patching/ (inside functions
    too), and importing the CLI and building its parser leave them unimported statically."""
    import re

    pattern = re.compile(r"^\s*(from|import) (analyses|patching)\b")
    offending = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "mechir").rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.match(line)
    ]
    assert offending == []
    code = "import mechir, mechir.cli, sys\nprint('\\n' + ' '.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    loaded = proc.stdout.splitlines()[-1].split()
    assert not [m for m in loaded if m.split(".")[0] in ("analyses", "patching")]


def test_pyproject_declares_the_known_commands_as_entry_points():
    """The fallback module paths of the CLI are the entry points pip installs (no drift)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from mechir.cli_plugins import COMMAND_GROUP, KNOWN_COMMANDS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"][COMMAND_GROUP] == KNOWN_COMMANDS


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{score,rerank,demo}" in out and "demo the main job, offline: direction ablation" in out


def fake_command(calls: list) -> Any:
    from mechir.cli_plugins import Command

    def add(p):
        p.add_argument("--answer", type=int, required=True)

    return Command(
        help="a fake plugin",
        description="fake",
        add_options=add,
        run=lambda a: calls.append(a) or 5,
    )


FAKE_CALLS: list = []
FAKE = fake_command(FAKE_CALLS)


def test_a_command_is_found_through_its_entry_point(monkeypatch, capsys):
    """A package's ``mechir.commands`` entry point becomes a subcommand, with its options."""
    from importlib.metadata import EntryPoint

    import mechir.cli as cli
    import mechir.cli_plugins as plugins

    point = EntryPoint(name="fake", value="tests.test_cli:FAKE", group=plugins.COMMAND_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [point])
    FAKE_CALLS.clear()
    assert cli.main(["fake", "--answer", "42"]) == 5
    assert [args.answer for args in FAKE_CALLS] == [42]
    assert cli.main(["fake", "--answer", "x"]) == 2
    assert "--answer: invalid int value" in capsys.readouterr().err


def test_demo_runs_from_its_module_when_the_entry_point_is_not_installed(monkeypatch):
    """An editable install made before the entry point existed still has ``mechir demo``."""
    import analyses.demo
    import mechir.cli as cli
    import mechir.cli_plugins as plugins

    monkeypatch.setattr(plugins, "_entry_points", lambda: {})
    seen = []
    monkeypatch.setattr(analyses.demo, "run_demo", lambda args: seen.append(args) or 7)
    assert cli.main(["demo", "--limit-queries", "3", "--device", "cpu"]) == 7
    assert seen[0].limit_queries == 3 and seen[0].device == "cpu"
    assert analyses.demo.study_argv(seen[0])[-2:] == ["--limit-queries", "3"]


@pytest.mark.parametrize("argv", [["demo"], ["demo", "--help"], ["demo", "--output", "x"]])
def test_a_missing_demo_is_one_line(monkeypatch, capsys, argv):
    import mechir.cli as cli
    import mechir.cli_plugins as plugins

    monkeypatch.setattr(plugins, "_entry_points", lambda: {})
    monkeypatch.setitem(plugins.KNOWN_COMMANDS, "demo", "no_such_package.demo:COMMAND")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "mechir: error: 'mechir demo' is not installed (no module 'no_such_package'; it comes "
        "with the mechir repository's studies: run 'pip install -e .' in a checkout of it)"
    ]
    with pytest.raises(SystemExit):
        cli.main(["--help"])  # the other commands still work, and demo says why it cannot
    assert "not available" in capsys.readouterr().out


def test_a_broken_entry_point_does_not_break_the_other_commands(monkeypatch, capsys):
    import mechir.cli as cli
    import mechir.cli_plugins as plugins

    monkeypatch.setattr(plugins, "_entry_points", lambda: {"bad": "tests.test_cli:no_such_object"})
    assert cli.main(["bad"]) == 2
    assert "is not a mechir.cli_plugins.Command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["score", "--help"])
    assert info.value.code == 0


# ---------------------------------------------------------------------- score: output, truncation
def score_argv(model: Path, *pairs: tuple[str, str], extra: Sequence[str] = ()) -> list[str]:
    argv = ["score", "--model", str(model), "--device", "cpu", *extra]
    for q, d in pairs:
        argv += ["--query", q, "--document", d]
    return argv


def test_score_output_replaces_only_its_own_file(saved_model, tmp_path, capsys):
    """Issue 25, case 1, and issue 30: ``--output`` writes its file (directories made, no
    temporary file left); a rerun may replace the file mechir wrote, but a file the user
    wrote or edited is refused with one line and left byte for byte."""
    pair = ("what cat", "the cat runs")
    assert main(score_argv(saved_model, pair)) == 0
    to_stdout = capsys.readouterr().out
    out = tmp_path / "new" / "scores.jsonl"
    assert main(score_argv(saved_model, pair, extra=["--output", str(out)])) == 0
    assert out.read_text() == to_stdout and capsys.readouterr().out == ""
    assert sorted(p.name for p in out.parent.iterdir()) == [".mechir-outputs.json", "scores.jsonl"]
    assert main(score_argv(saved_model, ("dog", "a dog"), extra=["--output", str(out)])) == 0
    second = out.read_text()
    assert second != to_stdout and '"query": "dog"' in second  # mechir's own file, replaced
    out.write_text(second + "my note\n")  # the user edits it
    capsys.readouterr()
    assert main(score_argv(saved_model, pair, extra=["--output", str(out)])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out} was changed since mechir wrote it" in err
    assert out.read_text() == second + "my note\n"


def hf_truncated(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> list[int]:
    """Reference: the pairs whose full Hugging Face encoding is longer than ``max_length``."""
    return [
        i
        for i, (q, d) in enumerate(pairs)
        if len(tokenizer(q, d, truncation=False)["input_ids"]) > max_length
    ]


def test_truncated_pairs_match_hugging_face(saved_model):
    from mechir.cli import truncated_pairs
    from tests.helpers import DOCUMENTS, QUERIES

    model = mechir.load_cross_encoder(saved_model, device="cpu")
    pairs = [(q, d) for q in QUERIES for d in DOCUMENTS]
    counts = []
    for max_length in range(10, 30):  # the longest query has 6 tokens
        batch = model.encode([q for q, _ in pairs], [d for _, d in pairs], max_length=max_length)
        found = truncated_pairs(model.tokenizer, batch, [d for _, d in pairs])
        assert found == hf_truncated(model.tokenizer, pairs, max_length)
        counts.append(len(found))
    assert counts == sorted(counts, reverse=True) and counts[0] > 12 and counts[-1] == 0
    assert any(0 < n < len(pairs) for n in counts)


def test_score_reports_truncated_pairs(saved_model, capsys):
    """Issue 25, case 6: documents are still cut to --max-length, and the count of truncated
    pairs (with the first one's origin) is one line on stderr."""
    model = mechir.load_cross_encoder(saved_model, device="cpu")
    long_doc = "the cat runs in the house and the dog sleeps in the big red car"
    pairs = [("cat", "a dog"), ("what cat runs", long_doc), ("dog", long_doc)]
    expected = hf_truncated(model.tokenizer, pairs, 12)
    assert expected == [1, 2]  # the reference agrees the long documents are cut
    assert main(score_argv(saved_model, *pairs, extra=["--max-length", "12"])) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        "mechir score: 2 of 3 pairs truncated to 12 tokens (the document cut to fit "
        "--max-length; first: --query/--document pair 2)"
    )
    batch = model.encode([q for q, _ in pairs], [d for _, d in pairs], max_length=12)
    assert [json.loads(x)["score"] for x in captured.out.splitlines()] == model.score(
        batch
    ).tolist()
    assert main(score_argv(saved_model, *pairs[:1], extra=["--max-length", "12"])) == 0
    assert "truncated" not in capsys.readouterr().err


def test_builtin_commands_do_not_scan_entry_points(monkeypatch, capsys):
    """``mechir score``/``rerank`` (and their --help and argument errors) skip the scan of the
    installed distributions' entry points; ``mechir --help`` and other commands do it."""
    import mechir.cli as cli
    import mechir.cli_plugins as plugins

    def scan():
        raise AssertionError("entry points scanned")

    monkeypatch.setattr(plugins, "_entry_points", scan)
    with pytest.raises(SystemExit) as info:
        cli.main(["rerank", "--help"])
    assert info.value.code == 0
    assert cli.main(["score", "--model", "m", "--batch-size", "0"]) == 2
    assert "--batch-size: '0'" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="entry points scanned"):
        cli.main(["--help"])
