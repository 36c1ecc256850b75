"""Reading features: per-feature statistics, top-activating pairs, HTML cards, JSON export.

Per feature, over tagged activation rows (:class:`mechir.features.source.SiteActivations`):

* ``frequency``: fraction of rows where it fires; ``mean_active``: its mean value there;
* ``share_<part>``: fraction of its total activation on each part (CLS, query, SEP1, document,
  SEP2, instruction; decoder positions as ``decoder``);
* ``matched_mean`` / ``unmatched_mean``: mean activation on query and document tokens whose
  term occurs (does not occur) in the other text, and ``matching = matched_mean -
  unmatched_mean`` (a *matching feature* fires on terms shared by query and document);
* with ``relevant`` (per pair): ``relevant_mean`` / ``nonrelevant_mean`` over the pairs' tokens;
* with ``idf`` (per token id): ``idf_corr``, the Pearson correlation of the activation with the
  token's IDF over query and document tokens;
* with ``direct_effect`` (per feature): the score change attributed to it (e.g. mean
  attribution patching over pairs).

A card (:func:`feature_cards_html`) shows a feature's statistics, its activation histogram (an
inline SVG) and its top-activating pairs with every token shaded by the feature's activation.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtyping import Bool, Float

from mechir.features.saes import encode
from mechir.features.source import DECODER_POSITION, SiteActivations
from mechir.lazy import lazy_import
from mechir.parts import Part

pd = lazy_import("pandas")
torch = lazy_import("torch")

PART_NAMES = {int(p): p.name.lower() for p in Part if p != Part.PAD}
PART_NAMES[DECODER_POSITION] = "decoder"


@torch.no_grad()
def feature_activations(
    sae: Any, acts: SiteActivations, *, chunk: int = 8192
) -> Float[torch.Tensor, "n d_sae"]:
    """Feature activations of every row (float32, CPU)."""
    out = [
        encode(sae, acts.acts[i : i + chunk].to(sae.device)).float().cpu()
        for i in range(0, len(acts), chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_sae)


def token_idf(documents: Sequence[str], tokenizer: Any) -> dict[int, float]:
    """``idf(t) = log((N + 1) / (df(t) + 1)) + 1`` over ``documents`` tokenized by ``tokenizer``
    (document frequency of each token id)."""
    df: dict[int, int] = {}
    for doc in documents:
        for t in set(tokenizer(doc, add_special_tokens=False)["input_ids"]):
            df[t] = df.get(t, 0) + 1
    n = len(documents)
    return {t: math.log((n + 1) / (c + 1)) + 1 for t, c in df.items()}


def feature_statistics(
    features: Float[torch.Tensor, "n d_sae"],
    acts: SiteActivations,
    *,
    relevant: Bool[torch.Tensor, " pairs"] | None = None,
    idf: Mapping[int, float] | None = None,
    direct_effect: Float[torch.Tensor, " d_sae"] | None = None,
) -> pd.DataFrame:
    """One row per feature (module docstring)."""
    f = features.double()
    active = f > 0
    n = max(len(f), 1)
    table: dict[str, Any] = {"feature": list(range(f.shape[1]))}
    table["frequency"] = (active.double().sum(0) / n).tolist()
    table["mean_active"] = (f.sum(0) / active.sum(0).clamp_min(1)).tolist()
    total = f.sum(0).clamp_min(1e-30)
    for pid, name in PART_NAMES.items():
        rows = acts.part == pid
        if rows.any():
            table[f"share_{name}"] = (f[rows].sum(0) / total).tolist()
    content = (acts.part == int(Part.QUERY)) | (acts.part == int(Part.DOCUMENT))
    matched, unmatched = content & acts.matched, content & ~acts.matched
    mm = f[matched].mean(0) if matched.any() else torch.full((f.shape[1],), math.nan)
    um = f[unmatched].mean(0) if unmatched.any() else torch.full((f.shape[1],), math.nan)
    table["matched_mean"], table["unmatched_mean"] = mm.tolist(), um.tolist()
    table["matching"] = (mm - um).tolist()
    if relevant is not None:
        rel = relevant[acts.pair]
        for key, rows in (("relevant_mean", rel), ("nonrelevant_mean", ~rel)):
            table[key] = (f[rows].mean(0) if rows.any() else torch.full_like(mm, math.nan)).tolist()
    if idf is not None and content.any():
        w = torch.tensor([idf.get(int(t), math.nan) for t in acts.token[content]], dtype=f.dtype)
        ok = torch.isfinite(w)
        table["idf_corr"] = _pearson_columns(f[content][ok], w[ok]).tolist()
    if direct_effect is not None:
        table["direct_effect"] = direct_effect.double().tolist()
    return pd.DataFrame(table)


def _pearson_columns(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every column of ``x`` with ``w`` (NaN for a constant column)."""
    if len(w) < 2:
        return torch.full((x.shape[1],), math.nan, dtype=x.dtype)
    xc, wc = x - x.mean(0), w - w.mean()
    den = xc.norm(dim=0) * wc.norm()
    return torch.where(den > 0, (xc * wc[:, None]).sum(0) / den, torch.full_like(den, math.nan))


