"""Feature statistics against naive per-feature loops; cards as HTML and JSON-ready data."""

from __future__ import annotations

import json
import math

import torch

from mechir import Part
from mechir.features.cards import (
    feature_activations,
    feature_card,
    feature_cards_html,
    feature_statistics,
    token_idf,
)
from tests.features.conftest import PAIRS


def test_statistics_equal_naive_loops(bert_sae):
    model, sae, acts = bert_sae
    f = feature_activations(sae, acts)
    relevant = torch.tensor([True, False, True, False])
    idf = token_idf([d for _, d in PAIRS], model.tokenizer)
    table = feature_statistics(f, acts, relevant=relevant, idf=idf)
    for i in f.count_nonzero(0).topk(3).indices.tolist():
        col = f[:, i].double()
        row = table.iloc[i]
        assert math.isclose(row.frequency, float((col > 0).double().mean()), rel_tol=1e-9)
        content = [
            (r, bool(acts.matched[r]))
            for r in range(len(acts))
            if int(acts.part[r]) in (int(Part.QUERY), int(Part.DOCUMENT))
        ]
        m = [float(col[r]) for r, is_m in content if is_m]
        u = [float(col[r]) for r, is_m in content if not is_m]
        assert math.isclose(row.matching, sum(m) / len(m) - sum(u) / len(u), abs_tol=1e-9)
        q_share = float(col[acts.part == int(Part.QUERY)].sum() / col.sum())
        assert math.isclose(row.share_query, q_share, rel_tol=1e-9)
        rel = [float(col[r]) for r in range(len(acts)) if relevant[int(acts.pair[r])]]
        assert math.isclose(row.relevant_mean, sum(rel) / len(rel), rel_tol=1e-9)
        assert -1 <= row.idf_corr <= 1 or math.isnan(row.idf_corr)


def test_cards_render_and_export(bert_sae):
    model, sae, acts = bert_sae
    f = feature_activations(sae, acts)
    table = feature_statistics(f, acts)
    top = int(f.count_nonzero(0).argmax())
    card = feature_card(
        top, table.iloc[top].to_dict(), f, acts, lambda t: model.tokenizer.convert_ids_to_tokens(t)
    )
    assert card["examples"] and len(card["examples"][0]["tokens"]) == len(
        card["examples"][0]["activations"]
    )
    json.dumps(card)  # JSON-ready
    page = feature_cards_html([card])
    assert f"feature {top}" in page and "<svg" in page and "rgba(220,80,30" in page
