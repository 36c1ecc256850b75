"""ModernBERT cross-encoders (``ModernBertForSequenceClassification``, e.g.
``Alibaba-NLP/gte-reranker-modernbert-base``).

ModernBERT cannot be expressed by TransformerLens's blocks; its blocks here are built from
``HookPoint`` s with BERT's hook names where they mean the same thing. What differs::

    embed.hook_embed -> embed.ln -> hook_full_embed      no position / token-type embedding
    blocks.{l}: hook_resid_pre -> ln1 (identity in layer 0) -> attn -> hook_attn_out
                hook_resid_mid = resid_pre + attn_out -> ln2 -> mlp -> hook_mlp_out
                hook_resid_post = resid_mid + mlp_out            (pre-LN: the block output)
    ln_final -> hook_final_hidden                        after the last block (the head's input)
    -> pooler.hook_pooled (resid[:, 0], or the mean over the running batch's real tokens)
    -> pooler.hook_pooler_out = LN(act(pooled W + b)) -> classifier.hook_logits -> hook_score

* Pre- vs post-LN: a BERT block's output is ``hook_normalized_resid_post``, a ModernBERT block's
  is ``hook_resid_post`` (``model.block_output_name(l)``); the score head reads
  ``model.final_hidden_name`` (``hook_final_hidden``, the output of ``ln_final``, whose own
  ``hook_normalized`` is before its weight, as in TL).
* Rotary attention: ``attn.hook_q/hook_k`` are before the rotation, ``attn.hook_rot_q/hook_rot_k``
  after it; ``hook_attn_scores`` includes the padding mask and, in local layers (all but every
  ``global_attn_every_n_layers``-th), -inf on keys with ``|i - j| > local_attention // 2``;
  global and local layers use their own theta. The QK circuit ``W_Q W_K^T`` is the one at
  relative distance 0 (see :mod:`mechir.circuits`).
* Gated MLP: ``mlp.hook_pre = x W_in + b_in`` (the activated half of HF's ``Wi``),
  ``mlp.hook_pre_linear = x W_gate + b_gate`` (the gate half), and the neuron
  ``mlp.hook_post = act(hook_pre) * hook_pre_linear``, the input of ``W_out``.
* Norms without bias (``norm_bias=False``) and linear layers without bias get zero biases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.models.attention import AttentionTerms, attention_watched, fused_attention_z
from mechir.models.encoder import (
    EncoderShape,
    EncoderSpec,
    HookAwareLayerNorm,
    HookedCrossEncoder,
    entry_points,
)
from mechir.models.tl import Embed, HookedTransformerConfig, HookPoint, TypedModuleList
from mechir.parts import PairLayout
from mechir.running import RunningKey, current_batch

#: Activations of ModernBERT's gated MLP and head (Hugging Face ``ACT2FN`` names).
MODERN_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "silu")


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
        extra=modern,
    )


# ------------------------------------------------------------------------------ components
_MODERN_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
}


class IdentityNorm(nn.Module):
    """ModernBERT's layer-0 attention norm, the identity, still hooked at ``hook_normalized``."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.hook_normalized(x)


