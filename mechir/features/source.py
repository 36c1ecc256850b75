"""Activations of one hook site over (query, document) pairs, tagged, and the endless training
stream an SAE trainer reads.

A *site* is a TransformerLens hook name of the model (``blocks.3.hook_resid_post``,
``blocks.3.hook_mlp_in`` / ``hook_mlp_out``, ``blocks.3.attn.hook_z`` flattened to
``n_heads * d_head``, MonoT5's ``decoder.1.hook_resid_post``, ...). Every activation row is
tagged with

* its pair (row of the pair list), position and token id;
* its part (:class:`mechir.parts.Part` value; :data:`DECODER_POSITION` for the positions of a
  MonoT5 decoder site, which has no input token);
* ``matched``: a query token whose token id occurs among the document's tokens, or a document
  token whose id occurs among the query's (:func:`mechir.matching.exact_match_mask`).

Padding is always dropped; special and template tokens (every part but query and document) are
kept unless ``special_tokens=False``. The forward pass stops at the site (nothing after it runs).

:class:`ActivationStream` turns the pairs into an endless iterator of ``[batch_size, d]`` tensors
for training: pairs are read in a reshuffled order each epoch (it never runs dry), activations go
into a buffer that is shuffled before half of it is handed out (activations of one pair are
spread across many batches), and every batch has exactly ``batch_size`` rows (SAELens needs
that). Under torchrun each rank reads its own shard of the pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Bool, Float, Int

from mechir import distributed
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, Part

torch = lazy_import("torch")

#: Part tag of the positions of a MonoT5 decoder site (the decoder reads no input token).
DECODER_POSITION = -1
#: The parts kept with ``special_tokens=False``.
CONTENT_PARTS = (int(Part.QUERY), int(Part.DOCUMENT))

PairsLike = Sequence[Any]


@dataclass
class SiteActivations:
    """Tagged activation rows of one site (all tensors on the CPU, one row per kept token).

    Attributes:
        acts: ``[n, d]`` activations (attention ``z`` flattened to ``n_heads * d_head``).
        pair: row of the pair (in the batch or pair list) each activation comes from.
        position: token position in its pair's input.
        token: input token id (-1 at decoder positions).
        part: :class:`~mechir.parts.Part` value, or :data:`DECODER_POSITION`.
        matched: the token's id occurs in the other text (query token in the document, or
            document token in the query).
    """

    acts: Float[torch.Tensor, "n d"]
    pair: Int[torch.Tensor, " n"]
    position: Int[torch.Tensor, " n"]
    token: Int[torch.Tensor, " n"]
    part: Int[torch.Tensor, " n"]
    matched: Bool[torch.Tensor, " n"]

    def __len__(self) -> int:
        return len(self.acts)

    def select(self, rows: Bool[torch.Tensor, " n"] | Int[torch.Tensor, " k"]) -> SiteActivations:
        """The rows ``rows`` (a mask or indices)."""
        return SiteActivations(
            *(getattr(self, f)[rows] for f in ("acts", "pair", "position", "token", "part")),
            self.matched[rows],
        )

    @classmethod
    def concat(cls, chunks: Sequence[SiteActivations], *, pair_offsets: Sequence[int]) -> Any:
        """Chunks concatenated, each chunk's pair rows shifted by its offset."""
        return cls(
            torch.cat([c.acts for c in chunks]),
            torch.cat([c.pair + o for c, o in zip(chunks, pair_offsets)]),
            torch.cat([c.position for c in chunks]),
            torch.cat([c.token for c in chunks]),
            torch.cat([c.part for c in chunks]),
            torch.cat([c.matched for c in chunks]),
        )


class _Stop(Exception):
    """Raised by the capture hook: nothing after the site needs to run."""


#: TransformerLens hook points that exist on every block but run only when their config switch
#: is on (a splice there would silently do nothing).
DORMANT_UNLESS = {
    "use_hook_mlp_in": ("hook_mlp_in",),
    "use_attn_result": ("hook_result",),
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_attn_in": ("hook_attn_in",),
}


