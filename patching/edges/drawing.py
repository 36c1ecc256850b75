"""A circuit drawn as a graph, in plain SVG (no graphviz needed).

Columns follow the forward pass: the input node, then per layer its heads (one row per head) and
its MLP, then the score. Each edge of the circuit is a curve from its sender to its receiver,
its width proportional to ``|effect|`` (when scores are given), red when patching it lowers the
metric and blue when it raises it; the receiver's channel is the line style (query solid, key
dashed, value dotted) and its letter is written at the arrow's end. Components the circuit does
not touch are drawn faint.
"""

from __future__ import annotations

import html

import torch
from jaxtyping import Int
from torch import Tensor

from patching.edges.attribution import EdgeScores
from patching.edges.graph import PART_NAMES, EdgeGraph

_DASH = {"q": "", "k": "6,3", "v": "2,3", "mlp": "", "score": ""}


def _node_xy(
    kind: str, layer: int, head: int, n_layers: int, n_heads: int, dx: float, dy: float
) -> tuple[float, float]:
    top = 40.0
    middle = top + (n_heads - 1) * dy / 2
    if kind == "input":
        return 60.0, middle
    if kind == "score":
        return 60.0 + (2 * n_layers + 1) * dx, middle
    if kind == "mlp":
        return 60.0 + (2 * layer + 2) * dx, middle
    return 60.0 + (2 * layer + 1) * dx, top + head * dy


def circuit_svg(
    graph: EdgeGraph,
    circuit: Int[Tensor, " n"],
    scores: EdgeScores | None = None,
    *,
    title: str = "",
    max_edges: int = 400,
) -> str:
    """The SVG document of a circuit (module doc); at most ``max_edges`` edges are drawn (the
    largest ``|effect|`` first when scores are given)."""
    ids = circuit.long().tolist()
    effect = scores.mean()[circuit.long()] if scores is not None else torch.ones(len(ids))
    if len(ids) > max_edges:
        keep = torch.argsort(effect.abs(), descending=True)[:max_edges].tolist()
        ids, effect = [ids[i] for i in keep], effect[keep]
    n_layers, n_heads = graph.n_layers, graph.n_heads
    dx, dy = 70.0, 22.0
    width = 60.0 * 2 + (2 * n_layers + 1) * dx
    height = 40.0 * 2 + (n_heads - 1) * dy + (30.0 if title else 0.0)
    scale = float(effect.abs().max()) if len(ids) else 1.0
    used: set[tuple[str, int, int]] = set()
    lines = []
    for e, w in zip(ids, effect.tolist()):
        s = graph.senders[int(graph.edge_sender[e])]
        r = graph.receivers[int(graph.edge_receiver[e])]
        r_kind = "head" if r.kind in ("q", "k", "v") else r.kind
        used.add((s.kind, s.layer, s.head))
        used.add((r_kind, r.layer, r.head))
        x1, y1 = _node_xy(s.kind, s.layer, s.head, n_layers, n_heads, dx, dy)
        x2, y2 = _node_xy(r_kind, r.layer, r.head, n_layers, n_heads, dx, dy)
        x2 -= 9
        bend = (x1 + x2) / 2
        stroke = "#c0392b" if w < 0 else "#2471a3"
        sw = 0.6 + 3.4 * abs(w) / (scale or 1.0)
        dash = _DASH[r.kind]
        part = f" @{PART_NAMES[int(graph.edge_part[e])]}" if graph.parts else ""
        label = html.escape(f"{graph.edge_label(e)}: {w:+.4f}" if scores is not None else
                            graph.edge_label(e) + part)  # fmt: skip
        lines.append(
            f'<path d="M{x1:.1f},{y1:.1f} C{bend:.1f},{y1:.1f} {bend:.1f},{y2:.1f} '
            f'{x2:.1f},{y2:.1f}" fill="none" stroke="{stroke}" stroke-width="{sw:.2f}" '
            f'stroke-opacity="0.75"'
            + (f' stroke-dasharray="{dash}"' if dash else "")
            + f"><title>{label}</title></path>"
        )
        if r.kind in ("q", "k", "v"):
            lines.append(
                f'<text x="{x2 - 2:.1f}" y="{y2 - 3:.1f}" font-size="7" fill="{stroke}" '
                f'text-anchor="end">{r.kind}</text>'
            )
    nodes = []

    def node(kind: str, layer: int, head: int, text: str, shape: str) -> None:
        x, y = _node_xy(kind, layer, head, n_layers, n_heads, dx, dy)
        on = (kind, layer, head) in used
        fill, stroke, opacity = ("#fdfefe", "#34495e", 1.0) if on else ("#f4f6f6", "#aab7b8", 0.6)
        if shape == "rect":
            nodes.append(
                f'<rect x="{x - 16:.1f}" y="{y - 8:.1f}" width="32" height="16" rx="3" '
                f'fill="{fill}" stroke="{stroke}" opacity="{opacity}"/>'
            )
        else:
            nodes.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8" fill="{fill}" stroke="{stroke}" '
                f'opacity="{opacity}"/>'
            )
        weight = "bold" if on else "normal"
        nodes.append(
            f'<text x="{x:.1f}" y="{y + 3:.1f}" font-size="7" text-anchor="middle" '
            f'font-weight="{weight}" fill="{stroke}">{html.escape(text)}</text>'
        )

    node("input", -1, -1, "input", "rect")
    for layer in range(n_layers):
        for h in range(n_heads):
            node("head", layer, h, f"{layer}/{h}", "circle")
        node("mlp", layer, -1, f"mlp{layer}", "rect")
    node("score", n_layers, -1, "score", "rect")
    header = (
        f'<text x="10" y="{height - 10:.1f}" font-size="10" fill="#1b1b1b">{html.escape(title)}'
        "</text>"
        if title
        else ""
    )
    legend = (
        f'<text x="10" y="14" font-size="8" fill="#555">{len(ids)} edges · red: patching lowers '
        "the metric, blue: raises it · q solid, k dashed, v dotted · width ∝ |effect|</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>{legend}'
        + "".join(lines)
        + "".join(nodes)
        + header
        + "</svg>"
    )


__all__ = ["circuit_svg"]
