"""DistilBERT cross-encoders (``DistilBertForSequenceClassification``).

BERT's blocks; ``[CLS] q [SEP] d [SEP]`` without token types (no ``embed.token_type_embed`` nor
``hook_token_type_embed``, so ``circuits.token_embeddings`` is the same for both segments); the
head is ``pre_classifier`` + ReLU (mechir's ``pooler``) -> ``classifier``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechir.models.bert import _activation, attention_weights, block_weights, head_weights
from mechir.models.encoder import EncoderShape, EncoderSpec, entry_points
from mechir.parts import PairLayout


def _distilbert_config(config: Any) -> EncoderShape:
    return EncoderShape(
        d_model=config.dim,
        n_heads=config.n_heads,
        d_mlp=config.hidden_dim,
        n_layers=config.n_layers,
        n_positions=config.max_position_embeddings,
        d_vocab=config.vocab_size,
        eps=1e-12,  # hard-coded in DistilBERT's modelling code
        act_fn=_activation(config.activation, "distilbert"),
        n_token_types=0,
        d_embed=config.dim,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
    )


def _distilbert_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    emb = hf.distilbert.embeddings
    sd: dict[str, Tensor] = {
        "embed.embed.W_E": emb.word_embeddings.weight,
        "embed.pos_embed.W_pos": emb.position_embeddings.weight,
        "embed.ln.w": emb.LayerNorm.weight,
        "embed.ln.b": emb.LayerNorm.bias,
    }
    for i, layer in enumerate(hf.distilbert.transformer.layer):
        a = layer.attention
        attention_weights(sd, i, a.q_lin, a.k_lin, a.v_lin, a.out_lin, n_heads)
        ffn = layer.ffn
        block_weights(sd, i, layer.sa_layer_norm, ffn.lin1, ffn.lin2, layer.output_layer_norm)
    head_weights(sd, hf.pre_classifier, hf.classifier)
    return sd


SPEC = EncoderSpec(
    layout=PairLayout(middle_seps=1, token_types=False),
    encoder_config=_distilbert_config,
    state_dict=_distilbert_state_dict,
    head_keys=("pre_classifier.", "classifier."),
    head_activation="relu",
)


load, dimensions = entry_points(SPEC)