def check_site(model: HookedReranker, site: str) -> str:
    """``site`` if the model has that hook point and it runs, else a one-line ``ValueError``
    (naming close ones, or the config switch that keeps a dormant point from running)."""
    if not isinstance(site, str) or site not in model.hook_dict:
        import difflib

        close = difflib.get_close_matches(str(site), list(model.hook_dict), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"no hook point {site!r} in this model{hint} (model.hook_dict lists all)")
    leaf = site.rsplit(".", 1)[-1]
    for switch, points in DORMANT_UNLESS.items():
        if leaf in points and not getattr(model.cfg, switch, True):
            raise ValueError(
                f"hook point {site!r} exists but never runs in this model (TransformerLens "
                f"config {switch}=False): choose one that runs (model.hook_dict; the MLP input "
                "is blocks.L.ln1.hook_normalized in post-LN encoders, ln2.hook_normalized in "
                "pre-LN models)"
            )
    return site


def flatten_site(act: torch.Tensor) -> Float[torch.Tensor, "batch pos d"]:
    """``[batch, pos, d]`` as is; ``[batch, pos, head, d_head]`` (attention ``z``) flattened."""
    if act.dim() == 4:
        return act.reshape(*act.shape[:2], -1)
    if act.dim() != 3:
        raise ValueError(
            f"site activation of shape {tuple(act.shape)}: features need [batch, pos, d] or "
            "[batch, pos, head, d_head] sites (residual stream, MLP in/out, attention z)"
        )
    return act


def site_forward(
    model: HookedReranker, batch: CrossEncoderBatch, site: str
) -> Float[torch.Tensor, "batch pos d"]:
    """The (flattened) activation of ``site`` on ``batch``, stopping the forward there. Active
    hooks (``with model.hooks(...)``) apply, so an intervention upstream is seen."""
    check_site(model, site)
    caught: list[torch.Tensor] = []

    def catch(act: torch.Tensor, hook: Any) -> None:
        caught.append(act.detach())
        raise _Stop

    with torch.no_grad(), model.hooks(fwd_hooks=[(site, catch)]):
        try:
            model(batch)
        except _Stop:
            pass
    if not caught:
        raise ValueError(f"hook point {site!r} did not run in the model's forward pass")
    return flatten_site(caught[0])


def token_tags(
    batch: CrossEncoderBatch, n_positions: int
) -> tuple[
    Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]
]:
    """``(part, token, matched)`` per (pair, position) of a site with ``n_positions`` positions:
    the input's parts and ids when the site reads the input positions, else (a decoder site)
    :data:`DECODER_POSITION`, -1 and False."""
    from mechir.matching import exact_match_mask

    b = len(batch)
    if n_positions != batch.input_ids.shape[1]:
        part = torch.full((b, n_positions), DECODER_POSITION, dtype=torch.long)
        token = torch.full((b, n_positions), -1, dtype=torch.long)
        return part, token, torch.zeros(b, n_positions, dtype=torch.bool)
    matched = exact_match_mask(batch).any(-1).cpu()
    return batch.parts.cpu().long(), batch.input_ids.cpu().long(), matched


def site_activations(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    site: str,
    *,
    special_tokens: bool = True,
    pair_offset: int = 0,
) -> SiteActivations:
    """The tagged activations of ``site`` on ``batch`` (padding dropped; with
    ``special_tokens=False`` only query and document tokens are kept)."""
    act = site_forward(model, batch, site).float().cpu()
    part, token, matched = token_tags(batch, act.shape[1])
    keep = part != int(Part.PAD)
    if not special_tokens:
        keep &= (part == CONTENT_PARTS[0]) | (part == CONTENT_PARTS[1])
    pair, position = keep.nonzero(as_tuple=True)
    return SiteActivations(
        act[pair, position],
        pair + pair_offset,
        position,
        token[pair, position],
        part[pair, position],
        matched[pair, position],
    )


def pair_texts(pairs: PairsLike) -> tuple[list[str], list[str]]:
    """Queries and documents of ``(query, document)`` tuples or objects with ``.query`` and
    ``.document`` (the candidates of :mod:`mechir.data`)."""
    queries, documents = [], []
    for p in pairs:
        q, d = (p.query, p.document) if hasattr(p, "query") else p
        queries.append(q)
        documents.append(d)
    return queries, documents


