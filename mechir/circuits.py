"""QK circuits of attention heads: thin SVDs, alignment scores, singular directions, bias terms.

For a head with query/key weights ``W_Q, W_K`` (``d_model x d_head``) and biases ``b_Q, b_K``
(``d_head``), the pre-softmax attention score from a query-side residual ``x_q`` (row vector) to a
key-side residual ``x_k`` is::

    score(x_q, x_k) = (x_q W_Q + b_Q) . (x_k W_K + b_K) / sqrt(d_head)
                    = [ x_q W_QK x_k^T             bilinear part, W_QK = W_Q W_K^T
                      + x_k . (W_K b_Q)            key bias: query-independent key preference
                      + x_q . (W_Q b_K)            query bias: constant over keys
                      + b_Q . b_K ] / sqrt(d_head) constant

Only the first two terms vary across keys for a fixed query, so only they shape the attention
pattern (the softmax over keys ignores the rest). ``W_QK`` alone therefore leaves out the
*key bias* ``w_key = W_K b_Q`` (``d_model``), a direction every query "looks for" regardless of
its own content; it is exposed here by :func:`qk_bias_terms`.

``W_QK`` is ``d_model x d_model`` but has rank at most ``d_head``. Its nonzero spectrum is computed
without materialising it (:func:`factored_svd`): with thin QR factorisations ``W_Q = Q_a R_a`` and
``W_K = Q_b R_b``::

    W_Q W_K^T = Q_a (R_a R_b^T) Q_b^T,   R_a R_b^T = U_m diag(S) V_m^T   (d_head x d_head)
    =>  U = Q_a U_m,  V = Q_b V_m

for all heads of all layers in one batched call. In the singular basis
``x_q W_QK x_k^T = sum_k S_k (x_q . u_k)(x_k . v_k)``: direction ``k`` makes a query whose residual
lies along ``u_k`` attend to keys along ``v_k``. When ``u_k`` and ``v_k`` point the same way
(``u_k . v_k > 0``) the head attends from a token to tokens *like itself*, the signature of a
matching head; :func:`qk_alignment` scores how much of a head's spectrum does so.

**QK-norm (Qwen3).** Queries and keys are RMS-normalized per head (``q' = q / rms(q) * w_q``),
so the circuit is ``W_Q diag(w_q * w_k) W_K^T`` (``model.QK`` folds the norm weights in): the
score's bilinear form up to the positive per-token factor ``1 / (rms(q) rms(k))``.

**Grouped-query attention.** ``W_K`` has one matrix per key/value head, shared by a group of
query heads; ``model.W_K`` repeats it for every query head, so each head's circuit is its own
``W_Q`` with its group's ``W_K``.

**Rotary models (ModernBERT, LLM rerankers).** There the score is ``(R_i q_i) . (R_j k_j)``
with ``R_p`` the rotation of position ``p``, so the bilinear form between positions ``i`` and
``j`` is ``W_Q R_{j-i} W_K^T``, not ``W_Q W_K^T``. Everything here reads ``W_Q W_K^T``, i.e.
the QK circuit at **relative distance 0** (``R_0 = I``), a position-free reading of the head's
content matching; at other distances each 2-d rotary plane is turned by ``(j - i) theta_k``.
The bias terms likewise hold at distance 0 only. :func:`token_embeddings` of a rotary model
ignores ``position``.

**Disentangled attention (DeBERTa).** The scores are ``(c2c + c2p + p2c) / sqrt(d_head * f)``
(``f`` = 1 + the number of position terms): the content term ``c2c`` is
``(x_q W_Q + b_Q) . (x_k W_K + b_K)`` at every distance, so ``W_QK`` here is DeBERTa's content
QK circuit exactly (only its scale differs). The position terms are not in ``W_QK``: ``c2p`` is
``(x_q W_Q + b_Q) . k^r_d`` and ``p2c`` ``(x_k W_K + b_K) . q^r_d`` for the relative-distance
row ``d`` of the pair, each linear in one residual, a per-head, per-distance preference like
the bias terms; :func:`mechir.models.deberta.position_terms` gives their vectors. DeBERTa-v3
has no absolute position embedding: :func:`token_embeddings` ignores ``position`` there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechir.display import describe
from mechir.interface import HookedReranker
from mechir.parts import PARTS, CrossEncoderBatch, Part
from mechir.selection import HeadLike, check_layer, head_label, select_heads, select_layers

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens import FactoredMatrix

__all__ = [
    "QKSVD",
    "factored_svd",
    "mean_part_residuals",
    "qk_alignment",
    "qk_alignment_from_svd",
    "qk_bias_terms",
    "qk_svd",
    "qk_svd_reference",
    "singular_direction_part_cosines",
    "singular_direction_tokens",
    "token_embeddings",
    "top_tokens",
]


# ---------------------------------------------------------------------------- decompositions
@dataclass(frozen=True)
class QKSVD:
    """Thin SVD ``W_QK[l, h] = U diag(S) V^T`` of every head, singular values descending.

    Attributes:
        U: left singular vectors (query side) as columns, ``[n_layers, n_heads, d_model, rank]``.
        S: singular values, ``[n_layers, n_heads, rank]`` with ``rank = d_head``.
        V: right singular vectors (key side) as columns, ``[n_layers, n_heads, d_model, rank]``.

    Signs: each pair ``(u_k, v_k)`` is defined up to a joint sign flip; the convention here makes
    the largest-magnitude entry of ``u_k`` positive. Quantities such as ``u_k . v_k``, ``S_k`` or
    ``(x . u_k)(y . v_k)`` do not depend on it.
    """

    U: Float[Tensor, "n_layers n_heads d_model rank"]
    S: Float[Tensor, "n_layers n_heads rank"]
    V: Float[Tensor, "n_layers n_heads d_model rank"]

    def __repr__(self) -> str:
        n_layers, n_heads, d_model, rank = self.U.shape
        return (
            f"QKSVD({n_layers} layers x {n_heads} heads, d_model {d_model}, rank {rank}; "
            f"U={describe(self.U)}, S={describe(self.S)}, V={describe(self.V)})"
        )

    @property
    def rank(self) -> int:
        """Number of singular triplets per head (``d_head``: the maximal rank of ``W_QK``)."""
        return self.S.shape[-1]

    def top(self, k: int) -> QKSVD:
        """The ``k`` leading singular triplets of every head."""
        _check_k(k, self.rank)
        return QKSVD(self.U[..., :k], self.S[..., :k], self.V[..., :k])

    def head(
        self, layer: int, head: int
    ) -> tuple[
        Float[Tensor, "d_model rank"], Float[Tensor, " rank"], Float[Tensor, "d_model rank"]
    ]:
        """``(U, S, V)`` of one head."""
        return self.U[layer, head], self.S[layer, head], self.V[layer, head]


def _check_k(k: int | None, rank: int) -> None:
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > rank:
        raise ValueError(
            f"k={k} exceeds the rank of W_QK: a head's QK matrix has at most d_head={rank} "
            f"nonzero singular values; pass k <= {rank}"
        )


def _canonical_signs(
    U: Float[Tensor, "... d rank"], V: Float[Tensor, "... d rank"]
) -> tuple[Tensor, Tensor]:
    """Flip each ``(u_k, v_k)`` jointly so that the largest-|.| entry of ``u_k`` is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def factored_svd(
    matrix: FactoredMatrix, *, dtype: torch.dtype | None = None
) -> tuple[
    Float[Tensor, "*batch ldim mdim"],
    Float[Tensor, "*batch mdim"],
    Float[Tensor, "*batch rdim mdim"],
]:
    """Thin SVD of a TransformerLens ``FactoredMatrix`` ``AB`` without forming ``AB``.

    With thin QR factorisations ``A = Q_a R_a`` and ``B^T = Q_b R_b``::

        A B = Q_a (R_a R_b^T) Q_b^T,   R_a R_b^T = U_m diag(S) V_m^T
        =>  A B = (Q_a U_m) diag(S) (Q_b V_m)^T

    Cost per matrix ``O((ldim + rdim) mdim^2 + mdim^3)`` instead of ``O(ldim rdim min(ldim, rdim))``
    for an SVD of the product. All leading (batch) dimensions are decomposed in one call.

    Args:
        matrix: ``A [*batch, ldim, mdim] @ B [*batch, mdim, rdim]`` (e.g. ``model.QK``).
        dtype: computation dtype; default the factors' dtype promoted to at least float32.

    Returns:
        ``(U, S, V)`` with ``A @ B == U @ diag(S) @ V^T``, ``S`` descending,
        ``min(ldim, mdim, rdim)`` triplets (the maximal rank of ``AB``).
    """
    A, B = matrix.A, matrix.B
    if dtype is None:
        dtype = torch.promote_types(A.dtype, torch.float32)
    qa, ra = torch.linalg.qr(A.to(dtype))  # [*, l, m'], [*, m', m]
    qb, rb = torch.linalg.qr(B.transpose(-2, -1).to(dtype))  # [*, r, m''], [*, m'', m]
    um, s, vmh = torch.linalg.svd(ra @ rb.transpose(-2, -1), full_matrices=False)
    return qa @ um, s, qb @ vmh.transpose(-2, -1)


