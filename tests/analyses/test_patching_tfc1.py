"""``python -m analyses.patching_tfc1`` end to end on a tiny model and collection."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from analyses import patching_tfc1 as pt


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tfc1_heads_and_residual(common_argv, tmp_path, tiny_model_dir, tiny_collection_dir):
    out = tmp_path / "pt"
    assert pt.main([*common_argv, "--unit-pairs", "10", "--output", str(out)]) == 0
    # 36 TFC1 pairs in chunks of 10, for the head and the residual targets
    assert units(out) == [f"{t}:{i}" for t in ("heads", "resid_pre") for i in range(4)]

    # the chunks reassemble what the library computes on all pairs in one sweep
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from patching import head_target, patch_sweep

    model = load_cross_encoder(tiny_model_dir, device="cpu")
    args = pt.build_parser().parse_args([*common_argv])
    pairs, skipped = pt.build_pairs(model, load_collection(tiny_collection_dir, split="test"), args)
    assert len(pairs) == 36 and not skipped
    expected = patch_sweep(model, pairs, head_target()).to_frame()
    frame = pd.read_csv(out / "heads.csv.gz")
    exact = frame[frame.method == "exact"].reset_index(drop=True)
    assert exact.pair.tolist() == expected.pair.tolist()
    # the units' chunks have other padded widths than the one sweep, and the fused attention
    # kernel rounds differently there (~2e-6 on scores); the normalized effect divides by score
    # deltas down to --min-delta, which amplifies that to ~4e-4. A reassembly error is O(1).
    torch.testing.assert_close(
        torch.tensor(exact.value.to_numpy()), torch.tensor(expected.value.to_numpy()),
        atol=2e-3, rtol=1e-3,
    )  # fmt: skip
    assert set(frame.method) == {"exact", "attribution"}
    resid = pd.read_csv(out / "resid_pre.csv.gz")
    layer0_doc = resid[(resid.method == "exact") & (resid.layer == 0) & (resid.part == "document")]
    # the document is the only difference: patching all of it at layer 0 restores the clean score
    assert layer0_doc.value.to_numpy() == pytest.approx(1.0, abs=1e-4)
    comparison = pd.read_csv(out / "attribution_vs_exact.csv")
    assert comparison.target.tolist() == ["heads", "resid_pre"]
    assert comparison.pearson.between(-1, 1).all()
    text = (out / "summary.md").read_text()
    assert "## Score change per relevance grade" in text and "heatmap_heads_exact.png" in text
    assert "- **score type**: binary_logit" in text
    # every pair excluded by --min-delta (a summary option): the summary says so (no KeyError)
    argv = [*common_argv, "--unit-pairs", "10", "--min-delta", "1e9", "--output", str(out)]
    assert pt.main(argv) == 0
    assert (
        "No cell to rank: no pair changes the score by --min-delta 1e+09"
        in (out / "summary.md").read_text()
    )


@pytest.mark.slow
def test_resume_tdc_by_position(common_argv, tmp_path):
    argv = [*common_argv, "--perturbation", "tdc", "--idf-from", "candidates"]
    argv += ["--targets", "mlp_out", "--resid-by", "position", "--unit-pairs", "7"]
    argv += ["--max-pairs", "20"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert pt.main([*argv, "--output", str(full)]) == 0
    assert pt.main([*argv, "--output", str(parts), "--max-units", "1"]) == 0
    with open(parts / "results.jsonl", "ab") as f:
        f.write(b'{"unit":"mlp_out:1","exact":{"tar')
    assert pt.main([*argv, "--output", str(parts)]) == 0
    assert units(parts) == units(full) == ["mlp_out:0", "mlp_out:1", "mlp_out:2"]
    got, want = (pd.read_csv(d / "mlp_out.csv.gz") for d in (parts, full))
    pd.testing.assert_frame_equal(got, want)
    assert got.position.max() > 0 and set(got.method) == {"exact", "attribution"}
    with pytest.raises(SystemExit, match="perturbation: 'tdc' there, 'tfc1' now"):
        pt.main([*argv, "--output", str(parts), "--perturbation", "tfc1"])
