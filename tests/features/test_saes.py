"""An SAE built and saved by SAELens itself loads and splices; the transcoder trained by mechir
loads as SAELens's Transcoder and splices."""

from __future__ import annotations

import pytest
import torch

from mechir.features.saes import load_sae
from mechir.features.source import collect_activations
from mechir.features.splice import sae_hooks
from mechir.features.training import train_transcoder
from tests.features.conftest import PAIRS, SITE


def test_an_sae_saved_by_saelens_loads_and_splices(tiny, tiny_batch, tmp_path):
    from sae_lens.saes import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model, _, _ = tiny
    torch.manual_seed(0)
    cfg = StandardSAEConfig(
        d_in=model.cfg.d_model, d_sae=48, metadata=SAEMetadata(hook_name=SITE, model_name="tiny")
    )
    theirs = StandardSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    theirs.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert type(sae).__name__ == "StandardSAE"
    clean = model.score(tiny_batch)
    assert torch.equal(model.score(tiny_batch, hooks=sae_hooks(model, sae)), clean)

    W_enc, b_enc, W_dec, b_dec = (
        getattr(theirs, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )

    def by_hand(act, hook):  # ReLU((x - b_dec) W_enc + b_enc) W_dec + b_dec at real tokens
        rec = torch.relu((act - b_dec) @ W_enc + b_enc) @ W_dec + b_dec
        return torch.where(tiny_batch.attention_mask.bool()[..., None], rec, act)

    got = model.score(tiny_batch, hooks=sae_hooks(model, sae, error="drop"))
    torch.testing.assert_close(
        got, model.score(tiny_batch, hooks=[(SITE, by_hand)]), rtol=1e-5, atol=1e-5
    )


def test_a_directory_without_cfg_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cfg.json"):
        load_sae(tmp_path)


def test_transcoder_trains_saves_loads_and_splices(tiny, tiny_batch, tmp_path):
    model, _, _ = tiny
    site_in, site_out = "blocks.0.ln1.hook_normalized", "blocks.0.hook_mlp_out"  # post-LN BERT
    x = collect_activations(model, PAIRS, site_in).acts
    y = collect_activations(model, PAIRS, site_out).acts

    def pairs():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randint(len(x), (16,), generator=g)
            yield x[idx], y[idx]

    d = model.cfg.d_model
    tc = train_transcoder(
        pairs(),
        d_in=d,
        d_out=d,
        d_sae=64,
        site_in=site_in,
        site_out=site_out,
        steps=30,
        eval_pairs=(x, y),
        eval_every=10,
        log=tmp_path / "log.jsonl",
        output=tmp_path / "tc",
        progress=False,
    )
    assert type(tc).__name__ == "Transcoder"
    assert tc.cfg.metadata.hook_name_out == site_out
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    clean = model.score(tiny_batch)
    # a hook on the LayerNorm output may switch the model to its hook-aware LayerNorm path
    assert (model.score(tiny_batch, hooks=sae_hooks(model, tc)) - clean).abs().max() <= 1e-5

    def by_hand(act, hook):  # mlp_out replaced by the transcoder of the same pass's mlp_in
        return torch.where(tiny_batch.attention_mask.bool()[..., None], seen["y"], act)

    seen = {}

    def keep_in(act, hook):
        seen["y"] = tc.decode(tc.encode(act))

    got = model.score(tiny_batch, hooks=sae_hooks(model, tc, error="drop"))
    want = model.score(tiny_batch, hooks=[(site_in, keep_in), (site_out, by_hand)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