def qk_svd(model: HookedReranker, *, dtype: torch.dtype | None = None) -> QKSVD:
    """Thin SVD of ``W_QK = W_Q W_K^T`` for every head (``model.QK``), in one batched call.

    See :func:`factored_svd` for the algorithm; ``d_model x d_model`` matrices are never formed.
    Biases are not part of ``W_QK``; see :func:`qk_bias_terms`.
    """
    with torch.no_grad():
        U, S, V = factored_svd(model.QK, dtype=dtype)
        U, V = _canonical_signs(U, V)
    return QKSVD(U, S, V)


def qk_svd_reference(model: HookedReranker, *, dtype: torch.dtype | None = None) -> QKSVD:
    """Naive reference for :func:`qk_svd`: materialise each ``W_Q W_K^T`` (the factors of
    ``model.QK``, which for QK-norm models fold in the norm weights) and call
    ``torch.linalg.svd`` head by head, keeping the ``d_head`` leading triplets."""
    with torch.no_grad():
        qk = model.QK
        W_Q, W_Kt = qk.A.detach(), qk.B.detach()
    dtype = dtype or torch.promote_types(W_Q.dtype, torch.float32)
    n_layers, n_heads, _, d_head = W_Q.shape
    Us, Ss, Vs = [], [], []
    for layer in range(n_layers):
        for h in range(n_heads):
            full = W_Q[layer, h].to(dtype) @ W_Kt[layer, h].to(dtype)
            u, s, vh = torch.linalg.svd(full)
            Us.append(u[:, :d_head])
            Ss.append(s[:d_head])
            Vs.append(vh[:d_head].T)
    shape = (n_layers, n_heads)
    U = torch.stack(Us).reshape(*shape, *Us[0].shape)
    V = torch.stack(Vs).reshape(*shape, *Vs[0].shape)
    U, V = _canonical_signs(U, V)
    return QKSVD(U, torch.stack(Ss).reshape(*shape, d_head), V)


