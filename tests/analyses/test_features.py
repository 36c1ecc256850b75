"""``python -m analyses.features`` end to end on a tiny model and collection: every stage
stored, resumable unit by unit, the SAE saved in SAELens's format and spliced exactly."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sae_lens")

from analyses import features  # noqa: E402

WORK = ["--train-queries", "3", "--eval-queries", "3", "--steps", "12", "--train-batch", "16",
        "--eval-every", "5", "--k", "4", "--d-sae", "48", "--cards", "3", "--top-features", "5",
        "--attribution-pairs", "3", "--circuit-pairs", "3",
        "--circuit-down-nodes", "4"]  # fmt: skip
UNITS = ["activations", "train", "fidelity:sae", "fidelity:pca", "attribution", "features"]
CIRCUIT = ["circuit:sae", "circuit"]


def units(out):
    return [json.loads(line)["unit"] for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_study_runs_resumes_and_saves_a_splicable_sae(common_argv, tmp_path, tiny_model_dir):
    out = tmp_path / "features"
    argv = [*common_argv, *WORK, "--output", str(out)]
    assert features.main([*argv, "--max-units", "2"]) == 0
    assert units(out) == UNITS[:2] and not (out / "summary.md").exists()
    assert features.main(argv) == 0
    assert units(out) == UNITS + CIRCUIT
    text = (out / "summary.md").read_text()
    assert "SAE vs PCA at equal L0" in text and "Top matching features" in text
    assert "relevant pairs against query-corrupted copies" in text
    assert (out / "cards.html").exists() and json.loads((out / "features.json").read_text())
    rows = [json.loads(line) for line in (out / "training.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 12]

    from mechir import load_cross_encoder
    from mechir.features import saes, splice

    model = load_cross_encoder(tiny_model_dir, device="cpu")
    sae = saes.load_sae(out / "sae")
    assert saes.sae_site(sae) == "blocks.1.hook_resid_pre"
    batch = model.encode(["cat runs"], ["the cat runs fast"])
    clean = model.score(batch)
    assert (model.score(batch, hooks=splice.sae_hooks(model, sae)) - clean).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", ["monot5", "qwen3"])
def test_the_study_runs_on_prompt_rerankers(family, tmp_path, tiny_collection_dir):
    from tests.analyses.conftest import common_options
    from tests.families.builders import save_tiny_decoder, save_tiny_t5

    model_dir = tmp_path / family
    model_dir.mkdir()
    if family == "monot5":
        save_tiny_t5(model_dir)
    else:
        save_tiny_decoder("qwen3", model_dir)
    out = tmp_path / "features"
    argv = [*common_options(model_dir, tiny_collection_dir), *WORK, "--output", str(out)]
    # the Qwen3-Reranker prompt alone is ~100 tokens: the last --max-length wins
    assert features.main([*argv, "--max-length", "160"]) == 0
    assert units(out) == UNITS
    assert "SAE vs PCA at equal L0" in (out / "summary.md").read_text()
