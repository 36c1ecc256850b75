"""What every attention component of mechir declares (:class:`AttentionTerms`), and the two
attention paths shared by mechir's lean attention forwards (the BERT-block encoders'
:class:`~mechir.models.encoder.EncoderAttention`, the decoders' causal forward, ModernBERT's
rotary attention).

* :func:`attend_fused`: ``softmax(scale q k^T + mask) v`` in one ``scaled_dot_product_attention``
  call; the ``[batch, head, query, key]`` scores are never stored. Taken when no hook of this
  forward pass is on ``hook_attn_scores`` or ``hook_pattern`` (:func:`attention_watched`).
* :func:`attend`: the explicit softmax with both hook points, TransformerLens's values.

Hooks scoped to a thread or asyncio task (``with model.hooks(...)``) watch only that context's
forward passes (:func:`mechir.models.hooked.fires_here`), so two threads may take different paths
through the same model at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from mechir.models.hooked import fires_here
from mechir.running import running_frames

__all__ = [
    "AttentionTerms",
    "attend",
    "attend_fused",
    "attention_watched",
    "fused_attention_z",
    "project_heads",
    "rows_may_be_empty",
]


class AttentionTerms:
    """What an attention component adds to ``softmax(q k^T / attn_scale + mask) v``, declared:
    every attention class of mechir derives from this one and overrides what it has, so tools
    read these attributes and never probe for them (None: the component has no such term).

    Attributes:
        rotate_positions: rotary positions, ``rotate_positions(x)`` rotating ``hook_q`` /
            ``hook_k``-shaped ``x`` ``[batch, pos, head, d_head]`` as at positions ``0..pos-1``
            (ModernBERT, the decoders).
        qk_score_delta: position terms of the scores (DeBERTa's disentangled attention):
            ``qk_score_delta(which, q, k, delta)``, the change of the scores
            ``[batch, head, query, key]`` when ``delta`` is added to ``q`` or ``k``
            (``which``), beyond the ``q.k`` term.
        window: a sliding window: a key more than ``window`` positions away from its query is
            masked (ModernBERT's local layers; a decoder's local layers, on top of the causal
            mask).
    """

    # a mixin after the module class in the bases, without instance layout of its own, so the
    # module class stays the layout base (swapping the class of a built module stays possible)
    __slots__ = ()

    rotate_positions: Callable[[Tensor], Tensor] | None = None
    qk_score_delta: Callable[..., Tensor] | None = None
    window: int | None = None


def attention_watched(attn: nn.Module) -> bool:
    """Whether a hook of this forward pass (this thread or task, or an unscoped hook; forward,
    backward or a cache) is on ``hook_attn_scores`` or ``hook_pattern``: then the explicit
    softmax runs (:func:`attend`), otherwise the fused kernel (:func:`attend_fused`)."""
    return fires_here(attn.hook_attn_scores) or fires_here(attn.hook_pattern)


#: Key of the per-forward memo of :func:`rows_may_be_empty` in the running frame.
_EMPTY_ROWS = object()


def rows_may_be_empty(
    attn: nn.Module, mask: Tensor, fully_masked: Callable[[Tensor], Tensor]
) -> bool:
    """``bool(fully_masked(mask))``: whether the attention mask leaves some query row without a
    key (softmax NaN, cleaned to zeros), computed once per forward pass and mask (kept in the
    running frame, so a device synchronises once per forward, not once per layer)."""
    key = attn.hook_pattern.__dict__.get("_mechir_running")
    frames = running_frames(key) if key is not None else ()
    signature = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask._version)
    if frames:
        hit = frames[-1].values.get(_EMPTY_ROWS)
        if hit is not None and hit[1] == signature:
            return hit[2]
    flag = bool(fully_masked(mask))
    if frames:
        frames[-1].values[_EMPTY_ROWS] = (mask, signature, flag)  # keeps ``mask`` alive
    return flag


def attend(
    attn: nn.Module,
    scores: Float[Tensor, "batch head query_pos key_pos"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    *,
    empty_rows: bool = True,
) -> Float[Tensor, "batch query_pos d_model"]:
    """The explicit second half of a lean attention forward, hooks as in TransformerLens:
    ``hook_attn_scores`` (masked scores), ``softmax``, ``hook_pattern``, ``hook_z``
    (``calculate_z_scores``: grouped values repeated), then ``z W_O + b_O``.

    Rows whose every key is masked (softmax NaN) become zeros; the pass that does it runs only
    when such rows can occur: ``empty_rows`` (the mask leaves a query without keys) or a hook on
    ``hook_attn_scores`` (which may remove every key of a row)."""
    scores_hooked = fires_here(attn.hook_attn_scores)
    scores = attn.hook_attn_scores(scores)
    pattern = torch.softmax(scores, dim=-1)
    if empty_rows or scores_hooked:
        pattern = torch.nan_to_num(pattern, nan=0.0)
    pattern = attn.hook_pattern(pattern).to(dtype=v.dtype)
    return project_heads(attn, attn.calculate_z_scores(v, pattern))


def attend_fused(
    attn: nn.Module,
    q: Float[Tensor, "batch query_pos head d_head"],
    k: Float[Tensor, "batch key_pos kv_head d_head"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    mask: Tensor | None,
    *,
    scale: float,
    empty_rows: bool,
    is_causal: bool = False,
) -> Float[Tensor, "batch query_pos d_model"]:
    """The fused second half of a lean attention forward: :func:`fused_attention_z`, then
    ``hook_z`` and ``z W_O + b_O``."""
    z = fused_attention_z(q, k, v, mask, scale=scale, empty_rows=empty_rows, is_causal=is_causal)
    return project_heads(attn, attn.hook_z(z))


def fused_attention_z(
    q: Float[Tensor, "batch query_pos head d_head"],
    k: Float[Tensor, "batch key_pos kv_head d_head"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    mask: Tensor | None,
    *,
    scale: float,
    empty_rows: bool,
    is_causal: bool = False,
) -> Float[Tensor, "batch query_pos head d_head"]:
    """``z = softmax(scale q k^T + mask) v`` in one ``scaled_dot_product_attention`` call
    (flash or memory-efficient kernels: the ``[batch, head, query, key]`` scores are never
    stored), in ``hook_z``'s layout. ``mask``: additive (0 / -inf) or boolean (True = keep),
    broadcast to ``[batch, head, query, key]``; grouped key/value heads are shared as
    TransformerLens repeats them. Rows without keys give zeros, as the explicit path's
    (``empty_rows``: the cleanup runs on ``z``, cheap)."""
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    z = nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        is_causal=is_causal,
        enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)  # [batch, query_pos, head, d_head]
    return torch.nan_to_num(z, nan=0.0) if empty_rows else z


def project_heads(
    attn: nn.Module, z: Float[Tensor, "batch query_pos head d_head"]
) -> Float[Tensor, "batch query_pos d_model"]:
    """``sum_h z_h W_O[h] + b_O`` as one matmul over the merged heads (``W_O`` read as a view)."""
    w_o = attn.W_O.reshape(-1, attn.cfg.d_model)  # [head * d_head, d_model], a view
    return nn.functional.linear(z.reshape(*z.shape[:2], -1), w_o.T, attn.b_O)
