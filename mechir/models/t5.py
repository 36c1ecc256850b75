"""MonoT5 rerankers (``T5ForConditionalGeneration``, e.g. ``castorini/monot5-base-msmarco``,
``castorini/monot5-3b-msmarco``).

The pair is a prompt (default :data:`DEFAULT_TEMPLATE`, ``Query: {q} Document: {d} Relevant:``)
read by the encoder; the decoder runs one step from the decoder start token and the score is
``logit("true") - logit("false")`` there, which ranks exactly like the softmax over the two
answers that the MonoT5 paper uses. The model is built here from TransformerLens hook points (its
``HookedEncoderDecoder`` names the encoder blocks ``encoder.{l}``; here they are ``blocks.{l}``,
so every encoder site and hook factory of :mod:`mechir.hooks` works on the encoder unchanged)::

    embed.hook_embed -> hook_full_embed                  W_E[t]: no position embedding
    blocks.{l}: hook_resid_pre -> ln1 -> attn -> hook_attn_out
                hook_resid_mid = resid_pre + attn_out -> ln2 -> mlp -> hook_mlp_out
                hook_resid_post = resid_mid + mlp_out           (pre-RMSNorm: the block output)
    ln_final -> hook_final_hidden                        the encoder output (the decoder reads it)
    hook_decoder_embed = W_E[decoder_start_token]        one decoder step per pair
    decoder.{l}: hook_resid_pre -> ln1 -> attn (causal self-attention) -> hook_attn_out
                 hook_resid_mid -> ln2 -> cross_attn (queries: decoder; keys, values: the encoder
                 output) -> hook_cross_attn_out; hook_resid_mid_cross -> ln3 -> mlp
                 -> hook_mlp_out; hook_resid_post
    decoder_ln_final -> hook_decoder_final -> classifier.hook_logits  [batch, 2]: (false, true)
    -> hook_score = logit(true) - logit(false)

* Attention (``attn`` and ``cross_attn``): ``q = x W_Q`` (``hook_q``), ``k``, ``v`` likewise, no
  biases and **no** ``1/sqrt(d_head)`` scale (T5 folds it into the weights);
  ``hook_attn_scores = q k^T + position_bias + mask`` (the total: the relative position bias of
  layer 0, shared by every layer, the padding mask -inf and, in the decoder, the causal mask),
  ``hook_pattern = softmax`` (rows with every key removed are zeros, not NaN), ``hook_z``.
* Relative positions: T5's buckets (``relative_attention_num_buckets``,
  ``relative_attention_max_distance``) exactly as Hugging Face computes them, bidirectional in the
  encoder, causal in the decoder; ``blocks.0.attn.hook_position_bias`` and
  ``decoder.0.attn.hook_position_bias`` ``[1, head, query, key]``. Cross-attention has none.
* RMSNorm (``ln*``: ``x / sqrt(mean(x^2) + eps) * w``, hook points as TransformerLens's).
* FFN: ``relu`` (T5 v1.0, MonoT5) ``mlp.hook_pre = x W_in``, ``mlp.hook_post = act(hook_pre)``;
  gated (``gated-gelu``, T5 v1.1 / Flan-T5) ``hook_pre = x W_in`` (the activated half, HF's
  ``wi_0``), ``hook_pre_linear = x W_gate`` (``wi_1``), ``hook_post = act(pre) * pre_linear``.
  The neuron is ``hook_post``, the input of ``W_out``.
* Output: ``classifier.hook_logits = (h * d_model^-0.5) W_U[:, (false, true)]`` (the answers
  read as a two-label classifier: tools reading a cross-encoder's classifier logits work as
  they are), where ``d_model^-0.5`` applies when the config scales decoder outputs (tied
  embeddings, T5 v1.0) and ``W_U`` is ``W_E^T`` for tied embeddings.
  ``return_type="vocab_logits"`` gives every token's logit (``classifier.hook_vocab_logits``).

Parts of the encoder input: the template's tokens before the query are ``prefix`` (``CLS``),
between query and document ``middle`` (``SEP1``), after the document, with the final ``</s>``,
``suffix`` (``SEP2``), by the one part rule of every prompt-based reranker
(:func:`mechir.models.prompt.token_parts`: a token overlapping the query or the document belongs
to it). Long documents are cut (the template's suffix is always kept) and the pair re-tokenized,
so ``input_ids`` are always the tokenizer's own encoding of a prompt string.

Interventions on the decoder: the sites ``cross_pattern``, ``cross_attn_scores``, ``cross_z``,
``decoder_z`` and ``decoder_neuron`` of :mod:`mechir.hooks.site`, and
``direction_ablation_hooks(model, attending="decoder", attended=...)`` (the decoder reading parts
of the encoder input through cross-attention).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.interface import Abilities
from mechir.models.hooked import HookedRerankerMixin
from mechir.models.prompt import pad_token_id, pair_lists, token_parts
from mechir.models.registry import Family, LoadOptions, UnsupportedModelError
from mechir.models.scores import ScoreType, check_score_type
from mechir.models.tl import (
    ActivationCache,
    Embed,
    FactoredMatrix,
    HookedRootModule,
    HookedTransformerConfig,
    HookPoint,
    RMSNorm,
    TypedModuleList,
    t5_relative_position_bucket,
)
from mechir.parts import (
    CrossEncoderBatch,
    Part,
    check_max_length,
    padded_batch,
    prompt_batch_from_tokens,
)

#: MonoT5's prompt (Nogueira et al. 2020); ``{query}`` and ``{document}`` are filled in.
DEFAULT_TEMPLATE = "Query: {query} Document: {document} Relevant:"
#: The relevant and the non-relevant answer: the score is ``logit(true) - logit(false)``.
DEFAULT_ANSWERS: tuple[str, str] = ("true", "false")
#: The input length MonoT5 was trained with (T5 has no position table to bound it).
DEFAULT_MAX_LENGTH = 512

ReturnType = Literal["score", "logits", "vocab_logits", "resid", None]


def gelu_new(x: Tensor) -> Tensor:
    """Hugging Face's ``gelu_new`` (T5 v1.1's gated GELU), written as it writes it:
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu,
}


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class T5Shape:
    """What the hooked MonoT5 is built from (read from a ``T5Config``)."""

    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_layers: int
    d_vocab: int
    eps: float
    act_fn: str
    gated: bool
    num_buckets: int
    max_distance: int
    scale_output: bool  #: multiply the decoder output by ``d_model**-0.5`` (tied, T5 v1.0)
    decoder_start_token_id: int
    n_positions: int


