"""QK-subspace ablation: remove chosen singular directions of a head's ``W_Q W_K^T`` from its
attention scores.

**The decomposition.** With query/key biases the score of query position ``i`` for key ``j`` is a
bilinear form of the augmented inputs ``[x, 1]``::

    s_ij = (x_i W_Q + b_Q) . (x_j W_K + b_K) / sqrt(d_head)

A head's ``W_Q`` (``d_model x d_head``, ``d_head <= d_model``) has full column rank in practice
(trained and random heads alike; checked, see below), so each bias is an input *shift*: there
are ``p_Q, p_K`` (``d_model``) with ``p_Q W_Q = b_Q`` and ``p_K W_K = b_K``
(``p = b W^+``), and::

    s_ij = (x_i + p_Q) W_QK (x_j + p_K)^T / sqrt(d_head),     W_QK = W_Q W_K^T = U diag(S) V^T
         = sum_k S_k a_ik b_jk / sqrt(d_head),   a_ik = (x_i + p_Q) . u_k,  b_jk = (x_j + p_K) . v_k

with ``U, S, V`` exactly the thin SVD of :func:`mechir.circuits.qk_svd` (so direction ``k`` here is
direction ``k`` there; the key-bias term ``x_j . W_K b_Q`` of :func:`mechir.circuits.qk_bias_terms`
is part of the ``S_k a_ik b_jk``). **Removing** the directions ``K`` replaces the score by::

    s'_ij = sum_{k not in K} S_k a_ik b_jk / sqrt(d_head)

so removing none changes nothing and removing all gives ``s' = 0``: after the padding mask, a
uniform pattern over the real keys (over the keys in the window, in a ModernBERT local layer).

**How.** ``q = (x + p_Q) W_Q`` and ``k = (x + p_K) W_K`` are affine in the attention input, so the
removal is applied to the head's query and key vectors (``attn.hook_q`` / ``attn.hook_k``,
``[batch, pos, head, d_head]``) with two ``d_head x d_head`` matrices per head, no cached input
needed::

    q' = (x + p_Q)(I - U_K U_K^T) W_Q = q P_Q,   P_Q = I - W_Q^+ U_K U_K^T W_Q
    k' = (x + p_K)(I - V_K V_K^T) W_K = k P_K,   P_K = I - W_K^+ V_K V_K^T W_K

(``W^+ W = I`` for full column rank), and ``q' . k' = sum_{k not in K} S_k a_ik b_jk`` because
``u_l^T W_Q W_K^T v_m = S_l delta_lm``. With ``K`` empty the matrix is the identity (``q' = q``
bit for bit: ``q @ I`` adds only exact zeros), with ``K`` all directions it is 0 (``q' = k' = 0``).

**Rotary families (ModernBERT).** The SVD is the one at relative distance 0 (``W_Q W_K^T``, as
in :mod:`mechir.circuits`). The projections act on ``hook_q`` / ``hook_k`` *before* the rotation,
so the head reads its queries and keys through the complement of the removed subspace at every
distance: at distance 0 the identity above holds exactly, removing all directions still gives a
uniform pattern, and at other distances the rotated cross terms of the removed directions go too.

**QK-norm (Qwen3: the model declares** ``qk_norm``). Queries and keys are RMS-normalized per
head after ``hook_q`` / ``hook_k``: ``q_n = q / r(q) * w_q``, ``r(q) = sqrt(mean(q^2) + eps)``.
The score is then ``q_n . k_n = (x W_Q D_q)(y W_K D_k)^T / (r(q) r(k))`` (``D = diag(w)``),
whose SVD is the one :func:`mechir.circuits.qk_svd` takes (``model.QK`` folds the norm weights
in: ``W_QK = W_Q D_q D_k W_K^T``). A projection at ``hook_q`` would be undone by the norm (it
rescales by the projected vector's own ``r``), so the same ``P_Q``, ``P_K`` act on the normalized
vectors (``attn.q_norm.hook_normalized`` / ``k_norm.hook_normalized``, after the division by
``r``, before ``w``)::

    q_n' = (q / r(q)) P_Q D_q = (x / r(q)) (I - U_K U_K^T) W_Q D_q

(``r`` of the unablated ``q``), and the decomposition holds with the per-token factor ``1 /
(r(q_i) r(k_j))`` in every term: ``s'(K) + s'(K^c) = s`` exactly at distance 0.

**Rank.** A middle ablation (some directions, not all) needs ``W_Q`` and ``W_K`` of full column
rank (their smallest singular value above ``1e-6`` of the largest); a head without it raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from jaxtyping import Float

from mechir.hooks.site import Action, get_site, refuse_shared_heads, site_hooks
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.running import Hooks
from mechir.selection import HeadLike, HeadSelection, head_label, select_heads

torch = lazy_import("torch")

#: Directions of a head: indices into its singular values (0 = largest), or every one.
DirectionSelection = Iterable[int] | Literal["all"]
#: Relative size of the smallest singular value of W_Q / W_K below which a head is rank-deficient.
RANK_RTOL = 1e-6

__all__ = [
    "DirectionSelection",
    "HeadProjection",
    "qk_subspace_ablation_hooks",
    "qk_subspace_projections",
    "qk_subspace_scores_reference",
]


class HeadProjection(Action):
    """Right-multiply the vectors of selected heads by a matrix of their layer and head:
    ``a'[..., h, :] = a[..., h, :] @ P[layer][h]`` on a ``[batch, pos, head, d_head]`` site."""

    label = "project"

    def __init__(self, matrices: Mapping[int, Float[torch.Tensor, "n_heads d_head d_head"]]):
        self.matrices = dict(matrices)

    def apply(self, act, where, hook, layer):
        matrix = self.matrices[layer].to(act)
        projected = torch.einsum("bphd,hde->bphe", act, matrix)
        return torch.where(where.to(act.device), projected, act)


