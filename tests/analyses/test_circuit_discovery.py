"""``python -m analyses.circuit_discovery`` end to end on a tiny model and collection: the stored
units reassemble the library's results, resume after an interruption, torchrun (2 processes)
equals one process."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
import torch

from analyses import circuit_discovery as cd
from tests.distributed_helpers import torchrun

WORK = ["--limit-queries", "3", "--greedy-budget", "0.05", "--greedy-step", "2"]
WORK += ["--budgets", "0.02", "0.05", "0.2", "0.5", "--draw-budget", "0.05"]


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_model_dir, tiny_collection_dir):
    from tests.analyses.conftest import common_options

    out = tmp_path_factory.mktemp("cd") / "run"
    argv = [*common_options(tiny_model_dir, tiny_collection_dir), *WORK, "--exact-queries", "1"]
    assert cd.main([*argv, "--output", str(out)]) == 0
    return out, argv


@pytest.mark.slow
def test_study_reassembles_the_library(study_run, tiny_model_dir, tiny_collection_dir):
    out, argv = study_run
    queries = [u.split(":", 1)[1] for u in units(out) if u.startswith("attr:")]
    assert len(queries) >= 2
    assert units(out)[len(queries)] == f"exact:{queries[0]}"
    assert units(out)[-2:] == ["greedy", "matching"]
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from patching.edges import edge_attribution, faithfulness_curve

    model = load_cross_encoder(tiny_model_dir, device="cpu")
    args = cd.build_parser().parse_args(argv)
    pairs, _ = cd.build_pairs(model, load_collection(tiny_collection_dir, split="test"), args)
    ig = edge_attribution(model, pairs, method="eap_ig", metric="margin")
    edges = pd.read_csv(out / "edges.csv.gz")
    torch.testing.assert_close(
        torch.tensor(edges.eap_ig.to_numpy()), ig.mean().double(), atol=1e-5, rtol=0
    )
    curve = faithfulness_curve(
        model, pairs, scores=ig, budgets=(0.02, 0.05, 0.2, 0.5), metric="margin"
    )
    table = pd.read_csv(out / "faithfulness.csv")
    got = table[table.ranking == "eap_ig"].faithfulness.to_numpy()
    torch.testing.assert_close(torch.tensor(got), curve.faithfulness.double(), atol=1e-4, rtol=0)
    assert set(table.ranking) == {"eap_ig", "eap", "exact", "greedy (eap_ig + exact)"}
    root = ET.fromstring((out / "circuit.svg").read_text())
    assert len(root.findall("{http://www.w3.org/2000/svg}path")) >= 1
    text = (out / "summary.md").read_text()
    for heading in ("## Edges", "## Faithfulness", "## The circuit", "## Heads shared"):
        assert heading in text
    assert "EAP-IG vs exact" in text


@pytest.mark.slow
def test_resume_and_two_processes(study_run, tmp_path):
    out, argv = study_run
    parts = tmp_path / "parts"
    assert cd.main([*argv, "--output", str(parts), "--max-units", "2"]) == 0
    assert len(units(parts)) == 2
    assert cd.main([*argv, "--output", str(parts)]) == 0
    assert units(parts) == units(out)
    pd.testing.assert_frame_equal(
        pd.read_csv(parts / "faithfulness.csv"), pd.read_csv(out / "faithfulness.csv")
    )
    two = tmp_path / "two"
    proc = torchrun(2, "analyses.circuit_discovery", [*argv, "--output", str(two)])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("summary.md") == 1
    assert units(two) == units(out)
    a, b = pd.read_csv(two / "faithfulness.csv"), pd.read_csv(out / "faithfulness.csv")
    pd.testing.assert_frame_equal(a, b, atol=1e-5)
    with pytest.raises(SystemExit, match="metric"):
        cd.main([*argv, "--output", str(parts), "--metric", "score"])


def test_bad_options(common_argv, tmp_path):
    with pytest.raises(SystemExit):
        cd.main([*common_argv, "--budgets", "0.5", "0.1", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        cd.main([*common_argv, "--n-steps", "0", "--output", str(tmp_path / "y")])


# ---------------------------------------------------------------------- bad input, named early
def _broken_collection(root, source, kind):
    """A copy of ``source`` with one of its files emptied or pointing at another dataset."""
    import shutil

    out = root / kind
    shutil.copytree(source, out)
    if kind == "no-queries":
        (out / "queries.test.tsv").write_text("")
    elif kind == "empty-run":
        (out / "run.bm25.test.trec").write_text("")
    elif kind == "other-run":  # a run of another dataset: its qids are not this one's
        run = out / "run.bm25.test.trec"
        run.write_text(run.read_text().replace("q", "x"))
    elif kind == "no-qrels":
        (out / "qrels.test.txt").write_text("")
    return out


#: (collection, extra options, text the one line must contain, text it must not contain)
EMPTY_INPUTS = [
    ("no-queries", [], "the queries file {col}/queries.test.tsv holds no queries", None),
    ("empty-run", [], "the run {col}/run.bm25.test.trec has no candidates", None),
    ("other-run", [], "the run {col}/run.bm25.test.trec has no candidates", None),
    ("no-qrels", [], "the qrels file {col}/qrels.test.txt judge none", None),
    ("no-qrels", ["--metric", "score"], "the qrels file {col}/qrels.test.txt", "--metric score"),
    ("col", ["--relevant", "0"], "--relevant 0: the margin metric", None),
    ("col", ["--non-relevant", "0"], "--non-relevant 0: the margin metric", None),
    ("col", ["--depth", "1"], "has both a relevant and a non-relevant document", None),
]


@pytest.mark.parametrize(("kind", "extra", "named", "absent"), EMPTY_INPUTS)
def test_empty_inputs_are_named_before_the_model_loads(
    tiny_model_dir, tiny_collection_dir, tmp_path, capsys, monkeypatch, kind, extra, named, absent
):
    """Issue 30: an empty queries file, an empty run, a run of another dataset, empty qrels and
    ``--relevant 0`` each name the file or option at fault, before the model loads, and leave
    no directory behind (not the generic "raise --depth" advice; no "--metric score" advice when
    the metric is already the score)."""
    import analyses.base
    from tests.analyses.conftest import common_options

    col = (
        tiny_collection_dir
        if kind == "col"
        else _broken_collection(tmp_path, tiny_collection_dir, kind)
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(analyses.base, "load_model", forbidden)
    out = tmp_path / "runs" / "cd"
    argv = [*common_options(tiny_model_dir, col), *extra, "--output", str(out)]
    with pytest.raises(SystemExit) as info:
        cd.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert named.replace("{col}", str(col)) in err, err
    assert absent is None or absent not in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("family", ["t5", "qwen3", "deberta-v2"])
def test_models_without_edge_circuits_are_refused_at_start(
    tiny_collection_dir, tmp_path, capsys, monkeypatch, family
):
    """Issue 30: MonoT5 and LLM rerankers (prompt-based) and DeBERTa (disentangled attention)
    are refused in one line from the model's config.json, before the model loads and before
    anything is written (``Family.kind`` / ``Family.edge_circuits``)."""
    import analyses.base
    from tests.analyses.conftest import common_options
    from tests.families.builders import save_tiny_decoder, save_tiny_family, save_tiny_t5

    if family == "t5":
        model, named = save_tiny_t5(tmp_path / family), "MonoT5 is a prompt-based reranker"
    elif family == "qwen3":
        model = save_tiny_decoder(family, tmp_path / family)
        named = "Qwen3 is a prompt-based reranker"
    else:
        model = save_tiny_family(family, tmp_path / family)
        named = "the DeBERTa-v2 family is not one of them"
    capsys.readouterr()  # the builders' progress bars
    monkeypatch.setattr(analyses.base, "load_model", None)  # never loaded
    out = tmp_path / "runs" / "cd"
    with pytest.raises(SystemExit) as info:
        cd.main([*common_options(model, tiny_collection_dir), "--output", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert "circuit_discovery study" in err
    assert not (tmp_path / "runs").exists()


def test_a_hub_model_without_edge_circuits_is_refused_once_loaded(
    tiny_collection_dir, tmp_path, capsys, monkeypatch
):
    """A model whose family is known only once loaded (a hub id not in the cache) is refused
    when it loads, before pairs.csv or any unit is written; the directory it created is
    removed."""
    import analyses.base
    import mechir.settings
    from mechir import load_cross_encoder
    from tests.analyses.conftest import common_options
    from tests.families.builders import save_tiny_family

    model = save_tiny_family("deberta-v2", tmp_path / "deberta")
    capsys.readouterr()
    monkeypatch.setattr(mechir.settings, "model_family", lambda name: None)  # "not local"
    monkeypatch.setattr(
        analyses.base, "load_model", lambda args: load_cross_encoder(model, device="cpu")
    )
    out = tmp_path / "runs" / "cd"
    with pytest.raises(SystemExit):
        cd.main([*common_options(model, tiny_collection_dir), "--output", str(out)])
    assert "the DeBERTa-v2 family is not one of them" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--n-steps", "abc", "argument --n-steps: 'abc' is neither a positive integer nor 'auto'"),
        ("--budgets", "nan", "argument --budgets: 'nan' is not a finite number"),
        ("--greedy-budget", "inf", "argument --greedy-budget: 'inf' is not a finite number"),
        ("--draw-budget", "1.5", "argument --draw-budget: '1.5' is outside (0, 1)"),
        ("--memory-budget", "-1", "argument --memory-budget: '-1' is outside (0, inf]"),
    ],
)
def test_options_are_checked_at_parse_time(common_argv, tmp_path, capsys, option, value, named):
    with pytest.raises(SystemExit) as info:
        cd.main([*common_argv, option, value, "--output", str(tmp_path / "x")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert "n_steps_arg" not in err
    assert not (tmp_path / "x").exists()


def test_queries_left_out_of_the_margin_are_named(tiny_collection_dir):
    """Issue 30: a selected query without a non-relevant (or relevant) candidate is left out
    of the margin with its reason, which the study prints and its summary lists."""
    from mechir.data import load_collection
    from tests.analyses.conftest import common_options

    collection = load_collection(tiny_collection_dir, split="test")
    first = collection.query_ids()[0]
    collection.qrels[first] = {p.docid: 1 for p in collection.candidates(depth=6)[:6]}
    args = cd.build_parser().parse_args(common_options("m", tiny_collection_dir))
    items, left_out = cd.select_candidates(args, collection)
    assert left_out == {first: "no non-relevant document in its top 6"}
    assert first not in {p.qid for p in items} and len({p.qid for p in items}) == 5


def test_quick_preset_sets_defaults_that_the_command_line_overrides():
    """``--preset quick`` (issue 30, a first look in about a minute on the demo): its values are
    the defaults; an option given on the command line wins before or after it; the preset's
    name is not a result-determining option (its values are)."""
    from analyses.common import study_config

    parse = cd.build_parser().parse_args
    quick = parse(["--preset", "quick"])
    for dest, value in cd.CircuitDiscovery.presets["quick"].items():
        assert getattr(quick, dest) == value, dest
    assert parse([]).greedy_budget == 0.002 and parse([]).limit_queries is None
    for argv in (
        ["--limit-queries", "2", "--preset", "quick"],
        ["--preset", "quick", "--limit-queries", "2"],
    ):
        args = parse(argv)
        assert args.limit_queries == 2 and args.n_steps == 4
    assert "preset" not in study_config(quick) and study_config(quick)["n_steps"] == 4
    with pytest.raises(ValueError, match="argument --preset: invalid choice: 'slow'"):
        parse(["--preset", "slow"])


def test_score_metric_without_documents_of_the_kinds_asked_for(tiny_collection_dir, capsys):
    """With --metric score, no selected document is not blamed on the margin."""
    from mechir.data import load_collection
    from tests.analyses.conftest import common_options

    collection = load_collection(tiny_collection_dir, split="test")
    argv = [*common_options("m", tiny_collection_dir), "--metric", "score", "--depth", "1"]
    args = cd.build_parser().parse_args([*argv, "--relevant", "0", "--non-relevant", "1"])
    with pytest.raises(ValueError) as info:
        cd.select_candidates(args, collection)  # every top-1 document is relevant
    assert "(--relevant 0, --non-relevant 1) among its top 1 candidates" in str(info.value)
    assert "--metric score" not in str(info.value) and "margin" not in str(info.value)
