"""What mechir knows about each cross-encoder family, as one declarative entry per family.

A :class:`Family` says, for one Hugging Face ``model_type``:

* which ``*ForSequenceClassification`` class loads it and where its encoder lives;
* how its config maps onto the encoder shape (``encoder_config``);
* how its state dict maps onto mechir's parameter names (``state_dict``);
* its **embedding** rule: token types or not, absolute positions ``0..n-1`` or RoBERTa's
  padding offset (``padding_idx + 1 + i`` for real tokens, ``padding_idx`` on padding), and an
  embedding projection when ``embedding_size != hidden_size`` (ELECTRA-small);
* its **head**, always ``first token -> dense -> activation -> linear``, which mechir splits into
  the pooler (``pooler.hook_pooler_out`` = the activation's output) and the classifier
  (``classifier.hook_logits``):

  ============  ==========================  ==========  ===============================
  family        pooler (dense)              activation  classifier (linear)
  ============  ==========================  ==========  ===============================
  BERT          ``bert.pooler.dense``       tanh        ``classifier``
  ELECTRA       ``classifier.dense``        GELU (erf)  ``classifier.out_proj``
  RoBERTa/XLM-R ``classifier.dense``        tanh        ``classifier.out_proj``
  DistilBERT    ``pre_classifier``          ReLU        ``classifier``
  ============  ==========================  ==========  ===============================

* its **pair layout** (:class:`~mechir.parts.PairLayout`): ``[CLS] q [SEP] d [SEP]`` or
  ``<s> q </s></s> d </s>``.

All four families are post-LayerNorm BERT blocks (attention -> add -> LN -> MLP -> add -> LN), so
every block hook (``blocks.{l}.attn.hook_pattern``, ``hook_z``, ``mlp.hook_post``,
``hook_resid_pre``, ...) means the same thing in each. Adding a family is one entry here (plus an
embedding or head variant in :mod:`mechir.model` when it needs a new one). This module has no
TransformerLens import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import einops
from torch import Tensor

from mechir.parts import BERT_LAYOUT, ROBERTA_LAYOUT, PairLayout

PositionRule = Literal["absolute", "padding_offset"]
HeadActivation = Literal["tanh", "gelu", "relu"]
ENCODER_ACTIVATIONS = ("gelu", "relu", "silu", "gelu_new")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a cross-encoder of a family that mechir can load."""


@dataclass(frozen=True)
class EncoderShape:
    """The family-independent description of an encoder (what the hooked model is built from)."""

    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int
    n_positions: int  #: rows of the position-embedding table
    d_vocab: int
    eps: float
    act_fn: str
    n_token_types: int  #: 0 when the family has no token-type embedding
    d_embed: int  #: embedding width (== d_model unless projected, ELECTRA-small)
    pad_token_id: int


@dataclass(frozen=True)
class Family:
    """One cross-encoder family: see the module docstring for what each field means."""

    name: str
    model_types: tuple[str, ...]
    hf_class: str  #: the ``transformers`` sequence-classification class
    examples: str
    positions: PositionRule
    head_activation: HeadActivation
    layout: PairLayout
    encoder_config: Callable[[Any], EncoderShape]
    state_dict: Callable[[Any, int], dict[str, Tensor]]
    head_keys: tuple[str, ...]  #: HF state-dict prefixes of the trained head

    def position_offset(self, shape: EncoderShape) -> int:
        """Row of the position table used by the first token (RoBERTa: ``padding_idx + 1``)."""
        return shape.pad_token_id + 1 if self.positions == "padding_offset" else 0

    def hf_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.hf_class)


# ------------------------------------------------------------------------------ configs
def _activation(act: Any, family: str) -> str:
    if act not in ENCODER_ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {act!r} in the {family} config: mechir supports "
            f"{ENCODER_ACTIVATIONS}"
        )
    return act


def _bert_like_config(config: Any) -> EncoderShape:
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


# ------------------------------------------------------------------------------ state dicts
_SPLIT_IN = "(h d) m -> h m d"


def _attention(sd: dict, i: int, q: Any, k: Any, v: Any, o: Any, n_heads: int) -> None:
    for name, lin in (("Q", q), ("K", k), ("V", v)):
        sd[f"blocks.{i}.attn.W_{name}"] = einops.rearrange(lin.weight, _SPLIT_IN, h=n_heads)
        sd[f"blocks.{i}.attn.b_{name}"] = einops.rearrange(lin.bias, "(h d) -> h d", h=n_heads)
    sd[f"blocks.{i}.attn.W_O"] = einops.rearrange(o.weight, "m (h d) -> h d m", h=n_heads)
    sd[f"blocks.{i}.attn.b_O"] = o.bias


def _rest_of_block(sd: dict, i: int, ln1: Any, mlp_in: Any, mlp_out: Any, ln2: Any) -> None:
    sd[f"blocks.{i}.ln1.w"], sd[f"blocks.{i}.ln1.b"] = ln1.weight, ln1.bias
    sd[f"blocks.{i}.mlp.W_in"], sd[f"blocks.{i}.mlp.b_in"] = mlp_in.weight.T, mlp_in.bias
    sd[f"blocks.{i}.mlp.W_out"], sd[f"blocks.{i}.mlp.b_out"] = mlp_out.weight.T, mlp_out.bias
    sd[f"blocks.{i}.ln2.w"], sd[f"blocks.{i}.ln2.b"] = ln2.weight, ln2.bias