def _directions(value: Any, rank: int, label: str) -> tuple[int, ...]:
    if isinstance(value, str):
        if value != "all":
            raise ValueError(
                f"head {label}: directions {value!r} not understood: give 'all' or indices 0-"
                f"{rank - 1}"
            )
        return tuple(range(rank))
    idx = [value] if isinstance(value, int) else list(value)
    bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < rank]
    if bad:
        raise ValueError(
            f"head {label}: direction {bad[0]!r} out of range: a head has d_head={rank} "
            f"directions, 0-{rank - 1} (0 = largest singular value)"
        )
    return tuple(sorted(set(idx)))


def _per_head(
    model: HookedReranker,
    heads: HeadSelection,
    directions: DirectionSelection | Mapping[HeadLike, DirectionSelection],
) -> dict[tuple[int, int], tuple[int, ...]]:
    """``{(layer, head): sorted direction indices}`` of the selection."""
    rank = model.cfg.d_head
    if isinstance(directions, Mapping):
        if heads is not None:
            raise ValueError(
                "give the heads once: either heads=... with one directions list, or directions="
                "{head: indices} alone"
            )
        out = {}
        for head, value in directions.items():
            ((layer, h),) = select_heads(model, [head])
            out[(layer, h)] = _directions(value, rank, head_label(layer, h))
        if not out:
            raise ValueError("directions={} selects no head: name at least one")
        return out
    if heads is None:
        raise ValueError("name the heads: heads=['l/h', ...] (or directions={head: indices})")
    return {
        (layer, h): _directions(directions, rank, head_label(layer, h))
        for layer, h in select_heads(model, heads)
    }


def _full_rank(weights: torch.Tensor, label: str, what: str) -> None:
    s = torch.linalg.svdvals(weights)
    if not s[-1] > RANK_RTOL * s[0]:
        raise ValueError(
            f"head {label}: {what} is rank-deficient (smallest singular value {float(s[-1]):.3g}, "
            f"largest {float(s[0]):.3g}), so its bias is no input shift and a partial QK ablation "
            "is undefined: remove all of its directions or none"
        )


