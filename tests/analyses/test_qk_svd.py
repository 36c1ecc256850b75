"""``python -m analyses.qk_svd`` end to end on a tiny model and collection."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analyses import qk_svd

WORK = ["--top-heads", "2", "--directions", "2", "--tokens", "4", "--cosine-pairs", "12"]


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_outputs_match_the_library(common_argv, tmp_path, tiny_model_dir, matching_heads_run):
    out = tmp_path / "qk"
    argv = [*common_argv, *WORK, "--heads", "1/2", "--output", str(out)]
    assert qk_svd.main([*argv, "--matching-heads", str(matching_heads_run)]) == 0
    from mechir import load_cross_encoder
    from mechir.circuits import qk_alignment, singular_direction_tokens

    model = load_cross_encoder(tiny_model_dir, device="cpu")
    alignment = pd.read_csv(out / "alignment.csv")
    pd.testing.assert_frame_equal(alignment, qk_alignment(model, k=3), check_dtype=False)
    top = alignment.sort_values("alignment_norm", ascending=False).label[:2].tolist()
    heads = [*top, "1/2"] if "1/2" not in top else top
    # alignment, 2 directions of each read head, part cosines
    reads = [f"tokens:vocabulary:{h}:{k}" for h in heads for k in (0, 1)]
    assert units(out) == ["alignment", *reads, "cosines:" + ",".join(heads)]
    tokens = pd.read_csv(out / "direction_tokens.csv", keep_default_na=False)
    expected = singular_direction_tokens(model, heads[0], 1, n=4)
    got = tokens[(tokens.label == heads[0]) & (tokens.k == 1)].reset_index(drop=True)
    assert got.token.tolist() == expected.token.tolist()
    assert got.projection.to_numpy() == pytest.approx(expected.projection.to_numpy(), abs=1e-6)
    cosines = pd.read_csv(out / "part_cosines.csv")
    assert cosines.label.unique().tolist() == heads and cosines.k.max() == 1
    corr = pd.read_csv(out / "correlations.csv")
    assert (corr.heads == 8).all() and corr["pearson r"].between(-1, 1).all()
    text = (out / "summary.md").read_text()
    assert "## Alignment vs matching-head Δ" in text and "alignment_vs_matching.png" in text
    assert "- **score type**: binary_logit" in text


@pytest.mark.slow
def test_resume_and_missing_matching_run(common_argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results/matching_heads here
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert qk_svd.main([*common_argv, *WORK, "--output", str(full)]) == 0
    assert "No matching_heads run found" in (full / "summary.md").read_text()
    argv = [*common_argv, *WORK, "--output", str(parts)]
    assert qk_svd.main([*argv, "--max-units", "2"]) == 0
    assert len(units(parts)) == 2 and not (parts / "summary.md").exists()
    assert qk_svd.main([*argv, "--max-units", "1"]) == 0
    assert qk_svd.main(argv) == 0
    assert units(parts) == units(full)
    for name in ("alignment.csv", "direction_tokens.csv", "part_cosines.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(parts / name), pd.read_csv(full / name))
    with pytest.raises(SystemExit, match="head 9 out of range"):
        qk_svd.main([*argv, "--heads", "0/9"])
    with pytest.raises(SystemExit, match="k: 3 there, 2 now"):
        qk_svd.main([*argv, "--k", "2"])