def top_pairs(
    features: Float[torch.Tensor, "n d_sae"], acts: SiteActivations, feature: int, n: int = 5
) -> list[int]:
    """The ``n`` pairs with the highest activation of ``feature`` (max over their tokens)."""
    col = features[:, feature]
    n_pairs = int(acts.pair.max()) + 1 if len(acts) else 0
    best = torch.full((n_pairs,), -math.inf).scatter_reduce(0, acts.pair, col, "amax")
    order = best.argsort(descending=True)
    return [int(p) for p in order[:n] if best[p] > 0]


def _histogram_svg(values: Sequence[float], bins: int = 20, width: int = 240) -> str:
    if not values:
        return "<svg width='240' height='60'></svg>"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    top = max(counts)
    bw = width / bins
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{60 - 55 * c / top:.1f}' width='{bw - 1:.1f}' "
        f"height='{55 * c / top:.1f}' fill='#4a7'/>"
        for i, c in enumerate(counts)
    )
    return (
        f"<svg width='{width}' height='72'>{bars}<text x='0' y='71' font-size='9'>{lo:.2g}</text>"
        f"<text x='{width - 30}' y='71' font-size='9'>{hi:.2g}</text></svg>"
    )


def _shaded_tokens(tokens: Sequence[str], values: Sequence[float], peak: float) -> str:
    spans = []
    for tok, v in zip(tokens, values):
        alpha = 0 if peak <= 0 else max(0.0, min(1.0, v / peak))
        title = f"{v:.3g}"
        spans.append(
            f"<span title='{title}' style='background:rgba(220,80,30,{alpha:.2f})'>"
            f"{html.escape(tok)}</span>"
        )
    return " ".join(spans)


def feature_card(
    feature: int,
    stats: Mapping[str, Any],
    features: Float[torch.Tensor, "n d_sae"],
    acts: SiteActivations,
    token_text: Callable[[int], str],
    *,
    pair_label: Callable[[int], str] | None = None,
    n_examples: int = 5,
) -> dict[str, Any]:
    """A feature's card as data: its statistics, histogram values and top pairs as tokens with
    their activations (``token_text(id)`` turns a token id into text)."""
    col = features[:, feature]
    examples = []
    for pair in top_pairs(features, acts, feature, n_examples):
        rows = (acts.pair == pair).nonzero().flatten()
        rows = rows[acts.position[rows].argsort()]
        examples.append(
            {
                "pair": pair,
                "label": pair_label(pair) if pair_label else str(pair),
                "tokens": [token_text(int(t)) if t >= 0 else "<dec>" for t in acts.token[rows]],
                "parts": [PART_NAMES.get(int(p), "?") for p in acts.part[rows]],
                "activations": col[rows].tolist(),
            }
        )
    return {
        "feature": feature,
        "statistics": {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in stats.items()
        },
        "histogram": col[col > 0].tolist(),
        "examples": examples,
    }


def feature_cards_html(cards: Sequence[Mapping[str, Any]], *, title: str = "Feature cards") -> str:
    """One self-contained HTML page of feature cards (from :func:`feature_card`)."""
    blocks = []
    for card in cards:
        stats = card["statistics"]
        shown = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in stats.items()
            if k != "feature" and v is not None
        )
        peak = max((max(e["activations"], default=0) for e in card["examples"]), default=0)
        examples = "".join(
            f"<p class='ex'><b>{html.escape(e['label'])}</b>: "
            f"{_shaded_tokens(e['tokens'], e['activations'], peak)}</p>"
            for e in card["examples"]
        )
        blocks.append(
            f"<div class='card'><h3>feature {card['feature']}</h3>"
            f"<p class='stats'>{html.escape(shown)}</p>"
            f"{_histogram_svg(card['histogram'])}{examples}</div>"
        )
    style = (
        "body{font-family:sans-serif;max-width:1100px}.card{border:1px solid #ccc;"
        "padding:8px;margin:10px 0}.stats{font-size:12px;color:#444}.ex{font-size:13px;"
        "line-height:1.6}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        + "".join(blocks)
        + "</body></html>"
    )


__all__ = [
    "PART_NAMES",
    "feature_activations",
    "feature_card",
    "feature_cards_html",
    "feature_statistics",
    "token_idf",
    "top_pairs",
]