def qk_subspace_projections(
    model: HookedReranker,
    *,
    heads: HeadSelection = None,
    directions: DirectionSelection | Mapping[HeadLike, DirectionSelection] = "all",
) -> dict[
    int,
    tuple[
        Float[torch.Tensor, "n_heads d_head d_head"], Float[torch.Tensor, "n_heads d_head d_head"]
    ],
]:
    """``{layer: (P_Q, P_K)}``: the query- and key-side matrices of every layer with a selected
    head (identity for the other heads of the layer), float64 (module docstring)::

        P_Q = I - W_Q^+ U_K U_K^T W_Q,   P_K = I - W_K^+ V_K V_K^T W_K

    ``P_Q = P_K = 0`` when every direction is removed."""
    from mechir.circuits import qk_svd

    selected = _per_head(model, heads, directions)
    cfg = model.cfg
    eye = torch.eye(cfg.d_head, dtype=torch.float64)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    partial = {key for key, ks in selected.items() if 0 < len(ks) < cfg.d_head}
    svd = qk_svd(model, dtype=torch.float64) if partial else None
    for (layer, h), ks in selected.items():
        pq, pk = out.setdefault(
            layer, (eye.repeat(cfg.n_heads, 1, 1), eye.repeat(cfg.n_heads, 1, 1))
        )
        if len(ks) == cfg.d_head:
            pq[h], pk[h] = 0.0, 0.0
        elif ks:
            assert svd is not None
            U, _, V = svd.head(layer, h)
            for P, W, vecs, what in (
                (pq, model.W_Q[layer, h], U, "W_Q"),
                (pk, model.W_K[layer, h], V, "W_K"),
            ):
                W = W.detach().to("cpu", torch.float64)
                _full_rank(W, head_label(layer, h), what)
                chosen = vecs[:, list(ks)].to("cpu", torch.float64)
                P[h] = eye - torch.linalg.pinv(W) @ chosen @ (chosen.T @ W)
    return out


def qk_subspace_ablation_hooks(
    model: HookedReranker,
    *,
    heads: HeadSelection = None,
    directions: DirectionSelection | Mapping[HeadLike, DirectionSelection] = "all",
) -> Hooks:
    """Hooks removing singular directions of ``W_Q W_K^T`` from the attention scores of
    ``heads`` (module docstring: the decomposition, with biases, and rotary models)::

        s'_ij = s_ij - sum_{k in K} S_k ((x_i + p_Q) . u_k) ((x_j + p_K) . v_k) / sqrt(d_head)

    Args:
        heads: the heads (any form of :mod:`mechir.selection`), with one ``directions`` for all.
        directions: indices of the singular directions to remove (0 = largest singular value,
            as in :func:`mechir.circuits.qk_svd`), ``"all"``, or ``{head: indices}`` (then no
            ``heads``). No direction: the identity; every direction: a uniform pattern over the
            real keys.

    Raises:
        ValueError: an empty or unknown head, a direction outside ``0..d_head-1``, or a partial
            ablation of a head whose ``W_Q`` or ``W_K`` is rank-deficient.
    """
    selected = _per_head(model, heads, directions)
    projections = qk_subspace_projections(model, directions=selected)
    units = list(selected)
    if model.abilities.qk_norm:
        refuse_shared_heads(model, get_site("k"), units)
        return [
            hook
            for layer, pair in projections.items()
            for which, matrix in zip(("q", "k"), pair)
            for hook in _normalized_projection_hooks(model, layer, which, matrix, selected)
        ]
    query = HeadProjection({layer: pq for layer, (pq, _) in projections.items()})
    key = HeadProjection({layer: pk for layer, (_, pk) in projections.items()})
    return site_hooks(model, "q", action=query, units=units) + site_hooks(
        model, "k", action=key, units=units
    )


