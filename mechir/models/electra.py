"""ELECTRA cross-encoders (``ElectraForSequenceClassification``, e.g.
``cross-encoder/ms-marco-electra-base``).

BERT's blocks and pair layout; the head is ``classifier.dense`` + GELU (mechir's ``pooler``, so
``pooler.hook_pooler_out`` is a GELU output) -> ``classifier.out_proj``. With
``embedding_size != hidden_size`` (ELECTRA-small) the embedding is projected
(``embed.hook_embed_proj``, before ``hook_full_embed``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechir.models.bert import bert_like_config, bert_like_encoder, head_weights
from mechir.models.encoder import EncoderSpec, entry_points
from mechir.parts import BERT_LAYOUT


def _electra_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    bert_like_encoder(sd, hf.electra, hf.electra.embeddings, n_heads)
    if hf.config.embedding_size != hf.config.hidden_size:  # HF then builds the projection
        proj = hf.electra.embeddings_project
        sd["embed.W_proj"], sd["embed.b_proj"] = proj.weight.T, proj.bias
    head_weights(sd, hf.classifier.dense, hf.classifier.out_proj)
    return sd


SPEC = EncoderSpec(
    layout=BERT_LAYOUT,
    encoder_config=bert_like_config,
    state_dict=_electra_state_dict,
    head_keys=("classifier.",),
    head_activation="gelu",
)


load, dimensions = entry_points(SPEC)
