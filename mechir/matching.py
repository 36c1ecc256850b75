"""Attention statistics over a dataset and the matching heads of a cross-encoder.

Per (pair, layer, head), with ``A[i, j]`` the attention of token ``i`` to token ``j``
(``blocks.{l}.attn.hook_pattern``), ``Q``/``D`` the query/document tokens of the pair and ``M``
the exact-match entries (:func:`exact_match_mask`)::

    qd_mass           = 1/|Q| sum_{i in Q} sum_{j in D} A[i, j]    (Query -> Document mass)
    qd_max            = max_{i in Q, j in D} A[i, j]               (strongest single Q -> D link)
    qd_match_mass     = 1/|Q| sum_{i in Q} sum_{j in D, (i,j) in M} A[i, j]
    qd_match_max      = max_{i in Q, j in D, (i,j) in M} A[i, j]   (NaN without an exact match)
    qd_nonmatch_mass, qd_nonmatch_max: the same over non-matching entries
    dq_*              : the same from Document tokens to Query tokens
    cls_mass, sep1_mass, sep2_mass = 1/|real| sum_{i real} A[i, CLS / SEP1 / SEP2]  ("no-op")

so ``qd_mass = qd_match_mass + qd_nonmatch_mass`` and ``qd_max = max(qd_match_max,
qd_nonmatch_max)``. :func:`attention_statistics` reduces every pattern inside the forward pass,
so memory does not grow with the dataset; :func:`attention_statistics_reference` computes the
same from a full ``run_with_cache`` with explicit loops.

Matching heads (Vast et al., "Understanding Matching Mechanisms in Cross-Encoders"): heads whose
``qd_max`` (or ``dq_max``) is clearly higher for relevant pairs than for negatives
(:func:`matching_head_deltas`). Pairs come from an IR collection
(:func:`mechir.data.matching_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from mechir.data import PAIR_KINDS
from mechir.display import short_list
from mechir.hooks.towers import refuse_two_towers
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, Part
from mechir.selection import head_label, select_layers

pd = lazy_import("pandas")
torch = lazy_import("torch")

__all__ = [
    "DIRECTIONS",
    "KINDS",
    "STATISTICS",
    "AttentionStatistics",
    "attention_statistics",
    "attention_statistics_reference",
    "exact_match_mask",
    "filter_correct",
    "matching_head_deltas",
    "matching_head_labels",
    "matching_heads",
    "pattern_statistics",
    "wordpiece_words",
]

#: The two cross-part directions: name -> (source part, target part).
DIRECTIONS: dict[str, tuple[Part, Part]] = {
    "qd": (Part.QUERY, Part.DOCUMENT),
    "dq": (Part.DOCUMENT, Part.QUERY),
}
_NOOP = {"cls": Part.CLS, "sep1": Part.SEP1, "sep2": Part.SEP2}
#: Names of the per-(pair, layer, head) statistics, in table order.
STATISTICS: tuple[str, ...] = tuple(
    f"{d}_{s}"
    for d in DIRECTIONS
    for s in (
        "mass",
        "max",
        "match_mass",
        "match_max",
        "nonmatch_mass",
        "nonmatch_max",
    )
) + tuple(f"{n}_mass" for n in _NOOP)

#: The kinds of pairs built by :func:`mechir.data.matching_pairs`.
KINDS: tuple[str, ...] = PAIR_KINDS


# ---------------------------------------------------------------------------- exact matches
def wordpiece_words(tokens: Sequence[str]) -> list[str]:
    """The lowercased whole word each WordPiece token belongs to.

    A token starting with ``##`` continues the previous token's word:
    ``["the", "cat", "##s"] -> ["the", "cats", "cats"]``.
    """
    words: list[str] = []
    start = 0
    for i, tok in enumerate(tokens):
        if not (tok.startswith("##") and i > 0):
            start = i
            words.append(tok.lower())
            continue
        joined = words[start] + tok[2:].lower()
        for j in range(start, i):
            words[j] = joined
        words.append(joined)
    return words


def _word_keys(batch: CrossEncoderBatch, tokenizer: Any) -> torch.Tensor:
    """Integer id of the whole word of every query/document token (-1 elsewhere)."""
    keys = torch.full_like(batch.input_ids, -1, device="cpu")
    vocab: dict[str, int] = {}
    ids, parts = batch.input_ids.cpu(), batch.parts.cpu()
    for b in range(len(batch)):
        for part in (Part.QUERY, Part.DOCUMENT):
            pos = (parts[b] == int(part)).nonzero().flatten()
            if not len(pos):
                continue
            words = wordpiece_words(tokenizer.convert_ids_to_tokens(ids[b, pos].tolist()))
            keys[b, pos] = torch.tensor([vocab.setdefault(w, len(vocab)) for w in words])
    return keys


def exact_match_mask(
    batch: CrossEncoderBatch, *, whole_words: bool = False, tokenizer: Any = None
) -> Bool[torch.Tensor, "batch pos pos"]:
    """``M[b, i, j]``: tokens ``i`` and ``j`` are an exact query/document match.

    True when one of ``i, j`` is a query token and the other a document token and they have the
    same token id; with ``whole_words``, also the same lowercased whole word after joining
    WordPieces (so ``##s`` of "cats" does not match ``##s`` of "dogs"). Symmetric.
    """
    ids = batch.input_ids
    is_q, is_d = batch.mask(Part.QUERY), batch.mask(Part.DOCUMENT)
    cross = (is_q[:, :, None] & is_d[:, None, :]) | (is_d[:, :, None] & is_q[:, None, :])
    match = cross & (ids[:, :, None] == ids[:, None, :])
    if whole_words:
        if tokenizer is None:
            raise ValueError("whole_words=True needs the tokenizer (to join WordPieces)")
        keys = _word_keys(batch, tokenizer).to(ids.device)
        match &= keys[:, :, None] == keys[:, None, :]
    return match


# ---------------------------------------------------------------------------- statistics
@dataclass
class AttentionStatistics:
    """Per-(pair, layer, head) attention statistics of a batch (see the module docstring).

    Attributes:
        values: statistic name (:data:`STATISTICS`) -> ``[pair, layer, head]`` float32 (CPU);
            ``layer`` indexes :attr:`layers`.
        layers: the layers measured.
        pairs: one row per pair: ``pair`` (row of the batch), ``score``, ``predicted_relevant``,
            ``n_query``, ``n_document``, ``n_matches`` (exact-match Q->D entries).
    """

    values: dict[str, Float[torch.Tensor, "pair layer head"]]
    layers: list[int]
    pairs: pd.DataFrame = field(repr=False)

    def __repr__(self) -> str:
        shape = next(iter(self.values.values())).shape if self.values else (0, 0, 0)
        names = ", ".join(self.values)
        return (
            f"AttentionStatistics({shape[0]} pairs x {len(self.layers)} layers "
            f"{short_list(self.layers)} x {shape[2]} heads; statistics: {names})"
        )

    def table(self) -> pd.DataFrame:
        """Tidy table: one row per (pair, layer, head) with ``label`` ``"l/h"`` and every
        statistic as a column."""
        n_pairs, n_layers, n_heads = next(iter(self.values.values())).shape
        grid = np.indices((n_pairs, n_layers, n_heads)).reshape(3, -1)
        layers = np.asarray(self.layers)[grid[1]]
        frame = pd.DataFrame({"pair": grid[0], "layer": layers, "head": grid[2]})
        frame["label"] = [head_label(int(a), int(b)) for a, b in zip(layers, grid[2])]
        for name in STATISTICS:
            frame[name] = self.values[name].reshape(-1).numpy()
        return frame


def _predicted_relevant(
    model: HookedReranker, logits: Float[torch.Tensor, "batch n_labels"]
) -> torch.Tensor:
    """1 label: logit > 0 (probability > 0.5); several: the relevant label has the top logit."""
    if model.num_labels == 1:
        return logits[:, 0] > 0
    return logits.argmax(-1) == model.relevant_label


def _pair_info(
    batch: CrossEncoderBatch,
    match: torch.Tensor,
    logits: torch.Tensor,
    score: torch.Tensor,
    model: HookedReranker,
) -> dict[str, torch.Tensor]:
    is_q = batch.mask(Part.QUERY)
    return {
        "score": score.float().cpu(),
        "predicted_relevant": _predicted_relevant(model, logits).cpu(),
        "n_query": is_q.sum(-1).cpu(),
        "n_document": batch.mask(Part.DOCUMENT).sum(-1).cpu(),
        "n_matches": (match & is_q[:, :, None]).sum((1, 2)).cpu(),
    }


def _masked_max(pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``pattern [b, h, q, k]`` over the entries where ``mask [b, q, k]`` (NaN if none)."""
    filled = pattern.masked_fill(~mask[:, None], -math.inf).amax((-2, -1))
    return filled.masked_fill(filled == -math.inf, math.nan)


@dataclass(frozen=True)
class _Reduction:
    """What reduces one layer's pattern of a chunk to the :data:`STATISTICS` (built once per
    chunk, shared by its layers).

    Every mass statistic is a weighted sum ``sum_{i,j} A[i, j] W_m[i, j]``, so all of them come
    from one batched matrix product with ``weights`` ``[batch, pos * pos, n_masses]``; every max
    is a max over a mask (``max_masks``).
    """

    mass_names: tuple[str, ...]
    weights: Float[torch.Tensor, "batch pos_pos n_masses"]
    max_masks: dict[str, Bool[torch.Tensor, "batch pos pos"]]

    @classmethod
    def build(cls, parts: torch.Tensor, match: torch.Tensor) -> _Reduction:
        masks = {p: parts == int(p) for p in Part}
        names, weights, max_masks = [], [], {}
        for name, (src_part, tgt_part) in DIRECTIONS.items():
            src, tgt = masks[src_part], masks[tgt_part]
            block = src[:, :, None] & tgt[:, None, :]
            per_source = 1 / src.sum(-1).clamp(min=1)[:, None, None]  # mean over source tokens
            for kind, mask in (("match", block & match), ("nonmatch", block & ~match)):
                names.append(f"{name}_{kind}_mass")
                weights.append(mask * per_source)
                max_masks[f"{name}_{kind}_max"] = mask
        real = ~masks[Part.PAD]
        per_real = 1 / real.sum(-1).clamp(min=1)[:, None, None]
        for name, part in _NOOP.items():
            names.append(f"{name}_mass")
            weights.append((real[:, :, None] & masks[part][:, None, :]) * per_real)
        stacked = torch.stack(weights, dim=-1).flatten(1, 2).float()
        return cls(tuple(names), stacked, max_masks)

    def __call__(
        self, pattern: Float[torch.Tensor, "batch head pos pos"]
    ) -> dict[str, Float[torch.Tensor, "batch head"]]:
        pattern = pattern.float()  # no copy for float32; sums of half-precision values drift
        masses = torch.bmm(pattern.flatten(2), self.weights)  # [batch, head, n_masses]
        out = dict(zip(self.mass_names, masses.unbind(-1)))
        out |= {name: _masked_max(pattern, mask) for name, mask in self.max_masks.items()}
        for d in DIRECTIONS:
            out[f"{d}_mass"] = out[f"{d}_match_mass"] + out[f"{d}_nonmatch_mass"]
            out[f"{d}_max"] = torch.fmax(out[f"{d}_match_max"], out[f"{d}_nonmatch_max"])
        return out


def pattern_statistics(
    pattern: Float[torch.Tensor, "batch head pos pos"],
    batch: CrossEncoderBatch,
    match: Bool[torch.Tensor, "batch pos pos"] | None = None,
) -> dict[str, Float[torch.Tensor, "batch head"]]:
    """The :data:`STATISTICS` of one layer's attention pattern (e.g. from a cache) for ``batch``.

    ``match`` defaults to :func:`exact_match_mask` of the batch (token ids only).
    """
    batch = batch.to(pattern.device)
    match = exact_match_mask(batch) if match is None else match.to(pattern.device)
    return _Reduction.build(batch.parts, match)(pattern)


def _reducing_hook(
    values: dict[str, torch.Tensor], rows: torch.Tensor, li: int, reduction: _Reduction
):
    """Hook on ``hook_pattern``: reduce the pattern and store it in ``values[...][rows, li]``."""

    def hook(pattern: torch.Tensor, hook: Any) -> None:
        reduced = reduction(pattern)
        stacked = torch.stack([reduced[name] for name in STATISTICS]).cpu()  # one device copy
        for name, value in zip(STATISTICS, stacked):
            values[name][rows, li] = value

    return hook


def _capture_hook(store: dict[str, torch.Tensor], key: str):
    def hook(activation: torch.Tensor, hook: Any) -> None:
        store[key] = activation.detach()

    return hook


def attention_statistics(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    *,
    layers: int | Iterable[int] | None = None,
    batch_size: int | None = 32,
    whole_words: bool = False,
    tokenizer: Any = None,
    sort_by_length: bool = True,
) -> AttentionStatistics:
    """Attention statistics of every pair, layer and head, reduced inside the forward pass.

    A hook on each ``blocks.{l}.attn.hook_pattern`` reduces the ``[batch, head, pos, pos]``
    pattern to the :data:`STATISTICS` at once, so only ``O(pairs x layers x heads)`` numbers are
    kept (never a cache of patterns). The same forward pass records each pair's relevance score
    and whether the model predicts it relevant (1 label: logit > 0; several: the relevant label
    has the largest logit), for :func:`filter_correct`.

    Args:
        layers: layers to measure (default all).
        batch_size: pairs per forward pass.
        whole_words: exact matches also need the same whole word (see :func:`exact_match_mask`).
        tokenizer: for ``whole_words``; default ``model.tokenizer``.
        sort_by_length: run pairs in order of length (less padding); results keep batch order.
    """
    refuse_two_towers(model, "attention_statistics (query<->document attention)")
    layers = select_layers(model, layers)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for one pass), got {batch_size}")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    n, n_heads = len(batch), model.cfg.n_heads
    device = model.cfg.device
    values = {name: torch.empty(n, len(layers), n_heads) for name in STATISTICS}
    info: dict[str, list[torch.Tensor]] = {}
    order = torch.arange(n)
    if sort_by_length:
        order = torch.sort(batch.lengths.cpu(), stable=True).indices
    step = batch_size or n
    for start in range(0, n, step):
        rows = order[start : start + step]
        chunk = batch[rows].to(device)
        match = exact_match_mask(chunk, whole_words=whole_words, tokenizer=tokenizer)
        reduction = _Reduction.build(chunk.parts, match)
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            (f"blocks.{layer}.attn.hook_pattern", _reducing_hook(values, rows, li, reduction))
            for li, layer in enumerate(layers)
        ]
        hooks.append(("classifier.hook_logits", _capture_hook(captured, "logits")))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            score = model(chunk)
        for key, value in _pair_info(chunk, match, captured["logits"], score, model).items():
            info.setdefault(key, []).append(value)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    pairs = pd.DataFrame({"pair": np.arange(n)})
    for key, parts in info.items():
        pairs[key] = torch.cat(parts)[inverse].numpy()
    return AttentionStatistics(values, layers, pairs)