def t5_shape(config: Any, source: str = "T5Config") -> T5Shape:
    """The :class:`T5Shape` of a ``T5Config``.

    Raises:
        UnsupportedModelError: another number of decoder layers than encoder layers, or an FFN
            activation mechir does not implement.
    """
    n_layers = config.num_layers
    n_decoder = getattr(config, "num_decoder_layers", None) or n_layers
    if n_decoder != n_layers:
        raise UnsupportedModelError(
            f"{source}: {n_decoder} decoder layers for {n_layers} encoder layers; mechir loads "
            "T5 rerankers whose decoder has as many layers as the encoder (every MonoT5 does)"
        )
    proj = str(getattr(config, "feed_forward_proj", "relu"))
    gated = proj.startswith("gated-")
    act = getattr(config, "dense_act_fn", None) or proj.split("-")[-1]
    if gated and proj == "gated-gelu":
        act = "gelu_new"  # what transformers maps gated-gelu to
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{source}: feed_forward_proj {proj!r} (activation {act!r}) is not supported; mechir "
            f"loads T5 FFNs with {sorted(_ACTIVATIONS)}, gated or not"
        )
    scale = getattr(config, "scale_decoder_outputs", None)
    if scale is None:
        scale = getattr(config, "tie_word_embeddings", True) is not False
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = config.pad_token_id if config.pad_token_id is not None else 0
    n_positions = getattr(config, "n_positions", None)
    return T5Shape(
        d_model=config.d_model,
        n_heads=config.num_heads,
        d_head=config.d_kv,
        d_mlp=config.d_ff,
        n_layers=n_layers,
        d_vocab=config.vocab_size,
        eps=config.layer_norm_epsilon,
        act_fn=act,
        gated=gated,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        scale_output=bool(scale),
        decoder_start_token_id=int(start),
        n_positions=n_positions if isinstance(n_positions, int) and n_positions > 0 else 0,
    )


def dimensions(config: Any) -> dict[str, int]:
    """``n_layers``, ``n_heads``, ``d_model``, ``d_mlp`` of a ``T5Config`` (the encoder's; the
    decoder has the same)."""
    shape = t5_shape(config)
    return {
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "d_model": shape.d_model,
        "d_mlp": shape.d_mlp,
    }


