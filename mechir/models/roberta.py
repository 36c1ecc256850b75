"""RoBERTa and XLM-RoBERTa cross-encoders (``RobertaForSequenceClassification``,
``XLMRobertaForSequenceClassification``: ``BAAI/bge-reranker-*``, RoBERTa rerankers).

BERT's blocks; pairs are ``<s> q </s></s> d </s>`` (both middle ``</s>`` are SEP1), no token
types (one token-type row, always added); positions start at ``padding_idx + 1`` (padding tokens
use ``padding_idx``, so ``model.max_length`` is the table size minus that offset); the head is
``classifier.dense`` + tanh -> ``classifier.out_proj``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechir.models.bert import bert_like_config, bert_like_encoder, head_weights
from mechir.models.encoder import EncoderSpec, entry_points
from mechir.parts import ROBERTA_LAYOUT


def _roberta_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    bert_like_encoder(sd, hf.roberta, hf.roberta.embeddings, n_heads)
    head_weights(sd, hf.classifier.dense, hf.classifier.out_proj)
    return sd


SPEC = EncoderSpec(
    layout=ROBERTA_LAYOUT,
    encoder_config=bert_like_config,
    state_dict=_roberta_state_dict,
    head_keys=("classifier.",),
    positions="padding_offset",
)


load, dimensions = entry_points(SPEC)