class ModernEmbed(nn.Module):
    """ModernBERT embedding: ``LN(W_E[t])`` (no position or token-type embedding: positions
    enter every attention layer as rotations of queries and keys)."""

    def __init__(self, cfg: HookedTransformerConfig, shape: EncoderShape):
        super().__init__()
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        self.ln = HookAwareLayerNorm(cfg)
        self.pad_token_id = shape.pad_token_id
        self.position_offset = 0

    def position_ids(self, input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Rotary position of every token: ``0..n-1`` (padding is on the right)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def token_states(
        self, token_ids: Int[Tensor, " n"], *, token_type: int = 0, position: int | None = None
    ) -> Float[Tensor, "n d_model"]:
        """What ``hook_full_embed`` holds for these tokens (the same at every position)."""
        return self.ln(self.embed.W_E[token_ids][None])[0]

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        return self.ln(self.hook_embed(self.embed(input_ids)))


def rotate(
    x: Float[Tensor, "batch pos head d_head"], theta: float, positions: Int[Tensor, " pos"]
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotary position embedding (GPT-NeoX / Hugging Face ``rotate_half`` layout): dimension
    ``j < d/2`` pairs with ``j + d/2``, rotated by ``p * theta^(-2j/d)`` at position ``p``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float) / d))
    angles = positions.float()[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [pos, 1, d]
    cos, sin = angles.cos(), angles.sin()
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


class RotaryAttention(nn.Module, AttentionTerms):
    """Bidirectional multi-head attention with rotary positions and an optional sliding window.

    ``q = x W_Q + b_Q`` (``hook_q``), rotated (``hook_rot_q``), likewise ``k``; ``v = x W_V + b_V``.
    ``scores = q k^T / sqrt(d_head) + mask`` (``hook_attn_scores``; the mask is -inf on padding keys
    and, for a local layer, on keys with ``|i - j| > window``), ``pattern = softmax(scores)``
    (``hook_pattern``), ``z = pattern v`` (``hook_z``), ``out = sum_h z_h W_O[h] + b_O``. Same
    parameter shapes and hook names as TransformerLens's ``Attention``. When no hook of this
    forward pass is on ``hook_attn_scores`` or ``hook_pattern``, ``z`` comes from one fused
    ``scaled_dot_product_attention`` (:func:`~mechir.models.encoder.fused_attention_z`).
    """

    def __init__(self, cfg: HookedTransformerConfig, *, theta: float, window: int | None):
        super().__init__()
        h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
        for name in ("Q", "K", "V"):
            setattr(self, f"W_{name}", nn.Parameter(torch.empty(h, m, d, dtype=cfg.dtype)))
            setattr(self, f"b_{name}", nn.Parameter(torch.zeros(h, d, dtype=cfg.dtype)))
        self.W_O = nn.Parameter(torch.empty(h, d, m, dtype=cfg.dtype))
        self.b_O = nn.Parameter(torch.zeros(m, dtype=cfg.dtype))
        self.theta, self.window = theta, window
        self.attn_scale = d**0.5
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())

    def rotate_positions(
        self, x: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """``hook_q``/``hook_k``-shaped ``x`` rotated as at positions ``0..pos-1`` (linear)."""
        return rotate(x, self.theta, torch.arange(x.shape[1], device=x.device))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        additive_attention_mask: Float[Tensor, "#batch 1 1 pos"] | None,
        n_query: int | None = None,
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """Attention of the first ``n_query`` positions (default all) to every position."""
        n = x.shape[1]
        nq = n if n_query is None else n_query
        positions = torch.arange(n, device=x.device)
        q = self.hook_q(torch.einsum("bpm,hmd->bphd", x[:, :nq], self.W_Q) + self.b_Q)
        k = self.hook_k(torch.einsum("bpm,hmd->bphd", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bpm,hmd->bphd", x, self.W_V) + self.b_V)
        q = self.hook_rot_q(rotate(q, self.theta, positions[:nq]))
        k = self.hook_rot_k(rotate(k, self.theta, positions))
        far = None
        if self.window is not None:
            far = (positions[:nq, None] - positions[None]).abs() > self.window
        if not attention_watched(self):  # nothing reads the scores: one fused kernel
            mask = additive_attention_mask
            if far is not None:
                mask = (
                    torch.zeros(far.shape, dtype=x.dtype, device=x.device) if mask is None else mask
                )
                mask = mask.masked_fill(far, -torch.inf)
            # a query whose window holds only padding reads nothing (zeros, as the softmax path)
            z = fused_attention_z(
                q, k, v, mask, scale=1 / self.attn_scale, empty_rows=mask is not None
            )
            z = self.hook_z(z)
            return torch.einsum("bqhd,hdm->bqm", z, self.W_O) + self.b_O
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.attn_scale
        if additive_attention_mask is not None:
            scores = scores + additive_attention_mask
        if far is not None:
            scores = scores.masked_fill(far, -torch.inf)
        scores = self.hook_attn_scores(scores)
        pattern = scores.softmax(-1)
        pattern = self.hook_pattern(torch.where(pattern.isnan(), 0.0, pattern))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return torch.einsum("bqhd,hdm->bqm", z, self.W_O) + self.b_O


class GatedMLP(nn.Module):
    """ModernBERT's GLU: ``hook_pre = x W_in + b_in`` (the activated half of HF's ``Wi``),
    ``hook_pre_linear = x W_gate + b_gate`` (the gate half), and the **neuron**
    ``hook_post = act(hook_pre) * hook_pre_linear`` ``[batch, pos, d_mlp]``, the input of
    ``W_out``: zeroing neuron ``n`` there removes row ``n`` of ``W_out`` exactly, as in BERT.
    (TransformerLens's ``GatedMLP`` calls the activated half ``W_gate``; mechir follows HF.)"""

    def __init__(self, cfg: HookedTransformerConfig, act: str):
        super().__init__()
        m, n = cfg.d_model, cfg.d_mlp
        self.W_in = nn.Parameter(torch.empty(m, n, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(n, dtype=cfg.dtype))
        self.W_gate = nn.Parameter(torch.empty(m, n, dtype=cfg.dtype))
        self.b_gate = nn.Parameter(torch.zeros(n, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(n, m, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(m, dtype=cfg.dtype))
        self.act = _MODERN_ACTS[act]
        self.hook_pre, self.hook_pre_linear, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        gate = self.hook_pre_linear(x @ self.W_gate + self.b_gate)
        return self.hook_post(self.act(pre) * gate) @ self.W_out + self.b_out


class ModernBlock(nn.Module):
    """A pre-LayerNorm ModernBERT block, hooked with BERT's names::

        resid_pre -> ln1 -> attn -> hook_attn_out; hook_resid_mid = resid_pre + attn_out
        -> ln2 -> mlp -> hook_mlp_out; hook_resid_post = resid_mid + mlp_out  (the block output)

    Unlike BERT (post-LN, output ``hook_normalized_resid_post``) the block output is the
    un-normalized ``hook_resid_post``; ``ln1`` is the identity in layer 0."""

    def __init__(self, cfg: HookedTransformerConfig, shape: EncoderShape, layer: int):
        super().__init__()
        modern = shape.extra
        is_global = modern.global_layers[layer]
        self.ln1: nn.Module = IdentityNorm() if layer == 0 else HookAwareLayerNorm(cfg)
        self.ln2 = HookAwareLayerNorm(cfg)
        self.attn = RotaryAttention(
            cfg,
            theta=modern.rope_theta_global if is_global else modern.rope_theta_local,
            window=None if is_global else modern.window,
        )
        self.mlp = GatedMLP(cfg, shape.act_fn)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        additive_attention_mask: Float[Tensor, "#batch 1 1 pos"] | None = None,
        n_query: int | None = None,
    ) -> Float[Tensor, "rows query_pos d_model"]:
        """The block on ``resid``; with ``n_query`` only the first positions are computed.
        (``rows`` may exceed ``batch``: hooks may add rows inside the block, as NIG does.)"""
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), additive_attention_mask, n_query))
        resid_mid = self.hook_resid_mid(resid[:, : attn_out.shape[1]] + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class ModernHead(nn.Module):
    """ModernBERT's head as mechir's pooler: pool (``[CLS]``, or the mean over the real tokens
    of :attr:`HookedCrossEncoder.running_batch`), then ``LN(act(pooled W + b))``, hooked at
    ``hook_pooler_out`` (the input of the classifier)."""

    def __init__(self, cfg: HookedTransformerConfig, shape: EncoderShape, key: RunningKey):
        super().__init__()
        modern = shape.extra
        self.W = nn.Parameter(torch.empty(cfg.d_model, cfg.d_model, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.act = _MODERN_ACTS[modern.head_activation]
        self.ln = HookAwareLayerNorm(cfg)
        self.pooling = modern.pooling
        self._running_key = key
        self.hook_pooled = HookPoint()
        self.hook_pooler_out = HookPoint()

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_model"]:
        if self.pooling == "cls":
            pooled = resid[:, 0]
        else:
            mask = current_batch(self._running_key).attention_mask.to(resid)
            if len(mask) == 1:  # rows grown from one example (as the attention mask broadcasts)
                mask = mask.expand(len(resid), -1)
            if mask.shape != resid.shape[:2]:
                raise ValueError(
                    f"mean pooling reads the running batch's attention mask {tuple(mask.shape)}, "
                    f"which does not match the hidden states {tuple(resid.shape[:2])}: run the "
                    "head inside model.running_on(batch) of these rows"
                )
            pooled = (resid * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        pooled = self.hook_pooled(pooled)
        return self.hook_pooler_out(self.ln(self.act(pooled @ self.W + self.b)))


def _body(model: HookedCrossEncoder, cfg: HookedTransformerConfig, shape: EncoderShape) -> None:
    """ModernBERT's embedding, blocks, final norm and head on ``model``."""
    if not isinstance(shape.extra, ModernShape):
        raise ValueError("ModernBERT needs an EncoderShape whose .extra is its ModernShape")
    model.embed = ModernEmbed(cfg, shape)
    model.blocks = TypedModuleList(
        [ModernBlock(cfg, shape, layer) for layer in range(cfg.n_layers)]
    )
    model.ln_final = HookAwareLayerNorm(cfg)
    model.hook_final_hidden = HookPoint()
    model.pooler = ModernHead(cfg, shape, model._running_key)


# ------------------------------------------------------------------------------ state dict
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


SPEC = EncoderSpec(
    layout=PairLayout(middle_seps=1, token_types=False),
    encoder_config=_modernbert_config,
    state_dict=_modernbert_state_dict,
    head_keys=("head.", "classifier."),
    positions="rotary",
    head_activation="gelu",  # the default; the checkpoint's classifier_activation is used
    blocks="pre_ln",
    body=_body,
)


load, dimensions = entry_points(SPEC)
