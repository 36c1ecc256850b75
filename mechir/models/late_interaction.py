"""Hooked late interaction: ColBERT-style MaxSim over token embeddings, on a hooked tower.

The tower is a bi-encoder's (:mod:`mechir.models.biencoder`: every encoder family mechir
hooks, the same hook names); its head keeps every token::

    E          = head.hook_projected         h W        (the linear projection, no bias)
    e          = head.hook_token_embeddings  E / ||E||_2 per token (when normalize)
    S[i, j]    = hook_similarity             q_i . d_j  [batch, query_pos, doc_pos]
    m_i        = hook_token_scores           max_j S[i, j] over real document tokens
                                             (ColBERT's skiplist left out)
    score      = hook_score                  sum_i m_i over the query's tokens

Query augmentation (ColBERT): every query is filled up to ``query_length`` tokens with
``[MASK]`` tokens, attended to and counted in the sum (parts ``QUERY``; ``input_ids`` tell them
apart). This is ColBERT v1's augmentation: ColBERTv2's default ``attend_to_mask_tokens=False``
(the ``[MASK]`` keys masked out) and its ``[Q]``/``[D]`` marker tokens after ``[CLS]`` are not
reproduced (pass markers as ``query_prefix``/``document_prefix`` text), so a ColBERTv2
checkpoint does not score exactly as the colbert library scores it; none was measured here.
:meth:`HookedLateInteraction.matches` records, for every query token, the document token
that wins its max (the matching analysis).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.models.biencoder import (
    BiEncoderBatch,
    HookedBiEncoder,
    Pooling,
    Tower,
    encode_texts,
    resolve_tower,
)
from mechir.models.tl import HookPoint
from mechir.parts import CrossEncoderBatch, Part

__all__ = [
    "HookedLateInteraction",
    "MaxSimMatch",
    "load_late_interaction",
    "match_head_effects",
    "maxsim",
]


class TokenEmbeddingHead(nn.Module):
    """The linear projection (``hook_projected``) and per-token L2 normalisation
    (``hook_token_embeddings``); padding rows are kept (MaxSim masks them)."""

    #: No pooling: one vector per token (declared like :class:`EmbeddingHead`'s pooling).
    pooling: None = None

    def __init__(self, d_model: int, dim: int, normalize: bool, dtype: torch.dtype):
        super().__init__()
        self.W = nn.Parameter(torch.empty(d_model, dim, dtype=dtype))
        self.normalize = normalize
        self.hook_projected = HookPoint()
        self.hook_token_embeddings = HookPoint()

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"], batch: CrossEncoderBatch
    ) -> Float[Tensor, "batch pos dim"]:
        e = self.hook_projected(hidden @ self.W)
        if self.normalize:
            e = nn.functional.normalize(e, p=2, dim=-1)
        return self.hook_token_embeddings(e)


@dataclass
class MaxSimMatch:
    """MaxSim of a batch of pairs and which document token each query token matched.

    Attributes:
        scores: ``sum_i max_j S[i, j]`` per pair.
        token_scores: ``max_j S[i, j]`` per query token (0 on query padding).
        winners: the document position ``argmax_j S[i, j]`` per query token (-1 on padding).
        similarity: ``S`` with excluded document tokens at ``-inf``.
    """

    scores: Float[Tensor, " batch"]
    token_scores: Float[Tensor, "batch query_pos"]
    winners: Int[Tensor, "batch query_pos"]
    similarity: Float[Tensor, "batch query_pos doc_pos"]


def maxsim(
    queries: Float[Tensor, "batch query_pos dim"],
    documents: Float[Tensor, "batch doc_pos dim"],
    query_mask: Int[Tensor, "batch query_pos"],
    document_mask: Int[Tensor, "batch doc_pos"],
) -> MaxSimMatch:
    """MaxSim: ``sum_{i: query_mask_i} max_{j: document_mask_j} q_i . d_j`` (see
    :class:`MaxSimMatch`); every document has at least one token in ``document_mask``."""
    sim = queries @ documents.transpose(1, 2)
    return maxsim_from_similarity(sim, query_mask, document_mask)


class HookedLateInteraction(HookedBiEncoder):
    """A ColBERT-style late-interaction model on a hooked tower (see the module docstring).
    The arguments not listed are :class:`~mechir.models.biencoder.HookedBiEncoder`'s.

    Args:
        dim: the width of the token embeddings (the projection's output).
        query_length: queries are cut to, and with ``augment`` filled with ``[MASK]`` up to,
            this many tokens (ColBERT's ``query_maxlen``).
        augment: fill queries with ``[MASK]`` tokens.
        normalize: L2-normalise every token embedding.
        skiplist: token ids left out of the document side of MaxSim (ColBERT: punctuation).
    """

    def __init__(
        self,
        cfg: Any,
        tokenizer: Any = None,
        *,
        dim: int,
        query_length: int = 32,
        augment: bool = True,
        normalize: bool = True,
        skiplist: Sequence[int] = (),
        **kwargs: Any,
    ):
        self._dim = dim
        self.query_length = query_length
        self.augment = augment
        self.skiplist = tuple(int(t) for t in skiplist)
        kwargs.setdefault("similarity", "dot")
        super().__init__(cfg, tokenizer, normalize=normalize, **kwargs)
        self.hook_similarity = HookPoint()
        self.hook_token_scores = HookPoint()
        self.setup()

    output_hook_name = "head.hook_token_embeddings"

    def _make_head(self, pooling: Pooling, normalize: bool, include_prefix: bool) -> nn.Module:
        return TokenEmbeddingHead(self.cfg.d_model, self._dim, normalize, self.cfg.dtype)

    def encode_tower(
        self, texts: str | Sequence[str], tower: Tower, *, max_length: int | None = None
    ) -> CrossEncoderBatch:
        """One tower's batch; queries cut to :attr:`query_length` and, with :attr:`augment`,
        filled with ``[MASK]`` tokens up to it (attended, part ``QUERY``)."""
        if tower != "query":
            return super().encode_tower(texts, tower, max_length=max_length)
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_late_interaction")
        batch = encode_texts(
            self.tokenizer,
            texts,
            part=Part.QUERY,
            prefix=self.prefixes["query"],
            max_length=self.query_length,
        )
        if not self.augment or batch.input_ids.shape[1] == self.query_length:
            return batch
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise ValueError("query augmentation needs a [MASK] token: pass augment=False")
        n, width = len(batch), self.query_length
        fill = lambda t, v: torch.cat(  # noqa: E731
            [t, torch.full((n, width - t.shape[1]), v, dtype=t.dtype)], 1
        )
        ids, types = fill(batch.input_ids, mask_id), fill(batch.token_type_ids, 0)
        attention, parts = fill(batch.attention_mask, 1), fill(batch.parts, int(Part.QUERY))
        pad = batch.attention_mask == 0  # padding inside the tokenizer's width: masks too
        ids[:, : pad.shape[1]][pad] = mask_id
        attention[:, : pad.shape[1]][pad] = 1
        parts[:, : pad.shape[1]][pad] = int(Part.QUERY)
        return CrossEncoderBatch(ids, types, attention, parts)

    def document_mask(self, documents: CrossEncoderBatch) -> Int[Tensor, "batch pos"]:
        """The document tokens MaxSim reads: real tokens not in the skiplist."""
        mask = documents.attention_mask.clone()
        if self.skiplist:
            skip = torch.tensor(self.skiplist, device=mask.device)
            mask = mask * ~torch.isin(documents.input_ids, skip)
        return mask

    def match(self, queries: Tensor, documents: Tensor, batch: BiEncoderBatch) -> MaxSimMatch:
        """MaxSim of the towers' outputs on ``batch``, through the hook points."""
        q_mask = batch.queries.attention_mask.to(queries.device)
        d_mask = self.document_mask(batch.documents).to(documents.device)
        sim = self.hook_similarity(queries @ documents.transpose(1, 2))
        found = maxsim_from_similarity(sim, q_mask, d_mask)
        token_scores = self.hook_token_scores(found.token_scores)
        return MaxSimMatch(token_scores.sum(-1), token_scores, found.winners, found.similarity)

    def score_towers(
        self, queries: Tensor, documents: Tensor, batch: BiEncoderBatch
    ) -> Float[Tensor, " batch"]:
        return self.hook_score(self.match(queries, documents, batch).scores)

    def matches(self, batch: BiEncoderBatch, *, hooks: Any = ()) -> MaxSimMatch:
        """The MaxSim match of every pair (no gradients), with ``hooks`` active."""
        with torch.no_grad(), self.hooks(fwd_hooks=list(hooks)):
            q, d = self(batch, return_type="towers")
            found = self.match(q, d, batch.to(self.cfg.device))
        return MaxSimMatch(*(t.cpu() for t in vars(found).values()))


def maxsim_from_similarity(
    sim: Float[Tensor, "batch query_pos doc_pos"],
    query_mask: Int[Tensor, "batch query_pos"],
    document_mask: Int[Tensor, "batch doc_pos"],
) -> MaxSimMatch:
    """:func:`maxsim` from a similarity matrix already computed."""
    sim = sim.masked_fill(~document_mask.bool()[:, None, :], -torch.inf)
    best, winners = sim.max(-1)
    real = query_mask.bool()
    token_scores = torch.where(real, best, torch.zeros_like(best))
    winners = torch.where(real, winners, torch.full_like(winners, -1))
    return MaxSimMatch(token_scores.sum(-1), token_scores, winners, sim)


def load_late_interaction(
    model: str | os.PathLike | Any,
    *,
    projection: Float[Tensor, "dim d_model"] | None = None,
    tokenizer: Any = None,
    query_length: int = 32,
    augment: bool = True,
    normalize: bool = True,
    skiplist: Sequence[int] = (),
    query_prefix: str = "",
    document_prefix: str = "",
    max_length: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedLateInteraction:
    """Load a late-interaction model: an encoder (as :func:`~mechir.models.biencoder.
    load_bi_encoder` reads it) and its projection, ``projection`` (``nn.Linear`` layout
    ``[dim, d_model]``) or, for a directory, the ``linear.weight`` of its weights (ColBERT's
    Hugging Face checkpoints).

    Raises:
        ValueError: no projection given or found, or one of the wrong width.
    """
    tower = resolve_tower(model, tokenizer, device=device, dtype=dtype)
    if projection is None and tower.location is not None:
        projection = _stored_projection(tower.location)
    if projection is None:
        raise ValueError(
            "no projection: pass projection= (a [dim, d_model] tensor) or a directory whose "
            "weights hold linear.weight (a ColBERT checkpoint)"
        )
    if projection.ndim != 2 or projection.shape[1] != tower.cfg.d_model:
        raise ValueError(
            f"projection of shape {tuple(projection.shape)}: expected [dim, {tower.cfg.d_model}]"
        )
    li = HookedLateInteraction(
        tower.cfg,
        tower.tokenizer,
        dim=projection.shape[0],
        query_length=query_length,
        augment=augment,
        normalize=normalize,
        skiplist=skiplist,
        family=tower.family,
        spec=tower.spec,
        shape=tower.shape,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        max_length=max_length,
        move_to_device=False,
    )
    with torch.no_grad():
        li.head.W.copy_(projection.T.to(li.head.W))
    return tower.load_into(li)


def _stored_projection(directory: Any) -> Tensor | None:
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "linear.weight" in f.keys():
                return f.get_tensor("linear.weight")
    return None


def match_head_effects(
    model: HookedLateInteraction,
    batch: BiEncoderBatch,
    *,
    heads: Sequence[str] | None = None,
    tower: Tower = "document",
) -> Any:
    """Which heads build each MaxSim match: every head of ``heads`` (default all, ``"l/h"``)
    knocked out (``z = 0``) in ``tower``, one forward pass per head, exact. One row per head,
    pair and real query token: the query token, its clean winner and similarity
    (``token_score``), the score it gets with the head knocked out (``knocked``, its winner may
    move: ``knocked_winner``) and ``effect = knocked - token_score``."""
    import pandas as pd

    from mechir.hooks import head_knockout_hooks

    if heads is None:
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        heads = [f"{layer}/{h}" for layer in range(n_layers) for h in range(n_heads)]
    clean = model.matches(batch)
    real = batch.queries.attention_mask.bool().cpu()
    ids = batch.queries.input_ids.cpu()
    tokens = model.tokenizer.convert_ids_to_tokens if model.tokenizer is not None else str
    rows = []
    for head in heads:
        knocked = model.matches(batch, hooks=head_knockout_hooks(model, heads=[head], tower=tower))
        for b, i in real.nonzero().tolist():
            rows.append(
                {
                    "head": head,
                    "pair": b,
                    "query_pos": i,
                    "query_token": tokens(int(ids[b, i])),
                    "winner": int(clean.winners[b, i]),
                    "token_score": float(clean.token_scores[b, i]),
                    "knocked_winner": int(knocked.winners[b, i]),
                    "knocked": float(knocked.token_scores[b, i]),
                }
            )
    table = pd.DataFrame(rows)
    table["effect"] = table["knocked"] - table["token_score"]
    return table
