"""``python -m analyses.neuron_attribution`` end to end on a tiny model and two tiny collections."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import neuron_attribution as na
from tests.analyses.conftest import write_tiny_collection

SMALL = ["--pairs-per-class", "4", "--per-query", "1", "--n-steps", "4", "--unit-pairs", "3"]
SMALL += ["--prune-seeds", "1"]


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def second_collection(tmp_path_factory):
    return write_tiny_collection(tmp_path_factory.mktemp("second"), seed=1)


@pytest.fixture()
def argv(common_argv, tiny_collection_dir, second_collection):
    datasets = [f"{tiny_collection_dir}@test", f"{second_collection}@test"]
    return [*common_argv, *SMALL, "--attribution-datasets", *datasets]


@pytest.mark.slow
def test_two_datasets_fusion_intersection_pruning(
    argv, tmp_path, tiny_model_dir, tiny_collection_dir
):
    out = tmp_path / "na"
    kinds = ["fused", "intersection"]
    assert na.main([*argv, "--percents", "10", "--prune", *kinds, "--output", str(out)]) == 0
    done = units(out)
    # 2 datasets x 2 classes x 2 chunks (4 pairs, 3 per unit), then 2 kinds x 1 percent
    assert len([u for u in done if u.startswith("nig:")]) == 8
    assert [u for u in done if u.startswith("prune:")] == [f"prune:{k}:relevant:10" for k in kinds]
    name = na._dataset_name(str(tiny_collection_dir), "test")

    # chunked sums reassemble the library's mean over all pairs of a dataset and class
    from mechir import load_cross_encoder
    from mechir.attribution import mean_neuron_attributions, pair_batches, top_neurons
    from mechir.data import load_collection

    model = load_cross_encoder(tiny_model_dir, device="cpu")
    args = na.build_parser().parse_args(argv)
    pairs = na.attribution_pairs(load_collection(args.dataset, split="test"), args)["relevant"]
    expected = mean_neuron_attributions(
        model,
        pair_batches(model, pairs, batch_size=8, max_length=48),
        target="prob:relevant",
        n_steps=4,
    ).mean("all")
    saved = np.load(out / "mean_attributions.npz")
    got = torch.from_numpy(saved[f"{name}__relevant"])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    neurons = pd.read_csv(out / "selected_neurons.csv")
    sel = neurons[(neurons.selection == f"{name}:relevant") & (neurons.percent == 10)]
    ref = top_neurons(got, 10, layers=[0, 1])
    assert list(zip(sel.layer, sel.neuron)) == list(zip(ref.table.layer, ref.table.neuron))

    pruning = pd.read_csv(out / "pruning.csv")
    assert len(pruning) == 2 and (pruning.n_seeds == 1).all()
    assert pruning.unpruned.nunique() == 1  # the same unpruned model for every selection
    inter = pruning[pruning.kind == "intersection:relevant"].n_neurons.to_numpy()
    fused = pruning[pruning.kind == "fused:relevant"].n_neurons.to_numpy()
    assert (inter <= fused).all()  # fused has exactly p%, the intersection at most that
    text = (out / "summary.md").read_text()
    assert "pruning_curve.png" in text and "overlap between selections" in text
    # the attributions' own error and steps are recorded; 4 steps on a random model: unstable
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["points_sum"] > 0 and row["error_count"] == row["count"]
    assert "mean est. rel. error" in text and "mean path points" in text
    assert "the requested steps leave the selection unstable" in text
    assert "- **score type**: binary_logit" in text


@pytest.mark.slow
def test_resume_and_errors(argv, tmp_path):
    one = [a for a in argv if "second" not in a]  # one attribution dataset
    full, parts = tmp_path / "full", tmp_path / "parts"
    argv = [*one, "--percents", "10"]
    assert na.main([*argv, "--output", str(full)]) == 0
    name = na._dataset_name(argv[argv.index("--dataset") + 1], "test")
    nig = [f"nig:0:{c}:{i}" for c in na.CLASSES for i in (0, 1)]
    assert units(full) == [*nig, f"prune:{name}:relevant:10"]
    assert na.main([*argv, "--output", str(parts), "--max-units", "3"]) == 0
    assert len(units(parts)) == 3 and not (parts / "summary.md").exists()
    with open(parts / "results.jsonl", "ab") as f:
        f.write(b'{"unit":"nig:0:non_relevant:1","dataset":"col')
    assert na.main([*argv, "--output", str(parts), "--max-units", "2"]) == 0  # 1 nig + 1 prune
    assert len(units(parts)) == 5
    assert units(parts) == units(full)
    for file in ("pruning.csv", "selected_neurons.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(parts / file), pd.read_csv(full / file))
    with pytest.raises(SystemExit, match="n_steps: 4 there, 5 now"):
        na.main([*argv, "--output", str(parts), "--n-steps", "5"])
    with pytest.raises(SystemExit, match="needs two or more --attribution-datasets"):
        na.main([*one, "--output", str(tmp_path / "one"), "--prune", "fused"])


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--n-steps", "abc", "argument --n-steps: 'abc' is neither a positive integer nor 'auto'"),
        ("--n-steps", "0", "argument --n-steps: '0' is neither a positive integer nor 'auto'"),
        ("--rtol", "nan", "argument --rtol: 'nan' is not a finite number"),
        ("--percents", "150", "argument --percents: '150' is outside (0, 100]"),
    ],
)
def test_options_are_named_at_parse_time(option, value, named):
    """Issue 30: no internal names (``<lambda>``) and no non-finite values get past parsing."""
    with pytest.raises(ValueError) as info:
        na.build_parser().parse_args([option, value])
    assert named in str(info.value) and "lambda" not in str(info.value)
