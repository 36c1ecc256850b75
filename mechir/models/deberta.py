"""DeBERTa-v2/v3 cross-encoders (``DebertaV2ForSequenceClassification``, e.g.
``mixedbread-ai/mxbai-rerank-base-v1``) and DeBERTa (v1, ``DebertaForSequenceClassification``).

Post-LN BERT blocks (TransformerLens's ``BertBlock``, so every BERT hook name means the same
thing: ``hook_attn_out``, ``hook_resid_mid``, ``ln1``, ``mlp.hook_post``, ``hook_resid_post``,
``hook_normalized_resid_post``, ...) whose attention is DeBERTa's *disentangled* attention, which
TransformerLens's ``Attention`` cannot express. What differs from BERT::

    embed.hook_embed (+ embed.hook_pos_embed when position_biased_input, DeBERTa-v2)
    (+ embed.hook_token_type_embed when type_vocab_size > 0)
    -> embed.hook_embed_proj (x W_proj, no bias; embedding_size != hidden_size)
    -> embed.ln -> hook_full_embed                     (the projection is before the norm)
    blocks.{l}.attn: hook_q, hook_k, hook_v              content projections, as in BERT
        hook_c2c_scores  q_i . k_j / s                                  content -> content
        hook_c2p_scores  q_i . k^r_{d(i,j)} / s                         content -> position
        hook_p2c_scores  k_j . q^r_{d(j,i)'} / s                        position -> content
        hook_attn_scores c2c + c2p + p2c + mask (-inf on padding keys)   the total, as in BERT
        hook_pattern = softmax(hook_attn_scores), hook_z, W_O            as in BERT
    -> pooler.hook_pooler_out = act(h_[CLS] W + b)       HF's ContextPooler (pooler_hidden_act)
    -> classifier.hook_logits -> hook_score

* ``s = sqrt(d_head * scale_factor)``, ``scale_factor = 1 + [c2p] + [p2c]`` (DeBERTa-v1:
  ``1 + len(pos_att_type)``), one scale for all three terms.
* The relative-position keys and queries ``k^r = R W_K^r + b_K^r`` and ``q^r = R W_Q^r + b_Q^r``
  are computed from the relative-embedding table ``R`` (``rel_embed.W_rel``, layer-normed when
  ``norm_rel_ebd`` says ``layer_norm``), shared by every layer. With ``share_att_key`` (DeBERTa-v3)
  ``W_K^r, b_K^r = W_K, b_K`` and ``W_Q^r, b_Q^r = W_Q, b_Q``; otherwise each layer has its own
  (``attn.W_K_pos``, ``attn.W_Q_pos``; DeBERTa-v1's ``pos_proj`` has no bias). They do not depend
  on the input, so they have no hook points: the position terms change only through ``q``
  (``c2p``) and ``k`` (``p2c``).
* Row ``d(i, j) = clamp(bucket(i - j) + span, 0, 2 span - 1)`` of ``R`` serves query ``i`` and
  key ``j`` (:func:`relative_position_index`, as Hugging Face computes it): ``bucket`` is the
  identity without ``position_buckets``, else DeBERTa-v2's log buckets
  (:func:`log_bucket_position`); ``span`` is ``position_buckets`` (or ``max_relative_positions``).
  DeBERTa-v1's length-dependent ``att_span`` slice selects the same rows.
* Hugging Face masks with ``finfo.min`` on the query *and* key padding; here padding keys get
  ``-inf`` (as in every mechir encoder), so padding query rows differ; real positions are equal.
* The enhanced mask decoder is not used by sequence classification (``z_steps = 0``).
* Not supported, refused in one line: DeBERTa-v2's convolution layer (``conv_kernel_size > 0``,
  the xlarge/xxlarge checkpoints), DeBERTa-v1's ``talking_head``, a ``pooler_hidden_size`` or
  ``attention_head_size`` other than the usual.

**QK circuits.** The content term ``c2c`` is the bilinear form ``x_i W_Q W_K^T x_j^T`` (plus the
bias terms) at every distance, so :mod:`mechir.circuits` reads DeBERTa's content QK circuit
exactly (up to the scale ``1/s`` instead of ``1/sqrt(d_head)``). The position terms are not in
``W_QK``: for a query at distance row ``d`` the ``c2p`` term ``(x_i W_Q + b_Q) . k^r_d`` is linear
in the query's residual alone and the ``p2c`` term linear in the key's alone, a learned per-head,
per-distance preference (like the bias terms of :func:`mechir.circuits.qk_bias_terms`);
:func:`position_terms` returns their vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.models.attention import AttentionTerms
from mechir.models.bert import attention_weights, block_weights, head_weights
from mechir.models.encoder import (
    CrossEncoderPooler,
    EncoderShape,
    EncoderSpec,
    HookAwareLayerNorm,
    HookedCrossEncoder,
    entry_points,
)
from mechir.models.tl import (
    Attention,
    BertBlock,
    Embed,
    HookedTransformerConfig,
    HookPoint,
    TypedModuleList,
)
from mechir.parts import BERT_LAYOUT

#: Activations of the DeBERTa FFN (Hugging Face ``ACT2FN`` names TransformerLens also has).
DEBERTA_ACTIVATIONS = ("gelu", "relu", "silu", "gelu_new")
#: Activations of the ContextPooler mechir's pooler can apply.
POOLER_ACTIVATIONS = tuple(CrossEncoderPooler.ACTIVATIONS)


@dataclass(frozen=True)
class DebertaShape:
    """What DeBERTa's disentangled attention adds to :class:`EncoderShape`."""

    version: Literal[1, 2]
    relative: bool  #: relative_attention: the position terms are added
    c2p: bool  #: content -> position term (``"c2p"`` in pos_att_type, with relative)
    p2c: bool  #: position -> content term
    scale_factor: int  #: scores are divided by sqrt(d_head * scale_factor)
    span: int  #: relative table rows: 2 span
    buckets: int  #: position_buckets (<= 0: no log buckets)
    max_relative_positions: int
    share_att_key: bool  #: position keys/queries use W_K/W_Q (DeBERTa-v3)
    rel_norm: bool  #: the relative table is layer-normed (norm_rel_ebd "layer_norm")
    position_biased_input: bool  #: absolute position embedding added to the input
    head_activation: str  #: pooler_hidden_act


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise ValueError(f"{what}: mechir does not support it; load another DeBERTa checkpoint")