# ---------------------------------------------------------------------------- scores
def _head_frame(n_layers: int, n_heads: int) -> pd.DataFrame:
    layers = [layer for layer in range(n_layers) for _ in range(n_heads)]
    heads = [h for _ in range(n_layers) for h in range(n_heads)]
    return pd.DataFrame(
        {"layer": layers, "head": heads, "label": [head_label(a, b) for a, b in zip(layers, heads)]}
    )


def qk_alignment_from_svd(svd: QKSVD, *, k: int | None = None) -> pd.DataFrame:
    """Alignment scores of every head from its QK SVD, as a tidy table (one row per head).

    With ``c_k = cos(u_k, v_k) = u_k . v_k`` (unit singular vectors) the columns are:

    - ``alignment = sum_k S_k c_k`` (``= trace(W_Q W_K^T)``, the sum of ``x W_QK x^T`` over an
      orthonormal basis: how much a token attends to itself / to tokens like itself);
    - ``alignment_pos = sum_k S_k max(0, c_k)`` (only the directions that match like with like);
    - ``*_norm``: the same divided by ``sigma_sum = sum_k S_k`` (a weighted mean cosine in
      ``[-1, 1]`` resp. ``[0, 1]``, comparable across heads of different scale);
    - with ``k``: ``alignment_topk``, ``alignment_pos_topk`` and their ``*_norm`` (divided by
      ``sum_{j<k} S_j``) over the ``k`` leading directions only.

    Also ``sigma_1`` (largest singular value, the spectral norm of ``W_QK``), ``sigma_sum``
    (nuclear norm) and ``rank`` (singular values above ``1e-6 * sigma_1``). The ``*_norm``
    scores of an all-zero head are NaN.
    """
    _check_k(k, svd.rank)
    S = svd.S
    cos = (svd.U * svd.V).sum(-2)  # [L, H, rank]; unit vectors, so dot = cosine

    def scores(s: Tensor, c: Tensor, suffix: str) -> dict[str, Tensor]:
        total = s.sum(-1)
        align, pos = (s * c).sum(-1), (s * c.clamp(min=0)).sum(-1)
        return {
            f"alignment{suffix}": align,
            f"alignment{suffix}_norm": align / total,
            f"alignment_pos{suffix}": pos,
            f"alignment_pos{suffix}_norm": pos / total,
        }

    cols: dict[str, Tensor] = {
        "rank": (S > 1e-6 * S[..., :1]).sum(-1),
        "sigma_1": S[..., 0],
        "sigma_sum": S.sum(-1),
        **scores(S, cos, ""),
    }
    if k is not None:
        cols["k"] = torch.full_like(cols["rank"], k)
        cols |= scores(S[..., :k], cos[..., :k], "_topk")
    n_layers, n_heads = S.shape[:2]
    frame = _head_frame(n_layers, n_heads)
    for name, value in cols.items():
        frame[name] = value.detach().reshape(-1).cpu().numpy()
    return frame