def collect_activations(
    model: HookedReranker,
    pairs: PairsLike | CrossEncoderBatch,
    site: str,
    *,
    pairs_per_forward: int = 16,
    max_length: int | None = None,
    special_tokens: bool = True,
) -> SiteActivations:
    """The tagged activations of ``site`` over every pair (``pair`` = row in ``pairs``)."""
    chunks, offsets = [], []
    for offset, batch in _pair_batches(model, pairs, pairs_per_forward, max_length):
        chunks.append(site_activations(model, batch, site, special_tokens=special_tokens))
        offsets.append(offset)
    if not chunks:
        raise ValueError("no pairs: pass at least one (query, document) pair")
    return SiteActivations.concat(chunks, pair_offsets=offsets)


def _pair_batches(
    model: HookedReranker, pairs: Any, size: int, max_length: int | None
) -> Iterator[tuple[int, CrossEncoderBatch]]:
    if isinstance(pairs, CrossEncoderBatch):
        for start in range(0, len(pairs), size):
            yield start, pairs[start : start + size]
        return
    queries, documents = pair_texts(pairs)
    for start in range(0, len(queries), size):
        stop = start + size
        yield start, model.encode(queries[start:stop], documents[start:stop], max_length=max_length)


class ActivationStream:
    """Endless, shuffled, exactly-sized batches of one site's activations over pairs.

    ``next(stream)`` is a ``[batch_size, d]`` float32 tensor (what SAELens's ``SAETrainer`` reads
    as its data provider). Pairs are read ``pairs_per_forward`` at a time in a fresh random order
    every epoch; activations fill a buffer of ``buffer_size`` rows, which is shuffled and half
    handed out before refilling. Under torchrun each rank streams its own shard of the pairs.

    Args:
        model: the hooked reranker.
        pairs: ``(query, document)`` pairs (or candidates with ``.query`` / ``.document``).
        site: hook name (see the module docstring).
        batch_size: rows per batch.
        buffer_size: rows shuffled together (default ``16 * batch_size``).
        special_tokens: keep special and template tokens (padding is always dropped).
    """

    def __init__(
        self,
        model: HookedReranker,
        pairs: PairsLike,
        site: str,
        *,
        batch_size: int,
        buffer_size: int | None = None,
        pairs_per_forward: int = 16,
        max_length: int | None = None,
        special_tokens: bool = True,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_site(model, site)
        shard = distributed.shard(list(pairs)) if distributed.sharding() else list(pairs)
        if not shard:
            raise ValueError("no pairs to stream activations from (or none on this rank)")
        self.model, self.pairs, self.site = model, shard, site
        self.batch_size = batch_size
        self.buffer_size = max(buffer_size or 16 * batch_size, 2 * batch_size)
        self.pairs_per_forward = pairs_per_forward
        self.max_length = max_length
        self.special_tokens = special_tokens
        self.generator = torch.Generator().manual_seed(seed + distributed.rank())
        self.epoch = 0
        self.pairs_read = 0
        self.rows_read = 0
        self._order: list[int] = []
        self._buffer = torch.empty(0)
        self._ready = torch.empty(0)

    def __iter__(self) -> ActivationStream:
        return self

    def _next_pairs(self) -> list[Any]:
        if not self._order:
            perm = torch.randperm(len(self.pairs), generator=self.generator).tolist()
            self._order = perm
            self.epoch += 1
        take, self._order = (
            self._order[: self.pairs_per_forward],
            self._order[self.pairs_per_forward :],
        )
        return [self.pairs[i] for i in take]

    def _fill(self) -> None:
        parts = [self._buffer] if len(self._buffer) else []
        n = len(self._buffer)
        while n < self.buffer_size:
            pairs = self._next_pairs()
            queries, documents = pair_texts(pairs)
            batch = self.model.encode(queries, documents, max_length=self.max_length)
            acts = site_activations(
                self.model, batch, self.site, special_tokens=self.special_tokens
            ).acts
            self.pairs_read += len(pairs)
            self.rows_read += len(acts)
            if len(acts):
                parts.append(acts)
                n += len(acts)
            elif self.epoch > 2 and self.rows_read == 0:
                raise ValueError(f"site {self.site!r} yields no activation rows on these pairs")
        buffer = torch.cat(parts)
        buffer = buffer[torch.randperm(len(buffer), generator=self.generator)]
        half = len(buffer) // 2
        self._ready, self._buffer = buffer[:half], buffer[half:]

    def __next__(self) -> Float[torch.Tensor, "batch_size d"]:
        while len(self._ready) < self.batch_size:
            rest = self._ready
            self._fill()
            self._ready = torch.cat([rest, self._ready]) if len(rest) else self._ready
        out, self._ready = self._ready[: self.batch_size], self._ready[self.batch_size :]
        return out

    def take(self, n_batches: int) -> Float[torch.Tensor, "n d"]:
        """``n_batches`` batches stacked into one ``[n_batches * batch_size, d]`` tensor."""
        return torch.cat([next(self) for _ in range(n_batches)])

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (RNG, epoch, pair order, buffered rows), for a resumable run."""
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "pairs_read": self.pairs_read,
            "rows_read": self.rows_read,
            "order": list(self._order),
            "buffer": self._buffer.clone(),
            "ready": self._ready.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the stream back where :meth:`state_dict` saw it."""
        self.generator.set_state(state["generator"])
        self.epoch, self.pairs_read = state["epoch"], state["pairs_read"]
        self.rows_read, self._order = state["rows_read"], list(state["order"])
        self._buffer, self._ready = state["buffer"], state["ready"]


class RowStream:
    """Endless exactly-sized batches from activation rows held in memory (or loaded from an
    fp16 cache, :func:`save_rows`): a fresh random order each epoch, batches that cross epoch
    boundaries, never a short batch."""

    def __init__(self, rows: Float[torch.Tensor, "n d"], *, batch_size: int, seed: int = 0):
        if batch_size < 1 or len(rows) == 0:
            raise ValueError(f"need rows and batch_size >= 1 (got {len(rows)} rows, {batch_size})")
        self.rows, self.batch_size = rows, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._order = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> RowStream:
        return self

    def __next__(self) -> Float[torch.Tensor, "batch_size d"]:
        while len(self._order) < self.batch_size:
            perm = torch.randperm(len(self.rows), generator=self.generator)
            self._order = torch.cat([self._order, perm])
            self.epoch += 1
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.rows[take].float()

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (RNG, epoch, remaining order), for a resumable run."""
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "order": self._order.clone(),
            "rows": len(self.rows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the stream back where :meth:`state_dict` saw it (same rows)."""
        if state["rows"] != len(self.rows):
            raise ValueError(
                f"stream state saved over {state['rows']} rows, this stream has "
                f"{len(self.rows)}: resume with the same training rows"
            )
        self.generator.set_state(state["generator"])
        self.epoch, self._order = state["epoch"], state["order"].clone()


def save_rows(acts: SiteActivations, path: str | Any) -> None:
    """Save tagged rows with the activations in float16 (an on-disk cache; :func:`load_rows`)."""
    fields = {f: getattr(acts, f) for f in ("pair", "position", "token", "part", "matched")}
    tmp = f"{path}.tmp"
    torch.save({"acts": acts.acts.half(), **fields}, tmp)
    import os

    os.replace(tmp, path)


def load_rows(path: str | Any) -> SiteActivations:
    """Rows saved by :func:`save_rows` (activations back in float32)."""
    data = torch.load(path)
    return SiteActivations(
        data["acts"].float(),
        data["pair"],
        data["position"],
        data["token"],
        data["part"],
        data["matched"],
    )


__all__ = [
    "CONTENT_PARTS",
    "RowStream",
    "load_rows",
    "save_rows",
    "DECODER_POSITION",
    "ActivationStream",
    "SiteActivations",
    "check_site",
    "collect_activations",
    "flatten_site",
    "pair_texts",
    "site_activations",
    "site_forward",
    "token_tags",
]
