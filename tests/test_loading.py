"""Loading errors: unsupported architectures, missing heads, missing tokenizers."""

from __future__ import annotations

import json

import pytest
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from mechir import UnsupportedModelError, load_cross_encoder
from tests.helpers import tiny_hf_model, tiny_tokenizer

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "hf",
    [
        RobertaForSequenceClassification(RobertaConfig(**SMALL)),
        DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
        ),
    ],
    ids=["roberta", "distilbert"],
)
def test_unsupported_in_memory(hf, tmp_path):
    with pytest.raises(UnsupportedModelError, match="supports BERT"):
        load_cross_encoder(hf, tokenizer=tiny_tokenizer(tmp_path))


def test_unsupported_directory(tmp_path):
    RobertaForSequenceClassification(RobertaConfig(**SMALL)).save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="'roberta' is not supported"):
        load_cross_encoder(tmp_path / "m")


def test_bert_without_classification_head(tmp_path):
    BertForMaskedLM(BertConfig(**SMALL)).save_pretrained(tmp_path / "mlm")
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "mlm")
    with pytest.raises(UnsupportedModelError, match="no sequence-classification head"):
        load_cross_encoder(tmp_path / "mlm")


def test_head_weights_missing(tmp_path):
    """A BERT checkpoint relabelled as a classifier but without classifier weights."""
    BertForMaskedLM(BertConfig(**SMALL)).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="no trained classification head"):
        load_cross_encoder(tmp_path / "m")


def test_missing_tokenizer(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_cross_encoder(tmp_path / "m")


def test_in_memory_needs_tokenizer():
    with pytest.raises(ValueError, match="needs its tokenizer"):
        load_cross_encoder(tiny_hf_model())


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cross_encoder(str(tmp_path / "nope"))


def test_no_deprecation_warning(tmp_path, recwarn):
    load_cross_encoder(tiny_hf_model(), tokenizer=tiny_tokenizer(tmp_path), device="cpu")
    assert not [
        w
        for w in recwarn
        if issubclass(w.category, DeprecationWarning) and "HookedEncoder" in str(w.message)
    ]