def hooked_config(
    shape: T5Shape, *, n_ctx: int, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformerConfig:
    """The TransformerLens config of the hooked MonoT5 (``n_layers``: encoder layers)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HookedTransformerConfig(
        d_model=shape.d_model,
        d_head=shape.d_head,
        n_heads=shape.n_heads,
        d_mlp=shape.d_mlp,
        n_layers=shape.n_layers,
        n_ctx=n_ctx,
        eps=shape.eps,
        d_vocab=shape.d_vocab,
        act_fn=shape.act_fn,
        gated_mlp=shape.gated,
        normalization_type="RMS",
        attention_dir="bidirectional",
        positional_embedding_type="relative_positional_bias",
        relative_attention_num_buckets=shape.num_buckets,
        relative_attention_max_distance=shape.max_distance,
        original_architecture="T5ForConditionalGeneration",
        device=str(device),
        dtype=dtype,
    )


# ---------------------------------------------------------------------------- components
class T5Norm(RMSNorm):
    """TransformerLens ``RMSNorm`` (same parameter ``w``, same hook points) computing Hugging
    Face's ``x * rsqrt(mean(x^2) + eps) * w`` (variance in float32) in one pass when neither hook
    point has a hook, and TransformerLens's step-by-step forward whenever one has."""

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        points = (self.hook_scale, self.hook_normalized)
        if any(p._forward_hooks or p._backward_hooks or p._backward_pre_hooks for p in points):
            return super().forward(x)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normalized = x * torch.rsqrt(variance + self.eps)
        return self.w * normalized.to(self.w.dtype)


class T5Embed(nn.Module):
    """The shared token embedding ``W_E`` (``embed.W_E``), hooked at ``hook_embed``; T5 adds no
    position embedding (positions enter every attention layer as a bias)."""

    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        self.position_offset = 0

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    def token_states(
        self, token_ids: Int[Tensor, " n"], *, token_type: int = 0, position: int | None = None
    ) -> Float[Tensor, "n d_model"]:
        """What ``hook_full_embed`` holds for these tokens: ``W_E[t]`` at every position."""
        return self.embed.W_E[token_ids]

    def forward(self, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.hook_embed(self.embed(input_ids))


def relative_position_bucket(
    relative_position: Int[Tensor, "query key"], *, bidirectional: bool, num_buckets: int,
    max_distance: int,
) -> Int[Tensor, "query key"]:  # fmt: skip
    """T5's bucket of ``key - query`` (Hugging Face's ``T5Attention._relative_position_bucket``,
    reused from TransformerLens's copy of it): exact buckets for small distances, logarithmic
    ones up to ``max_distance``; bidirectional (the encoder) halves the buckets by sign, causal
    (the decoder) maps every later key to bucket 0."""
    return t5_relative_position_bucket(
        relative_position,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )


def _project(
    x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
    w: Float[Tensor, "head d_model d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """``x W`` per head; ``x`` is the residual stream, or one copy of it per head (split
    q/k/v inputs)."""
    if x.dim() == 4:
        return torch.einsum("bphm,hmd->bphd", x, w)
    h, m, d = w.shape
    return (x @ w.transpose(0, 1).reshape(m, h * d)).view(*x.shape[:2], h, d)


class T5HookedAttention(nn.Module):
    """T5 attention with TransformerLens's parameter shapes and hook names (see the module
    docstring): self-attention (optionally owning the relative position bias, layer 0) or
    cross-attention. ``attn_scale`` is 1: T5 does not scale ``q k^T``."""

    def __init__(
        self, cfg: HookedTransformerConfig, *, relative_bias: bool, bidirectional: bool = True
    ):
        super().__init__()
        h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
        for name in ("Q", "K", "V"):
            setattr(self, f"W_{name}", nn.Parameter(torch.empty(h, m, d, dtype=cfg.dtype)))
        self.W_O = nn.Parameter(torch.empty(h, d, m, dtype=cfg.dtype))
        self.attn_scale = 1.0
        self.bidirectional = bidirectional
        if relative_bias:
            self.num_buckets = cfg.relative_attention_num_buckets
            self.max_distance = cfg.relative_attention_max_distance
            self.rel_pos_bias = nn.Embedding(self.num_buckets, h, dtype=cfg.dtype)
            self.hook_position_bias = HookPoint()
        for name in ("q", "k", "v", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())

    def _zeros(self, *shape: int) -> Tensor:
        return self.W_Q.new_zeros(shape)

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        """T5 attention has no biases: zeros (for tools reading ``b_Q`` / ``b_K``)."""
        return self._zeros(*self.W_Q.shape[::2])

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._zeros(*self.W_K.shape[::2])

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._zeros(*self.W_V.shape[::2])

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self._zeros(self.W_O.shape[-1])

    def position_bias(self, n_query: int, n_key: int) -> Float[Tensor, "1 head query key"]:
        """The relative position bias ``bias[0, h, i, j] = rel_pos_bias[bucket(j - i), h]``,
        hooked at ``hook_position_bias``."""
        device = self.rel_pos_bias.weight.device
        relative = (
            torch.arange(n_key, device=device)[None] - torch.arange(n_query, device=device)[:, None]
        )
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.hook_position_bias(self.rel_pos_bias(buckets).permute(2, 0, 1)[None])

    def forward(
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        position_bias: Float[Tensor, "1 head query key"] | None = None,
        additive_mask: Float[Tensor, "#batch 1 #query key"] | None = None,
    ) -> Float[Tensor, "rows query d_model"]:
        """``softmax(q k^T + bias + mask) v W_O`` (inputs ``[batch, pos, d_model]``, or
        ``[batch, pos, head, d_model]`` with split q/k/v inputs)."""
        q = self.hook_q(_project(query_input, self.W_Q))
        k = self.hook_k(_project(key_input, self.W_K))
        v = self.hook_v(_project(value_input, self.W_V))
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)  # [batch, head, query, key]
        if position_bias is not None:
            scores = scores + position_bias
        if additive_mask is not None:
            scores = scores + additive_mask
        scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1)
        pattern = self.hook_pattern(torch.where(pattern.isnan(), 0.0, pattern).to(v.dtype))
        z = self.hook_z((pattern @ v.transpose(1, 2)).transpose(1, 2))  # [batch, query, head, d]
        w_o = self.W_O.reshape(-1, self.W_O.shape[-1])
        return z.reshape(*z.shape[:2], -1) @ w_o


class T5MLP(nn.Module):
    """T5's FFN without biases (see the module docstring for the hook points)."""

    def __init__(self, cfg: HookedTransformerConfig, act: str, gated: bool):
        super().__init__()
        m, n = cfg.d_model, cfg.d_mlp
        self.W_in = nn.Parameter(torch.empty(m, n, dtype=cfg.dtype))
        if gated:
            self.W_gate = nn.Parameter(torch.empty(m, n, dtype=cfg.dtype))
            self.hook_pre_linear = HookPoint()
        self.W_out = nn.Parameter(torch.empty(n, m, dtype=cfg.dtype))
        self.gated = gated
        self.act = _ACTIVATIONS[act]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "rows pos d_model"]:
        post = self.act(self.hook_pre(x @ self.W_in))
        if self.gated:
            post = post * self.hook_pre_linear(x @ self.W_gate)
        return self.hook_post(post) @ self.W_out


class T5EncoderBlock(nn.Module):
    """A T5 encoder block with BERT's hook names (pre-RMSNorm: the output is
    ``hook_resid_post``). With ``cfg.use_split_qkv_input`` the attention reads
    ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` ``[batch, pos, head, d_model]``
    (copies of ``hook_resid_pre``, each normalized by ``ln1``), as TransformerLens's blocks do.
    (``rows`` may exceed ``batch``: hooks may add rows inside a block, as NIG does.)"""

    def __init__(self, cfg: HookedTransformerConfig, shape: T5Shape, layer: int):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.ln2 = T5Norm(cfg), T5Norm(cfg)
        self.attn = T5HookedAttention(cfg, relative_bias=layer == 0)
        self.mlp = T5MLP(cfg, shape.act_fn, shape.gated)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())
        for name in ("q_input", "k_input", "v_input"):
            setattr(self, f"hook_{name}", HookPoint())

    def attention_inputs(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not self.cfg.use_split_qkv_input:
            x = self.ln1(resid)
            return x, x, x
        copies = resid[:, :, None, :].expand(-1, -1, self.cfg.n_heads, -1)
        return tuple(  # type: ignore[return-value]
            self.ln1(hook(copies.clone()))
            for hook in (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        )

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "#batch 1 1 pos"] | None,
        position_bias: Float[Tensor, "1 head pos pos"],
    ) -> Float[Tensor, "rows pos d_model"]:
        resid = self.hook_resid_pre(resid)
        q, k, v = self.attention_inputs(resid)
        attn_out = self.hook_attn_out(self.attn(q, k, v, position_bias, additive_mask))
        resid_mid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class T5DecoderBlock(nn.Module):
    """A T5 decoder block: causal self-attention (``attn``, ``ln1``), cross-attention to the
    encoder output (``cross_attn``, ``ln2``), FFN (``mlp``, ``ln3``); TransformerLens's
    ``T5Block`` hook names."""

    def __init__(self, cfg: HookedTransformerConfig, shape: T5Shape, layer: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = T5Norm(cfg), T5Norm(cfg), T5Norm(cfg)
        self.attn = T5HookedAttention(cfg, relative_bias=layer == 0, bidirectional=False)
        self.cross_attn = T5HookedAttention(cfg, relative_bias=False)
        self.mlp = T5MLP(cfg, shape.act_fn, shape.gated)
        names = ("resid_pre", "attn_out", "resid_mid", "cross_attn_out", "resid_mid_cross")
        for name in (*names, "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        resid: Float[Tensor, "batch step d_model"],
        self_bias: Float[Tensor, "1 head step step"],
        encoder_hidden: Float[Tensor, "batch pos d_model"],
        encoder_mask: Float[Tensor, "#batch 1 1 pos"] | None,
    ) -> Float[Tensor, "rows step d_model"]:
        resid = self.hook_resid_pre(resid)
        x = self.ln1(resid)
        resid_mid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(x, x, x, self_bias)))
        cross = self.cross_attn(
            self.ln2(resid_mid), encoder_hidden, encoder_hidden, None, encoder_mask
        )
        resid_cross = self.hook_resid_mid_cross(resid_mid + self.hook_cross_attn_out(cross))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln3(resid_cross)))
        return self.hook_resid_post(resid_cross + mlp_out)


