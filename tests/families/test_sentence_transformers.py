"""A ``sentence_transformers.CrossEncoder`` object loads like its inner HF model; mechir reports
the raw logit (``score_type="logit"``), and ``score_type="prob"`` is what ``predict`` returns
with its default sigmoid activation for one label."""

from __future__ import annotations

import pytest
import torch

from mechir import load_cross_encoder
from tests.families.builders import save_tiny_family
from tests.helpers import DOCUMENTS, QUERIES

st = pytest.importorskip("sentence_transformers", reason="optional extra sentence-transformers")


@pytest.mark.parametrize("name", ["roberta", "electra"])
def test_cross_encoder_object(name, tmp_path):
    ce = st.CrossEncoder(str(save_tiny_family(name, tmp_path / name)), device="cpu")
    model = load_cross_encoder(ce, device="cpu")
    assert name in model.family.model_types
    batch = model.encode(QUERIES, DOCUMENTS)
    with torch.no_grad():
        logits = ce.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            **({"token_type_ids": batch.token_type_ids} if name == "electra" else {}),
        ).logits[:, 0]
    torch.testing.assert_close(model.score(batch), logits, atol=1e-5, rtol=0)
    predicted = torch.as_tensor(ce.predict(list(zip(QUERIES, DOCUMENTS)))).float()
    model.score_type = "prob"
    torch.testing.assert_close(model.score(batch), predicted, atol=1e-5, rtol=0)