def qk_alignment(
    model: HookedReranker, *, k: int | None = None, dtype: torch.dtype | None = None
) -> pd.DataFrame:
    """QK alignment scores of all heads (one batched thin SVD), as a tidy table.

    Columns ``layer, head, label ("l/h"), rank, sigma_1, sigma_sum, alignment, alignment_norm,
    alignment_pos, alignment_pos_norm`` (+ the top-``k`` variants when ``k`` is given) and
    ``key_bias_norm = ||W_K b_Q||``, the size of the query-independent key preference that
    ``W_QK`` leaves out. See :func:`qk_alignment_from_svd` for the formulas.

    Raises:
        ValueError: ``k`` not in ``1..d_head``.
    """
    _check_k(k, model.cfg.d_head)
    frame = qk_alignment_from_svd(qk_svd(model, dtype=dtype), k=k)
    key_bias = qk_bias_terms(model)["key_bias"]
    frame["key_bias_norm"] = key_bias.norm(dim=-1).reshape(-1).cpu().numpy()
    return frame


def qk_bias_terms(model: HookedReranker) -> dict[str, Tensor]:
    """The bias terms of every head's attention score that ``W_QK`` leaves out.

    Expanding ``(x_q W_Q + b_Q) . (x_k W_K + b_K)`` (before the ``1/sqrt(d_head)`` scale):

    - ``key_bias = W_K b_Q`` ``[n_layers, n_heads, d_model]``: adds ``x_k . key_bias`` to every
      query's score for key ``x_k``, a query-independent preference for some keys (e.g. ``[SEP]``
      or ``[CLS]``). This is the only bias term that changes the attention pattern.
    - ``query_bias = W_Q b_K`` ``[n_layers, n_heads, d_model]``: adds ``x_q . query_bias``, the
      same for all keys of a query, so the softmax over keys cancels it.
    - ``constant = b_Q . b_K`` ``[n_layers, n_heads]``: cancelled by the softmax too.

    Read the key bias in token space with :func:`top_tokens`.
    """
    W_Q, W_K = model.W_Q.detach(), model.W_K.detach()
    b_Q, b_K = model.b_Q.detach(), model.b_K.detach()
    return {
        "key_bias": torch.einsum("lhmd,lhd->lhm", W_K, b_Q),
        "query_bias": torch.einsum("lhmd,lhd->lhm", W_Q, b_K),
        "constant": (b_Q * b_K).sum(-1),
    }


