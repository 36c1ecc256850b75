"""A cross-encoder as a TransformerLens ``HookedEncoder`` with a hooked relevance head.

This is the only module that knows TransformerLens internals (config fields, parameter names, the
``HookedEncoder`` class); moving off TransformerLens 3.x touches this file alone. What differs
between families (BERT, ELECTRA, RoBERTa, XLM-RoBERTa, DistilBERT) is declared in
:mod:`mechir.families`; this module builds the embedding and head variants they need.

The relevance computation, with the hook point of every step::

    embed.hook_embed, embed.hook_pos_embed, embed.hook_token_type_embed (absent for DistilBERT)
    -> embed.ln (-> embed.hook_embed_proj, ELECTRA with embedding_size != hidden_size)
    hook_full_embed -> blocks.{l}.* -> blocks.{L-1}.hook_normalized_resid_post
    -> pooler.hook_pooler_out      act(h_first W_p + b_p)  act: tanh (BERT, RoBERTa, XLM-R),
                                                           GELU (ELECTRA), ReLU (DistilBERT)
    -> classifier.hook_logits      pooled W_c + b_c              [batch, num_labels]
    -> hook_score                  one relevance score per pair  [batch]

For ELECTRA, RoBERTa and XLM-R the "pooler" is the classification head's ``dense`` layer and the
classifier its ``out_proj``; for DistilBERT they are ``pre_classifier`` and ``classifier``.
RoBERTa/XLM-R position ids start at ``padding_idx + 1`` (``embed.position_offset``).

**ModernBERT** cannot be expressed by TransformerLens's blocks; its blocks here are built from
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
  ``model.final_hidden_name`` (BERT: the last block's output; ModernBERT: ``hook_final_hidden``,
  the output of ``ln_final``, whose own ``hook_normalized`` is before its weight, as in TL).
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

import contextlib
import contextvars
import copy
import difflib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens.ActivationCache import ActivationCache
    from transformer_lens.components import (
        Attention,
        BertBlock,
        BertEmbed,
        BertPooler,
        Embed,
        LayerNorm,
    )
    from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
    from transformer_lens.hook_points import HookPoint, LensHandle
    from transformer_lens.HookedEncoder import HookedEncoder
    from transformer_lens.HookedRootModule import HookedRootModule
    from transformer_lens.utilities import TypedModuleList

from mechir.families import BERT, EncoderShape, Family, family_of
from mechir.parts import CrossEncoderBatch, check_max_length, encode
from mechir.running import (
    Frame,
    HookFn,
    Hooks,
    RunningInput,
    RunningKey,
    current_batch,
    hook_scope,
    running,
    running_batch,
    running_frames,
    scope_active,
)

__all__ = ["HookFn", "Hooks", "HookedCrossEncoder", "running_batch"]

ScoreType = Literal["binary_logit", "logit", "log_prob", "prob"]
ReturnType = Literal["score", "logits", "pooled", "resid", None]
#: Hooks for :meth:`HookedCrossEncoder.score`: a list, or a function building one per sub-batch.
HooksArg = Hooks | Callable[[CrossEncoderBatch], Hooks] | None

SCORE_TYPES: tuple[str, ...] = ("binary_logit", "logit", "log_prob", "prob")
#: The default score: the log-odds of relevance. For one label it is the logit; for two or more it
#: is ``z_rel - logsumexp(z_other)`` (``z1 - z0`` for MonoBERT), which ranks exactly like the
#: softmax probability and, for two labels, is linear in the classifier.
DEFAULT_SCORE_TYPE: ScoreType = "binary_logit"


class FrameAwareHookPoint(HookPoint):
    """A TransformerLens ``HookPoint`` whose backward hooks run in the execution context of the
    forward pass that built their graph, so :func:`running_batch` works in them too (that
    forward pass has returned, possibly on another thread, by the time gradients flow).

    A backward hook ``fn(grad, hook)`` is registered as a forward hook that runs after every
    other forward hook and puts a tensor hook on the final output: ``fn`` receives the gradient
    of that output (what TransformerLens's full backward hook receives) and may return a
    replacement, as there. The handle is listed among the backward hooks (``has_hooks``,
    ``remove_hooks`` and ``reset_hooks`` treat it as one). :meth:`add_hook` returns the handle it
    added."""

    def add_hook(  # type: ignore[override]
        self,
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
        alias_names: list[str] | None = None,
    ) -> LensHandle:
        if dir != "bwd" or alias_names is not None or self.backward_scale != 1.0:
            super().add_hook(hook, dir, is_permanent, level, prepend, alias_names)
            self._keep_gradient_hooks_last()
            handles = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
            return handles[0 if prepend else -1]

        def on_forward(module: nn.Module, args: Any, output: Tensor) -> None:
            if not (isinstance(output, Tensor) and output.requires_grad):
                return
            context = contextvars.copy_context()
            output.register_hook(lambda grad: context.run(hook, grad, hook=self))

        pt_handle = self.register_forward_hook(on_forward)
        handle = LensHandle(pt_handle, is_permanent, level, user_hook=hook)
        ids = self.__dict__.setdefault("_mechir_gradient_hook_ids", [])
        if prepend:
            ids.insert(0, pt_handle.id)
            self.bwd_hooks.insert(0, handle)
        else:
            ids.append(pt_handle.id)
            self.bwd_hooks.append(handle)
        self._keep_gradient_hooks_last()
        return handle

    def _keep_gradient_hooks_last(self) -> None:
        """Forward hooks run in insertion order: move the gradient hooks to the end (in their
        own order) so they see the output after every forward hook has replaced it."""
        ids = self.__dict__.get("_mechir_gradient_hook_ids", ())
        ids = [i for i in ids if i in self._forward_hooks]
        self.__dict__["_mechir_gradient_hook_ids"] = ids
        for hook_id in ids:
            self._forward_hooks.move_to_end(hook_id)


def _scoped_hook(fn: HookFn, scope: object) -> HookFn:
    """``fn``, firing only where the hook scope ``scope`` is active (see
    :meth:`HookedCrossEncoder.hooks`)."""

    def hook(act: Any, hook: HookPoint) -> Any:
        return fn(act, hook=hook) if scope_active(scope) else None

    hook.__name__ = getattr(fn, "__name__", "hook")
    return hook


class HookAwareLayerNorm(LayerNorm):
    """TransformerLens ``LayerNorm`` that runs PyTorch's fused ``layer_norm`` when neither of its
    hook points (``hook_scale``, ``hook_normalized``) has a hook, forward or backward, and
    TransformerLens's exact step-by-step computation (with both hook points) whenever one has.
    Same parameters, same hook names, same results up to float rounding; about 6 fewer passes
    over the activations."""

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        hooked = any(
            point._forward_hooks or point._backward_hooks or point._backward_pre_hooks
            for point in (self.hook_scale, self.hook_normalized)
        )
        if hooked or self.cfg.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        return nn.functional.layer_norm(x, (self.length,), self.w, self.b, self.eps)


class EncoderAttention(Attention):
    """TransformerLens's bidirectional attention -- the same parameters, hook points and hook
    values -- in fewer passes over the ``[batch, head, query, key]`` scores: ``1/sqrt(d_head)``
    scales the queries instead of the scores, and fully masked rows (softmax NaN) become zeros in
    one op. A configuration this path does not cover (a cache, attention results, rotary/ALiBi
    positions, a causal mask, QK norm, ...) runs TransformerLens's own forward."""

    def _lean(self) -> bool:
        c = self.cfg
        return (
            c.positional_embedding_type == "standard"
            and (self._attention_dir_override or c.attention_dir) == "bidirectional"
            and not (c.use_attn_result or c.load_in_4bit or c.use_qk_norm or c.use_logn_attn)
            and not c.use_attention_sinks
            and c.clip_qkv is None
            and not c.attn_scores_soft_cap > 0
        )

    def forward(  # type: ignore[override]
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        past_kv_cache_entry: Any = None,
        additive_attention_mask: Float[Tensor, "#batch 1 1 kv_pos"] | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``softmax(q k^T / sqrt(d_head) + mask) v W_O + b_O``, hooks as in TransformerLens."""
        if past_kv_cache_entry is not None or position_bias is not None or not self._lean():
            return super().forward(
                query_input, key_input, value_input, past_kv_cache_entry,
                additive_attention_mask, attention_mask, position_bias,
            )  # fmt: skip
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        scores = (q / self.attn_scale).transpose(1, 2) @ k.permute(0, 2, 3, 1)
        if additive_attention_mask is not None:
            scores = scores + additive_attention_mask
        scores = self.hook_attn_scores(scores)  # [batch, head, query_pos, key_pos]
        pattern = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        pattern = self.hook_pattern(pattern).to(dtype=v.dtype)
        z = self.calculate_z_scores(v, pattern)  # [batch, pos, head, d_head], hook_z
        w_o = self.W_O.reshape(-1, self.cfg.d_model).T.contiguous()  # [d_model, head * d_head]
        return nn.functional.linear(z.reshape(*z.shape[:2], -1), w_o, self.b_O)


class CrossEncoderEmbed(BertEmbed):
    """``BertEmbed`` (same parameters and hook names) with the family's embedding rules.

    ``LN(W_E[t] + W_pos[position_offset + i] + W_tt[type])``, then ``embed.hook_embed_proj``
    ``(x W_proj + b_proj)`` when the embedding is narrower than the model (ELECTRA-small).

    * ``position_offset`` 0: positions ``0..n-1``. ``position_offset = padding_idx + 1``
      (RoBERTa/XLM-R): real tokens ``padding_idx + 1 + i``, padding tokens ``padding_idx``
      (Hugging Face's ``create_position_ids_from_input_ids``).
    * ``n_token_types`` 0: no token-type embedding and no ``embed.hook_token_type_embed``
      (DistilBERT); 1 (RoBERTa/XLM-R): one row, always added.
    """

    def __init__(self, cfg: HookedTransformerConfig, shape: EncoderShape, family: Family):
        embed_cfg = cfg
        if shape.d_embed != cfg.d_model:
            embed_cfg = copy.copy(cfg)
            embed_cfg.d_model = shape.d_embed
        super().__init__(embed_cfg)
        self.cfg = cfg
        self.ln = HookAwareLayerNorm(embed_cfg)
        self.pad_token_id = shape.pad_token_id
        self.position_offset = family.position_offset(shape)
        if shape.n_token_types == 0:
            del self.token_type_embed, self.hook_token_type_embed
        elif shape.n_token_types != 2:
            self.token_type_embed.W_token_type = nn.Parameter(
                torch.empty(shape.n_token_types, shape.d_embed, dtype=cfg.dtype)
            )
        self.projected = shape.d_embed != cfg.d_model
        if self.projected:
            self.W_proj = nn.Parameter(torch.empty(shape.d_embed, cfg.d_model, dtype=cfg.dtype))
            self.b_proj = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
            self.hook_embed_proj = HookPoint()

    def position_ids(self, input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Row of ``W_pos`` of every token (see the class docstring)."""
        if self.position_offset == 0:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = input_ids.ne(self.pad_token_id).long()
        return real.cumsum(1) * real + self.pad_token_id

    def token_states(
        self,
        token_ids: Int[Tensor, " n"],
        *,
        token_type: int = 0,
        position: int | None = None,
    ) -> Float[Tensor, "n d_model"]:
        """What ``hook_full_embed`` holds for tokens of one segment at sequence position
        ``position`` (``None``: without a position embedding)."""
        x = self.embed.W_E[token_ids]
        if hasattr(self, "token_type_embed"):
            n_types = self.token_type_embed.W_token_type.shape[0]
            x = x + self.token_type_embed.W_token_type[min(token_type, n_types - 1)]
        if position is not None:
            x = x + self.pos_embed.W_pos[self.position_offset + position]
        return self._project(self.ln(x[None]))[0]

    def _project(self, x: Float[Tensor, "batch pos d_embed"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.projected:
            return x
        return self.hook_embed_proj(x @ self.W_proj + self.b_proj)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_embed(self.embed(input_ids))
        x = x + self.hook_pos_embed(self.pos_embed.W_pos[self.position_ids(input_ids)])
        if hasattr(self, "token_type_embed"):
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.hook_token_type_embed(self.token_type_embed(token_type_ids))
        return self._project(self.ln(x))


class CrossEncoderPooler(BertPooler):
    """``BertPooler`` with the family's activation: ``act(resid[:, 0] W + b)``, hooked at
    ``hook_pooler_out`` (tanh: BERT/RoBERTa/XLM-R; GELU: ELECTRA; ReLU: DistilBERT)."""

    ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "relu": nn.ReLU,
    }

    def __init__(self, cfg: HookedTransformerConfig, activation: str = "tanh"):
        super().__init__(cfg)
        self.activation = self.ACTIVATIONS[activation]()


class CrossEncoderClassifier(nn.Module):
    """Linear classification head on the pooled [CLS] vector: ``logits = pooled @ W + b``."""

    def __init__(self, cfg: HookedTransformerConfig, num_labels: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(cfg.d_model, num_labels, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(num_labels, dtype=cfg.dtype))
        self.hook_logits = HookPoint()

    def forward(self, pooled: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch n_labels"]:
        return self.hook_logits(nn.functional.linear(pooled, self.W.T, self.b))


# ---------------------------------------------------------------------- ModernBERT components
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


class RotaryAttention(nn.Module):
    """Bidirectional multi-head attention with rotary positions and an optional sliding window.

    ``q = x W_Q + b_Q`` (``hook_q``), rotated (``hook_rot_q``), likewise ``k``; ``v = x W_V + b_V``.
    ``scores = q k^T / sqrt(d_head) + mask`` (``hook_attn_scores``; the mask is -inf on padding keys
    and, for a local layer, on keys with ``|i - j| > window``), ``pattern = softmax(scores)``
    (``hook_pattern``), ``z = pattern v`` (``hook_z``), ``out = sum_h z_h W_O[h] + b_O``. Same
    parameter shapes and hook names as TransformerLens's ``Attention``.
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
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.attn_scale
        if additive_attention_mask is not None:
            scores = scores + additive_attention_mask
        if self.window is not None:
            far = (positions[:nq, None] - positions[None]).abs() > self.window
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
        modern = shape.modern
        assert modern is not None
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
        modern = shape.modern
        assert modern is not None
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


class HookedCrossEncoder(HookedEncoder):
    """TransformerLens ``HookedEncoder`` whose forward pass returns cross-encoder relevance scores.

    The masked-language-model and next-sentence heads of ``HookedEncoder`` are not built (a
    cross-encoder has none); the pooler and a classifier with hook points are.

    While a forward pass runs, :attr:`running_batch` is the :class:`CrossEncoderBatch` it runs on
    (like an attention mask, the parts of every token travel with the input), so part-dependent
    hooks read the parts of the batch they run on: a hook list is built once and is correct for
    every batch and sub-batch.

    Args:
        cfg: the encoder configuration (see :func:`hooked_config_from_hf`).
        shape: the family-independent encoder description (default: read from ``cfg``, BERT).
        family: the :class:`~mechir.families.Family` (default BERT).
        num_labels: 1 (score = the logit) or >= 2 (MonoBERT: 2).
        tokenizer: the model's Hugging Face tokenizer, used by :meth:`encode`.
        relevant_label: the relevant class when ``num_labels >= 2``.
        score_type: what :meth:`score` returns, from the classifier logits ``z``:
            ``"binary_logit"`` (default) the log-odds of relevance: ``z`` for one label,
            ``z_rel - logsumexp(z_other)`` for several (``z1 - z0`` for MonoBERT; ranks exactly
            like the softmax probability and is linear in the classifier for two labels);
            ``"logit"`` the relevant class's logit ``z_rel`` alone; ``"log_prob"`` its
            log-softmax (log-sigmoid for one label); ``"prob"`` its softmax (sigmoid).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        num_labels: int,
        tokenizer: Any = None,
        *,
        relevant_label: int = 1,
        score_type: ScoreType | None = None,
        move_to_device: bool = True,
        family: Family = BERT,
        shape: EncoderShape | None = None,
    ):
        # HookedEncoder.__init__ would build the (unused, vocabulary-sized) MLM/NSP heads and warn
        # about its deprecation; we build only what a cross-encoder has.
        HookedRootModule.__init__(self)
        self.cfg = cfg
        self.tokenizer = tokenizer
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if num_labels > 1 and not 0 <= relevant_label < num_labels:
            raise ValueError(
                f"relevant_label {relevant_label} out of range for {num_labels} labels"
            )
        self.num_labels = num_labels
        self.relevant_label = relevant_label if num_labels > 1 else 0
        self.score_type = DEFAULT_SCORE_TYPE if score_type is None else score_type
        self._running_key = RunningKey()
        self.family = family
        shape = shape or _bert_shape(cfg)
        self.ln_final: nn.Module | None = None
        if family.blocks == "pre_ln":
            if shape.modern is None:
                raise ValueError(f"{family.name} needs an EncoderShape with .modern set")
            self.embed = ModernEmbed(cfg, shape)
            self.blocks = TypedModuleList(
                [ModernBlock(cfg, shape, layer) for layer in range(cfg.n_layers)]
            )
            self.ln_final = HookAwareLayerNorm(cfg)
            self.hook_final_hidden = HookPoint()
            self.pooler = ModernHead(cfg, shape, self._running_key)
        else:
            self.embed = CrossEncoderEmbed(cfg, shape, family)
            self.blocks = TypedModuleList([BertBlock(cfg) for _ in range(cfg.n_layers)])
            for block in self.blocks:
                block.ln1, block.ln2 = HookAwareLayerNorm(cfg), HookAwareLayerNorm(cfg)
                block.attn = EncoderAttention(cfg)
            self.pooler = CrossEncoderPooler(cfg, family.head_activation)
        self.classifier = CrossEncoderClassifier(cfg, num_labels)
        self.hook_full_embed = HookPoint()
        self.hook_score = HookPoint()
        if move_to_device and cfg.device is not None:
            nn.Module.to(self, cfg.device)
        self.setup()

    def setup(self) -> None:
        """TransformerLens's hook-point registry; each hook point also carries its model's running
        key, so a hook function can read the batch it runs on with :func:`running_batch`, and
        becomes a :class:`FrameAwareHookPoint` (backward hooks read the batch too)."""
        super().setup()
        for point in self.hook_dict.values():
            point.__dict__["_mechir_running"] = self._running_key
            if type(point) is HookPoint:
                point.__class__ = FrameAwareHookPoint

    @property
    def score_type(self) -> ScoreType:
        return self._score_type

    @score_type.setter
    def score_type(self, value: ScoreType) -> None:
        if value not in SCORE_TYPES:
            raise ValueError(f"unknown score_type {value!r}: choose one of {SCORE_TYPES}")
        self._score_type = value

    # ------------------------------------------------------------------ the running batch
    @property
    def running_batch(self) -> CrossEncoderBatch:
        """The batch of the forward pass now running (on the model's device).

        Part-dependent hooks call this inside the hook function. For a forward pass on bare token
        ids the parts are inferred from the tokenizer's [CLS]/[SEP] ids.

        Raises:
            RuntimeError: no forward pass is running (a hook called outside the model).
        """
        return current_batch(self._running_key)

    @property
    def _running(self) -> tuple[Frame, ...]:
        """This model's running frames in the current execution context, innermost last."""
        return running_frames(self._running_key)

    @contextlib.contextmanager
    def running_on(self, batch: CrossEncoderBatch) -> Iterator[CrossEncoderBatch]:
        """Make ``batch`` the :attr:`running_batch` for code that runs blocks itself (e.g. a
        patching engine calling :meth:`run_block`); :meth:`forward` does this on its own."""
        batch = batch.to(self.cfg.device)
        with running(self._running_key, RunningInput(batch=batch)):
            yield batch

    # ------------------------------------------------------------------ forward
    def scores_from_logits(
        self, logits: Float[Tensor, "batch n_labels"]
    ) -> Float[Tensor, " batch"]:
        """Relevance score from classifier logits, according to :attr:`score_type`."""
        if self.num_labels == 1:
            x = logits[:, 0]
            if self.score_type in ("logit", "binary_logit"):
                return x
            return nn.functional.logsigmoid(x) if self.score_type == "log_prob" else x.sigmoid()
        rel = self.relevant_label
        if self.score_type == "logit":
            return logits[:, rel]
        if self.score_type == "binary_logit":
            if self.num_labels == 2:
                return logits[:, rel] - logits[:, 1 - rel]
            others = torch.cat([logits[:, :rel], logits[:, rel + 1 :]], dim=-1)
            return logits[:, rel] - others.logsumexp(-1)
        log_probs = logits.log_softmax(-1)[:, rel]
        return log_probs if self.score_type == "log_prob" else log_probs.exp()

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
        """Run the cross-encoder.

        Args:
            input: a :class:`CrossEncoderBatch`, or token ids (then pass ``token_type_ids`` and,
                for padded batches, ``attention_mask``).
            return_type: ``"score"`` ``[batch]`` (default), ``"logits"`` ``[batch, num_labels]``,
                ``"pooled"`` ``[batch, d_model]``, ``"resid"`` (final hidden states
                ``[batch, pos, d_model]``) or None.
            start_at_layer: run blocks from this layer on, starting from ``resid`` (the input of
                that block, ``blocks.{l}.hook_resid_pre``); the embeddings are not run.
            stop_at_layer: run blocks before this layer only and return the input of block
                ``stop_at_layer`` ``[batch, pos, d_model]`` (``return_type`` is ignored).
        """
        input_now = RunningInput.of(self, input, token_type_ids, attention_mask)
        n_layers = self.cfg.n_layers
        start = 0 if start_at_layer is None else self._layer_arg("start_at_layer", start_at_layer)
        stop = (
            n_layers if stop_at_layer is None else self._layer_arg("stop_at_layer", stop_at_layer)
        )
        if start > stop:
            raise ValueError(f"start_at_layer {start} is after stop_at_layer {stop}")
        if (start_at_layer is None) != (resid is None):
            raise ValueError("pass resid= (the input of block start_at_layer) with start_at_layer")
        with running(self._running_key, input_now):
            if resid is None:
                resid = self.hook_full_embed(self.embed(input_now.tokens, input_now.token_type_ids))
            else:
                resid = resid.to(self.cfg.device)
            additive = (
                None
                if input_now.attention_mask is None
                else self.additive_attention_mask(input_now.attention_mask)
            )
            for layer in range(start, stop):
                resid = self._finish(layer, self.blocks[layer](resid, additive))
            if stop_at_layer is not None or return_type == "resid":
                return resid
            pooled = self.pooler(resid)
            if return_type == "pooled":
                return pooled
            logits = self.classifier(pooled)
            if return_type == "logits":
                return logits
            score = self.hook_score(self.scores_from_logits(logits))
            return score if return_type == "score" else None

    def _layer_arg(self, what: str, layer: int) -> int:
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"{what}={layer!r} out of range: the model has {n} layers (0-{n})")
        return layer

    # ------------------------------------------------------------------ hooks
    def _check_hook_name(self, name: Any) -> None:
        if not isinstance(name, str) or name in self.mod_dict:
            return
        match = re.match(r"blocks\.(\d+)\.", name)
        n = self.cfg.n_layers
        if match and int(match.group(1)) >= n:
            raise ValueError(
                f"no hook point {name!r}: layer {match.group(1)} out of range, the model has "
                f"{n} layers (0-{n - 1})"
            )
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"no hook point {name!r} in this model{hint}")

    def add_hook(self, name: Any, hook: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Any) -> None:  # type: ignore[override]
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    def _hook_points(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        """The hook points a hook list entry names: one name, or every name a filter accepts."""
        if isinstance(name, str):
            self._check_hook_name(name)
            return [self.mod_dict[name]]
        return [point for point_name, point in self.hook_dict.items() if name(point_name)]

    @contextlib.contextmanager
    def hooks(  # type: ignore[override]
        self,
        fwd_hooks: Hooks = (),  # type: ignore[assignment]
        bwd_hooks: Hooks = (),  # type: ignore[assignment]
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedCrossEncoder]:
        """TransformerLens's ``hooks`` context, scoped to the execution context that enters it.

        The hooks fire only for forward passes (and their backward passes) of this thread or
        asyncio task while the block runs, so threads scoring the same model at once with
        different hooks never run each other's hooks; on exit exactly the hooks this block added
        are removed, whatever other blocks (other threads, nested blocks) do meanwhile. With
        ``reset_hooks_end=False`` the hooks stay, unscoped, as in TransformerLens (they then fire
        for every forward pass until ``model.reset_hooks()``)."""
        if not reset_hooks_end:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for point in self._hook_points(name):
                        point.add_hook(fn, dir=direction)
            yield self
            return
        added: list[tuple[HookPoint, LensHandle]] = []
        with hook_scope() as scope:
            try:
                for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                    for name, fn in pairs:
                        scoped = _scoped_hook(fn, scope)
                        for point in self._hook_points(name):
                            added.append((point, point.add_hook(scoped, dir=direction)))
                yield self
            finally:
                for point, handle in added:
                    handle.hook.remove()
                    for handles in (point.fwd_hooks, point.bwd_hooks):
                        if any(h is handle for h in handles):
                            handles[:] = [h for h in handles if h is not handle]
                    if clear_contexts:
                        point.clear_context()

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        incl_bwd: bool = False,
        names_filter: Any = None,
        device: Any = None,
        remove_batch_dim: bool = False,
        return_cache_object: bool = True,
        **model_kwargs: Any,
    ) -> tuple[Any, Any]:
        """TransformerLens ``run_with_cache``. With ``incl_bwd=True`` the cached gradients
        (``<name>_grad``) are those of the **summed** output, e.g. ``sum_b score_b`` for a batch of
        scores. Pairs do not interact in the encoder, so each pair's cached gradient is the
        gradient of its own score.

        Run on a :class:`CrossEncoderBatch`, the cache records it as ``cache.batch``, so it can be
        the source of patching hooks (:func:`mechir.hooks.patch_hooks`)."""
        if not incl_bwd:
            out, cache = super().run_with_cache(
                *model_args,
                names_filter=names_filter,
                device=device,
                remove_batch_dim=remove_batch_dim,
                return_cache_object=return_cache_object,
                **model_kwargs,
            )
        else:
            cache, fwd, bwd = self.get_caching_hooks(
                names_filter, True, device, remove_batch_dim=remove_batch_dim
            )
            with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                out = self(*model_args, **model_kwargs)
                out.sum().backward()
            if return_cache_object:
                cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        batch = model_args[0] if model_args else model_kwargs.get("input")
        if return_cache_object and not remove_batch_dim and isinstance(batch, CrossEncoderBatch):
            cache.batch = batch
        return out, cache

    # ------------------------------------------------------------------ block-level API
    @staticmethod
    def additive_attention_mask(
        attention_mask: Int[Tensor, "batch pos"],
    ) -> Float[Tensor, "batch 1 1 pos"]:
        """0 on real tokens, -inf on padding keys (what the encoder adds to attention scores)."""
        return torch.where(attention_mask[:, None, None, :] == 0, -torch.inf, 0.0)

    def run_block(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "batch 1 1 pos"],
        *,
        cls_only: bool = False,
    ) -> Float[Tensor, "batch pos_out d_model"]:
        """Run block ``layer`` (with its hooks) on ``resid``, its input.

        With ``cls_only`` only query position 0 ([CLS], the only one the pooler reads) is
        computed, keys and values still from every position: ``[batch, 1, d_model]``. It falls
        back to the full block when a hook sits on the block or split q/k/v inputs are enabled,
        because such hooks may expect every position.
        """
        block = self.blocks[layer]
        cls_only = cls_only and self._cls_only_is_safe(layer)
        if isinstance(block, ModernBlock):
            return self._finish(layer, block(resid, additive_mask, 1 if cls_only else None))
        if not cls_only:
            return block(resid, additive_mask)
        query = resid[:, :1]
        attn_out = block.hook_attn_out(
            block.attn(query, resid, resid, additive_attention_mask=additive_mask)
        )
        resid_mid = block.hook_resid_mid(query + attn_out)
        normalized = block.ln1(resid_mid)
        resid_post = block.hook_resid_post(normalized + block.hook_mlp_out(block.mlp(normalized)))
        return block.hook_normalized_resid_post(block.ln2(resid_post))

    def _finish(
        self, layer: int, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """A block's output as the next block reads it; after the last block of a pre-LN model
        (ModernBERT) that is the final norm's output ``hook_final_hidden``."""
        if self.ln_final is None or layer != self.cfg.n_layers - 1:
            return resid
        return self.hook_final_hidden(self.ln_final(resid))

    @property
    def final_hidden_name(self) -> str:
        """Hook of the final hidden states, the input of the score head: BERT blocks'
        ``blocks.{L-1}.hook_normalized_resid_post``; ModernBERT's ``hook_final_hidden`` (the
        output of the final norm ``ln_final``, whose ``hook_normalized`` is before its weight)."""
        if self.ln_final is not None:
            return "hook_final_hidden"
        return self.block_output_name(self.cfg.n_layers - 1)

    def block_output_name(self, layer: int) -> str:
        """Hook of block ``layer``'s output (post-LN BERT: ``hook_normalized_resid_post``;
        pre-LN ModernBERT: ``hook_resid_post``, before the final norm for the last block)."""
        if self.family.blocks == "pre_ln":
            return f"blocks.{layer}.hook_resid_post"
        return f"blocks.{layer}.hook_normalized_resid_post"

    def _cls_only_is_safe(self, layer: int) -> bool:
        if getattr(self.pooler, "pooling", "cls") != "cls":
            return False  # mean pooling reads every position
        if self.ln_final is not None and layer == self.cfg.n_layers - 1:
            final = [*self.ln_final.modules(), self.hook_final_hidden]
            if any(m._forward_hooks or m._forward_pre_hooks for m in final):
                return False
        cfg = self.cfg
        if cfg.use_split_qkv_input or cfg.use_hook_mlp_in or cfg.use_attn_in:
            return False
        return not any(
            m._forward_hooks or m._forward_pre_hooks for m in self.blocks[layer].modules()
        )

    def score_from_resid(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, " batch"]:
        """The score head on final hidden states: pooler, classifier, ``hook_score``."""
        return self.hook_score(self.scores_from_logits(self.classifier(self.pooler(resid))))

    # ------------------------------------------------------------------ user API
    def encode(
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
    ) -> CrossEncoderBatch:
        """Tokenize pairs with this model's tokenizer (see :func:`mechir.encode`).

        ``max_length`` defaults to :attr:`max_length` and may not exceed it; the pair layout is
        the family's. ``pair_ids`` (one per pair) identify the examples (see
        :class:`~mechir.parts.CrossEncoderBatch`).
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_cross_encoder")
        length = self.max_length if max_length is None else max_length
        check_max_length(length, self.max_length)
        batch = encode(
            self.tokenizer, queries, documents, max_length=length, layout=self.family.layout
        )
        return batch if pair_ids is None else batch.with_pair_ids(pair_ids)

    @property
    def max_length(self) -> int:
        """Longest input the position table allows (RoBERTa: positions minus the offset)."""
        return self.cfg.n_ctx - self.embed.position_offset

    def score(
        self,
        batch: CrossEncoderBatch,
        *,
        batch_size: int | None = None,
        hooks: HooksArg = None,
        check_finite: bool = True,
    ) -> Float[Tensor, " batch"]:
        """Relevance scores of a batch, without gradients, returned as float32 **on the CPU**.

        Hooks already active (``with model.hooks(...)``) apply. ``hooks`` adds more for this call:
        a list (part-dependent hooks read the parts of each sub-batch they run on), or, for
        hooks that must be rebuilt per sub-batch, a function ``sub_batch -> list``.

        Raises:
            FloatingPointError: a score is NaN or infinite (corrupted weights, or hooks producing
                non-finite activations); the message names the pairs. ``check_finite=False``
                leaves the check to the caller (e.g. ``score_pairs``, which names qid and docid).
        """
        out = []
        with torch.no_grad():
            for chunk in batch.chunks(batch_size):
                fwd = hooks(chunk) if callable(hooks) else (hooks or [])
                with self.hooks(fwd_hooks=fwd):
                    out.append(self(chunk).float().cpu())
        scores = torch.cat(out)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist() if check_finite else []
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            raise FloatingPointError(
                f"{len(bad)} of {len(scores)} scores are NaN or infinite (pairs {shown}): check "
                "the model's weights are finite and that the hooks keep activations finite"
            )
        return scores

    @property
    def d_mlp(self) -> int:
        return self.cfg.d_mlp

    def to(self, device_or_dtype: torch.device | str | torch.dtype, print_details: bool = False):  # type: ignore[override]
        return super().to(device_or_dtype, print_details=print_details)


# ---------------------------------------------------------------------- conversion from HF
def _bert_shape(cfg: HookedTransformerConfig) -> EncoderShape:
    return EncoderShape(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        n_layers=cfg.n_layers,
        n_positions=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        eps=cfg.eps,
        act_fn=cfg.act_fn,
        n_token_types=2,
        d_embed=cfg.d_model,
        pad_token_id=0,
    )


def family_of_config(hf_config: Any) -> Family:
    """The :class:`~mechir.families.Family` of a Hugging Face config (ValueError if none)."""
    family = family_of(getattr(hf_config, "model_type", None))
    if family is None:
        raise ValueError(f"no mechir family for model_type {hf_config.model_type!r}")
    return family


def hooked_config_from_shape(
    shape: EncoderShape,
    *,
    architecture: str = "BertForSequenceClassification",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformerConfig:
    """TransformerLens config for an :class:`~mechir.families.EncoderShape`."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HookedTransformerConfig(
        d_model=shape.d_model,
        d_head=shape.d_model // shape.n_heads,
        n_heads=shape.n_heads,
        d_mlp=shape.d_mlp,
        n_layers=shape.n_layers,
        n_ctx=shape.n_positions,
        eps=shape.eps,
        d_vocab=shape.d_vocab,
        act_fn=shape.act_fn,
        attention_dir="bidirectional",
        original_architecture=architecture,
        device=str(device),
        dtype=dtype,
    )


def hooked_config_from_hf(
    hf_config: Any, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    """TransformerLens config for a Hugging Face config of a supported family (built locally)."""
    family = family_of_config(hf_config)
    return hooked_config_from_shape(
        family.encoder_config(hf_config), architecture=family.hf_class, device=device, dtype=dtype
    )


def state_dict_from_hf(hf_model: Any, n_heads: int) -> dict[str, Tensor]:
    """Map a supported ``*ForSequenceClassification`` state dict to mechir names."""
    family = family_of_config(hf_model.config)
    sd = family.state_dict(hf_model, n_heads)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def hooked_cross_encoder_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    relevant_label: int = 1,
    score_type: ScoreType | None = None,
) -> HookedCrossEncoder:
    """Convert an in-memory ``*ForSequenceClassification`` (already validated) to mechir."""
    family = family_of_config(hf_model.config)
    shape = family.encoder_config(hf_model.config)
    cfg = hooked_config_from_shape(shape, architecture=family.hf_class, device=device, dtype=dtype)
    model = HookedCrossEncoder(
        cfg,
        hf_model.config.num_labels,
        tokenizer,
        relevant_label=relevant_label,
        score_type=score_type,
        move_to_device=False,
        family=family,
        shape=shape,
    )
    state = {k: v.to(dtype) for k, v in state_dict_from_hf(hf_model, cfg.n_heads).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only TL's non-parameter buffers (e.g. attention masks) may be missing.
    missing = [m for m in missing if not m.endswith(("IGNORE", "mask"))]
    if missing or unexpected:
        raise RuntimeError(
            f"weight conversion mismatch: missing {missing}, unexpected {unexpected}"
        )
    nn.Module.to(model, cfg.device)
    return model.eval()
