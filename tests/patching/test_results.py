"""The normalized metric, exclusion of near-zero denominators, per-grade means, tables, plots."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure

from patching import PatchingResult, head_target, patch_sweep, patching_metric, plot_patching


def hand_result() -> PatchingResult:
    """3 pairs x (layer 2, head 2); pair c has clean == corrupted (up to 1e-4)."""
    patched = torch.tensor(
        [
            [[1.0, 2.0], [3.0, float("nan")]],
            [[0.0, -1.0], [-2.0, -3.0]],
            [[5.0, 5.0], [5.0, 5.0]],
        ]
    )
    return PatchingResult(
        target="z/all",
        dims=("layer", "head"),
        coords={"layer": [0, 1], "head": [0, 1]},
        patched=patched,
        clean=torch.tensor([5.0, -4.0, 1.0001]),
        corrupted=torch.tensor([1.0, 0.0, 1.0]),
        pair_ids=["a", "b", "c"],
        grades=[1, 0, 1],
    )


def test_metric_by_hand():
    r = hand_result()
    m = r.metric(min_delta=1e-3)
    assert m[0].tolist()[0] == [0.0, 0.25] and m[0, 1, 0] == 0.5 and math.isnan(m[0, 1, 1])
    assert m[1].tolist() == [[0.0, 0.25], [0.5, 0.75]]  # delta -4
    assert m[2].isnan().all()  # |delta| = 1e-4 < 1e-3: excluded, not divided by ~0
    assert list(r.excluded(1e-3)) == ["c"] and r.excluded(1e-3)["c"] == pytest.approx(
        1e-4, rel=1e-2
    )
    assert r.excluded(1e-5) == {}
    with pytest.raises(ValueError, match="min_delta"):
        patching_metric(r.patched, r.clean, r.corrupted, min_delta=-1)


def test_means_per_grade():
    r = hand_result()
    grades = r.by_grade()
    assert list(grades) == [0, 1]
    assert grades[0].tolist() == [[0.0, 0.25], [0.5, 0.75]]
    assert grades[1][0].tolist() == [0.0, 0.25]  # pair c (grade 1) excluded
    assert r.counts_by_grade() == {0: 1, 1: 1}
    torch.testing.assert_close(r.mean()[1], torch.tensor([0.5, 0.75], dtype=torch.float64))
    assert r.mean(grade=7).isnan().all()


def test_tidy_table():
    r = hand_result()
    df = r.to_frame()
    assert list(df.columns) == [
        "pair", "grade", "target", "method", "layer", "head",
        "value", "patched", "clean", "corrupted", "excluded",
    ]  # fmt: skip
    assert len(df) == 3 + 4  # pair a has one unpatched cell, pair c is excluded
    row = df[(df["pair"] == "b") & (df["layer"] == 1) & (df["head"] == 0)].iloc[0]
    assert (row["value"], row["patched"], row["grade"]) == (0.5, -2.0, 0)
    with_excluded = r.to_frame(include_excluded=True)
    assert len(with_excluded) == 11 and with_excluded[with_excluded.pair == "c"].value.isna().all()


def test_heatmap_arrays():
    r = hand_result()
    h = r.heatmap()
    assert h.values.shape == (2, 2) and (h.row_dim, h.col_dim) == ("layer", "head")
    one = r.heatmap(layer=1, grade=0)
    assert one.values.tolist() == [[0.5, 0.75]] and one.col_dim == "head"
    with pytest.raises(ValueError, match="cannot fix 'position'"):
        r.heatmap(position=3)
    with pytest.raises(ValueError, match="not in this result"):
        r.heatmap(layer=9)


def test_heatmap_needs_two_dimensions(model, pairs):
    r = patch_sweep(model, pairs, head_target(by="position", heads=["0/1"]))
    with pytest.raises(ValueError, match="3 dimensions left"):
        r.heatmap()
    assert r.heatmap(layer=0).values.shape == (4, pairs.clean.input_ids.shape[1])


def test_plot_patching_one_panel_per_grade(tmp_path, model, pairs):
    r = patch_sweep(model, pairs, head_target())
    fig = plot_patching(r)
    assert isinstance(fig, Figure)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(visible) == 1 + 3  # all pairs + grades 0, 1, 2
    assert "grade 2 (n=1)" in visible[-1].get_title()
    fig.savefig(tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 1000


def test_result_shape_is_checked():
    r = hand_result()
    with pytest.raises(ValueError, match="does not match dims"):
        PatchingResult(
            "z/all", ("layer",), {"layer": [0, 1]}, r.patched, r.clean, r.corrupted,
            r.pair_ids, r.grades,
        )  # fmt: skip