def attention_statistics_reference(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    *,
    layers: int | Iterable[int] | None = None,
    whole_words: bool = False,
    tokenizer: Any = None,
) -> AttentionStatistics:
    """Naive reference for :func:`attention_statistics`: a full ``run_with_cache`` of the batch,
    then explicit per-pair index selection and loops over token pairs."""
    layers = select_layers(model, layers)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if whole_words and tokenizer is None:
        raise ValueError("whole_words=True needs the tokenizer (to join WordPieces)")
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, return_type="logits")
        score = model.scores_from_logits(logits)
    n, n_heads = len(batch), model.cfg.n_heads
    values = {name: torch.full((n, len(layers), n_heads), math.nan) for name in STATISTICS}
    ids, parts = batch.input_ids.cpu().tolist(), batch.parts.cpu().tolist()
    n_matches = []
    for b in range(n):
        where = {p: [i for i, x in enumerate(parts[b]) if x == int(p)] for p in Part}
        real = [i for i, x in enumerate(parts[b]) if x != int(Part.PAD)]
        word: dict[int, str] = {}
        if whole_words:
            for p in (Part.QUERY, Part.DOCUMENT):
                toks = tokenizer.convert_ids_to_tokens([ids[b][i] for i in where[p]])
                word |= dict(zip(where[p], wordpiece_words(toks)))
        matched = {
            (i, j)
            for i in where[Part.QUERY] + where[Part.DOCUMENT]
            for j in where[Part.QUERY] + where[Part.DOCUMENT]
            if parts[b][i] != parts[b][j]
            and ids[b][i] == ids[b][j]
            and (not whole_words or word[i] == word[j])
        }
        n_matches.append(sum(parts[b][i] == int(Part.QUERY) for i, _ in matched))
        is_match = {  # [|source|, |target|] per direction
            name: torch.tensor(
                [[(i, j) in matched for j in where[tp]] for i in where[sp]], dtype=torch.bool
            ).reshape(len(where[sp]), len(where[tp]))
            for name, (sp, tp) in DIRECTIONS.items()
        }
        for li, layer in enumerate(layers):
            A = cache[f"blocks.{layer}.attn.hook_pattern"][b].float().cpu()  # [head, pos, pos]
            for name, (sp, tp) in DIRECTIONS.items():
                sub = A[:, where[sp]][:, :, where[tp]]  # [head, |source|, |target|]
                m = is_match[name]
                values[f"{name}_mass"][b, li] = sub.sum(-1).mean(-1)
                values[f"{name}_max"][b, li] = sub.amax((-2, -1))
                for kind, sel in (("match", m), ("nonmatch", ~m)):
                    values[f"{name}_{kind}_mass"][b, li] = (sub * sel).sum(-1).mean(-1)
                    if sel.any():
                        values[f"{name}_{kind}_max"][b, li] = sub[:, sel].amax(-1)
            for name, part in _NOOP.items():
                values[f"{name}_mass"][b, li] = A[:, real][:, :, where[part]].sum(-1).mean(-1)
    predicted = _predicted_relevant(model, logits)
    pairs = pd.DataFrame(
        {
            "pair": np.arange(n),
            "score": score.float().cpu().numpy(),
            "predicted_relevant": predicted.cpu().numpy(),
            "n_query": batch.mask(Part.QUERY).sum(-1).cpu().numpy(),
            "n_document": batch.mask(Part.DOCUMENT).sum(-1).cpu().numpy(),
            "n_matches": np.asarray(n_matches, dtype=np.int64),
        }
    )
    return AttentionStatistics(values, layers, pairs)