# ---------------------------------------------------------------------------- token space
def token_embeddings(
    model: HookedReranker, *, token_type: int = 0, position: int | None = None
) -> Float[Tensor, "d_vocab d_model"]:
    """Every vocabulary token as layer 0 sees it: ``LN(W_E[t] + W_tt[token_type] (+ W_pos[p]))``.

    This is what ``hook_full_embed`` (= ``blocks.0.hook_resid_pre``) holds for token ``t`` of
    segment ``token_type`` (0: CLS/query/SEP1, 1: document/SEP2) at sequence position
    ``position`` (``None``: no position embedding, i.e. a position-free reading of the token).
    Families without token types (DistilBERT) or with one (RoBERTa, XLM-R) read the same vector
    for both segments; RoBERTa/XLM-R positions are offset by ``padding_idx + 1`` and ELECTRA's
    embedding projection is applied (see :class:`mechir.models.encoder.CrossEncoderEmbed`).
    """
    if token_type not in (0, 1):
        raise ValueError(
            f"token_type must be 0 (query segment) or 1 (document), got {token_type!r}"
        )
    if position is not None and not 0 <= position < model.max_length:
        raise ValueError(
            f"position {position} out of range: the model has {model.max_length} positions"
        )
    with torch.no_grad():
        ids = torch.arange(model.cfg.d_vocab, device=model.cfg.device)
        return model.embed.token_states(ids, token_type=token_type, position=position)


def _token_strings(model: HookedReranker, ids: Iterable[int] | Int[Tensor, " n"]) -> list[str]:
    ids = [int(i) for i in ids]
    tok = model.tokenizer
    tokens = tok.convert_ids_to_tokens(ids) if tok is not None else [None] * len(ids)
    return [t if t is not None else f"[{i}]" for i, t in zip(ids, tokens)]


