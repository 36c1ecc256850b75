"""MonoT5's architecture: its shape from a T5 config, the TransformerLens config, and the blocks
the hooked model is built of (RMS norm, embedding, relative-position attention, MLP, encoder and
decoder blocks, the answer head).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.models.attention import AttentionTerms
from mechir.models.registry import UnsupportedModelError
from mechir.models.tl import (
    Embed,
    HookedTransformerConfig,
    HookPoint,
    RMSNorm,
    t5_relative_position_bucket,
)


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


class T5HookedAttention(nn.Module, AttentionTerms):
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
