"""Training through SAELens's SAETrainer: every architecture, mechir's JSONL evaluation, the
save format (BatchTopK saved as JumpReLU), exact batch sizes; metrics against closed forms."""

from __future__ import annotations

import json

import pytest
import torch

from mechir.features.saes import load_sae, training_config
from mechir.features.source import ActivationStream
from mechir.features.training import reconstruction_metrics, train_sae
from tests.features.conftest import PAIRS, SITE

SAVED_AS = {
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "standard": "StandardSAE",
}


@pytest.mark.parametrize("architecture", list(SAVED_AS))
def test_each_architecture_trains_logs_and_saves(tiny, architecture, tmp_path):
    model, _, _ = tiny
    stream = ActivationStream(model, PAIRS, SITE, batch_size=8)
    eval_acts = stream.take(4)
    cfg = training_config(
        architecture,
        d_in=model.cfg.d_model,
        d_sae=32,
        site=SITE,
        k=4,
        normalize_activations="expected_average_only_in",
    )
    sae = train_sae(
        cfg,
        stream,
        steps=12,
        batch_size=8,
        eval_acts=eval_acts,
        eval_every=5,
        log=tmp_path / "log.jsonl",
        output=tmp_path / "sae",
        progress=False,
    )
    assert type(sae).__name__ == SAVED_AS[architecture]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 12]
    assert {"fvu", "l0", "dead", "dense", "mse", "lr", "samples"} <= set(rows[0])
    assert rows[-1]["samples"] == 12 * 8
    again = load_sae(tmp_path / "sae")
    x = eval_acts[:5]
    torch.testing.assert_close(again.decode(again.encode(x)), sae.decode(sae.encode(x)))
    if architecture == "topk":
        assert (sae.encode(x) != 0).sum(-1).max() <= 4
    # the saved (folded) SAE reconstructs raw activations as the last evaluation measured
    final = reconstruction_metrics(
        eval_acts, sae.decode(sae.encode(eval_acts)), sae.encode(eval_acts)
    )
    assert final["fvu"] == pytest.approx(rows[-1]["fvu"], rel=1e-3, abs=1e-4)


def test_batches_of_another_size_are_refused(tiny):
    model, _, _ = tiny
    cfg = training_config("topk", d_in=model.cfg.d_model, d_sae=16, site=SITE, k=2)
    bad = iter([torch.zeros(5, model.cfg.d_model)] * 3)
    with pytest.raises(ValueError, match="exactly-sized"):
        train_sae(cfg, bad, steps=2, batch_size=8, progress=False)


def test_reconstruction_metrics_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    f = torch.zeros(50, 4)
    f[:, 0] = 1.0
    f[:10, 1] = 2.0
    perfect = reconstruction_metrics(x, x, f)
    assert perfect["fvu"] == 0 and perfect["mse"] == 0
    mean = reconstruction_metrics(x, x.mean(0).expand_as(x), f)
    assert mean["fvu"] == pytest.approx(1.0)
    assert perfect["l0"] == pytest.approx(1.2)
    assert perfect["dead"] == 2 and perfect["dense"] == 2  # feature 1 fires on 20% > 10%


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        training_config("gated-ish", d_in=4, d_sae=8, site=SITE)


def test_mean_init_of_the_decoder_bias_and_threads_restored():
    """With lr = 0 nothing moves, so the saved (unscaled) decoder bias is the mean of the
    norm-estimate batches; the caller's thread count is back after training."""
    from mechir.features.source import RowStream

    torch.manual_seed(0)
    rows = torch.randn(64, 6) * 3 + torch.arange(6.0)
    cfg = training_config(
        "topk", d_in=6, d_sae=12, site=SITE, k=2, normalize_activations="expected_average_only_in"
    )
    before = torch.get_num_threads()
    sae = train_sae(
        cfg,
        RowStream(rows, batch_size=16, seed=0),
        steps=2,
        batch_size=16,
        lr=0.0,
        norm_batches=2,
        init_b_dec="mean",
        threads=2,  # the fixture runs tests on one
        progress=False,
    )
    assert torch.get_num_threads() == before
    first = RowStream(rows, batch_size=16, seed=0)
    mean = torch.cat([next(first), next(first)]).mean(0)
    torch.testing.assert_close(sae.b_dec.detach(), mean, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="init_b_dec"):
        train_sae(cfg, iter([]), steps=1, batch_size=16, init_b_dec="median", progress=False)
