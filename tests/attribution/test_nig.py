"""Neuron integrated gradients: batched kernel vs naive reference, oracles, completeness."""

from __future__ import annotations

import pytest
import torch

from mechir.attribution import (
    neuron_integrated_gradients,
    neuron_integrated_gradients_reference,
    rows_for_memory,
)
from mechir.attribution.baselines import baseline_batch
from mechir.hooks.neurons import neuron_ablation_hooks
from mechir.parts import PARTS
from tests.helpers import DOCUMENTS, QUERIES


def assert_same_attributions(got, want, rel=1e-5):
    scale = want.attributions.abs().max()
    assert scale > 0
    diff = (got.attributions - want.attributions).abs().max()
    assert diff <= rel * scale, f"max diff {diff:.3g} vs scale {scale:.3g}"
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.baseline_scores, want.baseline_scores, rtol=0, atol=1e-5)
    score_scale = max(float(scale), float(want.scores.abs().max()))
    torch.testing.assert_close(got.unexplained, want.unexplained, rtol=0, atol=1e-5 * score_scale)


CASES = [
    dict(path="input", method="riemann_right", aggregate="position"),
    dict(path="input", method="gauss_legendre", neurons="pre", baseline="mask_document",
         aggregate="part", two_labels=True, target="prob:non_relevant"),
    dict(path="input", method="riemann_trapezoid", baseline="unk_all", layers=[1]),
    dict(path="activation", method="riemann_right"),
    dict(path="activation", method="gauss_legendre", neurons="pre", aggregate="position",
         activation_baseline="input", baseline="pad_query", two_labels=True, target="log_prob"),
    dict(path="activation", method="riemann_left", activation_baseline="input",
         aggregate="part", layers=[1]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['path']}-{c['method']}")
def test_batched_equals_naive_reference(tiny, tiny2, case):
    case = dict(case)
    model = (tiny2 if case.pop("two_labels", False) else tiny)[0]
    batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
    kwargs = dict(n_steps=5, **case)
    got = neuron_integrated_gradients(model, batch, max_batch=7, **kwargs)
    want = neuron_integrated_gradients_reference(model, batch, **kwargs)
    assert got.attributions.shape == want.attributions.shape
    assert_same_attributions(got, want)
    if case["path"] == "input":
        torch.testing.assert_close(
            got.embedding_completeness, want.embedding_completeness, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("path", ["input", "activation"])
def test_chunk_size_does_not_change_results(tiny, tiny_batch, path):
    model, _, _ = tiny
    runs = [
        neuron_integrated_gradients(
            model, tiny_batch, path=path, n_steps=4, method="riemann_middle", max_batch=mb
        )
        for mb in (1, 3, 1000)
    ]
    for other in runs[1:]:
        assert_same_attributions(other, runs[0], rel=1e-6)


def _linear_readout_hooks(model):
    """Hooks that make the logit an affine function of the last layer's FFN activation: the
    last LayerNorm's scale is frozen at its clean value and the tanh pooler is replaced by a
    linear map of the [CLS] vector."""
    last = model.cfg.n_layers - 1
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(model.cfg.d_model, model.cfg.d_model, generator=gen) / model.cfg.d_model
    scale_name = f"blocks.{last}.ln2.hook_scale"

    def build(batch):
        with torch.no_grad():
            _, cache = model.run_with_cache(batch, names_filter=scale_name)
        scale = cache[scale_name]
        box = {}

        def freeze(act, hook):
            return scale.expand_as(act)

        def keep(act, hook):
            box["resid"] = act

        def pool(act, hook):
            return box["resid"][:, 0] @ proj

        return [
            (scale_name, freeze),
            (f"blocks.{last}.hook_normalized_resid_post", keep),
            ("pooler.hook_pooler_out", pool),
        ]

    return build


def test_closed_form_oracle_for_a_model_linear_in_the_activation(tiny, tiny_batch):
    model, _, _ = tiny
    last = model.cfg.n_layers - 1
    name = f"blocks.{last}.mlp.hook_post"
    build = _linear_readout_hooks(model)
    batch = tiny_batch
    # oracle: F is affine in a, so IG_i = a_i * dF/da_i (zero baseline), from one backward
    expected = []
    for e in range(len(batch)):
        one = batch[e]
        box = {}

        def leaf(act, hook, box=box):
            box["a"] = act.detach().requires_grad_(True)
            return box["a"]

        with torch.enable_grad():
            with model.hooks(fwd_hooks=build(one) + [(name, leaf)]):
                f = model(one)
            (g,) = torch.autograd.grad(f.sum(), [box["a"]])
        expected.append((box["a"] * g)[0].sum(0).detach())
    expected = torch.stack(expected)
    for method, n in (("riemann_right", 1), ("riemann_left", 2), ("gauss_legendre", 3)):
        got = neuron_integrated_gradients(
            model, batch, path="activation", layers=[last], hooks=build, method=method, n_steps=n
        )
        scale = expected.abs().max()
        assert (got.attributions[:, 0] - expected).abs().max() <= 1e-5 * scale
        assert got.unexplained.abs().max() <= 1e-5 * got.scores.abs().max()


@pytest.mark.parametrize("path", ["input", "activation"])
def test_completeness_error_shrinks_with_steps(tiny, tiny_batch, path):
    model, _, _ = tiny

    def error(n):
        r = neuron_integrated_gradients(model, tiny_batch, path=path, n_steps=n, max_batch=256)
        delta = r.embedding_completeness if path == "input" else r.unexplained
        return float(delta.abs().max())

    errors = [error(n) for n in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 4


def test_input_path_layer_conductance_converges(tiny, tiny_batch):
    model, _, _ = tiny
    ref = neuron_integrated_gradients(model, tiny_batch, method="gauss_legendre", n_steps=64)
    ref_sums = ref.per_neuron().sum(-1)
    gaps = []
    for n in (4, 16, 64):
        r = neuron_integrated_gradients(model, tiny_batch, n_steps=n, max_batch=256)
        gaps.append(float((r.per_neuron().sum(-1) - ref_sums).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2]


@pytest.mark.parametrize("path", ["input", "activation"])
def test_gauss_legendre_beats_left_riemann(tiny, tiny_batch, path):
    model, _, _ = tiny

    def error(method):
        r = neuron_integrated_gradients(model, tiny_batch, path=path, method=method, n_steps=16)
        delta = r.embedding_completeness if path == "input" else r.unexplained
        return float(delta.abs().max())

    assert error("gauss_legendre") < error("riemann_left") / 4


@pytest.mark.parametrize("path", ["input", "activation"])
def test_ablated_neurons_get_zero_attribution(tiny, tiny_batch, path):
    model, _, _ = tiny
    ablated = {0: [3, 7], 1: [5]}
    hooks = neuron_ablation_hooks(model, ablated)
    kwargs = dict(path=path, n_steps=4, aggregate="position", activation_baseline="input")
    got = neuron_integrated_gradients(model, tiny_batch, hooks=hooks, **kwargs)
    for layer, idx in ablated.items():
        assert torch.all(got.attributions[:, layer, :, idx] == 0)
    assert got.attributions[:, 0, :, 4].abs().max() > 0
    # and the unablated neurons match the naive loop under the same hooks
    want = neuron_integrated_gradients_reference(model, tiny_batch, hooks=hooks, **kwargs)
    assert_same_attributions(got, want)


def test_batch_dependent_hooks_on_the_input_path(tiny, tiny_batch):
    model, _, _ = tiny

    def hooks(sub):  # ablate a neuron on document tokens only: masks built per sub-batch
        return neuron_ablation_hooks(model, {1: [2]}, parts="document")

    kwargs = dict(n_steps=3, aggregate="part", hooks=hooks)
    got = neuron_integrated_gradients(model, tiny_batch, max_batch=5, **kwargs)
    want = neuron_integrated_gradients_reference(model, tiny_batch, **kwargs)
    assert_same_attributions(got, want)
    document = PARTS.index(3)
    assert torch.all(got.attributions[:, 1, document, 2] == 0)
    assert got.attributions[:, 1, 0, 2].abs().max() > 0  # CLS position not ablated


def test_baseline_scores_are_the_counterfactual_scores(tiny, tiny_batch):
    model, _, _ = tiny
    r_in = neuron_integrated_gradients(model, tiny_batch, n_steps=2)
    base = baseline_batch(model, tiny_batch, "pad")
    torch.testing.assert_close(r_in.scores, model.score(tiny_batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(r_in.baseline_scores[:, 0], model.score(base), rtol=0, atol=1e-5)

    r_act = neuron_integrated_gradients(model, tiny_batch, path="activation", n_steps=2)
    for i, layer in enumerate(r_act.layers):
        zeroed = model.score(
            tiny_batch, hooks=[(f"blocks.{layer}.mlp.hook_post", lambda a, hook: a * 0)]
        )
        torch.testing.assert_close(r_act.baseline_scores[:, i], zeroed, rtol=0, atol=1e-5)


def test_non_relevant_class_attributions_are_negated(tiny, tiny2, tiny_batch):
    for model in (tiny[0], tiny2[0]):
        batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
        rel = neuron_integrated_gradients(model, batch, target="prob:relevant", n_steps=3)
        non = neuron_integrated_gradients(model, batch, target="prob:non_relevant", n_steps=3)
        scale = rel.attributions.abs().max()
        assert scale > 0
        assert (rel.attributions + non.attributions).abs().max() <= 1e-5 * scale
        torch.testing.assert_close(rel.scores + non.scores, torch.ones(len(batch)))


def test_score_target_follows_the_score_type(tmp_path, tiny_batch):
    from tests.helpers import tiny_cross_encoder

    model, _, _ = tiny_cross_encoder(tmp_path, seed=1, num_labels=2)
    model.score_type = "log_prob"
    batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
    by_score = neuron_integrated_gradients(model, batch, n_steps=3)
    by_class = neuron_integrated_gradients(model, batch, n_steps=3, target="log_prob:relevant")
    assert_same_attributions(by_score, by_class, rel=1e-6)


def test_aggregations_agree(tiny, tiny_batch):
    model, _, _ = tiny
    kw = dict(n_steps=3, path="activation")
    pos = neuron_integrated_gradients(model, tiny_batch, aggregate="position", **kw)
    part = neuron_integrated_gradients(model, tiny_batch, aggregate="part", **kw)
    seq = neuron_integrated_gradients(model, tiny_batch, aggregate="sequence", **kw)
    assert pos.attributions.shape == (4, 2, tiny_batch.input_ids.shape[1], model.cfg.d_mlp)
    assert part.attributions.shape == (4, 2, 5, model.cfg.d_mlp)
    masks = tiny_batch.part_masks.float()  # [batch, 5, pos]
    by_part = torch.einsum("bkp,blpd->blkd", masks, pos.attributions)
    torch.testing.assert_close(part.attributions, by_part, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq.attributions, part.attributions.sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq.per_neuron(), pos.per_neuron(), rtol=1e-5, atol=1e-6)
    frame = seq.frame()
    assert len(frame) == 4 * 2 * model.cfg.d_mlp
    assert list(frame.columns) == ["example", "layer", "neuron", "attribution", "error"]


def test_autocast_bfloat16_stays_close(tiny, tiny_batch):
    model, _, _ = tiny
    fp32 = neuron_integrated_gradients(model, tiny_batch, n_steps=4)
    bf16 = neuron_integrated_gradients(model, tiny_batch, n_steps=4, autocast=torch.bfloat16)
    assert bf16.attributions.dtype == torch.float32
    scale = fp32.attributions.abs().max()
    error = (bf16.attributions - fp32.attributions).abs().max() / scale
    assert 0 < error < 0.1


def test_memory_budget_sets_chunk_rows(tiny, tiny_batch):
    model, _, _ = tiny
    assert rows_for_memory(model, 64, 10**9) > rows_for_memory(model, 64, 10**7)
    assert rows_for_memory(model, 64, 1) == 1
    small = neuron_integrated_gradients(model, tiny_batch, n_steps=3, memory_budget=1)
    large = neuron_integrated_gradients(model, tiny_batch, n_steps=3, max_batch=100)
    # one-row chunks drop padding columns: float32 rounding of the fused attention over fewer keys
    assert_same_attributions(small, large, rel=2e-6)


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(path="gradient"), "unknown path 'gradient'"),
        (dict(aggregate="token"), "unknown aggregate 'token'"),
        (dict(neurons="mid"), "unknown neurons 'mid'"),
        (dict(layers=[2]), "layer 2 out of range: model has 2 layers"),
        (dict(activation_baseline="one"), "unknown activation_baseline"),
        (dict(max_batch=0), "max_batch must be a positive int"),
        (dict(max_batch=4, memory_budget=10**9), "not both"),
        (dict(autocast=torch.float64), "autocast dtype"),
        (dict(method="simpson"), "unknown integration method"),
        (dict(target="logit:non_relevant"), "no non-relevant logit"),
        (dict(baseline="zeros"), "unknown baseline 'zeros'"),
    ],
)
def test_bad_arguments_raise(tiny, tiny_batch, kwargs, message):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=message):
        neuron_integrated_gradients(model, tiny_batch, **kwargs)


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_batch_must_be_a_cross_encoder_batch(tiny, tiny_batch):
    with pytest.raises(ValueError, match="CrossEncoderBatch"):
        neuron_integrated_gradients(tiny[0], tiny_batch.input_ids)


@pytest.mark.parametrize("path", ["input", "activation"])
def test_non_finite_embedding_is_an_error_not_nan_attributions(tiny, tiny_batch, path):
    model = tiny[0]

    def poison(act, hook):  # one NaN in example 2's embedding
        act = act.clone()
        act[2, 1, 0] = float("nan")
        return act

    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in .* example\(s\) \[2\]"):
        neuron_integrated_gradients(
            model, tiny_batch, path=path, n_steps=2, hooks=[("hook_full_embed", poison)]
        )


def test_non_finite_weights_are_an_error(tmp_path, tiny_batch):
    from tests.helpers import tiny_cross_encoder

    model, _, _ = tiny_cross_encoder(tmp_path, seed=3)
    token = int(tiny_batch.input_ids[0, 1])
    with torch.no_grad():
        model.embed.embed.W_E[token, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite values"):
        neuron_integrated_gradients(model, tiny_batch, n_steps=2)