def _deberta_config(config: Any) -> EncoderShape:
    """DebertaV2Config / DebertaConfig -> :class:`EncoderShape` with a :class:`DebertaShape`.

    Raises:
        ValueError: a setting mechir does not support (one line naming it).
    """
    version = 2 if config.model_type == "deberta-v2" else 1
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    _refuse(
        getattr(config, "conv_kernel_size", 0) > 0,
        f"conv_kernel_size {getattr(config, 'conv_kernel_size', 0)} (DeBERTa-v2's convolution "
        "layer after block 0, used by the xlarge/xxlarge checkpoints)",
    )
    _refuse(getattr(config, "talking_head", False), "talking_head (DeBERTa-v1 talking heads)")
    head_size = getattr(config, "attention_head_size", None)
    _refuse(
        head_size is not None and head_size * n_heads != d_model,
        f"attention_head_size {head_size} with {n_heads} heads != hidden_size {d_model}",
    )
    pooler = getattr(config, "pooler_hidden_size", d_model)
    _refuse(pooler != d_model, f"pooler_hidden_size {pooler} != hidden_size {d_model}")
    act = config.hidden_act
    _refuse(
        act not in DEBERTA_ACTIVATIONS, f"hidden_act {act!r} (supported: {DEBERTA_ACTIVATIONS})"
    )
    head_act = getattr(config, "pooler_hidden_act", "gelu")
    _refuse(
        head_act not in POOLER_ACTIVATIONS,
        f"pooler_hidden_act {head_act!r} (supported: {POOLER_ACTIVATIONS})",
    )
    pos_att_type = config.pos_att_type or []
    if isinstance(pos_att_type, str):  # older configs: "c2p|p2c"
        pos_att_type = [x.strip() for x in pos_att_type.lower().split("|")]
    relative = bool(getattr(config, "relative_attention", False))
    max_rel = getattr(config, "max_relative_positions", -1)
    if max_rel < 1:
        max_rel = config.max_position_embeddings
    buckets = getattr(config, "position_buckets", -1) if version == 2 else -1
    if version == 2:
        scale_factor = 1 + ("c2p" in pos_att_type) + ("p2c" in pos_att_type)
        rel_norm = "layer_norm" in [
            x.strip()
            for x in (getattr(config, "norm_rel_ebd", "none") or "none").lower().split("|")
        ]
    else:
        scale_factor, rel_norm = 1 + len(pos_att_type), False
    deberta = DebertaShape(
        version=version,
        relative=relative,
        c2p=relative and "c2p" in pos_att_type,
        p2c=relative and "p2c" in pos_att_type,
        scale_factor=scale_factor,
        span=buckets if buckets > 0 else max_rel,
        buckets=buckets,
        max_relative_positions=max_rel,
        share_att_key=version == 2 and bool(getattr(config, "share_att_key", False)),
        rel_norm=rel_norm,
        position_biased_input=bool(getattr(config, "position_biased_input", True)),
        head_activation=head_act,
    )
    return EncoderShape(
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_positions=config.max_position_embeddings,
        d_vocab=config.vocab_size,
        eps=config.layer_norm_eps,
        act_fn=act,
        n_token_types=config.type_vocab_size,
        d_embed=getattr(config, "embedding_size", None) or d_model,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        extra=deberta,
    )


