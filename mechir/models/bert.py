"""BERT cross-encoders (``BertForSequenceClassification``: MonoBERT, ``cross-encoder/ms-marco-*``).

``[CLS] q [SEP] d [SEP]`` with token types 0/1, absolute positions, post-LN BERT blocks, and the
head ``bert.pooler.dense`` + tanh (mechir's ``pooler``) -> ``classifier``. The config and
state-dict helpers here are shared by the other BERT-block families (ELECTRA, RoBERTa,
XLM-RoBERTa, DistilBERT), whose own files only say what differs.
"""

from __future__ import annotations

from typing import Any

import einops
from torch import Tensor

from mechir.models.encoder import EncoderShape, EncoderSpec, entry_points
from mechir.models.registry import family_of
from mechir.parts import BERT_LAYOUT

#: Activations of the BERT-block FFN (Hugging Face ``ACT2FN`` names).
ENCODER_ACTIVATIONS = ("gelu", "relu", "silu", "gelu_new")


def _activation(act: Any, family: str) -> str:
    if act not in ENCODER_ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {act!r} in the {family} config: mechir supports "
            f"{ENCODER_ACTIVATIONS}"
        )
    return act


def bert_like_config(config: Any) -> EncoderShape:
    """BertConfig, ElectraConfig, RobertaConfig, XLMRobertaConfig (same field names)."""
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ValueError(
            f"position_embedding_type {position_type!r} is not supported (absolute positions only)"
        )
    return EncoderShape(
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_positions=config.max_position_embeddings,
        d_vocab=config.vocab_size,
        eps=config.layer_norm_eps,
        act_fn=_activation(config.hidden_act, config.model_type),
        n_token_types=config.type_vocab_size,
        d_embed=getattr(config, "embedding_size", None) or config.hidden_size,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
    )


# ------------------------------------------------------------------------------ state dicts
_SPLIT_IN = "(h d) m -> h m d"


def attention_weights(sd: dict, i: int, q: Any, k: Any, v: Any, o: Any, n_heads: int) -> None:
    for name, lin in (("Q", q), ("K", k), ("V", v)):
        sd[f"blocks.{i}.attn.W_{name}"] = einops.rearrange(lin.weight, _SPLIT_IN, h=n_heads)
        sd[f"blocks.{i}.attn.b_{name}"] = einops.rearrange(lin.bias, "(h d) -> h d", h=n_heads)
    sd[f"blocks.{i}.attn.W_O"] = einops.rearrange(o.weight, "m (h d) -> h d m", h=n_heads)
    sd[f"blocks.{i}.attn.b_O"] = o.bias


def block_weights(sd: dict, i: int, ln1: Any, mlp_in: Any, mlp_out: Any, ln2: Any) -> None:
    sd[f"blocks.{i}.ln1.w"], sd[f"blocks.{i}.ln1.b"] = ln1.weight, ln1.bias
    sd[f"blocks.{i}.mlp.W_in"], sd[f"blocks.{i}.mlp.b_in"] = mlp_in.weight.T, mlp_in.bias
    sd[f"blocks.{i}.mlp.W_out"], sd[f"blocks.{i}.mlp.b_out"] = mlp_out.weight.T, mlp_out.bias
    sd[f"blocks.{i}.ln2.w"], sd[f"blocks.{i}.ln2.b"] = ln2.weight, ln2.bias


def head_weights(sd: dict, dense: Any, out: Any) -> None:
    sd["pooler.W"], sd["pooler.b"] = dense.weight.T, dense.bias
    sd["classifier.W"], sd["classifier.b"] = out.weight.T, out.bias


def bert_like_encoder(sd: dict, encoder: Any, emb: Any, n_heads: int) -> None:
    sd["embed.embed.W_E"] = emb.word_embeddings.weight
    sd["embed.pos_embed.W_pos"] = emb.position_embeddings.weight
    sd["embed.token_type_embed.W_token_type"] = emb.token_type_embeddings.weight
    sd["embed.ln.w"], sd["embed.ln.b"] = emb.LayerNorm.weight, emb.LayerNorm.bias
    for i, layer in enumerate(encoder.encoder.layer):
        att = layer.attention
        s = att.self
        attention_weights(sd, i, s.query, s.key, s.value, att.output.dense, n_heads)
        block_weights(
            sd,
            i,
            att.output.LayerNorm,
            layer.intermediate.dense,
            layer.output.dense,
            layer.output.LayerNorm,
        )


def _bert_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    bert_like_encoder(sd, hf.bert, hf.bert.embeddings, n_heads)
    head_weights(sd, hf.bert.pooler.dense, hf.classifier)
    return sd


SPEC = EncoderSpec(
    layout=BERT_LAYOUT,
    encoder_config=bert_like_config,
    state_dict=_bert_state_dict,
    head_keys=("classifier.",),
)


#: BERT's registry entry (the default family of a ``HookedCrossEncoder`` built by hand).
FAMILY = family_of("bert", "BertForSequenceClassification")


load, dimensions = entry_points(SPEC)
