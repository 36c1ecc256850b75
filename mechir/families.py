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

PositionRule = Literal["absolute", "padding_offset", "rotary"]
HeadActivation = Literal["tanh", "gelu", "relu"]
BlockKind = Literal["post_ln", "pre_ln"]
ENCODER_ACTIVATIONS = ("gelu", "relu", "silu", "gelu_new")
#: Activations of ModernBERT's gated MLP and head (Hugging Face ``ACT2FN`` names).
MODERN_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "silu")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a cross-encoder of a family that mechir can load."""


@dataclass(frozen=True)
class ModernShape:
    """What a pre-LayerNorm, rotary ModernBERT encoder adds to :class:`EncoderShape`."""

    global_layers: tuple[bool, ...]  #: per layer: global (True) or sliding-window attention
    window: int  #: local layers see keys with ``|i - j| <= window`` (``local_attention // 2``)
    rope_theta_global: float
    rope_theta_local: float
    attention_bias: bool
    mlp_bias: bool
    norm_bias: bool
    classifier_bias: bool
    pooling: Literal["cls", "mean"]
    head_activation: str


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
    modern: ModernShape | None = None  #: set for ModernBERT (pre-LN, rotary, gated MLP)


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
    blocks: BlockKind = "post_ln"  #: BERT blocks, or ModernBERT's pre-LN rotary gated blocks

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


def _modernbert_config(config: Any) -> EncoderShape:
    """ModernBertConfig: global/local layers, rotary thetas, biases, head and pooling."""
    n_layers = config.num_hidden_layers
    every = config.global_attn_every_n_layers
    types = getattr(config, "layer_types", None) or [
        "full_attention" if i % every == 0 else "sliding_attention" for i in range(n_layers)
    ]
    rope = getattr(config, "rope_parameters", None) or {}
    thetas = {}
    for kind, legacy in (
        ("full_attention", "global_rope_theta"),
        ("sliding_attention", "local_rope_theta"),
    ):
        params = rope.get(kind) or {"rope_type": "default", "rope_theta": getattr(config, legacy)}
        if params.get("rope_type", "default") != "default":
            raise ValueError(
                f"ModernBERT rope_type {params['rope_type']!r} is not supported (default only)"
            )
        thetas[kind] = float(params["rope_theta"])
    if config.classifier_pooling not in ("cls", "mean"):
        raise ValueError(
            f"classifier_pooling {config.classifier_pooling!r} is not supported: 'cls' or 'mean'"
        )
    for act in (config.hidden_activation, config.classifier_activation):
        if act not in MODERN_ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {act!r} in the modernbert config: mechir supports "
                f"{MODERN_ACTIVATIONS}"
            )
    modern = ModernShape(
        global_layers=tuple(t == "full_attention" for t in types),
        window=getattr(config, "sliding_window", None) or config.local_attention // 2,
        rope_theta_global=thetas["full_attention"],
        rope_theta_local=thetas["sliding_attention"],
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        norm_bias=config.norm_bias,
        classifier_bias=config.classifier_bias,
        pooling=config.classifier_pooling,
        head_activation=config.classifier_activation,
    )
    return EncoderShape(
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        d_mlp=config.intermediate_size,
        n_layers=n_layers,
        n_positions=config.max_position_embeddings,
        d_vocab=config.vocab_size,
        eps=config.norm_eps,
        act_fn=config.hidden_activation,
        n_token_types=0,
        d_embed=config.hidden_size,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        modern=modern,
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


def _bias(module: Any, size: int) -> Tensor:
    """A layer's bias, or zeros where it has none (``*_bias=False``: adding zeros is exact)."""
    return module.bias if module.bias is not None else module.weight.new_zeros(size)


def _weight_and_bias(lin: Any, prefix: str, sd: dict, w: str = "W", b: str = "b") -> None:
    """``nn.Linear`` -> ``W`` ``[in, out]`` and ``b``."""
    sd[f"{prefix}.{w}"], sd[f"{prefix}.{b}"] = lin.weight.T, _bias(lin, len(lin.weight))