# ------------------------------------------------------------------------------ positions
def log_bucket_position(
    relative: Int[Tensor, "..."], bucket_size: int, max_position: int
) -> Int[Tensor, "..."]:
    """DeBERTa-v2's log buckets of relative positions ``r`` (Hugging Face's
    ``make_log_bucket_position``, computed the same way, float32 logarithms included)::

        bucket(r) = r                                                    if |r| <= mid
                  = sign(r) (mid + ceil(log(|r| / mid) / log((max_position - 1) / mid)
                                        * (mid - 1)))                    otherwise

    with ``mid = bucket_size // 2``: exact near the token, logarithmic far from it."""
    sign = torch.sign(relative)
    mid = bucket_size // 2
    abs_pos = torch.where(
        (relative < mid) & (relative > -mid),
        torch.tensor(mid - 1).type_as(relative),
        torch.abs(relative),
    )
    log_pos = (
        torch.ceil(
            torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)
        )
        + mid
    )
    return torch.where(abs_pos <= mid, relative.type_as(log_pos), log_pos * sign).long()


def relative_position_index(
    n_query: int, n_key: int, *, span: int, buckets: int, max_position: int, device: Any = None
) -> tuple[Int[Tensor, "query key"], Int[Tensor, "key query"]]:
    """Rows of the relative-embedding table read by the ``c2p`` and ``p2c`` terms of queries at
    positions ``0..n_query-1`` and keys at ``0..n_key-1``, as Hugging Face builds them:

    * ``c2p[i, j] = clamp(bucket(i - j) + span, 0, 2 span - 1)`` (the key row of query ``i``),
    * ``p2c[j, i] = clamp(-bucket(j - i) + span, 0, 2 span - 1)`` (the query row of key ``j``,
      indexed key first, as HF gathers it before transposing).

    ``bucket`` is :func:`log_bucket_position` when ``buckets > 0``, else the identity.
    """

    def bucket(rel: Tensor) -> Tensor:
        return log_bucket_position(rel, buckets, max_position) if buckets > 0 else rel

    q_ids = torch.arange(n_query, device=device)
    k_ids = torch.arange(n_key, device=device)
    c2p = torch.clamp(bucket(q_ids[:, None] - k_ids[None, :]) + span, 0, 2 * span - 1)
    p2c = torch.clamp(-bucket(k_ids[:, None] - q_ids[None, :]) + span, 0, 2 * span - 1)
    return c2p, p2c


