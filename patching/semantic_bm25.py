"""The analyses of Lu, Chen & Eickhoff, "A cross-encoder rediscovers a semantic variant of BM25"
(2025), as library calls: head -> [CLS] path patching, duplicate-token heads, the token embeddings'
singular directions against collection IDF, a linear soft-TF x IDF model of relevance-scoring
heads, and an edit of the IDF direction.

* :func:`cls_path_patch`: a sender head's clean output reaches the final [CLS] state only through
  the residual stream (every other head frozen to its corrupted output; MLPs recomputed, or
  frozen too), batched; :func:`cls_path_patch_reference` is the plain-hook oracle.
* :func:`duplicate_token_scores`: attention from a token to the other occurrences of the same
  token, per head, against what a uniform pattern would give; :func:`duplicate_token_scores_
  reference` loops over examples and positions.
* :func:`token_idf` and :func:`embedding_idf_svd`: BM25 IDF of every vocabulary token over a
  collection, and the Spearman correlation of each leading right singular vector's projections
  ``W_E v_k`` with it.
* :func:`soft_tf_idf` and :func:`linear_fit`: ``sum_t IDF(t) softTF(t, d)`` per pair, with
  ``softTF(t, d) = sum_{j in d} max(0, cos(E_t, E_{d_j}))^p`` (exact matches count 1, related
  tokens partly, ``p`` sharpens), and the least-squares fit of a head's effect on it with R² on
  held-out queries.
* :func:`embedding_direction_hooks`: scale the component of every token embedding along a
  direction (``embed.hook_embed``, before the embedding LayerNorm): 0 removes it, 1 is the
  identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.models.modernbert import ModernHead
from mechir.parts import CrossEncoderBatch, Part
from mechir.running import Hooks
from mechir.selection import HeadLike, head_label, select_heads
from patching.path import path_freeze_hooks
from patching.perturbations import AlignedPairs
from patching.results import PatchingResult
from patching.sweep import (
    DEFAULT_MEMORY_BUDGET,
    batch_rows,
    check_batch_size,
    rows_per_chunk,
    run_from_layers,
)

__all__ = [
    "cls_path_patch",
    "cls_path_patch_reference",
    "duplicate_token_scores",
    "duplicate_token_scores_reference",
    "embedding_direction_hooks",
    "embedding_idf_svd",
    "linear_fit",
    "soft_tf_idf",
    "token_idf",
]


# ====================================================================== head -> [CLS] paths
def _senders(model: HookedReranker, senders: Iterable[HeadLike] | None) -> list[tuple[int, int]]:
    if senders is not None:
        return select_heads(model, senders)
    cfg = model.cfg
    return [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]


def _cls_result(
    model: HookedReranker,
    pairs: AlignedPairs,
    senders: list[tuple[int, int]],
    patched: Tensor,
    clean: Tensor,
    corrupted: Tensor,
    freeze_mlps: bool,
) -> PatchingResult:
    cfg = model.cfg
    grid = torch.full((len(pairs), cfg.n_layers, cfg.n_heads), float("nan"))
    for j, (layer, head) in enumerate(senders):
        grid[:, layer, head] = patched[:, j]
    return PatchingResult(
        target="path->cls" + (":frozen_mlps" if freeze_mlps else ""),
        dims=("layer", "head"),
        coords={"layer": list(range(cfg.n_layers)), "head": list(range(cfg.n_heads))},
        patched=grid,
        clean=clean,
        corrupted=corrupted,
        pair_ids=list(pairs.pair_ids),
        grades=list(pairs.grades),
        method="path",
    )


#: What the corrupted run caches for :func:`cls_path_patch`.
_CACHED = ("hook_z", "hook_mlp_out", "hook_resid_pre")


def _replace(value: Tensor, act: Tensor, hook: Any) -> Tensor:
    return value.to(act.dtype)


def cls_path_patch(
    model: HookedReranker,
    pairs: AlignedPairs,
    *,
    senders: Iterable[HeadLike] | None = None,
    freeze_mlps: bool = False,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> PatchingResult:
    """Head -> [CLS] path patching: the score when only sender ``s``'s output is clean and every
    other head's output ``z`` is frozen to the corrupted run (with ``freeze_mlps``, every MLP
    output too), on the corrupted input::

        s_path[i, s] = f(corrupted_i | z_s <- z_s(clean_i), z_h <- z_h(corrupted_i) for h != s)

    With the heads frozen no attention moves the sender's signal between positions, so it
    reaches the score only along the residual stream of the [CLS] position (through the
    LayerNorms and, unless frozen, the MLPs of that position): the sender's direct path into the
    final [CLS] state. Rows (pair, sender) start at the sender's layer from the cached
    corrupted residual stream, many per forward pass, and carry the [CLS] position alone (all
    positions when the model mean-pools): the cost is two cached forward passes per pair.

    Returns:
        A :class:`PatchingResult` over a ``(layer, head)`` grid (``method="path"``); its metric
        is ``(s_path - s_corr) / (s_clean - s_corr)``.
    """
    send = _senders(model, senders)
    check_batch_size(batch_size)
    n = len(pairs)
    width = pairs.clean.input_ids.shape[1]
    # only [CLS]'s residual stream reaches a [CLS]-pooled score: rows carry that position alone
    # (the frozen z replaces whatever their attention computes); mean pooling needs them all
    mean_pooled = isinstance(model.pooler, ModernHead) and model.pooler.pooling == "mean"
    row_width = width if mean_pooled else 1
    rows_budget = batch_size or rows_per_chunk(model, row_width, memory_budget)
    per_group = max(1, rows_per_chunk(model, width, memory_budget) // 4)  # two cached runs
    s_layers = torch.tensor([layer for layer, _ in send])
    s_heads = torch.tensor([h for _, h in send])
    patched = torch.empty(n, len(send))
    clean_scores, corrupted_scores = torch.empty(n), torch.empty(n)
    for g0 in range(0, n, per_group):
        group = pairs[g0 : g0 + per_group]
        with torch.no_grad():
            c_score, clean = model.run_with_cache(
                group.clean, names_filter=lambda name: name.endswith("attn.hook_z")
            )
            k_score, corrupted = model.run_with_cache(
                group.corrupted, names_filter=lambda name: name.endswith(_CACHED)
            )
        clean_scores[g0 : g0 + len(group)] = c_score.float().cpu()
        corrupted_scores[g0 : g0 + len(group)] = k_score.float().cpu()
        pair_of_row = torch.arange(len(group)).repeat_interleave(len(send))
        send_of_row = torch.arange(len(send)).repeat(len(group))
        order = torch.argsort(s_layers[send_of_row], stable=True)
        pair_of_row, send_of_row = pair_of_row[order], send_of_row[order]
        for lo in range(0, len(order), rows_budget):
            p_rows, s_rows = pair_of_row[lo : lo + rows_budget], send_of_row[lo : lo + rows_budget]
            scores = _cls_rows(
                model, group, clean, corrupted, p_rows, s_layers[s_rows], s_heads[s_rows],
                row_width, freeze_mlps,
            )  # fmt: skip
            patched[g0 + p_rows, s_rows] = scores.float().cpu()
    return _cls_result(model, pairs, send, patched, clean_scores, corrupted_scores, freeze_mlps)


def _cls_rows(
    model: HookedReranker,
    group: AlignedPairs,
    clean: Any,
    corrupted: Any,
    pair_rows: Tensor,
    sender_layers: Tensor,
    sender_heads: Tensor,
    row_width: int,
    freeze_mlps: bool,
) -> Tensor:
    """Scores of rows (pair, sender), sorted by the sender's layer, on the first ``row_width``
    positions."""
    device = model.cfg.device
    idx = pair_rows.to(device)
    keep = slice(0, row_width)
    hooks: Hooks = []
    for layer in range(int(sender_layers[0]), model.cfg.n_layers):
        active = int((sender_layers <= layer).sum())
        z_name = f"blocks.{layer}.attn.hook_z"
        is_sender = (sender_layers[:active] == layer)[:, None] & (
            torch.arange(model.cfg.n_heads)[None] == sender_heads[:active, None]
        )
        mask = is_sender.to(device)[:, None, :, None]
        rows = idx[:active]
        source = torch.where(mask, clean[z_name][rows, keep], corrupted[z_name][rows, keep])
        hooks.append((z_name, partial(_replace, source)))
        if freeze_mlps:
            mlp = f"blocks.{layer}.hook_mlp_out"
            hooks.append((mlp, partial(_replace, corrupted[mlp][rows, keep])))

    def initial(layer: int, new: Tensor) -> Tensor:
        return corrupted[f"blocks.{layer}.hook_resid_pre"][idx[new.to(device)], keep]

    full = batch_rows(group.corrupted, idx)
    batch = CrossEncoderBatch(
        full.input_ids[:, keep],
        full.token_type_ids[:, keep],
        full.attention_mask[:, keep],
        full.parts[:, keep],
    )
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return run_from_layers(model, sender_layers, initial, batch)


def cls_path_patch_reference(
    model: HookedReranker,
    pairs: AlignedPairs,
    *,
    senders: Iterable[HeadLike] | None = None,
    freeze_mlps: bool = False,
) -> PatchingResult:
    """The oracle of :func:`cls_path_patch`: one full forward per (pair, sender) with
    :func:`patching.path.path_freeze_hooks` (plain patch hooks from the two runs' caches)."""
    send = _senders(model, senders)
    n = len(pairs)
    patched = torch.empty(n, len(send))
    clean_scores, corrupted_scores = torch.empty(n), torch.empty(n)
    with torch.no_grad():
        for i in range(n):
            pair = pairs[i]
            c_score, clean = model.run_with_cache(pair.clean)
            k_score, corrupted = model.run_with_cache(pair.corrupted)
            clean_scores[i], corrupted_scores[i] = float(c_score[0]), float(k_score[0])
            for j, sender in enumerate(send):
                hooks = path_freeze_hooks(model, clean, corrupted, sender, freeze_mlps=freeze_mlps)
                patched[i, j] = float(model.run_with_hooks(pair.corrupted, fwd_hooks=hooks)[0])
    return _cls_result(model, pairs, send, patched, clean_scores, corrupted_scores, freeze_mlps)


# ====================================================================== duplicate-token heads
def _duplicate_mask(batch: CrossEncoderBatch) -> Bool[Tensor, "batch pos pos"]:
    """``[b, i, j]``: tokens ``i != j`` of the query or document with the same token id."""
    content = (batch.parts == int(Part.QUERY)) | (batch.parts == int(Part.DOCUMENT))
    content = content & batch.attention_mask.bool()
    ids = batch.input_ids
    same = ids[:, :, None] == ids[:, None, :]
    eye = torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)[None]
    return same & ~eye & content[:, :, None] & content[:, None, :]