# ---------------------------------------------------------------------------- pairs
def filter_correct(
    pairs: pd.DataFrame, stats: AttentionStatistics, *, positive: str = "relevant"
) -> pd.DataFrame:
    """The pairs the model classifies correctly: ``positive`` pairs it predicts relevant and
    the others (negatives) it predicts non-relevant (``stats.pairs.predicted_relevant``)."""
    predicted = stats.pairs.set_index("pair")["predicted_relevant"]
    keep = (pairs["kind"] == positive).to_numpy() == predicted.loc[pairs["pair"]].to_numpy()
    return pairs[keep]


# ---------------------------------------------------------------------------- matching heads
def matching_head_deltas(
    stats: AttentionStatistics | pd.DataFrame,
    pairs: pd.DataFrame,
    *,
    statistics: Sequence[str] = ("qd_max", "dq_max"),
    positive: str = "relevant",
    negatives: Sequence[str] = ("easy_negative", "hard_negative"),
    threshold: float = 0.1,
    paired: bool = False,
) -> pd.DataFrame:
    """Matching-head score ``Delta`` of every head, for each statistic and negative kind.

    For a statistic ``s`` (default ``qd_max``, the maximal Query -> Document attention of a pair)
    and head ``h``: ``m_h(q, c)`` is the mean of ``s`` over the pairs of query ``q`` and kind
    ``c``; then::

        Delta_h = median_q m_h(q, positive) - median_q m_h(q, negative)     (paired=False)
        Delta_h = median_q [m_h(q, positive) - m_h(q, negative)]            (paired=True)

    where the paired form uses only queries with pairs of both kinds. A head with
    ``|Delta| > threshold`` is flagged ``matching``.

    Args:
        stats: :class:`AttentionStatistics` or its :meth:`~AttentionStatistics.table`.
        pairs: the pairs table (``pair``, ``qid``, ``kind``), e.g. from
            :func:`mechir.data.matching_pairs`, possibly filtered (:func:`filter_correct`);
            other pairs are ignored.

    Returns:
        One row per (statistic, negative, head): ``layer, head, label, statistic, negative,
        delta, positive_median, negative_median`` (the medians over queries of ``m_h``),
        ``n_positive_queries, n_negative_queries`` (the queries behind each median) and
        ``matching``; sorted by ``|delta|`` (largest first) within each (statistic, negative).
    """
    table = stats.table() if isinstance(stats, AttentionStatistics) else stats
    unknown = [s for s in statistics if s not in table.columns]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}: choose among {list(STATISTICS)}")
    kinds = set(pairs["kind"])
    for kind in (positive, *negatives):
        if kind not in kinds:
            raise ValueError(f"no {kind!r} pairs in the pairs table (kinds present: {kinds})")
    merged = table.merge(pairs[["pair", "qid", "kind"]], on="pair", how="inner")
    keys = ["layer", "head", "label"]
    means = merged.groupby([*keys, "kind", "qid"], sort=True)[list(statistics)].mean()
    frames = []
    for stat in statistics:
        wide = means[stat].unstack("kind")  # rows (layer, head, label, qid), columns kinds
        for negative in negatives:
            both = wide[[positive, negative]]
            if paired:
                both = both.dropna()
            grouped = both.groupby(level=keys)
            pos_med, neg_med = grouped[positive].median(), grouped[negative].median()
            if paired:
                delta = (both[positive] - both[negative]).groupby(level=keys).median()
            else:
                delta = pos_med - neg_med
            frame = pd.DataFrame(
                {
                    "statistic": stat,
                    "negative": negative,
                    "delta": delta,
                    "positive_median": pos_med,
                    "negative_median": neg_med,
                    "n_positive_queries": grouped[positive].count(),
                    "n_negative_queries": grouped[negative].count(),
                }
            ).reset_index()
            frame["matching"] = frame["delta"].abs() > threshold
            order = frame["delta"].abs().sort_values(ascending=False, kind="stable").index
            frames.append(frame.loc[order])
    return pd.concat(frames, ignore_index=True)