class AnswerHead(nn.Module):
    """The LM head read at the two answers, as a two-label classifier:
    ``hook_logits = (h * scale) W_U[:, (non-relevant, relevant)]`` ``[batch, 2]`` (the hook
    every tool reads classifier logits at); every token's logit is ``hook_vocab_logits``.
    ``W_U`` is a parameter of its own only for untied embeddings; tied, the model passes
    ``W_E^T``."""

    def __init__(self, cfg: HookedTransformerConfig, *, tied: bool, scale: float):
        super().__init__()
        if not tied:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self.tied, self.scale = tied, scale
        self.hook_logits = HookPoint()
        self.hook_vocab_logits = HookPoint()

    def forward(
        self,
        h: Float[Tensor, "batch d_model"],
        columns: Float[Tensor, "d_model n"],
        *,
        vocab: bool = False,
    ) -> Float[Tensor, "rows n"]:
        logits = (h * self.scale) @ columns
        return self.hook_vocab_logits(logits) if vocab else self.hook_logits(logits)


# ---------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A template split around its slots: ``prefix {query} middle {document} suffix``."""

    template: str
    prefix: str
    middle: str
    suffix: str

    @classmethod
    def parse(cls, template: str, family: str = "MonoT5") -> Prompt:
        """Raises ``ValueError`` (one line) for a template without exactly one ``{query}`` before
        exactly one ``{document}``, or with ``{instruction}``."""
        if not isinstance(template, str):
            raise ValueError(f"template must be a string, got {type(template).__name__}")
        if "{instruction}" in template:
            raise ValueError(
                f"template {template!r}: {family} prompts have no {{instruction}} slot; write "
                "the words into the template"
            )
        counts = {slot: template.count(slot) for slot in ("{query}", "{document}")}
        if any(n != 1 for n in counts.values()):
            raise ValueError(
                f"template {template!r} must hold {{query}} and {{document}} once each (found "
                f"{counts['{query}']} and {counts['{document}']}), e.g. {DEFAULT_TEMPLATE!r}"
            )
        q, d = template.index("{query}"), template.index("{document}")
        if d < q:
            raise ValueError(
                f"template {template!r}: {{query}} must come before {{document}} (parts are "
                "prefix, query, middle, document, suffix)"
            )
        return cls(template, template[:q], template[q + 7 : d], template[d + 10 :])

    def text(self, query: str, document: str) -> tuple[str, tuple[int, int, int, int]]:
        """The prompt and the character spans ``(q0, q1, d0, d1)`` of query and document."""
        q0 = len(self.prefix)
        q1 = q0 + len(query)
        d0 = q1 + len(self.middle)
        return f"{self.prefix}{query}{self.middle}{document}{self.suffix}", (
            q0, q1, d0, d0 + len(document),
        )  # fmt: skip


