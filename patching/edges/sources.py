"""Sources: the clean and corrupted inputs of an edge computation, and what they contribute.

Stage 2 of :mod:`patching.edges` (after the graph, before the engine): it turns what a user
passes into checked :class:`EdgeInputs`, and, for a group of pairs, into a :class:`Lockstep`
(the current rows and their source rows as one batch) that the engine's walk hands its
contributions to. Nothing here runs a forward pass beyond the embedding.

A source is one of:

* ``"token"``: a corrupted batch aligned token for token with the clean one (same width, parts,
  token types and attention mask: :class:`patching.AlignedPairs`, or any two batches that pass
  its checks);
* ``"part"``: a corrupted batch aligned *by part* (e.g. a swapped document of another length):
  at every point each sender's source contribution is its mean over the corrupted input's tokens
  of the same part, broadcast to the clean input's tokens of that part (every part a clean input
  has must have a token in its corrupted input);
* ``"mean"``: per part, the mean of each sender's contribution over every real token of that
  part in the clean batch (mean ablation; the same source for every pair; the engine fills
  :attr:`EdgeInputs.means` with one walk over the clean batch,
  :func:`patching.edges.engine.prepare_inputs`);
* ``"zero"``: no contribution.

With ``"token"`` and ``"part"`` the corrupted rows run in the same batch as the rows that read
them (:class:`Lockstep`), so their contributions at each point are at hand without being stored
for the whole pass.

**Pairs with the query corrupted** (:func:`replace_query_words`): :class:`patching.PerturbedPair`
perturbs documents (its query is shared by the clean and the corrupted input); edge circuits of
relevance also need the other direction, "query words replaced": every word piece of the query's
content words (the words :meth:`patching.PairBuilder.candidate_terms` accepts: not stopwords, at
least two characters with a letter) becomes the filler token, so the corrupted input has the
same length, parts and token types as the clean one (aligned token for token) and keeps only the
query's function words.

**Metrics** (:func:`metric_matrix`): every metric of edge attribution and circuits is linear in
the pairs' scores, ``metric = A @ scores`` with ``A`` a ``[unit, pair]`` matrix, so an edge's
effect on a unit is the same combination of its effects on the pairs (pairs do not interact in
an encoder):

* ``"score"``: one unit per pair, its score (the model's relevance score, e.g. the log-odds);
* ``"margin"``: one unit per query: mean score of its relevant pairs minus mean score of its
  non-relevant ones (grades from :class:`patching.AlignedPairs`, ``grade > 0`` relevant; pair ids
  ``"qid:docid"`` as :meth:`patching.PairBuilder.build` writes them);
* a ``[unit, pair]`` tensor: any other linear combination.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.parts import (
    PARTS,
    CrossEncoderBatch,
    Part,
    cross_encoder_batch_from_tokens,
    pair_layout_of,
)
from patching.edges.graph import N_PARTS, Point
from patching.perturbations import STOPWORDS, AlignedPairs, PairBuilder, is_content_word

SourceKind = Literal["token", "part", "mean", "zero"]
Align = Literal["token", "part"]
CorruptedLike = CrossEncoderBatch | Literal["mean", "zero"] | None
MetricLike = Literal["score", "margin"] | Tensor


@dataclass
class EdgeInputs:
    """Checked inputs of an edge computation (build with :func:`edge_inputs`).

    Attributes:
        clean: the clean batch (on the model's device).
        corrupted: the corrupted batch (``"token"``/``"part"``), else None.
        kind: the source kind (module doc).
        pair_ids, grades: per pair, from :class:`AlignedPairs` when given.
        means: ``"mean"``: per point, ``[S, 5, d]`` per-part mean contributions (filled by
            the engine: :func:`patching.edges.engine.prepare_inputs`).
    """

    clean: CrossEncoderBatch
    corrupted: CrossEncoderBatch | None
    kind: str
    pair_ids: list[str]
    grades: list[int | None]
    means: dict[Point, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.clean)

    def pad_token_id(self, model: HookedReranker) -> int:
        """The id that pads rows to a common width: the embedding's (every family with
        ``abilities.edges`` embeds with its shape's ``pad_token_id``, 0 when its config has
        none)."""
        return int(model.embed.pad_token_id)


def edge_inputs(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs,
    corrupted: CorruptedLike = None,
    *,
    align: Align = "token",
) -> EdgeInputs:
    """Check and gather the inputs of an edge computation (errors say what to pass)."""
    device = model.cfg.device
    pair_ids: list[str] | None = None
    grades: list[int | None] | None = None
    if isinstance(clean, AlignedPairs):
        pair_ids, grades = list(clean.pair_ids), list(clean.grades)
        if corrupted is None:
            corrupted = clean.corrupted
        clean = clean.clean
    if not isinstance(clean, CrossEncoderBatch):
        raise ValueError(
            f"clean must be a CrossEncoderBatch (model.encode(...)) or AlignedPairs, got "
            f"{type(clean).__name__}"
        )
    if len(clean) == 0:
        raise ValueError("no pairs given: pass at least one (query, document) pair")
    n = len(clean)
    pair_ids = pair_ids or [str(i) for i in range(n)]
    grades = grades or [None] * n
    clean = clean.to(device)
    if isinstance(corrupted, str):
        if corrupted not in ("mean", "zero"):
            raise ValueError(
                f"unknown corrupted={corrupted!r}: pass a corrupted batch (or AlignedPairs), "
                "'mean' or 'zero'"
            )
        return EdgeInputs(clean, None, corrupted, pair_ids, grades)
    if corrupted is None:
        raise ValueError(
            "no corrupted input: pass AlignedPairs, a corrupted batch aligned with the clean "
            "one, or corrupted='mean' / 'zero'"
        )
    if not isinstance(corrupted, CrossEncoderBatch):
        raise ValueError(
            f"corrupted must be a CrossEncoderBatch, 'mean' or 'zero', got "
            f"{type(corrupted).__name__}"
        )
    if len(corrupted) != n:
        raise ValueError(
            f"{n} clean pairs but {len(corrupted)} corrupted ones: pass one corrupted input per "
            "clean pair"
        )
    corrupted = corrupted.to(device)
    if align == "token":
        _check_token_aligned(clean, corrupted, pair_ids)
        return EdgeInputs(clean, corrupted, "token", pair_ids, grades)
    if align == "part":
        _check_part_aligned(clean, corrupted, pair_ids)
        return EdgeInputs(clean, corrupted, "part", pair_ids, grades)
    raise ValueError(f"unknown align={align!r}: use 'token' or 'part'")


def _check_token_aligned(
    clean: CrossEncoderBatch, corrupted: CrossEncoderBatch, pair_ids: list[str]
) -> None:
    if clean.input_ids.shape != corrupted.input_ids.shape:
        raise ValueError(
            f"clean batch {tuple(clean.input_ids.shape)} and corrupted batch "
            f"{tuple(corrupted.input_ids.shape)} differ in shape: they must align token for "
            "token (build them with PairBuilder), or pass align='part' to align them by part"
        )
    fields = (
        ("parts", clean.parts, corrupted.parts),
        ("token_type_ids", clean.token_type_ids, corrupted.token_type_ids),
        ("attention_mask", clean.attention_mask, corrupted.attention_mask),
    )
    for name, a, b in fields:
        differs = (a != b).any(-1)
        if bool(differs.any()):
            bad = [pair_ids[i] for i in differs.nonzero()[:, 0].tolist()]
            raise ValueError(
                f"pairs {bad[:5]} are not aligned token for token: clean and corrupted {name} "
                "differ; build them with PairBuilder, or pass align='part' to align them by part"
            )


def _check_part_aligned(
    clean: CrossEncoderBatch, corrupted: CrossEncoderBatch, pair_ids: list[str]
) -> None:
    has_clean = torch.stack([(clean.parts == int(p)).any(-1) for p in PARTS], -1)
    has_corr = torch.stack([(corrupted.parts == int(p)).any(-1) for p in PARTS], -1)
    missing = (has_clean & ~has_corr).any(-1)
    if bool(missing.any()):
        i = int(missing.nonzero()[0, 0])
        names = [p.name.lower() for p, m in zip(PARTS, (has_clean & ~has_corr)[i]) if m]
        raise ValueError(
            f"pair {pair_ids[i]!r} cannot be aligned by part: its corrupted input has no "
            f"{', '.join(names)} token(s); every part of the clean input needs one"
        )


# ---------------------------------------------------------------------- batches
def pad_batch(batch: CrossEncoderBatch, width: int, pad_token_id: int) -> CrossEncoderBatch:
    """``batch`` right-padded to ``width`` positions (padding is masked and has part PAD)."""
    n, w = batch.input_ids.shape
    if w == width:
        return batch
    extra = width - w

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.cat([t, t.new_full((n, extra), value)], dim=1)

    return CrossEncoderBatch(
        pad(batch.input_ids, pad_token_id),
        pad(batch.token_type_ids, 0),
        pad(batch.attention_mask, 0),
        pad(batch.parts, int(Part.PAD)),
    )


def cat_batches(batches: list[CrossEncoderBatch], pad_token_id: int) -> CrossEncoderBatch:
    """Rows of several batches in one (padded to the widest)."""
    width = max(b.input_ids.shape[1] for b in batches)
    padded = [pad_batch(b, width, pad_token_id) for b in batches]
    return CrossEncoderBatch(
        torch.cat([b.input_ids for b in padded]),
        torch.cat([b.token_type_ids for b in padded]),
        torch.cat([b.attention_mask for b in padded]),
        torch.cat([b.parts for b in padded]),
    )


def take_rows(batch: CrossEncoderBatch, rows: Int[Tensor, " n"]) -> CrossEncoderBatch:
    """Rows of ``batch`` at its full width."""
    rows = rows.to(batch.input_ids.device)
    return CrossEncoderBatch(
        batch.input_ids[rows], batch.token_type_ids[rows], batch.attention_mask[rows],
        batch.parts[rows],
    )  # fmt: skip


def embed(model: HookedReranker, batch: CrossEncoderBatch) -> Float[Tensor, "rows pos d"]:
    """The embedding output ``hook_full_embed`` of ``batch``."""
    batch = batch.to(model.cfg.device)
    return model.embed(batch.input_ids, batch.token_type_ids)


def part_onehot(parts: Int[Tensor, "rows pos"], n_parts: int) -> Float[Tensor, "rows pos k"]:
    """Per position: one-hot of its part (``n_parts`` = 5), or all ones (``n_parts`` = 1, edges
    not split by part: every position, padding included)."""
    if n_parts == 1:
        return torch.ones(*parts.shape, 1, device=parts.device)
    onehot = nn.functional.one_hot(parts.long().clamp(max=N_PARTS), N_PARTS + 1)
    return onehot[..., :N_PARTS].float()


# ---------------------------------------------------------------------- lockstep runs
class Lockstep:
    """Current rows (each reading the source of one pair of a group) and the group's source rows,
    run as one batch: rows ``0..n-1`` are current, the rest are the source's.

    Contributions (``c``) are ``[rows, S, pos, d]`` (:class:`patching.edges.engine.
    Contributions`). The source's are never broadcast to every position when they are part
    means: products with them are taken per part.

    Args:
        inputs: the checked inputs.
        pairs: the group's pair indices.
        row_pair: ``[n]`` for every current row, its pair's position in ``pairs``.
    """

    def __init__(self, model: HookedReranker, inputs: EdgeInputs, pairs: Tensor, row_pair: Tensor):
        self.model, self.inputs = model, inputs
        self.kind = inputs.kind
        device = inputs.clean.device
        self.row_pair = row_pair.to(device)
        self.n = len(row_pair)
        self.m = len(pairs)
        self.identity = bool(torch.equal(row_pair.cpu(), torch.arange(len(pairs))))
        group = take_rows(inputs.clean, pairs)
        current = take_rows(group, row_pair)
        with torch.no_grad():
            x_clean = embed(model, group)
        x_current = x_clean[self.row_pair]
        self.current = current
        if self.kind in ("token", "part"):
            assert inputs.corrupted is not None
            source = take_rows(inputs.corrupted, pairs)
            pad = inputs.pad_token_id(model)
            self.rows = cat_batches([current, source], pad)
            width = self.rows.input_ids.shape[1]
            self.source_onehot = part_onehot(_pad_parts(source.parts, width), N_PARTS)
            with torch.no_grad():
                x_source = embed(model, source)
            self.x0 = torch.cat([_pad(x_current, width), _pad(x_source, width)])
            self.width = width
        else:
            self.rows, self.x0, self.width = current, x_current, current.input_ids.shape[1]
        #: ``[n, width]`` parts of the current rows (PAD beyond their own width)
        self.current_parts = _pad_parts(current.parts, self.width)
        self.onehot5 = part_onehot(self.current_parts, N_PARTS)

    # ------------------------------------------------------------------ the source
    def _source_rows(self, c: Tensor) -> Tensor:
        """Token source: each current row's source row, ``[n, S, pos, d]``."""
        src = c[self.n : self.n + self.m]
        return src if self.identity else src[self.row_pair]

    def _part_means(self, point: Point, c: Tensor) -> Tensor:
        """``"mean"``/``"part"``: ``[n, S, 5, d]`` per-part source contributions of each row."""
        s = c.shape[1]
        if self.kind == "mean":
            assert self.inputs.means is not None
            means = self.inputs.means[point][:s]
            return means[None].expand(self.n, *means.shape)
        src = c[self.n : self.n + self.m]
        counts = self.source_onehot.sum(1).clamp(min=1)  # [m, 5]
        means = torch.einsum("mspd,mpk->mskd", src, self.source_onehot) / counts[:, None, :, None]
        return means if self.identity else means[self.row_pair]

    def diffs(self, point: Point, c: Tensor) -> Float[Tensor, "n S pos d"]:
        """``source - current`` contribution of every sender, for every current row."""
        cur = c[: self.n]
        if self.kind == "token":
            return self._source_rows(c) - cur
        if self.kind == "zero":
            return -cur
        means = self._part_means(point, c)
        return torch.einsum("nskd,npk->nspd", means, self.onehot5) - cur

    def source_x0(self) -> Float[Tensor, "n pos d"]:
        """The source's embedding output for the current rows (the far end of EAP-IG's path)."""
        c = self.x0[:, None]
        return (self.diffs(("pre", 0), c) + c[: self.n])[:, 0]

    # ------------------------------------------------------------------ products
    def apply_masks(self, point: Point, c: Tensor, masks: Tensor) -> Float[Tensor, "n pos J d"]:
        """``sum_s masks[n, j, s, k] (source - current)_s`` on the positions of part ``k`` (every
        position when ``K`` = 1), summed over ``k``: the deltas of ``J`` receivers."""
        n, s, pos, d = self.n, c.shape[1], c.shape[2], c.shape[3]
        j, k = masks.shape[1], masks.shape[3]
        m = masks.to(c.dtype)
        flat = m.permute(0, 1, 3, 2).reshape(n, j * k, s)
        out = -torch.bmm(flat, c[:n].reshape(n, s, pos * d))  # [n, J*K, pos*d]
        if self.kind == "token":
            src = c[self.n : self.n + self.m]
            for pair in range(self.m):
                rows = (self.row_pair == pair).nonzero()[:, 0]
                if len(rows):
                    prod = flat[rows].reshape(-1, s) @ src[pair].reshape(s, pos * d)
                    out[rows] += prod.view(len(rows), j * k, pos * d)
        out = out.view(n, j, k, pos, d)
        if k == 1:
            delta = out[:, :, 0]
        else:
            delta = torch.einsum("njkpd,npk->njpd", out, self.onehot5)
        if self.kind in ("mean", "part"):
            means = self._part_means(point, c)
            if k == 1:
                t = torch.einsum("njs,nsqd->njqd", m[..., 0], means)
            else:
                t = torch.einsum("njsk,nskd->njkd", m, means)
            delta = delta + torch.einsum("njqd,npq->njpd", t, self.onehot5)
        return delta.permute(0, 2, 1, 3)

    def dot_grads(
        self, point: Point, c: Tensor, grads: Float[Tensor, "n pos J d"], n_parts: int
    ) -> Float[Tensor, "n J S K"]:
        """``sum_{pos in part k, d} (source - current)_s . grads_j`` for every receiver ``j``,
        sender ``s`` and part ``k`` (``n_parts`` 1: every position)."""
        n, s, pos, d = self.n, c.shape[1], c.shape[2], c.shape[3]
        j = grads.shape[2]
        if n_parts == 1:
            g = grads.permute(0, 2, 1, 3).reshape(n, j, pos * d)
        else:
            g = torch.einsum("npjd,npk->njkpd", grads, self.onehot5).reshape(n, j * n_parts, -1)
        g_t = g.transpose(1, 2)
        out = -torch.bmm(c[:n].reshape(n, s, pos * d), g_t)  # [n, S, J*K]
        if self.kind == "token":
            src = self._source_rows(c)
            out += torch.bmm(src.reshape(n, s, pos * d), g_t)
        elif self.kind in ("mean", "part"):
            means = self._part_means(point, c)
            g_part = torch.einsum("npjd,npq->njqd", grads, self.onehot5)
            if n_parts == 1:
                out += torch.einsum("nsqd,njqd->nsj", means, g_part)
            else:
                out += torch.einsum("nskd,njkd->nsjk", means, g_part).reshape(n, s, -1)
        return out.view(n, s, j, n_parts).permute(0, 2, 1, 3)