def _duplicate_frame(sums: Tensor, base: Tensor, count: int) -> pd.DataFrame:
    n_layers, n_heads = sums.shape
    score = (sums / max(count, 1)).numpy()
    uniform = float(base) / max(count, 1)
    rows = []
    for layer in range(n_layers):
        for h in range(n_heads):
            value = float(score[layer, h]) if count else math.nan
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "label": head_label(layer, h),
                    "score": value,
                    "uniform": uniform if count else math.nan,
                    "ratio": value / uniform if count and uniform > 0 else math.nan,
                    "tokens": count,
                }
            )
    return pd.DataFrame(rows)


def duplicate_token_scores(
    model: HookedReranker, batch: CrossEncoderBatch, *, batch_size: int | None = 32
) -> pd.DataFrame:
    """How much each head attends from a token to the other occurrences of the same token.

    Over the query and document tokens ``i`` that have at least one duplicate ``j != i`` (same
    token id, query or document), per head::

        score = mean_i sum_{j dup of i} A[i, j]        uniform = mean_i |dup(i)| / n_keys(i)

    (``uniform``: what a uniform pattern over the real keys would give). Streamed through the
    attention patterns without a cache.

    Returns:
        One row per head: ``layer, head, label, score, uniform, ratio`` (= score / uniform) and
        ``tokens`` (the number of tokens ``i``), sorted by layer and head.
    """
    cfg = model.cfg
    sums = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    count, base = 0, torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            dup = _duplicate_mask(chunk).to(cfg.device)
            has = dup.any(-1)
            count += int(has.sum())
            keys = chunk.attention_mask.sum(-1).to(cfg.device)
            base += (dup.sum(-1) / keys[:, None]).double()[has].sum().cpu()

            def hook(pattern: Tensor, hook: Any, layer: int, dup=dup, has=has) -> None:
                mass = (pattern * dup[:, None]).sum(-1)  # [batch, head, pos]
                sums[layer] += mass.transpose(1, 2)[has].double().sum(0).cpu()

            hooks = [
                (f"blocks.{layer}.attn.hook_pattern", partial(hook, layer=layer))
                for layer in range(cfg.n_layers)
            ]
            with model.hooks(fwd_hooks=hooks):
                model(chunk, return_type=None)
    return _duplicate_frame(sums, base, count)