def matching_head_labels(
    deltas: pd.DataFrame,
    *,
    statistic: str = "qd_max",
    negative: str = "easy_negative",
    threshold: float = 0.1,
) -> list[str]:
    """Labels ``"l/h"`` of the heads with ``|Delta| > threshold``, largest ``|Delta|`` first."""
    sel = deltas[(deltas["statistic"] == statistic) & (deltas["negative"] == negative)]
    if sel.empty:
        raise ValueError(f"no rows for statistic {statistic!r} and negative {negative!r}")
    sel = sel[sel["delta"].abs() > threshold]
    return sel.loc[sel["delta"].abs().sort_values(ascending=False, kind="stable").index][
        "label"
    ].tolist()


def matching_heads(
    model: HookedReranker,
    pairs: pd.DataFrame,
    *,
    max_length: int | None = None,
    batch_size: int | None = 32,
    correct_only: bool = False,
    whole_words: bool = False,
    **delta_kwargs: Any,
) -> tuple[pd.DataFrame, AttentionStatistics]:
    """Encode ``pairs``, stream their attention statistics and score every head.

    ``pairs`` as from :func:`mechir.data.matching_pairs` (``query``, ``document``, ``qid``,
    ``kind``; its ``pair`` column is reset to the row order). With ``correct_only`` only
    correctly classified pairs count (:func:`filter_correct`, the paper's setting).
    ``delta_kwargs`` go to :func:`matching_head_deltas`.

    Returns:
        ``(deltas, stats)``: the :func:`matching_head_deltas` table and the statistics.
    """
    pairs = pairs.reset_index(drop=True).assign(pair=lambda f: np.arange(len(f)))
    batch = model.encode(list(pairs["query"]), list(pairs["document"]), max_length=max_length)
    stats = attention_statistics(model, batch, batch_size=batch_size, whole_words=whole_words)
    used = filter_correct(pairs, stats) if correct_only else pairs
    return matching_head_deltas(stats, used, **delta_kwargs), stats