def _head(sd: dict, dense: Any, out: Any) -> None:
    sd["pooler.W"], sd["pooler.b"] = dense.weight.T, dense.bias
    sd["classifier.W"], sd["classifier.b"] = out.weight.T, out.bias


def _bert_like_encoder(sd: dict, encoder: Any, emb: Any, n_heads: int) -> None:
    sd["embed.embed.W_E"] = emb.word_embeddings.weight
    sd["embed.pos_embed.W_pos"] = emb.position_embeddings.weight
    sd["embed.token_type_embed.W_token_type"] = emb.token_type_embeddings.weight
    sd["embed.ln.w"], sd["embed.ln.b"] = emb.LayerNorm.weight, emb.LayerNorm.bias
    for i, layer in enumerate(encoder.encoder.layer):
        att = layer.attention
        s = att.self
        _attention(sd, i, s.query, s.key, s.value, att.output.dense, n_heads)
        _rest_of_block(
            sd,
            i,
            att.output.LayerNorm,
            layer.intermediate.dense,
            layer.output.dense,
            layer.output.LayerNorm,
        )


def _bert_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    _bert_like_encoder(sd, hf.bert, hf.bert.embeddings, n_heads)
    _head(sd, hf.bert.pooler.dense, hf.classifier)
    return sd


def _electra_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    _bert_like_encoder(sd, hf.electra, hf.electra.embeddings, n_heads)
    if hasattr(hf.electra, "embeddings_project"):
        proj = hf.electra.embeddings_project
        sd["embed.W_proj"], sd["embed.b_proj"] = proj.weight.T, proj.bias
    _head(sd, hf.classifier.dense, hf.classifier.out_proj)
    return sd


def _roberta_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    _bert_like_encoder(sd, hf.roberta, hf.roberta.embeddings, n_heads)
    _head(sd, hf.classifier.dense, hf.classifier.out_proj)
    return sd


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
        _attention(sd, i, a.q_lin, a.k_lin, a.v_lin, a.out_lin, n_heads)
        ffn = layer.ffn
        _rest_of_block(sd, i, layer.sa_layer_norm, ffn.lin1, ffn.lin2, layer.output_layer_norm)
    _head(sd, hf.pre_classifier, hf.classifier)
    return sd


# ------------------------------------------------------------------------------ registry
BERT = Family(
    name="BERT",
    model_types=("bert",),
    hf_class="BertForSequenceClassification",
    examples="castorini/monobert-large-msmarco, cross-encoder/ms-marco-MiniLM-L-6-v2",
    positions="absolute",
    head_activation="tanh",
    layout=BERT_LAYOUT,
    encoder_config=_bert_like_config,
    state_dict=_bert_state_dict,
    head_keys=("classifier.",),
)
ELECTRA = Family(
    name="ELECTRA",
    model_types=("electra",),
    hf_class="ElectraForSequenceClassification",
    examples="cross-encoder/ms-marco-electra-base",
    positions="absolute",
    head_activation="gelu",
    layout=BERT_LAYOUT,
    encoder_config=_bert_like_config,
    state_dict=_electra_state_dict,
    head_keys=("classifier.",),
)
ROBERTA = Family(
    name="RoBERTa",
    model_types=("roberta",),
    hf_class="RobertaForSequenceClassification",
    examples="cross-encoder/stsb-roberta-base, RoBERTa rerankers",
    positions="padding_offset",
    head_activation="tanh",
    layout=ROBERTA_LAYOUT,
    encoder_config=_bert_like_config,
    state_dict=_roberta_state_dict,
    head_keys=("classifier.",),
)
XLM_ROBERTA = Family(
    name="XLM-RoBERTa",
    model_types=("xlm-roberta",),
    hf_class="XLMRobertaForSequenceClassification",
    examples="BAAI/bge-reranker-base, BAAI/bge-reranker-large, BAAI/bge-reranker-v2-m3",
    positions="padding_offset",
    head_activation="tanh",
    layout=ROBERTA_LAYOUT,
    encoder_config=_bert_like_config,
    state_dict=_roberta_state_dict,
    head_keys=("classifier.",),
)
DISTILBERT = Family(
    name="DistilBERT",
    model_types=("distilbert",),
    hf_class="DistilBertForSequenceClassification",
    examples="DistilBERT cross-encoders (e.g. fine-tuned distilbert-base-uncased)",
    positions="absolute",
    head_activation="relu",
    layout=PairLayout(middle_seps=1, token_types=False),
    encoder_config=_distilbert_config,
    state_dict=_distilbert_state_dict,
    head_keys=("pre_classifier.", "classifier."),
)

FAMILIES: tuple[Family, ...] = (BERT, ELECTRA, ROBERTA, XLM_ROBERTA, DISTILBERT)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}

SUPPORTED = (
    "sequence-classification cross-encoders (*ForSequenceClassification, 1 or more labels) of "
    "the families "
    + "; ".join(f"{f.name} (model_type {', '.join(map(repr, f.model_types))})" for f in FAMILIES)
)


def family_of(model_type: str | None) -> Family | None:
    """The family of a ``config.model_type``, or None when mechir does not support it."""
    return _BY_MODEL_TYPE.get(model_type or "")
