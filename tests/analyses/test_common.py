"""The studies' shared pieces: results store, config check, unit loop, floors, summary."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest

from analyses.common import (
    ConfigMismatchError,
    Unit,
    default_run_name,
    open_study,
    prepare_output,
    run_units,
    study_config,
)
from analyses.floors import random_ranking_floor, worst_ranking_run
from analyses.summary import Summary, markdown_table
from mechir.data import Pair
from mechir.evaluation import evaluate
from mechir.store import ResultsStore


def test_run_units_skips_finished_units_and_stops_after_max_units(tmp_path):
    calls = []

    def compute(unit):
        calls.append(unit.id)
        return {"value": unit.spec}

    units = [Unit(str(i), spec=i * i) for i in range(5)] + [Unit("1", spec=-1)]
    with ResultsStore(tmp_path / "r.jsonl") as store:
        assert not run_units(store, units, compute, progress=False, max_units=2)
        assert run_units(store, units, compute, progress=False)
        assert calls == ["0", "1", "2", "3", "4"] and store.get("4")["value"] == 16


def test_config_check(tmp_path):
    args = argparse.Namespace(
        model="m", dataset=str(tmp_path), split=None, depth=10, device="cpu", batch_size=4,
        output=None, run_name=None, max_units=None, progress=True, conditions=["x"],
    )  # fmt: skip
    config = study_config(args, exclude=["conditions"])
    assert config == {"dataset": str(tmp_path.resolve()), "depth": 10, "model": "m", "split": None}
    prepare_output(tmp_path / "out", "s", config, {"device": "cpu"})
    prepare_output(tmp_path / "out", "s", config, {"device": "cuda"})  # runtime may change
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["runtime"] == {"device": "cuda"} and saved["config"] == config
    with pytest.raises(ConfigMismatchError, match="depth: 10 there, 11 now"):
        prepare_output(tmp_path / "out", "s", {**config, "depth": 11}, {})
    with pytest.raises(ConfigMismatchError, match="study 's'"):
        prepare_output(tmp_path / "out", "t", config, {})
    assert default_run_name(args, "zero") == f"m__{tmp_path.name}__zero"


def test_weights_replaced_in_place_are_a_config_mismatch(tmp_path):
    from tests.helpers import tiny_hf_model

    model = tmp_path / "model"
    tiny_hf_model().save_pretrained(model)
    args = argparse.Namespace(
        model=str(model), dataset="d", split=None, device="cpu", output=tmp_path / "out",
        run_name=None, max_units=None, progress=True,
    )  # fmt: skip
    with open_study("s", args) as run:
        assert run.config["weights"].startswith("sha256:")
    with open_study("s", args):  # same weights: resumes
        pass
    tiny_hf_model(seed=1).save_pretrained(model)
    with pytest.raises(ConfigMismatchError, match="weights: 'sha256:"):
        open_study("s", args)


def test_ranking_floors():
    pairs = [Pair("q", d, "", "") for d in ("a", "b")] + [Pair("r", "c", "", "")]
    qrels = {"q": {"b": 1}, "r": {"c": 2}}
    worst = evaluate(worst_ranking_run(pairs, qrels), qrels).values()
    assert worst == pytest.approx({"q": 1 / 1.5849625, "r": 1.0})
    floor = random_ranking_floor(pairs, qrels, shuffles=400, seed=1)
    # q: relevant document first or second with equal chance
    assert floor.per_query["q"] == pytest.approx((1 + 1 / 1.5849625) / 2, abs=0.03)
    assert floor.per_query["r"] == 1.0 and floor.min < floor.mean < floor.max
    again = random_ranking_floor(pairs, qrels, shuffles=400, seed=1)
    assert again.mean == floor.mean


def test_summary_markdown_and_json(tmp_path):
    frame = pd.DataFrame({"name": ["a|b", "c"], "value": [0.12345, float("nan")], "ok": [1, 2]})
    assert markdown_table(frame).splitlines()[:3] == [
        "| name | value | ok |",
        "| --- | ---: | ---: |",
        "| a\\|b | 0.1235 | 1 |",
    ]
    s = Summary("T", "sub").heading("H").facts({"n": 3}).table(frame, "cap", {"value": ".2f"})
    s.image("x.png", "an image").write(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# T\n\nsub\n\n## H\n\n- **n**: 3") and "| c | - | 2 |" in md
    assert "![an image](x.png)" in md
    blocks = json.loads((tmp_path / "summary.json").read_text())["blocks"]
    assert [b["type"] for b in blocks] == ["heading", "list", "table", "image"]
    assert blocks[2]["rows"][0] == ["a|b", "0.12", "1"] and blocks[2]["numeric"] == [
        False,
        True,
        True,
    ]


@pytest.mark.parametrize(
    "study",
    ["direction_ablation", "matching_heads", "qk_svd", "neuron_attribution", "patching_tfc1"],
)
def test_every_study_has_the_common_options(study, capsys):
    import importlib

    module = importlib.import_module(f"analyses.{study}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--dataset", "--split", "--depth", "--limit-queries",
                   "--max-length", "--device", "--batch-size", "--seed", "--output",
                   "--max-units"):  # fmt: skip
        assert option in text
    assert "castorini/monobert-large-msmarco" in text and f"analyses.{study}" in text


OPENER = r"""
import sys
from pathlib import Path
import analyses.common as c
from mechir.store import StoreLockedError