def _residual_states(
    model: HookedReranker, batch: CrossEncoderBatch, layers: list[int], batch_size: int | None
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """``blocks.{l}.hook_resid_pre`` for the requested layers (only those are cached)."""
    names = {f"blocks.{layer}.hook_resid_pre": layer for layer in layers}
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            _, cache = model.run_with_cache(chunk, names_filter=lambda n: n in names)
            width = batch.input_ids.shape[1]
            for name, layer in names.items():
                act = cache[name].cpu()
                out[layer].append(torch.nn.functional.pad(act, (0, 0, 0, width - act.shape[1])))
    return {layer: torch.cat(acts) for layer, acts in out.items()}


@dataclass(frozen=True)
class _Candidates:
    """Token states to rank by projection, with what identifies each of them."""

    states: Float[Tensor, "n d_model"]
    token_ids: Tensor
    where: dict[str, Tensor]  # with a batch: example, position, part of every state


def _vocabulary_candidates(
    model: HookedReranker, token_type: int, position: int | None
) -> _Candidates:
    states = token_embeddings(model, token_type=token_type, position=position).float().cpu()
    return _Candidates(states, torch.arange(states.shape[0]), {})


def _batch_candidates(
    model: HookedReranker, batch: CrossEncoderBatch, layer: int, batch_size: int | None
) -> _Candidates:
    check_layer(model, layer)
    real = batch.attention_mask.bool().cpu()
    resid = _residual_states(model, batch, [layer], batch_size)[layer].float()
    ex, pos = real.nonzero(as_tuple=True)
    where = {"example": ex, "position": pos, "part": batch.parts.cpu()[real]}
    return _Candidates(resid[real], batch.input_ids.cpu()[real], where)


def _top_rows(
    model: HookedReranker, candidates: _Candidates, direction: Float[Tensor, " d_model"], n: int
) -> pd.DataFrame:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    direction = direction.detach().float().cpu()
    unit = direction / direction.norm().clamp_min(torch.finfo(direction.dtype).tiny)
    proj = candidates.states @ unit
    ids = candidates.token_ids
    n = min(n, proj.shape[0])
    rows = []
    for sign, order in (("+", proj.topk(n).indices), ("-", (-proj).topk(n).indices)):
        tokens = _token_strings(model, ids[order])
        for rank, (i, token) in enumerate(zip(order.tolist(), tokens)):
            row = {"sign": sign, "rank": rank, "token_id": int(ids[i]), "token": token}
            row["projection"] = float(proj[i])
            for key, value in candidates.where.items():
                row[key] = Part(int(value[i])).name.lower() if key == "part" else int(value[i])
            rows.append(row)
    return pd.DataFrame(rows)


def top_tokens(
    model: HookedReranker,
    direction: Float[Tensor, " d_model"],
    *,
    n: int = 10,
    batch: CrossEncoderBatch | None = None,
    layer: int = 0,
    token_type: int = 0,
    position: int | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """The tokens whose states project most (both signs) on a residual-stream direction.

    The projection of state ``x`` is ``x . d / ||d||``. Without ``batch`` the candidates are the
    vocabulary tokens as layer 0 sees them (:func:`token_embeddings` with ``token_type`` and
    ``position``); with ``batch`` they are the real tokens' residual states entering ``layer``
    (``blocks.{layer}.hook_resid_pre``).

    Returns:
        ``sign`` (``"+"``: largest projections, ``"-"``: most negative), ``rank`` (0 = most
        extreme), ``token_id``, ``token``, ``projection``; with ``batch`` also ``example``,
        ``position`` and ``part``.
    """
    if batch is None:
        candidates = _vocabulary_candidates(model, token_type, position)
    else:
        candidates = _batch_candidates(model, batch, layer, batch_size)
    return _top_rows(model, candidates, direction, n)


def singular_direction_tokens(
    model: HookedReranker,
    head: HeadLike,
    k: int = 0,
    *,
    n: int = 10,
    svd: QKSVD | None = None,
    batch: CrossEncoderBatch | None = None,
    token_type: tuple[int, int] = (0, 1),
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Tokens that project most on the ``k``-th (0-indexed) singular directions ``u_k``, ``v_k``.

    ``u_k`` is read by the attending (query-side) token, ``v_k`` by the attended (key-side)
    token: direction ``k`` adds ``S_k (x_q . u_k)(x_k . v_k)`` to the score. Because the sign of
    ``(u_k, v_k)`` is arbitrary, both ends are listed: ``"+"`` tokens of ``u`` pair with
    ``"+"`` tokens of ``v`` (and ``"-"`` with ``"-"``) to raise attention.

    Candidates are vocabulary embeddings (``u`` side with segment ``token_type[0]``, default the
    query segment; ``v`` side with ``token_type[1]``, default the document segment) or, with
    ``batch``, the residual states entering the head's layer (one forward pass).

    Returns:
        :func:`top_tokens`' columns plus ``layer, head, label, k, sigma, vector ("u"/"v")``.
    """
    (layer, h), *_ = select_heads(model, [head])
    svd = svd if svd is not None else qk_svd(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < svd.rank:
        raise ValueError(f"k={k!r} out of range: directions are 0-indexed, 0-{svd.rank - 1}")
    U, S, V = svd.head(layer, h)
    shared = None if batch is None else _batch_candidates(model, batch, layer, batch_size)
    frames = []
    for name, vec, tt in (("u", U[:, k], token_type[0]), ("v", V[:, k], token_type[1])):
        candidates = shared or _vocabulary_candidates(model, tt, None)
        frames.append(_top_rows(model, candidates, vec, n).assign(vector=name))
    out = pd.concat(frames, ignore_index=True)
    head_cols = {"layer": layer, "head": h, "label": head_label(layer, h), "k": k}
    head_cols |= {"sigma": float(S[k]), "vector": out.pop("vector")}
    for i, (col, value) in enumerate(head_cols.items()):
        out.insert(i, col, value)
    return out


def mean_part_residuals(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    layers: Iterable[int] | None = None,
    *,
    batch_size: int | None = None,
) -> Float[Tensor, "n_layers 5 d_model"]:
    """Mean residual state entering each layer over all tokens of each part in the batch.

    ``out[i, p]`` is the mean of ``blocks.{layers[i]}.hook_resid_pre`` over every token of part
    ``PARTS[p]`` (CLS, QUERY, SEP1, DOCUMENT, SEP2) of every example, accumulated in the forward
    pass (no activation cache); float32 on the CPU. ``layers=None`` means all layers.
    """
    layers = select_layers(model, layers)
    d_model = model.cfg.d_model
    sums = torch.zeros(len(layers), len(PARTS), d_model, dtype=torch.float64)
    counts = torch.zeros(len(PARTS), dtype=torch.float64)

    def hook(i: int, masks: Tensor):
        def fn(resid: Tensor, hook: Any) -> None:
            m = masks.to(resid.device, resid.dtype)
            sums[i] += torch.einsum("bpn,bnd->pd", m, resid).double().cpu()

        return fn

    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            masks = chunk.part_masks
            counts += masks.sum((0, 2)).double()
            hooks = [
                (f"blocks.{layer}.hook_resid_pre", hook(i, masks)) for i, layer in enumerate(layers)
            ]
            with model.hooks(fwd_hooks=hooks):
                model(chunk, return_type=None)
    return (sums / counts.clamp(min=1)[None, :, None]).float()


def singular_direction_part_cosines(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    *,
    k: int = 3,
    heads: Iterable[HeadLike] | None = None,
    svd: QKSVD | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Cosines of each head's leading singular directions with the mean query / document state.

    For head ``l/h`` and direction ``j < k``, with ``m_Q``, ``m_D`` the mean residual states of
    query and document tokens entering layer ``l`` (:func:`mean_part_residuals`)::

        u_query = cos(u_j, m_Q)   u_document = cos(u_j, m_D)
        v_query = cos(v_j, m_Q)   v_document = cos(v_j, m_D)
        qd = u_query * v_document    dq = u_document * v_query

    ``qd`` and ``dq`` do not depend on the arbitrary joint sign of ``(u_j, v_j)``; ``qd > 0``
    means direction ``j`` raises the attention of an average query token to an average document
    token.

    Returns:
        One row per (head, direction): ``layer, head, label, k, sigma`` and the columns above.
    """
    svd = svd if svd is not None else qk_svd(model)
    _check_k(k, svd.rank)
    if heads is None:
        selected = [(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)]
    else:
        selected = select_heads(model, heads)
    layers = sorted({layer for layer, _ in selected})
    means = mean_part_residuals(model, batch, layers, batch_size=batch_size)
    q_idx, d_idx = PARTS.index(Part.QUERY), PARTS.index(Part.DOCUMENT)
    rows = []
    for layer, h in selected:
        U, S, V = (t.detach().float().cpu() for t in svd.head(layer, h))
        mq, md = means[layers.index(layer), q_idx], means[layers.index(layer), d_idx]
        cos = {
            name: torch.nn.functional.cosine_similarity(vecs[:, :k].T, m[None], dim=-1)
            for name, vecs, m in (
                ("u_query", U, mq),
                ("u_document", U, md),
                ("v_query", V, mq),
                ("v_document", V, md),
            )
        }
        for j in range(k):
            row: dict[str, Any] = {
                "layer": layer,
                "head": h,
                "label": head_label(layer, h),
                "k": j,
                "sigma": float(S[j]),
            }
            row |= {name: float(c[j]) for name, c in cos.items()}
            row["qd"] = row["u_query"] * row["v_document"]
            row["dq"] = row["u_document"] * row["v_query"]
            rows.append(row)
    return pd.DataFrame(rows)
