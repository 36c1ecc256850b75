"""The computational graph of an encoder, edge by edge.

**Senders** are the components that write into the residual stream: the input node (the
embeddings, and every term no head or MLP owns, see :mod:`patching.edges.engine`), every
attention head and every MLP. **Receivers** read from it: the query, key and value inputs of
every head separately, every MLP input, and the score head. There is one edge from every sender
to every later receiver::

    input -> every receiver
    head l/h -> the q, k, v inputs of the heads of layers > l, MLPs >= l, the score
    MLP l -> the q, k, v inputs of the heads of layers > l, MLPs > l, the score

Senders are ordered as the forward pass creates them (input; heads of layer 0, MLP 0; heads of
layer 1, ...), so every receiver reads a *prefix* of the senders. Receivers are ordered layer by
layer (q of every head, k of every head, v of every head, the MLP), then the score.

With ``parts=True`` every edge is split by the input part of the positions it carries (CLS,
query, SEP1, document, SEP2): the edge ``(s, r, part)`` is the sender's contribution at the
positions of that part only (in the residual stream a contribution stays at its position; it
moves between positions inside the receiving head, so ``5/3 -> 6/0.k@query`` is what head 6/0's
keys read from head 5/3 at the query tokens). Padding positions belong to no part edge.

On the shared 6-layer, 12-head MiniLM: 79 senders, 223 receivers, 7,588 edges (37,940 by part).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.models.registry import FAMILIES
from mechir.parts import PARTS

Channel = Literal["q", "k", "v"]
#: Where receivers read: ``("pre", l)``, ``("mid", l)`` or ``("final", n_layers)``
#: (:attr:`Receiver.point`).
Point = tuple[str, int]
#: Receiver kinds, in the order a layer's receivers are listed.
RECEIVER_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp", "score")
#: Names of the parts of part-split edges (:data:`mechir.PARTS` order).
PART_NAMES: tuple[str, ...] = tuple(p.name.lower() for p in PARTS)
#: Number of input parts of part-split edges (CLS, query, SEP1, document, SEP2).
N_PARTS = len(PART_NAMES)
#: Families whose blocks the engine follows (attention, MLP and LayerNorms of ``EncoderSpec``):
#: those declaring ``Family.edge_circuits`` (a model's ``abilities.edges``), for messages.
EDGE_FAMILIES = tuple(f.name for f in FAMILIES if f.edge_circuits)


@dataclass(frozen=True)
class Sender:
    """A component writing into the residual stream: ``kind`` is ``"input"``, ``"head"`` or
    ``"mlp"``; ``layer`` is -1 for the input node, ``head`` -1 unless a head."""

    kind: str
    layer: int = -1
    head: int = -1

    @property
    def label(self) -> str:
        """``"input"``, ``"3/7"`` (layer 3, head 7) or ``"mlp3"``."""
        if self.kind == "input":
            return "input"
        return f"{self.layer}/{self.head}" if self.kind == "head" else f"mlp{self.layer}"


@dataclass(frozen=True)
class Receiver:
    """A component reading the residual stream: ``kind`` is ``"q"``, ``"k"``, ``"v"`` (one
    head's query, key or value input), ``"mlp"`` or ``"score"`` (``layer`` = n_layers)."""

    kind: str
    layer: int
    head: int = -1

    @property
    def label(self) -> str:
        """``"3/7.q"``, ``"mlp3"`` or ``"score"``."""
        if self.kind == "score":
            return "score"
        return f"mlp{self.layer}" if self.kind == "mlp" else f"{self.layer}/{self.head}.{self.kind}"

    @property
    def point(self) -> Point:
        """Where in the forward pass it reads: ``("pre", l)`` (the input of block ``l``),
        ``("mid", l)`` (block ``l``'s MLP input) or ``("final", n_layers)``."""
        if self.kind == "score":
            return ("final", self.layer)
        return ("mid", self.layer) if self.kind == "mlp" else ("pre", self.layer)


@dataclass(frozen=True, eq=False)
class EdgeGraph:
    """Senders, receivers and edges of one encoder shape (build it with :func:`edge_graph`).

    Attributes:
        n_layers, n_heads: the encoder's shape.
        parts: edges split by input part (``n_parts`` = 5), or not (``n_parts`` = 1).
        senders, receivers: in forward order (module doc).
        reach: ``[receiver]`` how many senders (a prefix) each receiver reads.
        edge_receiver, edge_sender, edge_part: ``[edge]`` indices of every edge, receiver-major,
            then sender, then part (``edge_part`` is 0 without parts).
    """

    n_layers: int
    n_heads: int
    parts: bool
    senders: tuple[Sender, ...]
    receivers: tuple[Receiver, ...]
    reach: Int[Tensor, " receiver"]
    edge_receiver: Int[Tensor, " edge"]
    edge_sender: Int[Tensor, " edge"]
    edge_part: Int[Tensor, " edge"]

    @property
    def n_parts(self) -> int:
        return len(PART_NAMES) if self.parts else 1

    @property
    def n_edges(self) -> int:
        return len(self.edge_receiver)

    @property
    def valid(self) -> Bool[Tensor, "receiver sender part"]:
        """Which ``(receiver, sender, part)`` triples are edges."""
        s = torch.arange(len(self.senders))
        prefix = s[None, :] < self.reach[:, None]
        return prefix[:, :, None].expand(-1, -1, self.n_parts).clone()

    def __len__(self) -> int:
        return self.n_edges

    def __repr__(self) -> str:
        by = ", by part" if self.parts else ""
        return (
            f"EdgeGraph({self.n_layers} layers x {self.n_heads} heads: {len(self.senders)} "
            f"senders, {len(self.receivers)} receivers, {self.n_edges} edges{by})"
        )

    # ------------------------------------------------------------------ labels
    def edge_label(self, edge: int) -> str:
        """``"sender->receiver"``, plus ``"@part"`` on part edges (``"2/5->3/7.q@query"``)."""
        s = self.senders[int(self.edge_sender[edge])].label
        r = self.receivers[int(self.edge_receiver[edge])].label
        part = f"@{PART_NAMES[int(self.edge_part[edge])]}" if self.parts else ""
        return f"{s}->{r}{part}"

    def edge_labels(self, edges: Iterable[int] | None = None) -> list[str]:
        """Labels of ``edges`` (default: every edge, in edge order)."""
        return [self.edge_label(e) for e in (range(self.n_edges) if edges is None else edges)]

    def edge_index(self, label: str) -> int:
        """The index of an edge given by its label (see :meth:`edge_label`)."""
        s, r, part = _parse_label(label, self.parts)
        s_i = self._sender_index(s, label)
        r_i = self._receiver_index(r, label)
        if s_i >= int(self.reach[r_i]):
            raise ValueError(
                f"no edge {label!r}: sender {s} comes after receiver {r} reads the stream"
            )
        k = PART_NAMES.index(part) if part is not None else 0
        offset = int((self.reach[:r_i] * self.n_parts).sum())
        return offset + s_i * self.n_parts + k

    def _sender_index(self, label: str, edge: str) -> int:
        for i, s in enumerate(self.senders):
            if s.label == label:
                return i
        raise ValueError(f"unknown sender {label!r} in edge {edge!r}: use 'input', 'l/h' or 'mlpL'")

    def _receiver_index(self, label: str, edge: str) -> int:
        for i, r in enumerate(self.receivers):
            if r.label == label:
                return i
        raise ValueError(
            f"unknown receiver {label!r} in edge {edge!r}: use 'l/h.q', 'l/h.k', 'l/h.v', "
            "'mlpL' or 'score'"
        )

    # ------------------------------------------------------------------ edge sets
    def edge_ids(self, edges: EdgesLike) -> Int[Tensor, " n"]:
        """Edge indices from ``"all"``, labels, indices, or a boolean mask over edges."""
        if isinstance(edges, str):
            if edges == "all":
                return torch.arange(self.n_edges)
            edges = [edges]
        if isinstance(edges, Tensor):
            if edges.dtype == torch.bool:
                if edges.shape != (self.n_edges,):
                    raise ValueError(
                        f"a boolean edge mask needs shape ({self.n_edges},), got "
                        f"{tuple(edges.shape)}"
                    )
                return edges.nonzero()[:, 0]
            edges = edges.tolist()
        out = []
        for e in edges:
            if isinstance(e, str):
                out.append(self.edge_index(e))
            elif isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.n_edges:
                out.append(e)
            else:
                raise ValueError(
                    f"edge {e!r} is neither a label ('2/5->3/7.q') nor an index in "
                    f"0..{self.n_edges - 1}"
                )
        return torch.tensor(out, dtype=torch.long)

    def mask(self, edges: EdgesLike) -> Bool[Tensor, "receiver sender part"]:
        """The ``[receiver, sender, part]`` mask of an edge set (see :meth:`edge_ids`)."""
        ids = self.edge_ids(edges)
        out = torch.zeros(len(self.receivers), len(self.senders), self.n_parts, dtype=torch.bool)
        out[self.edge_receiver[ids], self.edge_sender[ids], self.edge_part[ids]] = True
        return out

    def masks(self, sets: Sequence[EdgesLike]) -> Bool[Tensor, "set receiver sender part"]:
        """Masks of several edge sets, stacked."""
        if not len(sets):
            raise ValueError("no edge sets given")
        return torch.stack([self.mask(s) for s in sets])

    def flat(self, dense: Tensor) -> Tensor:
        """``[..., receiver, sender, part]`` values -> ``[..., edge]`` (edge order)."""
        return dense[..., self.edge_receiver, self.edge_sender, self.edge_part]

    def describe(self) -> dict[str, Any]:
        """Counts, for reports."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "senders": len(self.senders),
            "receivers": len(self.receivers),
            "edges": self.n_edges,
            "parts": self.parts,
        }


EdgesLike = str | Sequence[int | str] | Tensor

_LABEL = re.compile(r"^\s*(?P<s>[^\s\->@]+)\s*->\s*(?P<r>[^\s@]+)\s*(?:@\s*(?P<p>\w+))?\s*$")


def _parse_label(label: str, parts: bool) -> tuple[str, str, str | None]:
    m = _LABEL.match(label)
    if not m:
        raise ValueError(
            f"cannot read edge {label!r}: write 'sender->receiver' such as '2/5->3/7.q', "
            "'input->mlp0' or 'mlp1->score' (with '@part' on a graph by parts)"
        )
    part = m.group("p")
    if parts and part is None:
        raise ValueError(
            f"edge {label!r} needs '@part' (one of {PART_NAMES}): the graph is split by parts"
        )
    if not parts and part is not None:
        raise ValueError(f"edge {label!r} names a part, but the graph is not split by parts")
    if part is not None:
        part = part.lower()
        aliases = {"q": "query", "d": "document", "doc": "document"}
        part = aliases.get(part, part)
        if part not in PART_NAMES:
            raise ValueError(f"unknown part {part!r} in edge {label!r}: use one of {PART_NAMES}")
    return m.group("s"), m.group("r"), part


def edge_graph(
    model_or_shape: HookedReranker | tuple[int, int], *, parts: bool = False
) -> EdgeGraph:
    """The edge graph of a model (or of ``(n_layers, n_heads)``).

    >>> g = edge_graph((2, 4))
    >>> len(g.senders), len(g.receivers), g.n_edges
    (11, 27, 110)
    """
    if isinstance(model_or_shape, tuple):
        n_layers, n_heads = model_or_shape
    else:
        n_layers, n_heads = model_or_shape.cfg.n_layers, model_or_shape.cfg.n_heads
    senders = [Sender("input")]
    for layer in range(n_layers):
        senders += [Sender("head", layer, h) for h in range(n_heads)]
        senders.append(Sender("mlp", layer))
    receivers: list[Receiver] = []
    reach: list[int] = []
    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)
        for kind in ("q", "k", "v"):
            receivers += [Receiver(kind, layer, h) for h in range(n_heads)]
            reach += [before] * n_heads
        receivers.append(Receiver("mlp", layer))
        reach.append(before + n_heads)
    receivers.append(Receiver("score", n_layers))
    reach.append(len(senders))
    reach_t = torch.tensor(reach, dtype=torch.long)
    n_parts = len(PART_NAMES) if parts else 1
    per = reach_t * n_parts
    edge_receiver = torch.arange(len(receivers)).repeat_interleave(per)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), per.cumsum(0)[:-1]])
    within = torch.arange(int(per.sum())) - starts.repeat_interleave(per)
    return EdgeGraph(
        n_layers=n_layers,
        n_heads=n_heads,
        parts=parts,
        senders=tuple(senders),
        receivers=tuple(receivers),
        reach=reach_t,
        edge_receiver=edge_receiver,
        edge_sender=within // n_parts,
        edge_part=within % n_parts,
    )


def receivers_at(graph: EdgeGraph, point: Point) -> list[int]:
    """Indices of the receivers reading at ``point`` (see :attr:`Receiver.point`)."""
    return [i for i, r in enumerate(graph.receivers) if r.point == point]


def require_edges(model: HookedReranker) -> None:
    """One line when the model's family does not declare edge support (``abilities.edges``
    False: DeBERTa, MonoT5, decoder LLMs): the engine follows only the blocks of
    :data:`EDGE_FAMILIES`."""
    if not model.abilities.edges:
        raise ValueError(
            f"edge circuits follow the blocks of {', '.join(EDGE_FAMILIES)}; "
            f"the {model.family.name} family is not supported"
        )


def check_graph(
    model: HookedReranker, graph: EdgeGraph | None, *, parts: bool = False
) -> EdgeGraph:
    """``graph``, or the model's, checked against the model's shape (and the model's family
    against the engine: :func:`require_edges`). Every public edge function starts here."""
    require_edges(model)
    if graph is None:
        return edge_graph(model, parts=parts)
    cfg = model.cfg
    if (graph.n_layers, graph.n_heads) != (cfg.n_layers, cfg.n_heads):
        raise ValueError(
            f"the edge graph is for {graph.n_layers} layers x {graph.n_heads} heads but the model "
            f"has {cfg.n_layers} x {cfg.n_heads}: build it with edge_graph(model)"
        )
    return graph


def edge_set_masks(
    graph: EdgeGraph, sets: Sequence[EdgesLike] | Tensor
) -> Bool[Tensor, "set receiver sender part"]:
    """``[set, receiver, sender, part]`` masks from a list of edge sets (anything
    :meth:`EdgeGraph.edge_ids` takes), ``[set, edge]`` boolean masks, or masks already."""
    if isinstance(sets, Tensor):
        if sets.dtype != torch.bool:
            raise ValueError("edge-set masks must be boolean tensors")
        if sets.dim() == 2 and sets.shape[1] == graph.n_edges:
            out = torch.zeros(len(sets), *graph.valid.shape, dtype=torch.bool)
            out[:, graph.edge_receiver, graph.edge_sender, graph.edge_part] = sets
            return out
        if sets.dim() == 4 and sets.shape[1:] == graph.valid.shape:
            if bool((sets & ~graph.valid).any()):
                raise ValueError("an edge-set mask marks a (receiver, sender) that is no edge")
            return sets
        raise ValueError(
            f"edge-set masks need shape [sets, {graph.n_edges}] or [sets, "
            f"{', '.join(map(str, graph.valid.shape))}], got {tuple(sets.shape)}"
        )
    return graph.masks(list(sets))


__all__ = [
    "EDGE_FAMILIES",
    "N_PARTS",
    "PART_NAMES",
    "Point",
    "RECEIVER_KINDS",
    "EdgeGraph",
    "EdgesLike",
    "Receiver",
    "Sender",
    "check_graph",
    "require_edges",
    "edge_graph",
    "edge_set_masks",
    "receivers_at",
]