def _norm(norm: Any, prefix: str, sd: dict) -> None:
    """``nn.LayerNorm`` (bias-free when ``norm_bias=False``)."""
    sd[f"{prefix}.w"], sd[f"{prefix}.b"] = norm.weight, _bias(norm, len(norm.weight))


def _modernbert_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    """``Wqkv`` splits into Q, K, V; ``Wi`` into the activated half (``W_in``) and the gate
    (``W_gate``); layer 0 has no attention norm (``attn_norm`` is the identity)."""
    enc = hf.model
    sd: dict[str, Tensor] = {"embed.embed.W_E": enc.embeddings.tok_embeddings.weight}
    _norm(enc.embeddings.norm, "embed.ln", sd)
    for i, layer in enumerate(enc.layers):
        att, mlp, p = layer.attn, layer.mlp, f"blocks.{i}"
        w = att.Wqkv.weight.view(3, n_heads, -1, att.Wqkv.weight.shape[-1])  # [3, h, d, m]
        bias = _bias(att.Wqkv, len(att.Wqkv.weight)).view(3, n_heads, -1)
        for j, name in enumerate("QKV"):
            sd[f"{p}.attn.W_{name}"], sd[f"{p}.attn.b_{name}"] = w[j].transpose(1, 2), bias[j]
        sd[f"{p}.attn.W_O"] = einops.rearrange(att.Wo.weight, "m (h d) -> h d m", h=n_heads)
        sd[f"{p}.attn.b_O"] = _bias(att.Wo, len(att.Wo.weight))
        if i > 0:
            _norm(layer.attn_norm, f"{p}.ln1", sd)
        _norm(layer.mlp_norm, f"{p}.ln2", sd)
        d_mlp = mlp.Wo.weight.shape[1]
        wi = mlp.Wi.weight  # [2 d_mlp, m]: first half activated ("input"), second the gate
        sd[f"{p}.mlp.W_in"], sd[f"{p}.mlp.W_gate"] = wi[:d_mlp].T, wi[d_mlp:].T
        bi = _bias(mlp.Wi, 2 * d_mlp)
        sd[f"{p}.mlp.b_in"], sd[f"{p}.mlp.b_gate"] = bi[:d_mlp], bi[d_mlp:]
        _weight_and_bias(mlp.Wo, f"{p}.mlp", sd, "W_out", "b_out")
    _norm(enc.final_norm, "ln_final", sd)
    _weight_and_bias(hf.head.dense, "pooler", sd)
    _norm(hf.head.norm, "pooler.ln", sd)
    _weight_and_bias(hf.classifier, "classifier", sd)
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

MODERNBERT = Family(
    name="ModernBERT",
    model_types=("modernbert",),
    hf_class="ModernBertForSequenceClassification",
    examples="Alibaba-NLP/gte-reranker-modernbert-base",
    positions="rotary",
    head_activation="gelu",  # the default; the checkpoint's classifier_activation is used
    layout=PairLayout(middle_seps=1, token_types=False),
    encoder_config=_modernbert_config,
    state_dict=_modernbert_state_dict,
    head_keys=("head.", "classifier."),
    blocks="pre_ln",
)

FAMILIES: tuple[Family, ...] = (BERT, ELECTRA, ROBERTA, XLM_ROBERTA, DISTILBERT, MODERNBERT)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}

SUPPORTED = (
    "sequence-classification cross-encoders (*ForSequenceClassification, 1 or more labels) of "
    "the families "
    + "; ".join(f"{f.name} (model_type {', '.join(map(repr, f.model_types))})" for f in FAMILIES)
)


def family_of(model_type: str | None) -> Family | None:
    """The family of a ``config.model_type``, or None when mechir does not support it."""
    return _BY_MODEL_TYPE.get(model_type or "")
