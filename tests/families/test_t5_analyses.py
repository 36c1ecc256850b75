"""Every analysis on MonoT5: the batched kernels against their naive references (NIG on both
paths, patching sweeps, path patching, guided patching, attention statistics), attribution
patching against autograd, the token-level pair assembly against the tokenizer, the five
studies, PyTerrier and torchrun end to end, and the one refusal (the pooled [CLS] target)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from mechir import CrossEncoderBatch, load_cross_encoder, matching
from mechir.attribution import neuron_integrated_gradients, neuron_integrated_gradients_reference
from mechir.hooks import direction_ablation_hooks
from patching import (
    AlignedPairs,
    PairBuilder,
    attribution_patch,
    head_target,
    patch_sweep,
    patch_sweep_reference,
    patch_top_cells,
    path_patch,
    path_patch_reference,
    pooled_target,
    qk_target,
    resid_target,
)
from tests.analyses.conftest import (
    DIRECTION_ABLATION_WORK,
    MATCHING_HEADS_WORK,
    common_options,
    write_tiny_collection,
)
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5


def corrupted_pairs(batch: CrossEncoderBatch) -> AlignedPairs:
    """Clean pairs and the same pairs with every document token replaced by the query's first
    token (same lengths and parts: aligned)."""
    ids = batch.input_ids.clone()
    first_query = batch.input_ids.gather(1, batch.mask("query").int().argmax(1, keepdim=True))
    doc = batch.mask("document")
    ids[doc] = first_query.expand_as(ids)[doc]
    corrupted = CrossEncoderBatch(ids, batch.token_type_ids, batch.attention_mask, batch.parts)
    return AlignedPairs.from_batches(batch, corrupted)


# ------------------------------------------------------------------ NIG
@pytest.mark.parametrize("path", ["input", "activation"])
def test_nig_batched_equals_naive_reference(t5, path):
    _, model, _, batch = t5
    kwargs = dict(n_steps=4, path=path, method="gauss_legendre", aggregate="part")
    got = neuron_integrated_gradients(model, batch, max_batch=5, **kwargs)
    want = neuron_integrated_gradients_reference(model, batch, **kwargs)
    scale = want.attributions.abs().max()
    assert scale > 0
    assert (got.attributions - want.attributions).abs().max() <= 1e-5 * scale
    torch.testing.assert_close(got.scores, want.scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.unexplained, want.unexplained, atol=ATOL * 10, rtol=0)
    torch.testing.assert_close(got.scores, model.score(batch), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ patching
@pytest.mark.parametrize(
    "target",
    [resid_target("resid_pre"), head_target(by="part"), qk_target("k", by="part")],
    ids=["resid", "heads", "keys"],
)
def test_patching_sweep_batched_equals_per_cell(t5, target):
    _, model, _, batch = t5
    pairs = corrupted_pairs(batch)
    fast = patch_sweep(model, pairs, target, batch_size=5)
    ref = patch_sweep_reference(model, pairs, target)
    assert fast.dims == ref.dims and fast.coords == ref.coords
    torch.testing.assert_close(fast.patched, ref.patched, atol=ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(fast.clean, model.score(batch), atol=ATOL, rtol=0)
    assert fast.patched.isfinite().any()


def test_path_patching_batched_equals_reference(t5):
    _, model, _, batch = t5
    pairs = corrupted_pairs(batch)
    for channels in (("q", "k", "v"), ("v",)):
        fast = path_patch(model, pairs, ["1/0", "1/2"], channels=channels, batch_size=3)
        ref = path_patch_reference(model, pairs, ["1/0", "1/2"], channels=channels)
        torch.testing.assert_close(fast.patched, ref.patched, atol=ATOL, rtol=0, equal_nan=True)
        assert fast.patched.isfinite().any()


def test_attribution_patching_is_the_gradient_times_the_difference(t5):
    """Head target, all positions: ``sum (z_clean - z_corrupted) * dF/dz`` at the corrupted
    input, with dF/dz from autograd through the whole encoder-decoder."""
    _, model, _, batch = t5
    pairs = corrupted_pairs(batch)
    estimate = attribution_patch(model, pairs, head_target())
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean, names_filter=lambda n: n in names)
    _, corrupted = model.run_with_cache(
        pairs.corrupted, names_filter=lambda n: n in names, incl_bwd=True
    )
    real = pairs.corrupted.attention_mask[:, :, None, None]
    for layer, name in enumerate(names):
        delta = (clean[name] - corrupted[name]) * corrupted[name + "_grad"] * real
        want = delta.sum((1, 3))  # [pair, head]
        got = estimate.patched[:, layer] - estimate.corrupted[:, None]
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-4)


def test_guided_verified_effects_equal_the_per_cell_reference(t5):
    _, model, _, batch = t5
    pairs = corrupted_pairs(batch)[:2]
    target = head_target(by="part", heads=["0/0", "0/3", "1/1", "1/2"])
    ref = patch_sweep_reference(model, pairs, target)
    guided = patch_top_cells(model, pairs, target, k=2, step=1)
    done = guided.verified.reshape(2, -1)
    exact = guided.exact.reshape(2, -1).double()
    metric = ref.patched.reshape(2, -1).double() - ref.corrupted.double()[:, None]
    assert done.any()
    torch.testing.assert_close(exact[done], metric[done], atol=ATOL, rtol=0)


def test_the_pooled_target_is_refused_in_one_line(t5):
    """MonoT5 has no pooled [CLS] vector (the decoder reads every encoder position)."""
    _, model, _, batch = t5
    match = "'pooler.hook_pooler_out', which MonoT5 does not have"
    with pytest.raises(ValueError, match=match) as err:
        patch_sweep(model, corrupted_pairs(batch), pooled_target())
    assert "\n" not in str(err.value)


def test_token_level_pairs_assemble_like_the_prompt(t5):
    _, model, _, batch = t5
    tok = model.tokenizer
    ids = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    built = model.batch_from_tokens(ids(QUERIES), ids(DOCUMENTS))
    for name in CrossEncoderBatch.TENSORS:
        assert torch.equal(getattr(built, name), getattr(batch, name)), name
    assert model.n_special == 7  # ▁Query : ▁Document : ▁Relevant : </s>
    builder = PairBuilder(tok, max_length=40, n_special=model.n_special)
    pair = builder.tfc1("what cat runs", "the cat runs in the house", pair_id="p", term="cat")
    aligned = AlignedPairs.from_pairs([pair], tok, model=model)
    assert torch.equal(aligned.clean.parts, aligned.corrupted.parts)
    assert (aligned.clean.input_ids != aligned.corrupted.input_ids).sum() >= 1
    pieces = tok.convert_ids_to_tokens(aligned.clean.input_ids[0])
    assert pieces[:2] == ["▁Query", ":"] and pieces[-3:] == ["▁Relevant", ":", "</s>"]


# ------------------------------------------------------------------ attention statistics
def test_streaming_attention_statistics_match_the_full_cache(t5):
    _, model, _, batch = t5
    fast = matching.attention_statistics(model, batch, batch_size=3)
    ref = matching.attention_statistics_reference(model, batch)
    for name in matching.STATISTICS:
        a, b = fast.values[name], ref.values[name]
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(fast.pairs.score.to_numpy()), model.score(batch))


# ------------------------------------------------------------------ studies, PyTerrier, torchrun
@pytest.fixture(scope="module")
def t5_study_setup(tmp_path_factory):
    from tests.families.builders import save_tiny_t5

    root = tmp_path_factory.mktemp("t5-studies")
    return save_tiny_t5(root / "model"), write_tiny_collection(root / "collection")


@pytest.mark.slow
def test_the_five_studies_run_on_monot5(t5_study_setup, tmp_path):
    from analyses import (
        direction_ablation,
        matching_heads,
        neuron_attribution,
        patching_tfc1,
        qk_svd,
    )

    model_dir, collection = t5_study_setup
    argv = common_options(model_dir, collection)
    small = ["--pairs-per-class", "4", "--per-query", "1", "--n-steps", "4", "--unit-pairs", "3"]
    runs = {
        "direction_ablation": (
            direction_ablation,
            [*DIRECTION_ABLATION_WORK, "--random-shuffles", "20"],
        ),
        "matching_heads": (matching_heads, MATCHING_HEADS_WORK),
        "neuron_attribution": (
            neuron_attribution,
            [*small, "--prune-seeds", "1", "--attribution-datasets", f"{collection}@test"],
        ),
        "patching_tfc1": (patching_tfc1, ["--unit-pairs", "10"]),
        "qk_svd": (qk_svd, ["--top-heads", "2", "--directions", "2", "--tokens", "4"]),
    }
    for name, (study, extra) in runs.items():
        out = tmp_path / name
        assert study.main([*argv, *extra, "--output", str(out)]) == 0, name
        summary = json.loads((out / "summary.json").read_text())
        assert str(model_dir) in json.dumps(summary), name
    table = pd.read_csv(tmp_path / "direction_ablation" / "table.csv")
    assert table["nDCG@10"].between(0, 1).all()
    model = load_cross_encoder(model_dir, device="cpu")
    alignment = pd.read_csv(tmp_path / "qk_svd" / "alignment.csv")
    from mechir.circuits import qk_alignment

    pd.testing.assert_frame_equal(alignment, qk_alignment(model, k=3), check_dtype=False)
    patched = pd.read_csv(next((tmp_path / "patching_tfc1").glob("*.csv")))
    assert len(patched)


def test_pyterrier_reranks_with_monot5_and_its_hooks(t5):
    pytest.importorskip("pyterrier")
    from mechir.pyterrier import MechirReranker

    _, model, _, batch = t5
    frame = pd.DataFrame(
        {
            "qid": ["1", "1", "2", "2"],
            "query": QUERIES[:1] * 2 + QUERIES[1:2] * 2,
            "docno": ["a", "b", "c", "d"],
            "text": DOCUMENTS,
        }
    )
    plain = MechirReranker(model).transform(frame)
    expected = model.score(model.encode(list(frame["query"]), DOCUMENTS))
    torch.testing.assert_close(torch.tensor(plain.score.to_numpy()).float(), expected)
    hooks = direction_ablation_hooks(model, attending="decoder", attended="document")
    ablated = MechirReranker(model, hooks=hooks).transform(frame)
    assert not torch.allclose(torch.tensor(ablated.score.to_numpy()).float(), expected, atol=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_on_monot5(t5_study_setup, tmp_path):
    from tests.test_cli_distributed import assert_prompt_reranker_runs_alike

    template = "Query: {query} Document: {document} Relevant:"
    assert_prompt_reranker_runs_alike(t5_study_setup[0], tmp_path, "template", template)
