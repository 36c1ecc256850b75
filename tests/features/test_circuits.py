"""Feature circuits: frozen patterns and scales keep the clean scores, edges against exact
ablation of upstream features under the same freezing, exact faithfulness end points."""

from __future__ import annotations

import pytest
import torch

from mechir.features.circuits import (
    faithfulness_curve,
    feature_circuit,
    frozen_hooks,
    prune_by_influence,
)
from mechir.features.saes import encode
from mechir.features.splice import FeatureEdit, sae_hooks
from tests.features.conftest import DOWN


def test_frozen_hooks_keep_the_clean_scores(two_saes, tiny_batch):
    model, _, _ = two_saes
    got = model.score(tiny_batch, hooks=frozen_hooks(model, tiny_batch))
    torch.testing.assert_close(got, model.score(tiny_batch), rtol=1e-5, atol=1e-5)


def test_edges_follow_exact_ablation_of_upstream_features(two_saes, tiny_batch):
    model, up, down = two_saes
    circuit = feature_circuit(model, tiny_batch, up, down, n_down=3)
    frozen = frozen_hooks(model, tiny_batch)
    seen = {}

    def down_features(hooks):
        def read(act, hook):
            seen["x"] = act.detach()

        with model.hooks(fwd_hooks=frozen + hooks + [(DOWN, read)]):
            model.score(tiny_batch)
        return encode(down, seen["x"])

    base = down_features(sae_hooks(model, up))
    j = circuit.down_nodes[0]
    top = circuit.edges[0, :-1].abs().topk(8).indices.tolist()
    exact = []
    for i in top:
        ablated = down_features(sae_hooks(model, up, edit=FeatureEdit((i,))))
        exact.append(float((base[..., j] - ablated[..., j]).sum().detach()))
    # edges carry the score gradient g_j as a weight per position: compare signs and ranking
    est = circuit.edges[0, top]
    r = torch.corrcoef(torch.stack([est, torch.tensor(exact)]))[0, 1]
    assert r >= 0.8


def test_faithfulness_end_points_are_exact(two_saes, tiny_batch):
    model, up, down = two_saes
    circuit = feature_circuit(model, tiny_batch, up, down, n_down=2)
    curve = faithfulness_curve(model, tiny_batch, up, down, circuit, [0, up.cfg.d_sae])
    assert curve[0]["faithfulness"] == 0
    assert curve[1]["faithfulness"] == pytest.approx(1, abs=1e-4)


def test_prune_by_influence_closed_form():
    effect = torch.tensor([0.1, -0.5, 0.3, 0.1])
    assert prune_by_influence(effect, 0.5) == [1]
    assert prune_by_influence(effect, 0.8) == [1, 2]
    assert sorted(prune_by_influence(effect, 1.0)) == [0, 1, 2, 3]


def test_sites_out_of_order_are_refused(two_saes, tiny_batch):
    model, up, down = two_saes
    with pytest.raises(ValueError, match="must come before"):
        feature_circuit(model, tiny_batch, down, up)
