"""Feature and error-node attribution: completeness of integrated gradients, attribution
patching against exact single-feature ablation, exact ablation against a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from mechir.features.attribution import feature_ablation_effects, feature_attribution, node_means
from tests.features.conftest import SITE

#: Documented tolerance: with mean baselines and n_steps="auto" (rtol=0.01), the attributions
#: of the features and the error node sum to the score change within 1% of max |delta|.
COMPLETENESS_RTOL = 0.01


def test_ig_attributions_sum_to_the_score_change(bert_sae, tiny_batch):
    model, sae, acts = bert_sae
    fm, em = node_means(sae, acts.acts)
    attr = feature_attribution(
        model, tiny_batch, sae, n_steps="auto", feature_baseline=fm, error_baseline=em
    )
    assert attr.relative_completeness_error() <= COMPLETENESS_RTOL
    assert attr.delta.abs().min() > 1e-3  # a real change to explain
    torch.testing.assert_close(attr.clean, model.score(tiny_batch), rtol=1e-5, atol=1e-5)
    assert attr.error.abs().max() > 0  # the error node takes its share


def test_zero_baseline_with_enough_steps_and_clean_error(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    attr = feature_attribution(model, tiny_batch, sae, n_steps=64, error_baseline="clean")
    assert torch.equal(attr.error, torch.zeros_like(attr.error))
    assert attr.relative_completeness_error() <= COMPLETENESS_RTOL


def test_exact_ablation_equals_a_hand_written_hook(bert_sae, tiny_batch):
    model, sae, acts = bert_sae
    live = sae.encode(acts.acts).count_nonzero(0).topk(3).indices.tolist()
    effects = feature_ablation_effects(model, tiny_batch, sae, live)
    clean = model.score(tiny_batch)
    for col, i in enumerate(live):
        direction = sae.decode(torch.eye(sae.cfg.d_sae)[i]) - sae.decode(torch.zeros(sae.cfg.d_sae))

        def minus_feature(act, hook, i=i, direction=direction):  # x - f_i * d_i at real tokens
            f_i = sae.encode(act)[..., i : i + 1]
            real = tiny_batch.attention_mask.bool()[..., None]
            return torch.where(real, act - f_i * direction, act)

        want = clean - model.score(tiny_batch, hooks=[(SITE, minus_feature)])
        torch.testing.assert_close(effects[:, col], want, rtol=1e-4, atol=1e-5)
    assert effects.abs().max() > 1e-4


def test_attribution_patching_agrees_with_exact_ablation(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    atp = feature_attribution(model, tiny_batch, sae, method="atp")
    top = atp.features.abs().sum(0).topk(8).indices.tolist()
    exact = feature_ablation_effects(model, tiny_batch, sae, top)
    est = atp.features[:, top]
    r = torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1]
    assert r >= 0.9


def test_bad_baselines_are_refused(bert_sae, tiny_batch, unchecked_shapes):
    model, sae, _ = bert_sae
    with pytest.raises(ValueError, match="feature baseline"):
        feature_attribution(model, tiny_batch, sae, feature_baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="unknown method"):
        feature_attribution(model, tiny_batch, sae, method="eap")
