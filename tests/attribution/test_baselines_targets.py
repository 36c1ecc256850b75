from __future__ import annotations

import pytest
import torch

from mechir.attribution import AttributionTarget, baseline_batch, parse_target, target_from_logits
from mechir.parts import Part


def test_default_baseline_pads_query_and_document(tiny, tiny_batch):
    model, _, tok = tiny
    base = baseline_batch(model, tiny_batch)
    content = tiny_batch.mask(["query", "document"])
    assert torch.all(base.input_ids[content] == tok.pad_token_id)
    assert torch.equal(base.input_ids[~content], tiny_batch.input_ids[~content])  # CLS/SEP/pad
    assert torch.equal(base.attention_mask, tiny_batch.attention_mask)
    assert torch.equal(base.token_type_ids, tiny_batch.token_type_ids)


@pytest.mark.parametrize(
    "name, token, parts",
    [
        ("unk_query", "unk", [Part.QUERY]),
        ("mask_document", "mask", [Part.DOCUMENT]),
        ("pad_all", "pad", [Part.CLS, Part.QUERY, Part.SEP1, Part.DOCUMENT, Part.SEP2]),
        ("mask", "mask", [Part.QUERY, Part.DOCUMENT]),
    ],
)
def test_named_baselines(tiny, tiny_batch, name, token, parts):
    model, _, tok = tiny
    base = baseline_batch(model, tiny_batch, name)
    replaced = tiny_batch.mask(parts)
    assert torch.all(base.input_ids[replaced] == getattr(tok, f"{token}_token_id"))
    assert torch.equal(base.input_ids[~replaced], tiny_batch.input_ids[~replaced])


def test_user_baseline_batch_is_checked(tiny, tiny_batch):
    model, _, _ = tiny
    other = model.encode(["cat"], ["dog"], max_length=64)
    with pytest.raises(ValueError, match="same padding"):
        baseline_batch(model, tiny_batch, other)
    shifted = baseline_batch(model, tiny_batch, "unk")
    shifted.attention_mask = shifted.attention_mask.clone()
    shifted.attention_mask[0, -1] = 1 - shifted.attention_mask[0, -1]
    with pytest.raises(ValueError, match="attention mask"):
        baseline_batch(model, tiny_batch, shifted)
    ok = baseline_batch(model, tiny_batch, baseline_batch(model, tiny_batch, "unk"))
    assert torch.equal(ok.input_ids, baseline_batch(model, tiny_batch, "unk").input_ids)


def test_baseline_needs_a_tokenizer(tiny, tiny_batch, monkeypatch):
    model, _, _ = tiny
    monkeypatch.setattr(model, "tokenizer", None)
    with pytest.raises(ValueError, match="no tokenizer"):
        baseline_batch(model, tiny_batch, "pad")


def test_parse_target():
    assert parse_target("score") == AttributionTarget("score", "relevant")
    assert parse_target("prob:non-relevant") == AttributionTarget("prob", "non_relevant")
    assert parse_target("log_prob:0") == AttributionTarget("log_prob", 0)
    assert str(parse_target("logit")) == "logit:relevant"
    for bad, message in [
        ("odds", "unknown target kind"),
        ("prob:maybe", "unknown target label"),
        ("score:non_relevant", "relevance score"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_target(bad)


def test_targets_from_logits(tiny, tiny2):
    one, two = tiny[0], tiny2[0]
    z = torch.tensor([[0.3], [-2.0]])
    torch.testing.assert_close(target_from_logits(one, z, "score"), z[:, 0])
    torch.testing.assert_close(target_from_logits(one, z, "prob"), z[:, 0].sigmoid())
    torch.testing.assert_close(
        target_from_logits(one, z, "prob:non_relevant"), (-z[:, 0]).sigmoid()
    )
    torch.testing.assert_close(
        target_from_logits(one, z, "log_prob:non_relevant"),
        torch.nn.functional.logsigmoid(-z[:, 0]),
    )
    with pytest.raises(ValueError, match="no non-relevant logit"):
        target_from_logits(one, z, "logit:non_relevant")
    logits = torch.tensor([[0.5, 1.5], [2.0, -1.0]])
    assert two.relevant_label == 1
    torch.testing.assert_close(target_from_logits(two, logits, "logit:non_relevant"), logits[:, 0])
    torch.testing.assert_close(target_from_logits(two, logits, "prob"), logits.softmax(-1)[:, 1])
    with pytest.raises(ValueError, match="out of range"):
        target_from_logits(two, logits, "prob:2")


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_baseline_token_id_out_of_range_is_rejected(tiny, tiny_batch, bad):
    model = tiny[0]
    ids = tiny_batch.input_ids.clone()
    ids[:, 1] = bad
    user = type(tiny_batch)(
        ids, tiny_batch.token_type_ids, tiny_batch.attention_mask, tiny_batch.parts
    )
    with pytest.raises(ValueError, match=f"baseline token id {bad} out of range: the vocabulary"):
        baseline_batch(model, tiny_batch, user)