def _normalized_projection_hooks(
    model: HookedReranker,
    layer: int,
    which: str,
    matrix: Float[torch.Tensor, "n_heads d_head d_head"],
    selected: Mapping[tuple[int, int], tuple[int, ...]],
) -> Hooks:
    """The projection of a QK-norm layer (module docstring), on the normalized queries or keys:
    ``blocks.{layer}.attn.{which}_norm.hook_normalized``, ``[batch * pos * head, d_head]``."""
    n_heads, d_head = matrix.shape[0], matrix.shape[-1]
    chosen = torch.zeros(n_heads, dtype=torch.bool)
    chosen[[h for (lay, h) in selected if lay == layer]] = True
    name = f"blocks.{layer}.attn.{which}_norm.hook_normalized"

    def project(act: Float[torch.Tensor, "rows d_head"], hook: Any) -> torch.Tensor:
        if act.shape[-1] != d_head or act.numel() % (n_heads * d_head):
            raise ValueError(
                f"{name} holds {tuple(act.shape)}, not [batch * pos * {n_heads} heads, {d_head}]: "
                "this TransformerLens lays out its QK norm differently; a partial QK ablation "
                "cannot be applied"
            )
        x = act.reshape(-1, n_heads, d_head)
        projected = torch.einsum("rhd,hde->rhe", x, matrix.to(x))
        return torch.where(chosen[:, None].to(x.device), projected, x).reshape(act.shape)

    return [(name, project)]


def qk_subspace_scores_reference(
    model: HookedReranker,
    attention_input: Float[torch.Tensor, "batch pos d_model"],
    layer: int,
    head: int,
    directions: DirectionSelection,
) -> Float[torch.Tensor, "batch pos pos"]:
    """Naive reference: the pre-mask scores of one head after the removal, recomputed from its
    attention input ``x`` (the input of ``blocks.{layer}.attn``) in ``d_model`` space, float64::

        a = (x + p_Q) U,  b = (x + p_K) V      (p = b W^+, U, V, S from a float64 SVD of W_Q W_K^T)
        s'_ij = sum_{k not in K} S_k a_ik b_jk / sqrt(d_head)

    For rotary layers, the queries ``(x + p_Q)(I - U_K U_K^T) W_Q`` and keys are rotated to
    their positions before the dot product (no padding mask, no window mask). With QK-norm,
    ``x + p`` is divided by ``r`` of the unablated query or key and ``W`` carries the norm
    weights (``W_Q D_q``, ``W_K D_k``; module docstring)."""
    cfg = model.cfg
    ks = set(_directions(directions, cfg.d_head, head_label(layer, head)))
    W_Q = model.W_Q[layer, head].detach().to("cpu", torch.float64)
    W_K = model.W_K[layer, head].detach().to("cpu", torch.float64)
    b_Q = model.b_Q[layer, head].detach().to("cpu", torch.float64)
    b_K = model.b_K[layer, head].detach().to("cpu", torch.float64)
    x = attention_input.detach().to("cpu", torch.float64)
    xq = x + torch.linalg.lstsq(W_Q.T, b_Q[:, None]).solution[:, 0]
    xk = x + torch.linalg.lstsq(W_K.T, b_K[:, None]).solution[:, 0]
    attn = model.blocks[layer].attn
    # x / r(q) and x / r(k) of the unablated q, k; W D with the norm weights
    if model.abilities.qk_norm:
        q_norm, k_norm = attn.q_norm, attn.k_norm
        xq = xq / (xq @ W_Q).pow(2).mean(-1, keepdim=True).add(q_norm.eps).sqrt()
        xk = xk / (xk @ W_K).pow(2).mean(-1, keepdim=True).add(k_norm.eps).sqrt()
        W_Q = W_Q * q_norm.w.detach().to("cpu", torch.float64)
        W_K = W_K * k_norm.w.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(W_Q @ W_K.T)
    U, S, V = u[:, : cfg.d_head], s[: cfg.d_head], vh[: cfg.d_head].T
    keep = [k for k in range(cfg.d_head) if k not in ks]
    if attn.rotate_positions is None:
        a, b = xq @ U[:, keep], xk @ V[:, keep]
        return torch.einsum("bik,bjk,k->bij", a, b, S[keep]) / cfg.d_head**0.5
    q = (xq @ U[:, keep]) @ (U[:, keep].T @ W_Q)
    k = (xk @ V[:, keep]) @ (V[:, keep].T @ W_K)
    q = attn.rotate_positions(q[:, :, None])[:, :, 0]
    k = attn.rotate_positions(k[:, :, None].double())[:, :, 0]
    return torch.einsum("bid,bjd->bij", q, k) / cfg.d_head**0.5