@dataclass(frozen=True)
class RelativeRows:
    """Table rows ``lo..hi-1`` used by an input, and each (query, key) pair's row minus ``lo``."""

    lo: int
    hi: int
    c2p: Int[Tensor, "query key"]
    p2c: Int[Tensor, "key query"]


class RelativeEmbedding(nn.Module):
    """The relative-position table shared by every layer: ``W_rel`` ``[2 span, d_model]``, layer
    normed (``LN(W_rel)``, weights ``w``, ``b``) when the config says so. No hook points: it
    does not depend on the input."""

    _CACHE = 64

    def __init__(self, cfg: HookedTransformerConfig, deberta: DebertaShape, eps: float):
        super().__init__()
        self.deberta = deberta
        self.W_rel = nn.Parameter(torch.empty(2 * deberta.span, cfg.d_model, dtype=cfg.dtype))
        if deberta.rel_norm:
            self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
            self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.eps = eps
        self._rows: dict[tuple[int, int, str], RelativeRows] = {}

    def rows(self, n_query: int, n_key: int, device: torch.device) -> RelativeRows:
        """The rows queries ``0..n_query-1`` and keys ``0..n_key-1`` read (cached per shape; the
        cache is only read whole or replaced, so threads scoring at once never break it)."""
        key = (n_query, n_key, str(device))
        rows = self._rows.get(key)
        if rows is None:
            d = self.deberta
            c2p, p2c = relative_position_index(
                n_query,
                n_key,
                span=d.span,
                buckets=d.buckets,
                max_position=d.max_relative_positions,
                device=device,
            )
            lo = int(min(c2p.min(), p2c.min()))
            hi = int(max(c2p.max(), p2c.max())) + 1
            rows = RelativeRows(lo, hi, c2p - lo, p2c - lo)
            if len(self._rows) >= self._CACHE:
                self._rows = {}
            self._rows[key] = rows
        return rows

    def table(self, lo: int = 0, hi: int | None = None) -> Float[Tensor, "rows d_model"]:
        """Rows ``lo..hi-1`` of the (normed) table; the norm is per row, so a slice is exact."""
        rows = self.W_rel[lo:hi]
        if not self.deberta.rel_norm:
            return rows
        return nn.functional.layer_norm(rows, (rows.shape[-1],), self.w, self.b, self.eps)