def duplicate_token_scores_reference(
    model: HookedReranker, batch: CrossEncoderBatch
) -> pd.DataFrame:
    """Naive reference of :func:`duplicate_token_scores`: the full cache of each example, and
    Python loops over its tokens."""
    cfg = model.cfg
    sums = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    count, base = 0, torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in range(len(batch)):
            one = batch[b]
            _, cache = model.run_with_cache(one)
            ids, parts = one.input_ids[0].tolist(), one.parts[0].tolist()
            content = [p in (int(Part.QUERY), int(Part.DOCUMENT)) for p in parts]
            for i in range(len(ids)):
                dups = [
                    j
                    for j in range(len(ids))
                    if j != i and content[i] and content[j] and ids[j] == ids[i]
                ]
                if not dups:
                    continue
                count += 1
                base += len(dups) / len(ids)
                for layer in range(cfg.n_layers):
                    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
                    for h in range(cfg.n_heads):
                        sums[layer, h] += float(sum(pattern[h, i, j] for j in dups))
    return _duplicate_frame(sums, base, count)


# ====================================================================== IDF in the embeddings
def token_idf(
    tokenizer: Any, documents: Iterable[str], *, d_vocab: int | None = None
) -> tuple[Float[Tensor, " d_vocab"], Int[Tensor, " d_vocab"]]:
    """``(idf, df)`` of every vocabulary token over ``documents``: ``df`` the number of documents
    containing the token, ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` (BM25's, as
    :class:`patching.TermStatistics`; tokens in no document get the largest value)."""
    size = d_vocab or len(tokenizer)
    df = torch.zeros(size, dtype=torch.long)
    n = 0
    docs = list(documents)
    for start in range(0, len(docs), 256):
        encoded = tokenizer(docs[start : start + 256], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            n += 1
            present = torch.tensor(sorted(set(ids)), dtype=torch.long)
            df[present[present < size]] += 1
    if n == 0:
        raise ValueError("no documents given: IDF needs at least one document")
    idf = torch.log1p((n - df + 0.5) / (df + 0.5)).float()
    return idf, df


def embedding_idf_svd(
    embeddings: Float[Tensor, "d_vocab d_embed"],
    idf: Float[Tensor, " d_vocab"],
    tokens: Bool[Tensor, " d_vocab"],
    *,
    k: int = 10,
) -> tuple[pd.DataFrame, Float[Tensor, " d_embed"]]:
    """SVD of the token embedding matrix ``W_E = U S V^T`` (the whole vocabulary, uncentred) and,
    for each of the ``k`` leading right singular vectors ``v_c``, the Spearman correlation over
    the ``tokens`` (e.g. those seen in the collection) of the projections ``W_E[t] . v_c`` with
    ``idf[t]``.

    Returns:
        ``(table, direction)``: one row per component (``component, sigma, variance_share,
        spearman, p``) and the IDF direction: the unit ``v_c`` of the largest ``|spearman|``,
        signed so that projections grow with IDF.
    """
    from scipy.stats import spearmanr

    E = embeddings.detach().double().cpu()
    if not 1 <= k <= min(E.shape):
        raise ValueError(f"k={k} out of range: the embedding matrix has rank <= {min(E.shape)}")
    if int(tokens.sum()) < 3:
        raise ValueError("fewer than 3 tokens to correlate: pass a tokens mask with more tokens")
    _, S, Vh = torch.linalg.svd(E, full_matrices=False)
    proj = E[tokens.cpu()] @ Vh[:k].T  # [n_tokens, k]
    target = idf.cpu()[tokens.cpu()].double().numpy()
    total = float((S**2).sum())
    rows = []
    for c in range(k):
        rho, p = spearmanr(proj[:, c].numpy(), target)
        rows.append(
            {
                "component": c,
                "sigma": float(S[c]),
                "variance_share": float(S[c] ** 2) / total,
                "spearman": float(rho),
                "p": float(p),
            }
        )
    table = pd.DataFrame(rows)
    best = int(table["spearman"].abs().idxmax())
    sign = 1.0 if table.loc[best, "spearman"] >= 0 else -1.0
    return table, (sign * Vh[best]).float()


def embedding_direction_hooks(
    model: HookedReranker, direction: Float[Tensor, " d_embed"], *, factor: float = 0.0
) -> Hooks:
    """Scale every token embedding's component along ``direction`` (``embed.hook_embed``, the
    rows of ``W_E`` before the embedding LayerNorm): ``x <- x + (factor - 1)(x . v) v`` with
    ``v`` the unit direction. 0 removes the component, 1 is the identity, 2 doubles it."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ValueError(f"factor must be a number, got {factor!r}")
    d_embed = model.embed.embed.W_E.shape[1]
    if direction.shape != (d_embed,):
        raise ValueError(
            f"direction has shape {tuple(direction.shape)}: the token embeddings have {d_embed} "
            "dimensions"
        )
    unit = direction.detach().float() / direction.detach().float().norm().clamp_min(1e-12)

    def hook(x: Tensor, hook: Any) -> Tensor:
        v = unit.to(x.device, x.dtype)
        return x + (factor - 1.0) * (x @ v)[..., None] * v

    return [("embed.hook_embed", hook)]


# ====================================================================== soft-TF x IDF
def soft_tf_idf(
    embeddings: Float[Tensor, "d_vocab d_embed"],
    idf: Float[Tensor, " d_vocab"],
    batch: CrossEncoderBatch,
    *,
    power: float = 4.0,
    exclude: Iterable[int] = (),
) -> pd.DataFrame:
    """Per pair, the BM25-like sums over its query tokens ``t`` (without ``exclude``, e.g.
    stopword ids)::

        soft_tf_idf = sum_t IDF(t) softTF(t, d)
        softTF(t, d) = sum_{j in d} max(0, cos(E_t, E_j))^p
        tf_idf      = sum_t IDF(t) tf(t, d)          (exact matches only: the limit p -> inf)
        soft_tf_idf_log = sum_t IDF(t) log(1 + softTF(t, d))   (BM25's saturation)

    Returns:
        One row per pair: ``soft_tf_idf, soft_tf_idf_log, tf_idf, query_tokens``.
    """
    unit = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=-1)
    skip = set(int(i) for i in exclude)
    rows = []
    ids, parts = batch.input_ids.cpu(), batch.parts.cpu()
    for b in range(len(batch)):
        q = [
            int(t) for t, p in zip(ids[b], parts[b]) if p == int(Part.QUERY) and int(t) not in skip
        ]
        d = [int(t) for t, p in zip(ids[b], parts[b]) if p == int(Part.DOCUMENT)]
        if not q or not d:
            rows.append(
                {"soft_tf_idf": 0.0, "soft_tf_idf_log": 0.0, "tf_idf": 0.0, "query_tokens": len(q)}
            )
            continue
        cos = unit[torch.tensor(q)] @ unit[torch.tensor(d)].T  # [q, d]
        soft = cos.clamp(min=0).pow(power).sum(-1).double()
        exact = (torch.tensor(q)[:, None] == torch.tensor(d)[None]).sum(-1).double()
        weights = idf.cpu()[torch.tensor(q)].double()
        rows.append(
            {
                "soft_tf_idf": float((weights * soft).sum()),
                "soft_tf_idf_log": float((weights * torch.log1p(soft)).sum()),
                "tf_idf": float((weights * exact).sum()),
                "query_tokens": len(q),
            }
        )
    return pd.DataFrame(rows)


def linear_fit(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    train: Sequence[bool] | np.ndarray,
) -> dict[str, float]:
    """Least-squares ``y = a x + b`` on the ``train`` rows, and its R² on the other rows
    (held out: ``1 - SS_res / SS_tot`` around the held-out mean; can be negative) and on the
    training rows. Also the Pearson correlation on the held-out rows."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    train = np.asarray(train, dtype=bool)
    test = ~train
    if train.sum() < 2 or test.sum() < 2:
        raise ValueError(
            f"need at least 2 training and 2 held-out rows, got {int(train.sum())} and "
            f"{int(test.sum())}: use more queries"
        )
    design = np.stack([x[train], np.ones(int(train.sum()))], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y[train], rcond=None)

    def r2(mask: np.ndarray) -> float:
        pred = a * x[mask] + b
        total = float(((y[mask] - y[mask].mean()) ** 2).sum())
        return 1.0 - float(((y[mask] - pred) ** 2).sum()) / total if total > 0 else math.nan

    xs, ys = x[test], y[test]
    pearson = float(np.corrcoef(xs, ys)[0, 1]) if xs.std() > 0 and ys.std() > 0 else math.nan
    return {
        "slope": float(a),
        "intercept": float(b),
        "r2_train": r2(train),
        "r2_heldout": r2(test),
        "pearson_heldout": pearson,
        "n_train": int(train.sum()),
        "n_heldout": int(test.sum()),
    }
