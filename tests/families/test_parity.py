"""Every family scores exactly like Hugging Face: every layer's hidden state and the score."""

from __future__ import annotations

import pytest
import torch

from mechir import Part
from mechir.models.registry import FAMILIES
from tests.families.builders import SPECS
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5


def hf_forward(hf, batch, spec):
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if spec.has_token_types:
        kwargs["token_type_ids"] = batch.token_type_ids
    with torch.no_grad():
        out = hf(**kwargs, output_hidden_states=True)
    return out.logits, out.hidden_states


def test_every_hidden_state_and_the_score_match_hf(family):
    name, model, hf, batch = family
    assert batch.attention_mask.sum(-1).unique().numel() > 1, "batch must contain padding"
    logits, hidden = hf_forward(hf, batch, SPECS[name])
    last = model.cfg.n_layers - 1  # HF's last hidden state is the final norm's (ModernBERT)
    names = ["hook_full_embed"]
    names += [model.block_output_name(i) for i in range(last)] + [model.final_hidden_name]
    with torch.no_grad():
        mine, cache = model.run_with_cache(batch, return_type="logits", names_filter=names)
    assert len(hidden) == len(names)
    real = batch.attention_mask.bool()
    for i, hook in enumerate(names):
        torch.testing.assert_close(cache[hook][real], hidden[i][real], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(mine, logits, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model.score(batch), logits[:, 0], atol=ATOL, rtol=1e-5)


def test_family_is_recognised(family):
    name, model, _, _ = family
    assert model.family.hf_class == SPECS[name].model_class
    assert name.split("-cls")[0] in model.family.model_types


def test_padding_does_not_change_scores(family):
    _, model, _, batch = family
    together = model.score(batch)
    alone = torch.cat([model.score(batch[i]) for i in range(len(batch))])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)


def test_encode_equals_the_tokenizers_own_pair_encoding(family):
    """Tokens, mask and (where the family has them) token types as ``tokenizer(q, d)`` gives."""
    name, model, _, _ = family
    batch = model.encode(QUERIES, DOCUMENTS, max_length=20)  # truncates the long documents
    ref = model.tokenizer(
        QUERIES,
        DOCUMENTS,
        truncation="only_second",
        padding=True,
        max_length=20,
        return_tensors="pt",
    )
    torch.testing.assert_close(batch.input_ids, ref["input_ids"])
    torch.testing.assert_close(batch.attention_mask, ref["attention_mask"])
    if SPECS[name].has_token_types:
        torch.testing.assert_close(batch.token_type_ids, ref["token_type_ids"])
    else:
        assert "token_type_ids" not in ref and not batch.token_type_ids.any()


def test_parts_at_hand_computed_positions(family):
    """Pair 2 of the batch: query "who eats" is 2 words; positions written out per layout."""
    name, model, _, _ = family
    tok = model.tokenizer
    q = tok("who eats", add_special_tokens=False)["input_ids"]
    d = tok("a small fish", add_special_tokens=False)["input_ids"]
    batch = model.encode(["who eats", "what cat runs in the house"], ["a small fish", "cat"])
    seps = SPECS[name].middle_seps
    expected = (
        [Part.CLS]
        + [Part.QUERY] * len(q)
        + [Part.SEP1] * seps
        + [Part.DOCUMENT] * len(d)
        + [Part.SEP2]
    )
    n = len(expected)
    assert batch.parts[0, :n].tolist() == [int(p) for p in expected]
    assert (batch.parts[0, n:] == Part.PAD).all() and batch.attention_mask[0].sum() == n
    ids = [tok.cls_token_id, *q, *[tok.sep_token_id] * seps, *d, tok.sep_token_id]
    assert batch.input_ids[0, :n].tolist() == ids
    assert (batch.input_ids[0, n:] == tok.pad_token_id).all()
    if SPECS[name].has_token_types:
        first_doc = 1 + len(q) + seps
        assert batch.token_type_ids[0, :n].tolist() == [0] * first_doc + [1] * (n - first_doc)


def test_roberta_positions_start_after_padding_idx(family):
    """RoBERTa/XLM-R: position rows padding_idx + 1 + i on real tokens, padding_idx on padding."""
    name, model, _, batch = family
    rows = model.embed.position_ids(batch.input_ids)
    if SPECS[name].middle_seps == 2:
        pad = model.tokenizer.pad_token_id
        for i, length in enumerate(batch.lengths.tolist()):
            assert rows[i, :length].tolist() == list(range(pad + 1, pad + 1 + length))
            assert (rows[i, length:] == pad).all()
        assert model.max_length == model.cfg.n_ctx - pad - 1
    else:
        assert rows[0].tolist() == list(range(batch.input_ids.shape[1]))


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_registry_entries_are_complete(fam):
    import transformers

    assert hasattr(transformers, fam.hf_class)
    assert fam.model_types and fam.examples


def test_tokenizer_of_another_layout_is_a_clear_error(family_dirs):
    """A RoBERTa checkpoint with a [CLS] q [SEP] d [SEP] tokenizer would be read wrongly."""
    from mechir import load_cross_encoder
    from tests.families.builders import load_hf, wordpiece_tokenizer

    hf = load_hf("roberta", family_dirs("roberta"))
    with pytest.raises(ValueError, match="1 separator.*RoBERTa cross-encoders read 2"):
        load_cross_encoder(hf, tokenizer=wordpiece_tokenizer(), device="cpu")


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.kind == "encoder"], ids=lambda f: f.name)
def test_registry_counts_the_special_tokens_of_the_family_layout(fam):
    """The light registry entry (read before a model loads) agrees with the family's layout."""
    assert fam.n_special == fam.implementation().SPEC.layout.n_special