for out, depth in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        store = c._open_store(Path(out), "demo_study", {"depth": int(depth)}, {}, "cmd")
    except StoreLockedError as err:
        print("locked", flush=True)
    else:
        store.close()
        print("opened", flush=True)
"""


def test_the_lock_is_taken_before_config_json_is_checked_or_written(tmp_path):
    """A second run opening a directory whose store another process holds is refused before it
    reads or writes config.json (fresh directory, and one of another setting); once the lock is
    free the setting is checked under it."""
    import os
    import subprocess
    import sys

    from analyses.common import _open_store
    from tests.distributed_helpers import ROOT

    fresh, used = tmp_path / "fresh", tmp_path / "used"
    with _open_store(used, "demo_study", {"depth": 10}, {}, "cmd") as store:
        store.add("u1", {"depth_used": 10})
    config = (used / "config.json").read_bytes()
    held = [ResultsStore(fresh / "results.jsonl"), ResultsStore(used / "results.jsonl")]
    try:
        child = subprocess.run(
            [sys.executable, "-c", OPENER, str(fresh), "20", str(used), "20"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "MECHIR_TYPECHECK": "0"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for store in held:
            store.close()
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ["locked", "locked"]
    assert not (fresh / "config.json").exists() and not (fresh / "results.jsonl").exists()
    assert (used / "config.json").read_bytes() == config
    with pytest.raises(ConfigMismatchError, match="depth: 10 there, 20 now"):
        _open_store(used, "demo_study", {"depth": 20}, {}, "cmd")
    assert not (used / "results.jsonl.lock").exists()  # released on the error
    with _open_store(used, "demo_study", {"depth": 10}, {}, "cmd") as store:
        assert store.units == ["u1"]


def test_small_sample_warning_below_the_minimum_only():
    """Issue 30: t-tests and held-out R² on a handful of queries carry a warning line."""
    from analyses.summary import MIN_QUERIES, small_sample_warning

    assert small_sample_warning(MIN_QUERIES, "the paired t-tests") is None
    one = small_sample_warning(1, "the held-out R²")
    assert one.startswith("**Small sample:** the held-out R² rest on 1 query (fewer than")
    md = Summary("T").small_sample(2, "the paired t-tests").to_markdown()
    assert "the paired t-tests rest on 2 queries" in md
    assert Summary("T").small_sample(MIN_QUERIES, "x").blocks == []