class DisentangledAttention(Attention, AttentionTerms):
    """DeBERTa's disentangled self-attention with TransformerLens's parameters (``W_Q``, ``b_Q``,
    ... ``[head, d_model, d_head]``) and hook points, and one hook point per score term (see the
    module docstring)::

        hook_attn_scores = hook_c2c_scores + hook_c2p_scores + hook_p2c_scores + mask

    Split q/k/v inputs (``use_split_qkv_input``) work as in TransformerLens; given ``n`` query
    rows (``run_block(cls_only=True)``) the queries are positions ``0..n-1``."""

    def __init__(
        self, cfg: HookedTransformerConfig, deberta: DebertaShape, relative: RelativeEmbedding
    ):
        super().__init__(cfg)
        self.deberta = deberta
        self.attn_scale = float(
            torch.sqrt(torch.tensor(cfg.d_head * deberta.scale_factor, dtype=torch.float))
        )
        self.hook_c2c_scores = HookPoint()
        if deberta.relative:
            self.__dict__["relative"] = relative  # shared by every layer: not a submodule here
        h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
        if deberta.relative and not deberta.share_att_key:
            for name, present in (("K", deberta.c2p), ("Q", deberta.p2c)):
                if present:
                    w = nn.Parameter(torch.empty(h, m, d, dtype=cfg.dtype))
                    setattr(self, f"W_{name}_pos", w)
                    setattr(self, f"b_{name}_pos", nn.Parameter(torch.zeros(h, d, dtype=cfg.dtype)))
        if deberta.c2p:
            self.hook_c2p_scores = HookPoint()
        if deberta.p2c:
            self.hook_p2c_scores = HookPoint()

    # ------------------------------------------------------------------ position terms
    def position_projection(
        self, which: Literal["q", "k"], lo: int = 0, hi: int | None = None
    ) -> Float[Tensor, "rows head d_head"]:
        """``q^r`` (``"q"``) or ``k^r`` (``"k"``) of table rows ``lo..hi-1``."""
        name = which.upper()
        shared = self.deberta.share_att_key
        w = getattr(self, f"W_{name}" if shared else f"W_{name}_pos")
        b = getattr(self, f"b_{name}" if shared else f"b_{name}_pos")
        table = self.relative.table(lo, hi).to(w.dtype)
        return torch.einsum("rm,hmd->rhd", table, w) + b

    def c2p_scores(
        self, q: Float[Tensor, "batch query head d_head"], rows: RelativeRows
    ) -> Float[Tensor, "batch head query key"]:
        """``q_i . k^r_{c2p[i, j]} / s`` (linear in ``q``)."""
        pos_k = self.position_projection("k", rows.lo, rows.hi).to(q.dtype)
        full = torch.einsum("bqhd,rhd->bhqr", q, pos_k)
        index = rows.c2p[None, None].expand(*full.shape[:3], -1)
        return torch.gather(full, -1, index) / self.attn_scale

    def p2c_scores(
        self, k: Float[Tensor, "batch key head d_head"], rows: RelativeRows
    ) -> Float[Tensor, "batch head query key"]:
        """``k_j . q^r_{p2c[j, i]} / s`` (linear in ``k``)."""
        pos_q = self.position_projection("q", rows.lo, rows.hi).to(k.dtype)
        full = torch.einsum("bkhd,rhd->bhkr", k, pos_q)
        index = rows.p2c[None, None].expand(*full.shape[:3], -1)
        return torch.gather(full, -1, index).transpose(-1, -2) / self.attn_scale

    def qk_score_delta(
        self,
        which: Literal["q", "k"],
        q: Float[Tensor, "batch query head d_head"],
        k: Float[Tensor, "batch key head d_head"],
        delta: Float[Tensor, "batch pos head d_head"],
    ) -> Float[Tensor, "batch head query key"]:
        """Change of ``hook_attn_scores`` when ``hook_q`` (``which="q"``) or ``hook_k`` changes
        by ``delta``: exact, the scores being linear in ``q`` and in ``k`` (content term plus
        ``c2p`` for queries, ``p2c`` for keys); used by attribution patching (AtP*)."""
        if which == "q":
            out = torch.einsum("bqhd,bkhd->bhqk", delta, k) / self.attn_scale
            if self.deberta.c2p:
                out = out + self.c2p_scores(
                    delta, self.relative.rows(delta.shape[1], k.shape[1], delta.device)
                )
        else:
            out = torch.einsum("bqhd,bkhd->bhqk", q, delta) / self.attn_scale
            if self.deberta.p2c:
                out = out + self.p2c_scores(
                    delta, self.relative.rows(q.shape[1], delta.shape[1], delta.device)
                )
        return out

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
        """``softmax(c2c + c2p + p2c + mask) v W_O + b_O`` (see the class docstring)."""
        if past_kv_cache_entry is not None or position_bias is not None:
            raise ValueError("DeBERTa attention takes no key/value cache or position bias")
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        scores = self.hook_c2c_scores(
            torch.einsum("bqhd,bkhd->bhqk", q, k) / self.attn_scale
        )  # [batch, head, query_pos, key_pos]
        if self.deberta.c2p or self.deberta.p2c:
            rows = self.relative.rows(q.shape[1], k.shape[1], q.device)
            if self.deberta.c2p:
                scores = scores + self.hook_c2p_scores(self.c2p_scores(q, rows))
            if self.deberta.p2c:
                scores = scores + self.hook_p2c_scores(self.p2c_scores(k, rows))
        if additive_attention_mask is not None:
            scores = scores + additive_attention_mask
        scores = self.hook_attn_scores(scores)
        pattern = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        pattern = self.hook_pattern(pattern).to(dtype=v.dtype)
        z = self.calculate_z_scores(v, pattern)  # [batch, pos, head, d_head], hook_z
        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bqhd,hdm->bqhm", z, self.W_O))
            return result.sum(-2) + self.b_O
        w_o = self.W_O.reshape(-1, self.cfg.d_model).T.contiguous()  # [d_model, head * d_head]
        return nn.functional.linear(z.reshape(*z.shape[:2], -1), w_o, self.b_O)


