"""``python -m analyses.axioms`` end to end on a tiny BERT (and tiny ModernBERT for the
cross-family replication), its stored units against direct library calls, resume, the HTML
report, and the demo smoke run (slow)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import axioms as ax
from tests.families.builders import save_tiny_family

AXIOMS = ["TFC1", "TFC2", "STMC1", "LNC1", "LNC2"]
#: every option on, small sizes
WORK = [
    "--max-pairs", "12", "--component-pairs", "6", "--patch-pairs", "6", "--head-scaling",
    "0", "2", "--qk-ablation", "--ffn-share", "--nig-percent", "5", "--nig-steps", "4",
]  # fmt: skip


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def modern_dir(tmp_path_factory):
    return save_tiny_family("modernbert", tmp_path_factory.mktemp("modernbert"))


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tiny_collection_dir, tmp_path_factory, modern_dir):
    from tests.analyses.conftest import common_options

    out = tmp_path_factory.mktemp("axioms") / "tiny"
    argv = [*common_options(tiny_model_dir, tiny_collection_dir), *WORK]
    argv += ["--replicate", str(tiny_model_dir), str(modern_dir)]
    assert ax.main([*argv, "--output", str(out)]) == 0
    return out, argv


@pytest.mark.slow
def test_summary_names_every_axiom_and_idf(full_run):
    out, _ = full_run
    text = (out / "summary.md").read_text()
    for name in [*AXIOMS, "IDF"]:
        assert name in text
    for section in (
        "## Diagnostics", "## Components", "## TFC1: activation patching", "## Semantic BM25",
        "### Duplicate-token heads", "### IDF in the token embeddings", "### IDF-direction edit",
        "soft-TF x IDF", "amplified, suppressed, QK-ablated", "feed-forward networks",
        "NIG neurons on held-out queries", "same study over several models",
    ):  # fmt: skip
        assert section in text, section
    summary = json.loads((out / "summary.json").read_text())
    images = [b["path"] for b in summary["blocks"] if b["type"] == "image"]
    assert all((out / p).exists() for p in images) and len(images) >= 14


@pytest.mark.slow
def test_stored_units_equal_the_library(full_run, tiny_model_dir, tiny_collection_dir):
    """Diagnostics, layer knockouts and head patching as stored = direct library calls with
    independent hooks (head knockout of a whole layer; a plain hook zeroing the MLP)."""
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from mechir.hooks import head_knockout_hooks
    from patching import head_target, patch_sweep
    from patching.axioms import DiagnosticSet, axiom_scores

    out, argv = full_run
    args = ax.build_parser().parse_args(argv)
    model = load_cross_encoder(tiny_model_dir, device="cpu")
    collection = load_collection(tiny_collection_dir, split="test")
    cands = collection.candidates(depth=6, query_ids=collection.query_ids())
    sets = ax.build_sets(model, collection, cands, ax.idf_statistics(args, collection, cands), args)
    diagnostics = pd.read_csv(out / "diagnostics.csv")
    agreement = pd.read_csv(out / "agreement.csv").set_index("axiom")
    for name in AXIOMS:
        expected = axiom_scores(model, sets[name])
        got = diagnostics[diagnostics.axiom == name].reset_index(drop=True)
        assert got.pair_id.tolist() == expected.pair_id.tolist() and len(got) == 12
        np.testing.assert_allclose(got.gap, expected.gap, atol=1e-5)
        assert agreement.agreement[name] == pytest.approx(expected.agrees.mean())
    comp = pd.read_csv(out / "components.csv")
    sub = DiagnosticSet("STMC1", sets["STMC1"].pairs[:6], {})
    base = axiom_scores(model, sub).gap.mean()
    attn = axiom_scores(model, sub, hooks=head_knockout_hooks(model, layers=[1])).gap.mean()
    mlp = axiom_scores(
        model, sub, hooks=[("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    ).gap.mean()
    row = comp[(comp.axiom == "STMC1") & (comp.layer == 1) & (comp["knocked out"] == "attention")]
    assert float(row["Δ mean gap"].iloc[0]) == pytest.approx(attn - base, abs=1e-5)
    row = comp[(comp.axiom == "STMC1") & (comp.layer == 0) & (comp["knocked out"] == "mlp")]
    assert float(row["Δ mean gap"].iloc[0]) == pytest.approx(mlp - base, abs=1e-5)
    pairs = DiagnosticSet("TFC1", sets["TFC1"].pairs[:6], {}).aligned(model.tokenizer)
    heads = pd.read_csv(out / "patch_TFC1_heads.csv.gz")
    expected = patch_sweep(model, pairs, head_target()).to_frame()
    np.testing.assert_allclose(heads.value, expected.value, atol=1e-4)


@pytest.mark.slow
def test_replication_of_the_same_model_reproduces_its_profile(full_run):
    out, _ = full_run
    table = pd.read_csv(out / "replication.csv")
    assert len(table) == 3 and table.layers.tolist() == [2, 2, 2]
    np.testing.assert_allclose(
        table.loc[0, AXIOMS].astype(float), table.loc[1, AXIOMS].astype(float)
    )
    assert table.loc[2, AXIOMS].notna().all()  # the ModernBERT row: its own tokenizer, pairs
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    reps = [r for r in rows if r["unit"].startswith("replicate:")]
    assert [r["family"] for r in reps] == ["BERT", "ModernBERT"]
    comp = pd.read_csv(out / "components.csv")
    tfc1 = comp[comp.axiom == "TFC1"]
    for layer in (0, 1):
        got = reps[0]["profile"][str(layer)]
        for kind, name in (("attention", "attention"), ("mlp", "mlp")):
            want = tfc1[(tfc1.layer == layer) & (tfc1["knocked out"] == name)]["Δ mean gap"]
            assert got[kind] == pytest.approx(float(want.iloc[0]), abs=1e-5)
    assert (out / "replication_attention.png").exists()


@pytest.mark.slow
def test_seed_check_tables(full_run):
    out, _ = full_run
    checks = pd.read_csv(out / "matching_heads_checks.csv")
    assert set(checks.condition) == {
        f"{s} heads {how}"
        for s in ("matching", "random")
        for how in ("x0", "x2", "QK top:1", "QK all")
    }
    nig = pd.read_csv(out / "nig_ablation.csv")
    assert len(nig) == 8 and nig.queries.eq(3).all()  # split B: every other of 6 queries
    ffn = pd.read_csv(out / "ffn_share.csv")
    assert ffn.layer.tolist() == [0, 1] and ffn["FFN share (patching)"].between(0, 1).all()
    edit = pd.read_csv(out / "idf_edit.csv")
    assert edit.condition.tolist() == ["IDF direction x0", "random direction x0"]
    fit = pd.read_csv(out / "soft_tf_fit.csv")
    assert set(fit.feature) == {"soft_tf_idf", "soft_tf_idf_log", "tf_idf"}
    assert "score" in set(fit.target) and len(set(fit.target)) == 4  # score + 3 top heads


@pytest.mark.slow
def test_report_renders_the_study(full_run, tmp_path):
    from analyses.report import build_report

    out, _ = full_run
    page = build_report([out.parent], tmp_path / "report.html").read_text()
    assert "IR axioms" in page and "STMC1" in page and "IDF direction" in page
    assert page.count("<img") >= 14 and "data:image/png;base64" in page


@pytest.mark.slow
def test_resume_gives_the_same_results(common_argv, tmp_path):
    argv = [*common_argv, "--max-pairs", "6", "--component-pairs", "3", "--patch-axioms"]
    argv += ["--axioms", "TFC1", "LNC2", "--idf-factors", "2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert ax.main([*argv, "--output", str(full)]) == 0
    assert ax.main([*argv, "--output", str(parts), "--max-units", "3"]) == 0
    assert not (parts / "summary.md").exists() and len(units(parts)) == 3
    with open(parts / "results.jsonl", "ab") as f:
        f.write(b'{"unit":"comp:TFC1:1","attention":{"dt')  # a torn line
    assert ax.main([*argv, "--output", str(parts)]) == 0
    assert units(parts) == units(full)
    pd.testing.assert_frame_equal(
        pd.read_csv(parts / "diagnostics.csv"), pd.read_csv(full / "diagnostics.csv")
    )
    with pytest.raises(SystemExit, match="max_pairs"):
        ax.main([*argv, "--output", str(parts), "--max-pairs", "5"])


def test_bad_options_say_what_to_do(common_argv, tmp_path, capsys):
    for extra, message in (
        (["--qk-directions", "top"], "use 'all' or 'top:K'"),
        (["--nig-percent", "0"], "argument --nig-percent: '0' is outside (0, 100]"),
        # issue 30: non-finite factors are refused at parse time, naming the option
        (["--idf-factors", "nan", "inf"], "argument --idf-factors: 'nan' is not a finite number"),
        (["--head-scaling", "1", "inf"], "argument --head-scaling: 'inf' is not a finite number"),
        (["--nig-factors", "0", "NaN"], "argument --nig-factors: 'NaN' is not a finite number"),
        (["--min-delta", "-1"], "argument --min-delta: '-1' is outside [0, inf]"),
        (["--lnc2-copies", "1"], "--lnc2-copies must be >= 2"),
        (["--patch-pairs", "0"], "--patch-pairs must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            ax.main([*common_argv, *extra, "--output", str(tmp_path / "x")])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_prompt_based_rerankers_are_refused_in_one_line(tiny_collection_dir, tmp_path, capsys):
    """MonoT5 and LLM rerankers (as --model or --replicate): one line before anything is
    written (the study reads [CLS], the pair layout and the embedding matrix)."""
    from tests.analyses.conftest import common_options
    from tests.families.builders import save_tiny_decoder, save_tiny_t5

    t5 = save_tiny_t5(tmp_path / "t5")
    qwen = save_tiny_decoder("qwen3", tmp_path / "qwen3")
    bert = save_tiny_family("bert", tmp_path / "bert")
    capsys.readouterr()  # the builders' progress bars
    for model, extra, family in ((t5, [], "MonoT5"), (bert, ["--replicate", str(qwen)], "Qwen3")):
        argv = [
            *common_options(model, tiny_collection_dir),
            *extra,
            "--output",
            str(tmp_path / "x"),
        ]
        with pytest.raises(SystemExit) as exit_:
            ax.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{family} is a prompt-based reranker" in err and "patching_tfc1" in err, err
        assert not (tmp_path / "x").exists()


def test_helpers():
    from patching import PatchingResult

    grid = torch.tensor([[[0.1, -0.9], [0.5, float("nan")]]])  # 1 pair, 2 layers x 2 heads
    result = PatchingResult(
        "z/all", ("layer", "head"), {"layer": [0, 1], "head": [0, 1]}, grid,
        torch.tensor([1.0]), torch.tensor([0.0]), ["p"], [None],
    )  # fmt: skip
    assert ax.top_heads(result, 2, 1e-3) == ["0/1", "1/0"]
    shape = {"n_layers": 2, "n_heads": 3}
    rand = ax.random_heads(["0/1", "1/2"], shape, seed=0)
    assert len(rand) == 2 and not set(rand) & {"0/1", "1/2"}
    assert rand == ax.random_heads(["0/1", "1/2"], shape, seed=0)

    class M:
        class cfg:  # noqa: N801
            d_head = 4

    assert ax.qk_directions("all", M, []) == "all" and ax.qk_directions("top:9", M, []) == [
        0,
        1,
        2,
        3,
    ]
    Pair = argparse.Namespace
    cands = [Pair(qid=q, docid=str(i)) for i, q in enumerate("aabbccd")]
    a, b = ax.nig_split(cands)
    assert {p.qid for p in a} == {"a", "c"} and {p.qid for p in b} == {"b", "d"}
    row = {
        "qids": list("aabbccdd"),
        "score": [1.0, 2, 3, 4, 5, 6, 7, 8],
        "effects": {"0/1": [0.0, 1, 0, 1, 0, 1, 0, 1]},
        "features": {"f": [1.0, 2, 3, 4, 5, 6, 7, 8]},
    }
    fit = ax.fit_table(row, argparse.Namespace())
    exact = fit[fit.target == "score"].iloc[0]
    assert exact.r2_heldout == pytest.approx(1.0) and exact.n_train == 4
    assert exact.slope == pytest.approx(1.0)


@pytest.mark.slow
def test_demo_smoke_run(tmp_path):
    """The command of the issue, offline, on the embedded demo (2 queries, default options)."""
    pytest.importorskip("mechir_demo")
    out = tmp_path / "demo"
    argv = ["--model", "demo", "--dataset", "demo", "--limit-queries", "2", "--no-progress"]
    assert ax.main([*argv, "--output", str(out)]) == 0
    text = (out / "summary.md").read_text()
    for name in [*AXIOMS, "IDF"]:
        assert name in text