def encode_prompts(
    tokenizer: Any,
    prompt: Prompt,
    queries: str | Sequence[str],
    documents: str | Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> CrossEncoderBatch:
    """Tokenize (query, document) pairs filled into ``prompt`` into a right-padded
    :class:`CrossEncoderBatch` whose parts label the template's tokens ``prefix`` / ``middle`` /
    ``suffix`` and the query and document tokens (see the module docstring).

    ``input_ids`` are ``tokenizer(prompt_text)["input_ids"]`` (with its special tokens, T5's final
    ``</s>``). A prompt longer than ``max_length`` has its document cut at a token boundary and is
    tokenized again, so the template's suffix is kept.

    Raises:
        ValueError: no pairs, lists of different lengths, an empty query or document, a slow
            tokenizer (offsets are needed), or a pair whose query and template leave no room
            for a document token, or without a query token; the message names the pair.
    """
    queries, documents = pair_lists(queries, documents)
    check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: MonoT5 needs a fast one (with "
            "offsets, tokenizer.json) to find the query and document tokens"
        )
    rows = [
        _encode_one(tokenizer, prompt, q, d, max_length, i)
        for i, (q, d) in enumerate(zip(queries, documents))
    ]
    return padded_batch(rows, pad_token_id=pad_token_id(tokenizer))


def _encode_one(
    tokenizer: Any, prompt: Prompt, query: str, document: str, max_length: int, i: int
) -> tuple[list[int], list[int]]:
    """One pair's ids and parts, its document cut until the prompt fits ``max_length``."""
    doc = document
    while True:
        text, spans = prompt.text(query, doc)
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        parts = token_parts(offsets, {"query": spans[:2], "document": spans[2:]})
        if int(Part.QUERY) not in parts:
            raise ValueError(
                f"pair {i}: no token of the query {query!r} in the prompt (the template's "
                "tokens absorb it); put a space between the template and {query}"
            )
        doc_tokens = [j for j, p in enumerate(parts) if p == int(Part.DOCUMENT)]
        excess = len(ids) - max_length
        if excess <= 0 and doc_tokens:
            return ids, parts
        if len(doc_tokens) <= max(excess, 0):
            raise ValueError(
                f"pair {i}: the query and the template take {len(ids) - len(doc_tokens)} tokens, "
                f"which leaves no room for the document within max_length={max_length}; raise "
                "max_length or shorten the query"
            )
        first_cut = doc_tokens[len(doc_tokens) - excess]
        cut = offsets[first_cut][0] - spans[2]
        shorter = doc[:cut].rstrip()
        doc = shorter if len(shorter) < len(doc) else doc[:-1]


# ---------------------------------------------------------------------------- the model
class _CachingRoot(HookedRootModule):
    """``HookedRootModule`` whose ``run_with_cache`` returns an ``ActivationCache`` (as
    ``HookedEncoder``'s and ``HookedTransformer``'s do), which the reranker mixin expects."""

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        out, cache = super().run_with_cache(
            *model_args, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache


class HookedMonoT5(HookedRerankerMixin, _CachingRoot):
    """A hooked MonoT5 reranker (see the module docstring for the computation and its hooks).

    Like :class:`~mechir.models.HookedCrossEncoder` it scores a :class:`CrossEncoderBatch`;
    its "classifier" logits are the two answers' logits ``(false, true)``, so ``num_labels`` is
    2, ``relevant_label`` 1, and the score types are those of a two-label cross-encoder
    (default ``"binary_logit"``: ``logit(true) - logit(false)``; ``"prob"``: MonoT5's softmax
    probability of ``true``).

    Args:
        cfg: the TransformerLens config (:func:`hooked_config`).
        shape: the :class:`T5Shape`.
        tokenizer: the T5 tokenizer (fast).
        family: the registry entry.
        answer_ids: token ids of the relevant and the non-relevant answer.
        tied: whether the output embedding is ``W_E`` (else ``classifier.W_U``).
        template, answer_tokens: the prompt and the answers (recorded on the model).
        score_type: see above.
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        shape: T5Shape,
        tokenizer: Any,
        *,
        family: Family,
        answer_ids: tuple[int, int],
        tied: bool = True,
        template: str = DEFAULT_TEMPLATE,
        answer_tokens: tuple[str, str] = DEFAULT_ANSWERS,
        score_type: ScoreType | None = None,
        move_to_device: bool = True,
    ):
        HookedRootModule.__init__(self)
        self.cfg = cfg
        self.init_reranker(tokenizer, family)
        self.shape = shape
        self.prompt = Prompt.parse(template, family.name)
        self.answer_tokens = tuple(answer_tokens)
        self.answer_ids = (int(answer_ids[0]), int(answer_ids[1]))
        self.decoder_start_token_id = shape.decoder_start_token_id
        self.num_labels, self.relevant_label = 2, 1
        self.score_type = "binary_logit" if score_type is None else score_type
        self.embed = T5Embed(cfg)
        self.hook_full_embed = HookPoint()
        self.blocks = TypedModuleList([T5EncoderBlock(cfg, shape, i) for i in range(cfg.n_layers)])
        self.ln_final = T5Norm(cfg)
        self.hook_final_hidden = HookPoint()
        self.hook_decoder_embed = HookPoint()
        self.decoder = TypedModuleList([T5DecoderBlock(cfg, shape, i) for i in range(cfg.n_layers)])
        self.decoder_ln_final = T5Norm(cfg)
        self.hook_decoder_final = HookPoint()
        scale = shape.d_model**-0.5 if shape.scale_output else 1.0
        self.classifier = AnswerHead(cfg, tied=tied, scale=scale)
        self.hook_score = HookPoint()
        if move_to_device and cfg.device is not None and str(cfg.device) != "meta":
            nn.Module.to(self, cfg.device)
        self.setup()

    @property
    def abilities(self) -> Abilities:
        """MonoT5's: a bidirectional pre-norm encoder read by a decoder through cross-attention,
        a prompt."""
        return Abilities(
            causal=False,
            post_ln=False,
            qk_norm=False,
            grouped_kv=False,
            cross_attention=True,
            prompt=True,
            edges=self.family.edge_circuits,
        )

    # ------------------------------------------------------------------ settings
    @property
    def template(self) -> str:
        return self.prompt.template

    @property
    def score_type(self) -> ScoreType:
        return self._score_type

    @score_type.setter
    def score_type(self, value: ScoreType) -> None:
        self._score_type = check_score_type(value)

    @property
    def max_length(self) -> int:
        """Longest input :meth:`encode` makes by default (``cfg.n_ctx``: the tokenizer's
        ``model_max_length``, else the config's ``n_positions``, else 512)."""
        return self.cfg.n_ctx

    @property
    def d_mlp(self) -> int:
        return self.cfg.d_mlp

    # ------------------------------------------------------------------ weights, stacked
    def _stack(self, name: str) -> Tensor:
        return torch.stack([getattr(block.attn, name) for block in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        """Encoder query weights of every layer (``blocks.{l}.attn``)."""
        return self._stack("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack("W_O")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        """Zeros: T5 attention has no biases."""
        return self._stack("b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("b_K")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` of every encoder head: the whole content part of the attention score
        (T5's relative position bias is added apart, and there is no ``1/sqrt(d_head)``)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)

    # ------------------------------------------------------------------ forward
    def scores_from_logits(self, logits: Float[Tensor, "batch 2"]) -> Float[Tensor, " batch"]:
        """The score from the answer logits ``(false, true)`` (:attr:`score_type`)."""
        if self.score_type == "binary_logit":
            return logits[:, 1] - logits[:, 0]
        if self.score_type == "logit":
            return logits[:, 1]
        log_probs = logits.log_softmax(-1)[:, 1]
        return log_probs if self.score_type == "log_prob" else log_probs.exp()

    @staticmethod
    def additive_attention_mask(
        attention_mask: Int[Tensor, "batch pos"],
    ) -> Float[Tensor, "batch 1 1 pos"]:
        """0 on real tokens, -inf on padding keys (what every attention over the encoder input
        adds to its scores)."""
        return torch.where(attention_mask[:, None, None, :] == 0, -torch.inf, 0.0)

    def encoder_position_bias(self, width: int) -> Float[Tensor, "1 head pos pos"]:
        return self.blocks[0].attn.position_bias(width, width)

    def run_block(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "batch 1 1 pos"],
        *,
        cls_only: bool = False,
    ) -> Float[Tensor, "rows pos d_model"]:
        """Run encoder block ``layer`` (with its hooks) on its input ``resid``; after the last
        block, the final norm (``hook_final_hidden``). ``cls_only`` is ignored: the decoder
        reads every position of the encoder output."""
        block = self.blocks[layer]
        out = block(resid, additive_mask, self.encoder_position_bias(resid.shape[1]))
        return self._finish(layer, out)

    def _finish(self, layer: int, resid: Tensor) -> Tensor:
        if layer != self.cfg.n_layers - 1:
            return resid
        return self.hook_final_hidden(self.ln_final(resid))

    @property
    def final_hidden_name(self) -> str:
        """The encoder output (after its final norm), the input of the decoder."""
        return "hook_final_hidden"

    def block_output_name(self, layer: int) -> str:
        """Encoder block ``layer``'s output ``blocks.{layer}.hook_resid_post`` (pre-norm: before
        the final norm for the last block)."""
        return f"blocks.{layer}.hook_resid_post"

    def run_decoder(
        self,
        encoder_hidden: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "#batch 1 1 pos"] | None,
    ) -> Float[Tensor, "rows d_model"]:
        """The decoder's first step from the decoder start token, reading ``encoder_hidden``:
        the final decoder state ``hook_decoder_final`` ``[batch, d_model]``."""
        rows = encoder_hidden.shape[0]
        start = self.embed.W_E[self.decoder_start_token_id]
        x = self.hook_decoder_embed(start.expand(rows, 1, -1).clone())
        bias = self.decoder[0].attn.position_bias(1, 1)
        for block in self.decoder:
            x = block(x, bias, encoder_hidden, additive_mask)
        return self.hook_decoder_final(self.decoder_ln_final(x))[:, 0]

    def vocab_matrix(self) -> Float[Tensor, "d_model d_vocab"]:
        """The output embedding: ``W_E^T`` (tied) or ``classifier.W_U``."""
        return self.embed.W_E.T if self.classifier.tied else self.classifier.W_U

    def answer_columns(self) -> Float[Tensor, "d_model 2"]:
        """Output-embedding columns of the answers, ``(non-relevant, relevant)``."""
        ids = [self.answer_ids[1], self.answer_ids[0]]
        if self.classifier.tied:
            return self.embed.W_E[ids].T
        return self.classifier.W_U[:, ids]

    def _head(
        self, encoder_hidden: Tensor, additive_mask: Tensor | None, return_type: ReturnType
    ) -> Tensor | None:
        h = self.run_decoder(encoder_hidden, additive_mask)
        if return_type == "vocab_logits":
            return self.classifier(h, self.vocab_matrix(), vocab=True)
        logits = self.classifier(h, self.answer_columns())
        if return_type == "logits":
            return logits
        score = self.hook_score(self.scores_from_logits(logits))
        return score if return_type == "score" else None

    def score_from_resid(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, " batch"]:
        """The score from the encoder output (decoder and answer head), masked by the running
        batch's attention mask (run it inside :meth:`running_on`)."""
        mask = self.additive_attention_mask(self.running_batch.attention_mask.to(resid.device))
        return self._head(resid, mask, "score")  # type: ignore[return-value]

    def _layer_arg(self, what: str, layer: int) -> int:
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"{what}={layer!r} out of range: the model has {n} layers (0-{n})")
        return layer

    def forward(  # type: ignore[override]
        self,
        input: CrossEncoderBatch | Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        return_type: ReturnType = "score",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Tensor | None:
        """Run MonoT5 on a batch (or token ids with ``attention_mask``).

        Args:
            return_type: ``"score"`` ``[batch]`` (default), ``"logits"`` (the answers'
                ``(false, true)`` logits ``[batch, 2]``), ``"vocab_logits"`` ``[batch, d_vocab]``,
                ``"resid"`` (the encoder output ``[batch, pos, d_model]``) or None.
            start_at_layer: run encoder blocks from this layer on, from ``resid`` (the input of
                that block; for ``n_layers``, the encoder output).
            stop_at_layer: run encoder blocks before this layer only and return the input of
                block ``stop_at_layer``.
        """
        n_layers = self.cfg.n_layers
        start = 0 if start_at_layer is None else self._layer_arg("start_at_layer", start_at_layer)
        stop = (
            n_layers if stop_at_layer is None else self._layer_arg("stop_at_layer", stop_at_layer)
        )
        if start > stop:
            raise ValueError(f"start_at_layer {start} is after stop_at_layer {stop}")
        if (start_at_layer is None) != (resid is None):
            raise ValueError("pass resid= (the input of block start_at_layer) with start_at_layer")
        with self.forward_frame(input, token_type_ids, attention_mask) as now:
            if resid is None:
                resid = self.hook_full_embed(self.embed(now.tokens))
            else:
                resid = resid.to(self.cfg.device)
            mask = now.attention_mask
            additive = None if mask is None else self.additive_attention_mask(mask)
            if stop > start:
                bias = self.encoder_position_bias(resid.shape[1])
                for layer in range(start, stop):
                    resid = self._finish(layer, self.blocks[layer](resid, additive, bias))
            if stop_at_layer is not None or return_type == "resid":
                return resid
            return self._head(resid, additive, return_type)

    # ------------------------------------------------------------------ user API
    def encode(
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
    ) -> CrossEncoderBatch:
        """Fill the prompt with each pair and tokenize it (:func:`encode_prompts`); the parts
        label the template tokens (prefix, middle, suffix), the query and the document.
        ``max_length`` defaults to :attr:`max_length` and may not exceed it."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_cross_encoder")
        length = self.max_length if max_length is None else max_length
        check_max_length(length, self.max_length)
        batch = encode_prompts(self.tokenizer, self.prompt, queries, documents, max_length=length)
        return batch if pair_ids is None else batch.with_pair_ids(pair_ids)

    def template_ids(self) -> tuple[list[int], list[int], list[int]]:
        """The prompt's own tokens: before the query, between query and document, after the
        document (with the tokenizer's special tokens, T5's ``</s>``), each piece tokenized
        alone (as the whole prompt is for whitespace-split SentencePiece tokenizers such as
        T5's, where the template meets the slots at spaces)."""
        tok = self.tokenizer

        def piece(text: str) -> list[int]:
            return list(tok(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

        plain = list(tok("x", add_special_tokens=False)["input_ids"])
        full = list(tok("x")["input_ids"])
        start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        lead, trail = full[:start], full[start + len(plain) :]
        return (
            lead + piece(self.prompt.prefix),
            piece(self.prompt.middle),
            piece(self.prompt.suffix) + trail,
        )

    @property
    def n_special(self) -> int:
        """Tokens of a pair's input besides its query and document: the template's."""
        return sum(len(ids) for ids in self.template_ids())

    def field_tokens(
        self, text: str, field: Literal["query", "document"] = "document"
    ) -> list[int]:
        """``text``'s token ids as the query or the document of this model's prompt: the
        tokenizer's, without special tokens (T5's template pieces end at the fields)."""
        if field not in ("query", "document"):
            raise ValueError(f"field must be 'query' or 'document', got {field!r}")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def batch_from_tokens(
        self,
        query_ids: Sequence[Sequence[int]],
        document_ids: Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
    ) -> CrossEncoderBatch:
        """A batch from already-tokenized queries and documents (no special tokens), the
        template's tokens (:meth:`template_ids`) around them, documents cut to ``max_length``
        (default :attr:`max_length`): what :func:`mechir.parts.cross_encoder_batch_from_tokens`
        is for the encoder families (token-level perturbations use it).

        Raises:
            ValueError: lists of different lengths, an empty query or document, or a query
                leaving no room for a document token; the message names the pair.
        """
        prefix, middle, suffix = self.template_ids()
        pieces = [(prefix, Part.CLS), ([], Part.QUERY), (middle, Part.SEP1), ([], Part.DOCUMENT),
                  (suffix, Part.SEP2)]  # fmt: skip
        return prompt_batch_from_tokens(
            pieces, query_ids, document_ids,
            max_length=self.max_length if max_length is None else max_length,
            pad_token_id=pad_token_id(self.tokenizer),
        )  # fmt: skip

    def to(self, device_or_dtype: torch.device | str | torch.dtype, print_details: bool = False):  # type: ignore[override]
        """Move (or cast) the model and keep ``cfg.device`` / ``cfg.dtype`` in step."""
        if isinstance(device_or_dtype, torch.dtype):
            self.cfg.dtype = device_or_dtype
        else:
            self.cfg.device = str(torch.device(device_or_dtype))
        return nn.Module.to(self, device_or_dtype)


# ---------------------------------------------------------------------------- weights
_ATTENTION = {"SelfAttention": "attn", "EncDecAttention": "cross_attn"}
_LINEAR = re.compile(
    r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(SelfAttention|EncDecAttention|DenseReluDense)"
    r"\.(q|k|v|o|wi|wi_0|wi_1|wo|relative_attention_bias)\.weight"
)
_NORM = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.layer_norm\.weight")
#: Hugging Face names that are the shared embedding when tied (ignored: ``shared`` is read).
_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def convert_tensor(name: str, tensor: Tensor, n_heads: int) -> tuple[str, Tensor] | None:
    """One Hugging Face ``T5ForConditionalGeneration`` tensor as ``(mechir name, tensor)`` (a
    view where it can be), or None for names that mechir reads elsewhere (the embedding's
    aliases, ``lm_head``).

    Raises:
        UnsupportedModelError: a tensor mechir does not know (the checkpoint is not a plain T5).
    """
    if name == "shared.weight":
        return "embed.embed.W_E", tensor
    if name in _EMBEDDING_ALIASES or name == "lm_head.weight":
        return None
    if name == "encoder.final_layer_norm.weight":
        return "ln_final.w", tensor
    if name == "decoder.final_layer_norm.weight":
        return "decoder_ln_final.w", tensor
    match = _NORM.fullmatch(name)
    if match:
        stack, layer, sub = match.group(1), match.group(2), int(match.group(3))
        prefix = "blocks" if stack == "encoder" else "decoder"
        return f"{prefix}.{layer}.ln{sub + 1}.w", tensor
    match = _LINEAR.fullmatch(name)
    if match is None:
        raise UnsupportedModelError(
            f"unknown T5 weight {name!r}: mechir loads plain T5 checkpoints"
        )
    stack, layer, _, module, lin = match.groups()
    prefix = f"{'blocks' if stack == 'encoder' else 'decoder'}.{layer}"
    if module == "DenseReluDense":
        mlp = {"wi": "W_in", "wi_0": "W_in", "wi_1": "W_gate", "wo": "W_out"}[lin]
        return f"{prefix}.mlp.{mlp}", tensor.T
    attn = f"{prefix}.{_ATTENTION[module]}"
    if lin == "relative_attention_bias":
        return f"{attn}.rel_pos_bias.weight", tensor
    if lin == "o":  # [d_model, head * d_head] -> [head, d_head, d_model]
        return f"{attn}.W_O", tensor.T.reshape(n_heads, -1, tensor.shape[0])
    d_model = tensor.shape[1]  # [head * d_head, d_model] -> [head, d_model, d_head]
    return f"{attn}.W_{lin.upper()}", tensor.view(n_heads, -1, d_model).transpose(1, 2)


def _answer_ids(tokenizer: Any, answers: tuple[str, str]) -> tuple[int, int]:
    """The token ids of the relevant and the non-relevant answer, each one token.

    Raises:
        ValueError: an answer that is not exactly one token of this tokenizer.
    """
    if tokenizer is None:
        raise ValueError("MonoT5 needs its tokenizer: pass tokenizer=...")
    if len(answers) != 2 or len(set(answers)) != 2:
        raise ValueError(
            f"answer_tokens {answers!r}: give two different answers, the relevant one first"
        )
    out = []
    for word in answers:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"answer token {word!r} is {len(ids)} tokens ({pieces}) in this tokenizer: give "
                "answers that are single tokens (MonoT5: true,false)"
            )
        out.append(int(ids[0]))
    return out[0], out[1]


def _n_ctx(tokenizer: Any, shape: T5Shape) -> int:
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length <= 1_000_000:
        return length
    return shape.n_positions or DEFAULT_MAX_LENGTH


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files (safetensors preferred, sharded or not)."""
    import json

    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (directory / index).is_file():
            names = json.loads((directory / index).read_text())["weight_map"].values()
            return [directory / n for n in dict.fromkeys(names)]
        if (directory / single).is_file():
            return [directory / single]
    raise UnsupportedModelError(
        f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not) to load"
    )


def _stream_tensors(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a local checkpoint, one at a time (safetensors read lazily; ``.bin``
    files memory-mapped)."""
    for file in _weight_files(directory):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def _hf_tensors(hf: Any) -> Iterator[tuple[str, Tensor]]:
    """The tensors of an in-memory ``T5ForConditionalGeneration`` (``lm_head`` only when it is
    not the shared embedding)."""
    if hf.encoder.embed_tokens.weight.data_ptr() != hf.shared.weight.data_ptr():
        raise UnsupportedModelError(
            "the encoder's embed_tokens is not the shared embedding: mechir loads T5 models "
            "whose encoder and decoder share one input embedding"
        )
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and tensor.data_ptr() == hf.shared.weight.data_ptr():
            continue
        yield name, tensor.detach()


def build_from_tensors(
    tensors: Iterator[tuple[str, Tensor]],
    shape: T5Shape,
    tokenizer: Any,
    *,
    family: Family,
    options: LoadOptions,
    source: str,
) -> HookedMonoT5:
    """The hooked MonoT5 from a stream of Hugging Face tensors: the model is built on the meta
    device and each tensor converted (cast to ``options.dtype``) and assigned as it arrives, so
    at most one full copy of the weights exists (plus one tensor in conversion).

    Raises:
        ValueError: a non-finite tensor (named), missing or unknown weights.
    """
    template = options.template or DEFAULT_TEMPLATE
    answers = tuple(options.answer_tokens or DEFAULT_ANSWERS)
    answer_ids = _answer_ids(tokenizer, answers)  # type: ignore[arg-type]
    dtype = options.dtype or torch.float32
    cfg = hooked_config(shape, n_ctx=_n_ctx(tokenizer, shape), device=options.device, dtype=dtype)
    state: dict[str, Tensor] = {}
    lm_head: Tensor | None = None
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: weight {name!r} has {bad} non-finite values (NaN/inf) out of "
                f"{tensor.numel()}: the checkpoint is corrupted; re-download or re-save it"
            )
        if name == "lm_head.weight":
            lm_head = tensor.to(dtype).contiguous()
            continue
        converted = convert_tensor(name, tensor, shape.n_heads)
        if converted is not None:
            state[converted[0]] = converted[1].to(dtype).contiguous()
    embedding = state.get("embed.embed.W_E")
    tied = lm_head is None or (embedding is not None and torch.equal(lm_head, embedding))
    if not tied:
        state["classifier.W_U"] = lm_head.T.contiguous()  # type: ignore[union-attr]
    del lm_head
    with torch.device("meta"):
        model = HookedMonoT5(
            cfg,
            shape,
            tokenizer,
            family=family,
            answer_ids=answer_ids,
            tied=tied,
            template=template,
            answer_tokens=answers,  # type: ignore[arg-type]
            score_type=options.score_type,  # type: ignore[arg-type]
            move_to_device=False,
        )
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: the T5 checkpoint does not match its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); re-save the model"
        )
    model.load_state_dict(state, assign=True)
    del state
    nn.Module.to(model, cfg.device)
    return model.eval()


def load(family: Family, source: Any, tokenizer: Any, options: LoadOptions) -> HookedMonoT5:
    """Load a ``T5ForConditionalGeneration`` reranker (a local directory or hub id, streamed
    tensor by tensor from its weight files; or an in-memory model).

    Raises:
        ValueError: an ``instruction`` (MonoT5 has none), a bad template or answer token, a
            slow tokenizer, non-finite weights.
        UnsupportedModelError: a T5 variant mechir does not implement (see :func:`t5_shape`).
    """
    if options.instruction is not None:
        raise ValueError(
            f"instruction: {family.name} prompts have no instruction; drop the option (or write "
            "the words into --template)"
        )
    Prompt.parse(options.template or DEFAULT_TEMPLATE, family.name)
    if options.score_type is not None:
        check_score_type(options.score_type)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: MonoT5 needs a fast one (with "
            "offsets, tokenizer.json) to find the query and document tokens"
        )
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoConfig

        name = str(source)
        directory = Path(source)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(name))
        config = AutoConfig.from_pretrained(directory)
        tensors = _stream_tensors(directory)
    else:
        name, config = type(source).__name__, source.config
        tensors = _hf_tensors(source)
    shape = t5_shape(config, name)
    return build_from_tensors(
        tensors, shape, tokenizer, family=family, options=options, source=name
    )