class DebertaEmbed(nn.Module):
    """``LN((W_E[t] + W_pos[i] + W_tt[type]) W_proj)``: the absolute position embedding only when
    ``position_biased_input`` (DeBERTa-v2 checkpoints of v3 have none), the token-type embedding
    only when ``type_vocab_size > 0``, the projection (no bias, ``embed.hook_embed_proj``) only
    when ``embedding_size != hidden_size``. Same parameter and hook names as BERT's.

    Attributes:
        absolute_positions: whether ``pos_embed`` (absolute positions) is there.
        n_token_types: rows of the token-type embedding (0: none).
    """

    def __init__(self, cfg: HookedTransformerConfig, shape: EncoderShape):
        super().__init__()
        deberta: DebertaShape = shape.extra
        e = shape.d_embed
        self.embed = Embed(cfg)
        self.embed.W_E = nn.Parameter(torch.empty(cfg.d_vocab, e, dtype=cfg.dtype))
        self.hook_embed = HookPoint()
        if deberta.position_biased_input:
            self.pos_embed = nn.Module()
            self.pos_embed.W_pos = nn.Parameter(torch.empty(shape.n_positions, e, dtype=cfg.dtype))
            self.hook_pos_embed = HookPoint()
        self.absolute_positions = deberta.position_biased_input
        self.n_token_types = shape.n_token_types
        if shape.n_token_types > 0:
            self.token_type_embed = nn.Module()
            self.token_type_embed.W_token_type = nn.Parameter(
                torch.empty(shape.n_token_types, e, dtype=cfg.dtype)
            )
            self.hook_token_type_embed = HookPoint()
        self.projected = e != cfg.d_model
        if self.projected:
            self.W_proj = nn.Parameter(torch.empty(e, cfg.d_model, dtype=cfg.dtype))
            self.hook_embed_proj = HookPoint()
        self.ln = HookAwareLayerNorm(cfg)
        self.pad_token_id = shape.pad_token_id
        self.position_offset = 0

    def position_ids(self, input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Absolute position of every token: ``0..n-1`` (padding is on the right)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def _finish(self, x: Float[Tensor, "batch pos d_embed"]) -> Float[Tensor, "batch pos d_model"]:
        if self.projected:
            x = self.hook_embed_proj(x @ self.W_proj)
        return self.ln(x)

    def token_states(
        self, token_ids: Int[Tensor, " n"], *, token_type: int = 0, position: int | None = None
    ) -> Float[Tensor, "n d_model"]:
        """What ``hook_full_embed`` holds for these tokens of segment ``token_type`` at position
        ``position`` (None, or a model without absolute positions: no position embedding)."""
        x = self.embed.W_E[token_ids]
        if self.n_token_types:
            types = self.token_type_embed.W_token_type
            x = x + types[min(token_type, types.shape[0] - 1)]
        if position is not None and self.absolute_positions:
            x = x + self.pos_embed.W_pos[position]
        return self._finish(x[None])[0]

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_embed(self.embed(input_ids))
        if self.absolute_positions:
            x = x + self.hook_pos_embed(self.pos_embed.W_pos[self.position_ids(input_ids)])
        if self.n_token_types:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.hook_token_type_embed(self.token_type_embed.W_token_type[token_type_ids])
        return self._finish(x)


def _body(model: HookedCrossEncoder, cfg: HookedTransformerConfig, shape: EncoderShape) -> None:
    """DeBERTa's embedding, relative table, BERT blocks with disentangled attention, pooler."""
    deberta = shape.extra
    if not isinstance(deberta, DebertaShape):
        raise ValueError("DeBERTa needs an EncoderShape whose .extra is its DebertaShape")
    model.embed = DebertaEmbed(cfg, shape)
    relative = RelativeEmbedding(cfg, deberta, shape.eps)
    if deberta.relative:
        model.rel_embed = relative
    blocks = []
    for _ in range(cfg.n_layers):
        block = BertBlock(cfg)
        block.ln1, block.ln2 = HookAwareLayerNorm(cfg), HookAwareLayerNorm(cfg)
        block.attn = DisentangledAttention(cfg, deberta, relative)
        blocks.append(block)
    model.blocks = TypedModuleList(blocks)
    model.pooler = CrossEncoderPooler(cfg, deberta.head_activation)


# ------------------------------------------------------------------------------ state dict
_SPLIT_IN = "(h d) m -> h m d"


def _position_weights(sd: dict, p: str, name: str, lin: Any, n_heads: int) -> None:
    sd[f"{p}.attn.W_{name}_pos"] = einops.rearrange(lin.weight, _SPLIT_IN, h=n_heads)
    bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(len(lin.weight))
    sd[f"{p}.attn.b_{name}_pos"] = einops.rearrange(bias, "(h d) -> h d", h=n_heads)


def _v1_attention(sd: dict, p: str, s: Any, o: Any, n_heads: int) -> None:
    """DeBERTa-v1's fused ``in_proj`` (rows per head: q, k, v), ``q_bias``, ``v_bias``."""
    w = s.in_proj.weight.view(n_heads, 3, -1, s.in_proj.weight.shape[-1])  # [h, 3, d, m]
    for j, name in enumerate("QKV"):
        sd[f"{p}.attn.W_{name}"] = w[:, j].transpose(1, 2)
    sd[f"{p}.attn.b_Q"] = s.q_bias.view(n_heads, -1)
    sd[f"{p}.attn.b_K"] = s.q_bias.new_zeros(n_heads, w.shape[2])
    sd[f"{p}.attn.b_V"] = s.v_bias.view(n_heads, -1)
    sd[f"{p}.attn.W_O"] = einops.rearrange(o.weight, "m (h d) -> h d m", h=n_heads)
    sd[f"{p}.attn.b_O"] = o.bias


def _deberta_state_dict(hf: Any, n_heads: int) -> dict[str, Tensor]:
    """Hugging Face ``DebertaV2ForSequenceClassification`` / ``DebertaForSequenceClassification``
    -> mechir names."""
    shape = _deberta_config(hf.config)
    deberta: DebertaShape = shape.extra
    emb, enc = hf.deberta.embeddings, hf.deberta.encoder
    sd: dict[str, Tensor] = {"embed.embed.W_E": emb.word_embeddings.weight}
    if emb.position_embeddings is not None:
        sd["embed.pos_embed.W_pos"] = emb.position_embeddings.weight
    if emb.token_type_embeddings is not None:
        sd["embed.token_type_embed.W_token_type"] = emb.token_type_embeddings.weight
    if emb.embed_proj is not None:
        sd["embed.W_proj"] = emb.embed_proj.weight.T
    sd["embed.ln.w"], sd["embed.ln.b"] = emb.LayerNorm.weight, emb.LayerNorm.bias
    if deberta.relative:
        sd["rel_embed.W_rel"] = enc.rel_embeddings.weight
        if deberta.rel_norm:
            sd["rel_embed.w"], sd["rel_embed.b"] = enc.LayerNorm.weight, enc.LayerNorm.bias
    for i, layer in enumerate(enc.layer):
        att, p = layer.attention, f"blocks.{i}"
        s = att.self
        if deberta.version == 2:
            attention_weights(
                sd, i, s.query_proj, s.key_proj, s.value_proj, att.output.dense, n_heads
            )
            if deberta.relative and not deberta.share_att_key:
                if deberta.c2p:
                    _position_weights(sd, p, "K", s.pos_key_proj, n_heads)
                if deberta.p2c:
                    _position_weights(sd, p, "Q", s.pos_query_proj, n_heads)
        else:
            _v1_attention(sd, p, s, att.output.dense, n_heads)
            if deberta.c2p:
                _position_weights(sd, p, "K", s.pos_proj, n_heads)
            if deberta.p2c:
                _position_weights(sd, p, "Q", s.pos_q_proj, n_heads)
        block_weights(
            sd,
            i,
            att.output.LayerNorm,
            layer.intermediate.dense,
            layer.output.dense,
            layer.output.LayerNorm,
        )
    head_weights(sd, hf.pooler.dense, hf.classifier)
    return sd


# ------------------------------------------------------------------------------ circuits
def position_terms(model: HookedCrossEncoder, layer: int) -> dict[str, Tensor]:
    """The position terms of layer ``layer``'s heads as vectors in the residual stream.

    For table row ``r`` (``relative_position_index`` gives the row of each query/key pair):

    - ``c2p_query`` ``[head, rows, d_model]`` ``= W_Q k^r_r``: the ``c2p`` score of a query with
      residual ``x`` is ``(x . c2p_query[h, r] + c2p_bias[h, r]) / s``;
    - ``c2p_bias`` ``[head, rows] = b_Q . k^r_r``;
    - ``p2c_key`` ``[head, rows, d_model]`` ``= W_K q^r_r`` and ``p2c_bias = b_K . q^r_r``: the
      ``p2c`` score of a key with residual ``x`` is ``(x . p2c_key[h, r] + p2c_bias[h, r]) / s``.

    Only the terms the model has are returned (none without relative attention).
    """
    attn = model.blocks[layer].attn
    if not isinstance(attn, DisentangledAttention):
        raise ValueError(f"{model.family.name} has no disentangled attention (DeBERTa only)")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        if attn.deberta.c2p:
            pos_k = attn.position_projection("k")  # [rows, head, d_head]
            out["c2p_query"] = torch.einsum("hmd,rhd->hrm", attn.W_Q, pos_k)
            out["c2p_bias"] = torch.einsum("hd,rhd->hr", attn.b_Q, pos_k)
        if attn.deberta.p2c:
            pos_q = attn.position_projection("q")
            out["p2c_key"] = torch.einsum("hmd,rhd->hrm", attn.W_K, pos_q)
            out["p2c_bias"] = torch.einsum("hd,rhd->hr", attn.b_K, pos_q)
    return out


SPEC = EncoderSpec(
    layout=BERT_LAYOUT,
    encoder_config=_deberta_config,
    state_dict=_deberta_state_dict,
    head_keys=("pooler.", "classifier."),
    positions="relative",
    head_activation="gelu",  # the default; the checkpoint's pooler_hidden_act is used
    blocks="post_ln",
    body=_body,
)

__all__ = [
    "SPEC",
    "DebertaShape",
    "DisentangledAttention",
    "RelativeEmbedding",
    "dimensions",
    "load",
    "log_bucket_position",
    "position_terms",
    "relative_position_index",
]

load, dimensions = entry_points(SPEC)
