"""The common study base: the README's worked example runs, resumes and agrees with one direct
library call; stages share the --max-units budget; the score type is recorded and checked."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from analyses.base import LEGACY_SCORE_TYPE, Stage, Study, Summary, Unit, recorded_score_type
from mechir import outputs

README = Path(__file__).resolve().parents[2] / "analyses" / "README.md"


def readme_example(tmp_path: Path):
    """The module in the python block of README's "Adding a study", imported from a file."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Adding a study", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    path = tmp_path / "head_knockout_example.py"
    path.write_text(code, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("head_knockout_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, code


def results_units(out: Path) -> list[str]:
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_readme_example_study(common_argv, tmp_path):
    example, code = readme_example(tmp_path)
    assert len(code.splitlines()) <= 150  # "a new study is ~100-150 lines"
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert example.main([*common_argv, "--output", str(full)]) == 0
    table = pd.read_csv(full / "table.csv")
    assert sorted(table["head"]) == sorted(f"{la}/{h}" for la in range(2) for h in range(4))
    # one head against one direct library call
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from mechir.evaluation import evaluate, rerank
    from mechir.hooks import head_knockout_hooks

    collection = load_collection(common_argv[common_argv.index("--dataset") + 1], split="test")
    pairs = collection.candidates(depth=6, query_ids=collection.query_ids())
    model = load_cross_encoder(common_argv[common_argv.index("--model") + 1], device="cpu")
    hooks = head_knockout_hooks(model, heads=["1/2"])
    run = rerank(model, pairs, hooks=hooks, batch_size=8, max_length=48, progress=False)
    expected = evaluate(run, collection.qrels, ["nDCG@10"]).aggregate["nDCG@10"]
    assert table.set_index("head").loc["1/2", "nDCG@10"] == pytest.approx(expected, abs=1e-9)
    md = (full / "summary.md").read_text()
    assert "- **score type**: binary_logit" in md and "heatmap.png" in md  # the default
    assert json.loads((full / "config.json").read_text())["score_type"] == "binary_logit"
    # stopped by --max-units, then resumed: the same table, no unit twice
    assert example.main([*common_argv, "--output", str(parts), "--max-units", "3"]) == 0
    assert len(results_units(parts)) == 3 and not (parts / "summary.md").exists()
    assert example.main([*common_argv, "--output", str(parts)]) == 0
    assert sorted(results_units(parts)) == sorted(results_units(full))
    pd.testing.assert_frame_equal(pd.read_csv(parts / "table.csv"), table)
    with pytest.raises(SystemExit, match=r"layer 2 out of range: model has 2 layers \(0-1\)"):
        example.main([*common_argv, "--output", str(tmp_path / "bad"), "--layers", "2"])


class TwoStages(Study):
    """A toy study: stage b's units depend on stage a's stored rows."""

    name = "two_stages"

    def stages(self):
        yield Stage("a", [Unit(f"a{i}", spec=i) for i in range(3)], lambda u: {"x": u.spec})
        total = sum(self.store.get(f"a{i}")["x"] for i in range(3))
        yield Stage("b", [Unit(f"b{i}") for i in range(total)], lambda u: {"x": 1})

    def summarize(self) -> Summary:
        return Summary("Two stages").facts({"rows": len(self.store)})


def test_stages_share_the_max_units_budget(common_argv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*common_argv, "--output", str(out)]
    assert TwoStages.main([*argv, "--max-units", "2"]) == 0
    assert results_units(out) == ["a0", "a1"]
    assert "2/3 units done" in capsys.readouterr().err
    assert TwoStages.main([*argv, "--max-units", "3"]) == 0  # a2, then b0 and b1 of b0..b2
    assert results_units(out) == ["a0", "a1", "a2", "b0", "b1"]
    assert "5/6 units done" in capsys.readouterr().err
    assert TwoStages.main(argv) == 0
    assert "- **rows**: 6" in (out / "summary.md").read_text()
    assert TwoStages.parser().description == "A toy study: stage b's units depend on stage a's " \
        "stored rows."  # fmt: skip


@pytest.mark.slow
def test_score_type_is_recorded_and_checked(common_argv, tmp_path):
    example, _ = readme_example(tmp_path)
    out = tmp_path / "out"
    argv = [*common_argv, "--output", str(out), "--layers", "0"]
    assert example.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["score_type"] == "binary_logit"
    # units computed under another score type are never mixed with new ones
    # (written as mechir writes it: a config.json edited by hand is refused, see
    # tests/analyses/test_user_files.py)
    outputs.write_json(out / "config.json", {**config, "score_type": "prob"})
    with pytest.raises(SystemExit, match="scored as 'prob', but the model now scores as 'binary_"):
        example.main([*common_argv, "--output", str(out), "--layers", "0", "1"])
    # a directory from before the score type was recorded: its results were logits, the same
    # scores as binary_logit for a 1-label model
    del config["score_type"]
    outputs.write_json(out / "config.json", config)
    assert recorded_score_type(out) == LEGACY_SCORE_TYPE == "logit"
    assert example.main(argv) == 0  # all done: summarised without loading the model
    assert "- **score type**: logit" in (out / "summary.md").read_text()
    assert example.main([*common_argv, "--output", str(out), "--layers", "0", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["score_type"] == "binary_logit"


@pytest.mark.slow
def test_two_label_model_records_its_score_type(tiny_collection_dir, tmp_path):
    """A 2-label (MonoBERT-style) model: the summary lists the score the model produced."""
    from mechir import load_cross_encoder
    from tests.analyses.conftest import common_options
    from tests.helpers import tiny_hf_model, tiny_tokenizer

    model_dir = tmp_path / "two_labels"
    tiny_hf_model(num_labels=2).save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    expected = load_cross_encoder(model_dir, device="cpu").score_type
    example, _ = readme_example(tmp_path)
    out = tmp_path / "out"
    argv = [*common_options(model_dir, tiny_collection_dir), "--layers", "0", "--output", str(out)]
    assert example.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["score_type"] == expected
    assert f"- **score type**: {expected}" in (out / "summary.md").read_text()
