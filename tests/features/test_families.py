"""The Done-when checks on tiny MonoT5 (encoder and decoder sites) and Qwen3 yes/no rerankers:
an SAE trained through SAELens spliced with its error scores exactly; feature + error
attributions sum to the score change; exact ablation equals a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from mechir import load_cross_encoder
from mechir.features.attribution import feature_ablation_effects, feature_attribution, node_means
from mechir.features.splice import sae_hooks
from tests.families.builders import save_tiny_decoder, save_tiny_t5
from tests.features.conftest import tiny_sae
from tests.features.test_attribution import COMPLETENESS_RTOL
from tests.helpers import DOCUMENTS, QUERIES

CASES = [
    ("monot5", "blocks.1.hook_resid_pre"),
    ("monot5", "decoder.1.hook_resid_pre"),
    ("qwen3", "blocks.1.hook_resid_pre"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        "monot5": load_cross_encoder(save_tiny_t5(tmp_path_factory.mktemp("t5")), device="cpu"),
        "qwen3": load_cross_encoder(
            save_tiny_decoder("qwen3", tmp_path_factory.mktemp("qwen3")), device="cpu"
        ),
    }


@pytest.mark.parametrize("family,site", CASES)
def test_done_when_checks(models, family, site):
    model = models[family]
    sae, acts = tiny_sae(model, site)
    batch = model.encode(QUERIES, DOCUMENTS)
    clean = model.score(batch)
    assert (model.score(batch, hooks=sae_hooks(model, sae)) - clean).abs().max() <= 1e-5

    fm, em = node_means(sae, acts.acts)
    attr = feature_attribution(
        model, batch, sae, n_steps="auto", feature_baseline=fm, error_baseline=em
    )
    assert attr.relative_completeness_error() <= COMPLETENESS_RTOL

    live = sae.encode(acts.acts).count_nonzero(0).topk(2).indices.tolist()
    effects = feature_ablation_effects(model, batch, sae, live)
    for col, i in enumerate(live):
        direction = sae.decode(torch.eye(sae.cfg.d_sae)[i]) - sae.decode(torch.zeros(sae.cfg.d_sae))

        def minus_feature(act, hook, i=i, direction=direction):
            f_i = sae.encode(act)[..., i : i + 1]
            if act.shape[1] != batch.input_ids.shape[1]:  # decoder site: every position
                return act - f_i * direction
            real = batch.attention_mask.bool()[..., None]
            return torch.where(real, act - f_i * direction, act)

        want = clean - model.score(batch, hooks=[(site, minus_feature)])
        torch.testing.assert_close(effects[:, col], want, rtol=1e-4, atol=1e-5)