def _pad(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], dim=1)


def _pad_parts(parts: Int[Tensor, "n pos"], width: int) -> Int[Tensor, "n width"]:
    if parts.shape[1] >= width:
        return parts[:, :width]
    extra = parts.new_full((parts.shape[0], width - parts.shape[1]), N_PARTS)
    return torch.cat([parts, extra], dim=1)


# ---------------------------------------------------------------------- query words replaced
def replace_query_words(
    tokenizer: Any,
    items: Iterable[Any],
    *,
    max_length: int = 512,
    filler: str | int = "a",
    stopwords: frozenset[str] = STOPWORDS,
    qrels: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[AlignedPairs, dict[str, str]]:
    """``(pairs, skipped)``: the candidates with their query's content words replaced.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets map word pieces to words).
        items: ``Pair``-like objects (``qid``, ``docid``, ``query``, ``document``), e.g.
            ``collection.candidates()``; pair ids are ``"qid:docid"``.
        max_length: the model input length (documents are cut to fit).
        filler: the replacement token (a one-token word or a token id).
        qrels: relevance judgments for the grades (0 when unjudged).

    Returns:
        Aligned pairs (clean = the real query) and, per skipped pair id, why (a query without a
        content word, or an empty document).
    """
    builder = PairBuilder(tokenizer, max_length=max_length, filler=filler, stopwords=stopwords)
    filler_id = builder.filler_id
    layout = pair_layout_of(tokenizer)
    queries, clean_q, corrupted_q, docs, ids, grades = [], [], [], [], [], []
    skipped: dict[str, str] = {}
    for item in items:
        pair_id = f"{item.qid}:{item.docid}"
        enc = tokenizer(item.query, add_special_tokens=False, return_offsets_mapping=True)
        q_ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        spans = [
            m.span()
            for m in re.finditer(r"\w+", item.query)
            if m.group().lower() not in stopwords and is_content_word(m.group().lower())
        ]
        replaced = [
            filler_id if any(a < e and s < b for a, b in spans) else t
            for t, (s, e) in zip(q_ids, offsets)
        ]
        doc = list(tokenizer(item.document, add_special_tokens=False)["input_ids"])
        room = max_length - layout.n_special - len(q_ids)
        if replaced == q_ids:
            skipped[pair_id] = f"the query {item.query!r} has no content word to replace"
            continue
        if not doc or room < 1:
            skipped[pair_id] = "empty document, or no room for it next to the query"
            continue
        queries.append(item.query)
        clean_q.append(q_ids)
        corrupted_q.append(replaced)
        docs.append(doc[:room])
        ids.append(pair_id)
        grade = None if qrels is None else int(qrels.get(str(item.qid), {}).get(str(item.docid), 0))
        grades.append(grade)
    if not ids:
        raise ValueError(
            f"no pair could be built ({len(skipped)} skipped, e.g. "
            f"{next(iter(skipped.values()), 'no candidates given')})"
        )
    common = dict(
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layout=layout,
        max_length=max(len(q) + len(d) for q, d in zip(clean_q, docs)) + layout.n_special,
    )
    clean = cross_encoder_batch_from_tokens(clean_q, docs, **common)
    corrupted = cross_encoder_batch_from_tokens(corrupted_q, docs, **common)
    return AlignedPairs(clean, corrupted, ids, grades), skipped


# ---------------------------------------------------------------------- metrics
def metric_matrix(
    metric: MetricLike, pair_ids: list[str], grades: list[int | None]
) -> tuple[Float[Tensor, "unit pair"], list[str]]:
    """``(A, unit ids)`` of a metric (module doc)."""
    n = len(pair_ids)
    if isinstance(metric, Tensor):
        if metric.dim() != 2 or metric.shape[1] != n:
            raise ValueError(
                f"a metric matrix needs shape [units, {n} pairs], got {tuple(metric.shape)}"
            )
        return metric.double(), [str(u) for u in range(metric.shape[0])]
    if metric == "score":
        return torch.eye(n, dtype=torch.float64), list(pair_ids)
    if metric != "margin":
        raise ValueError(
            f"unknown metric {metric!r}: use 'score', 'margin' or a [unit, pair] tensor"
        )
    if any(g is None for g in grades):
        raise ValueError(
            "metric='margin' needs relevance grades: build the pairs with qrels "
            "(PairBuilder.build(..., qrels=...))"
        )
    by_query: dict[str, list[int]] = {}
    for i, pid in enumerate(pair_ids):
        if ":" not in pid:
            raise ValueError(
                f"metric='margin' groups pairs by query from ids 'qid:docid', got {pid!r}"
            )
        by_query.setdefault(pid.split(":", 1)[0], []).append(i)
    rows, units = [], []
    for qid, members in by_query.items():
        rel = [i for i in members if (grades[i] or 0) > 0]
        non = [i for i in members if (grades[i] or 0) <= 0]
        if not rel or not non:
            continue
        row = torch.zeros(n, dtype=torch.float64)
        row[rel] = 1.0 / len(rel)
        row[non] = -1.0 / len(non)
        rows.append(row)
        units.append(qid)
    if not rows:
        raise ValueError(
            "metric='margin' found no query with both a relevant and a non-relevant pair: add "
            "judged relevant and non-relevant documents per query, or use metric='score'"
        )
    return torch.stack(rows), units


__all__ = [
    "Align",
    "CorruptedLike",
    "EdgeInputs",
    "Lockstep",
    "MetricLike",
    "SourceKind",
    "cat_batches",
    "edge_inputs",
    "embed",
    "metric_matrix",
    "pad_batch",
    "part_onehot",
    "replace_query_words",
    "take_rows",
]
