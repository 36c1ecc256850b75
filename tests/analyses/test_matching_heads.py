"""``python -m analyses.matching_heads`` end to end on a tiny model and collection."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from analyses import matching_heads as mh
from tests.analyses.conftest import MATCHING_HEADS_WORK as WORK


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_outputs_match_the_library(matching_heads_run, tiny_model_dir, tiny_collection_dir):
    out = matching_heads_run
    # 6 queries' statistics, then baseline + top 2 + each head + 1 random set
    assert len(units(out)) == len(set(units(out))) == 6 + 5
    deltas = pd.read_csv(out / "deltas.csv")
    assert set(deltas.statistic) == set(mh.DELTA_STATISTICS)
    assert set(deltas.negative) == {"easy_negative", "hard_negative"}
    assert len(deltas) == len(mh.DELTA_STATISTICS) * 2 * 2 * 4  # x negatives x layers x heads

    # the per-query units reassemble exactly what the library computes in one call
    from mechir import load_cross_encoder
    from mechir.data import load_collection, matching_pairs
    from mechir.matching import matching_heads

    col = load_collection(tiny_collection_dir, split="test")
    model = load_cross_encoder(tiny_model_dir, device="cpu")
    pairs = matching_pairs(col, query_ids=col.query_ids(), max_relevant=10, max_hard=10)
    expected, _ = matching_heads(
        model, pairs, max_length=48, statistics=mh.DELTA_STATISTICS, threshold=0.01
    )
    key = ["statistic", "negative", "label"]
    got = deltas.sort_values(key).reset_index(drop=True)
    expected = expected.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        got[[*key, "delta"]],
        expected[[*key, "delta"]],
        check_exact=False,
        check_dtype=False,
        atol=1e-6,
    )

    knockout = pd.read_csv(out / "knockout.csv")
    assert knockout.condition.tolist()[:1] == ["top heads"] and len(knockout) == 4
    top = pd.read_csv(out / "head_deltas.csv")
    top = top.reindex(top["Δ qd_max vs easy"].abs().sort_values(ascending=False).index)
    assert knockout.heads[0] == ", ".join(top.label[:2])
    per_layer = pd.read_csv(out / "per_layer.csv")
    assert per_layer.layer.tolist() == [0, 1]
    assert per_layer["exact-match share of Q->D mass"].between(0, 1).all()
    summary = json.loads((out / "summary.json").read_text())
    for block in summary["blocks"]:
        if block["type"] == "image":
            assert (out / block["path"]).read_bytes()[:4] == b"\x89PNG"
    assert "## Head knockout" in (out / "summary.md").read_text()
    assert "- **score type**: binary_logit" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_resume(matching_heads_run, common_argv, tmp_path):
    out = tmp_path / "parts"
    argv = [*common_argv, *WORK, "--output", str(out)]
    assert mh.main([*argv, "--max-units", "4"]) == 0
    assert len(units(out)) == 4 and not (out / "summary.md").exists()
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"unit":"stats:q4","qid":"q4","pairs":[1')
    assert mh.main([*argv, "--max-units", "3"]) == 0  # 2 statistics + 1 knockout unit
    assert len(units(out)) == 7
    assert mh.main(argv) == 0
    assert units(out) == units(matching_heads_run)
    for name in ("deltas.csv", "knockout.csv", "per_layer.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / name), pd.read_csv(matching_heads_run / name)
        )
    with pytest.raises(SystemExit, match="max_relevant: 10 there, 2 now"):
        mh.main([*argv, "--max-relevant", "2"])


@pytest.mark.slow
def test_correct_only_is_a_summary_option(matching_heads_run, common_argv, tmp_path):
    """Re-summarising with the paper's filter needs no recomputation: the stored predictions
    decide which pairs count."""
    out = tmp_path / "copy"
    shutil.copytree(matching_heads_run, out)
    (out / "results.jsonl.lock").unlink(missing_ok=True)  # removed on close since the store moved
    before = units(out)
    argv = [*common_argv, "--threshold", "0.01", "--random-shuffles", "5", "--output", str(out)]
    assert mh.main(argv) == 0  # --correct-only is the default
    assert units(out) == before
    predicted = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["unit"].startswith("stats:"):
            predicted |= dict(zip(row["pairs"], row["info"]["predicted_relevant"]))
    pairs = pd.read_csv(out / "pairs.csv")
    correct = pairs[(pairs.kind == "relevant") == pairs.pair.map(predicted)]
    counts = correct.kind.value_counts()
    text = (out / "summary.md").read_text()
    expected = ", ".join(
        f"{k} {counts.get(k, 0)}" for k in ("relevant", "hard_negative", "easy_negative")
    )
    assert f"**pairs used**: {expected} (correctly classified only)" in text
    negatives = {k for k in ("easy_negative", "hard_negative") if counts.get(k, 0)}
    assert set(pd.read_csv(out / "deltas.csv").negative) == negatives


def test_knockouts_on_one_query_are_refused_before_the_model_loads(
    common_argv, tmp_path, capsys, monkeypatch
):
    """Issue 30: the knockouts' paired t-tests need 2 queries: one line at start, nothing left."""
    import analyses.base

    monkeypatch.setattr(analyses.base, "load_model", None)  # never loaded
    out = tmp_path / "runs" / "mh"
    argv = [*common_argv, "--limit-queries", "1", "--knockout-top", "2", "--output", str(out)]
    with pytest.raises(SystemExit) as info:
        mh.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--limit-queries 1 selects 1 judged query with candidates; the knockouts' paired" in err
    assert not (tmp_path / "runs").exists()
