"""The edge engine: a forward pass that knows every sender's contribution to the residual stream.

Stage 3 of :mod:`patching.edges`: it takes the graph (:mod:`~patching.edges.graph`) and the
checked sources (:mod:`~patching.edges.sources`) and runs them: the tracked walk (contributions
kept, a :class:`PointHandler` asked at every receiver point), the plain forward (receiver inputs
kept for gradients), the ``"mean"`` source's per-part means, and exact patching of edge sets
(:func:`patch_edge_sets`, :func:`patch_edges`). Attribution and circuits call it; it calls
neither.

**Contributions in a post-LayerNorm stream.** A BERT block (TransformerLens ``BertBlock``) is::

    r = x + attn(x)              attn(x) = sum_h z_h W_O[h] + b_O
    m = LN1(r)                   the MLP input
    x' = LN2(m + mlp(m))         the next block's input

Once its input ``v`` is given, a LayerNorm is affine: ``LN(v) = gamma * P v / sigma(v) + beta``
(``P`` the centring projection, ``sigma(v) = sqrt(var(v) + eps)``). So in any one run, with that
run's own ``sigma`` at every LayerNorm, the stream at any point is exactly a sum of
contributions, ``v = sum_s c_s``, where

* a head's or an MLP's contribution ``c_s`` is its output (``z_h W_O[h]``; the MLP output with its
  bias ``b_out``) carried forward through every LayerNorm between it and that point:
  ``c -> gamma * P c / sigma``, with the sigma of *this run* at each LayerNorm;
* the **input node** carries everything else: the embedding output (``hook_full_embed``, i.e. the
  embedding LayerNorm's output, or ELECTRA's projection of it), every attention output bias
  ``b_O`` and every LayerNorm bias ``beta``, carried forward the same way. Nothing is left over:
  ``sum_s c_s`` *is* the stream, at every point.

Pre-LayerNorm blocks (ModernBERT) need no carrying: the stream is the plain sum of the outputs
(the embedding, with its LayerNorm, and the ``b_O`` go to the input node), and every receiver
applies its own LayerNorm (``ln1`` per head input, ``ln2`` for the MLP, ``ln_final`` for the score)
to what it reads.

**Receivers** read at three kinds of points: the input of block ``l`` (the q, k and v inputs of its
heads; pre-LN: before ``ln1``), block ``l``'s MLP input (post-LN: the ``ln1`` output; pre-LN:
the sum before ``ln2``) and the final hidden states (the score head; pre-LN: before
``ln_final``).

**Patching edges.** In a patched run, receiver ``r`` reads::

    x_r(current run) + sum_{s: (s, r) patched} (c_s(source run) - c_s(current run))

with both contributions at ``r``'s point, each carried with its own run's LayerNorm scales, and
everything downstream recomputed (LayerNorm statistics included). The stream itself is never
patched: only what receivers read. Hence (exactly, up to float round-off):

* patching no edge gives the clean run;
* patching every edge gives every receiver ``sum_s c_s(source)`` = the source run's input, so
  every head, MLP and the score compute exactly what they compute in the source run: the
  corrupted run's score. (This needs the input node to own every term no head or MLP owns, as
  above; tests check both identities to 1e-5.)

The source is the corrupted run (aligned token by token), its per-part means (``align="part"``),
the per-part means of the clean runs over the pairs (``"mean"``), or zero (``"zero"``).

The engine runs the model's own embedding, MLP and score-head modules and LayerNorm parameters,
and its own attention (the same computation as the model's: softmax of ``q k^T / sqrt(d_head)``
plus the padding mask; rotary positions and sliding windows for ModernBERT), which is what lets a
head read different q, k and v inputs. So the engine would apply a user's hooks where it calls
the model's modules (embedding, MLP, score head) and skip them everywhere else (attention, block
and LayerNorm hook points): every public edge function refuses, in one line, to run while hooks
are active on the model (:func:`mechir.running.refuse_active_hooks`; one intervention dialect:
hooks go to the model's own forward, engines run without them). A query position whose
keys are all masked (padding inside a sliding window) gets ``z = 0`` as in the model, with a zero
gradient (the model's own softmax backward gives NaN there).
**Exact patching of edge sets.** :func:`patch_edge_sets` runs one tracked forward per (pair,
edge set) row, many rows per batch, with the source rows in the same batch
(:class:`~patching.edges.sources.Lockstep`): the score of each pair when exactly the edges of
the set read their sender's source contribution. :func:`patch_edges` is the one-set case. Both
are checked against :func:`patching.edges.reference.patch_edges_reference` (plain model hooks,
one forward per edge set) in ``tests/patching/test_edges.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir import distributed
from mechir.interface import HookedReranker
from mechir.models.modernbert import IdentityNorm, RotaryAttention
from mechir.parts import CrossEncoderBatch
from mechir.running import refuse_active_hooks
from patching.edges.graph import (
    EDGE_FAMILIES,
    N_PARTS,
    EdgeGraph,
    EdgesLike,
    Point,
    check_graph,
    edge_set_masks,
    require_edges,
)
from patching.edges.sources import (
    Align,
    CorruptedLike,
    EdgeInputs,
    Lockstep,
    edge_inputs,
    embed,
    part_onehot,
    take_rows,
)
from patching.perturbations import AlignedPairs
from patching.sweep import DEFAULT_MEMORY_BUDGET, check_batch_size


# ---------------------------------------------------------------------- model pieces
def is_pre_ln(model: HookedReranker) -> bool:
    """ModernBERT-style blocks (the stream is a plain sum; receivers normalize what they read);
    a one-line error for a model whose blocks the engine does not follow (``abilities.edges``
    is False: DeBERTa, MonoT5, decoder LLMs)."""
    require_edges(model)
    return not model.abilities.post_ln


def layer_norm(ln: nn.Module, v: Tensor) -> Tensor:
    """A model LayerNorm module's function (ModernBERT's layer-0 ``IdentityNorm`` is the
    identity)."""
    if isinstance(ln, IdentityNorm):
        return v
    return nn.functional.layer_norm(v, (v.shape[-1],), ln.w, ln.b, ln.eps)


def norm_stats(ln: nn.Module, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_hat, sigma)`` of a LayerNorm on ``v``: ``x_hat = P v / sigma`` (``[..., d]``) and
    ``sigma = sqrt(var(v) + eps)`` (``[..., 1]``)."""
    centred = v - v.mean(-1, keepdim=True)
    sigma = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    return centred / sigma, sigma


def norm_vjp(ln: nn.Module, x_hat: Tensor, sigma: Tensor, grad: Tensor) -> Tensor:
    """Gradient through a LayerNorm: ``J^T g = (P u - x_hat (u . x_hat) / d) / sigma`` with
    ``u = gamma * g`` (``x_hat``/``sigma`` broadcast over extra dimensions of ``grad``)."""
    if isinstance(ln, IdentityNorm):
        return grad
    u = grad * ln.w
    d = u.shape[-1]
    centred = u - u.mean(-1, keepdim=True)
    return (centred - x_hat * (u * x_hat).sum(-1, keepdim=True) / d) / sigma


class Contributions:
    """Every sender's contribution so far, ``[rows, S, pos, d]`` in a buffer allocated once for
    all senders (sender order; slot 0 the input node), carried through post-LN LayerNorms in
    place, and the stream they add up to (kept alongside, equal to their sum up to round-off)."""

    def __init__(self, x0: Float[Tensor, "rows pos d"], total: int):
        rows, pos, d = x0.shape
        self.buf = x0.new_empty(rows, total, pos, d)
        self.buf[:, 0] = x0
        self.count = 1
        self.x = x0

    @property
    def view(self) -> Float[Tensor, "rows S pos d"]:
        return self.buf[:, : self.count]

    def stream(self) -> Float[Tensor, "rows pos d"]:
        """The residual stream: the sum of the contributions."""
        return self.x

    def append(self, values: Float[Tensor, "rows k pos d"]) -> None:
        k = values.shape[1]
        self.buf[:, self.count : self.count + k] = values
        self.count += k
        self.x = self.x + values.sum(1)

    def add_to_input(self, bias: Tensor) -> None:
        self.buf[:, 0] += bias
        self.x = self.x + bias

    def carry(self, ln: nn.Module) -> None:
        """Through a post-LN LayerNorm applied to their sum: ``c -> gamma * P c / sigma(sum)``;
        the input node also receives ``beta``."""
        c = self.view
        x_hat, sigma = norm_stats(ln, self.x)
        c.sub_(c.mean(-1, keepdim=True)).mul_((ln.w / sigma)[:, None])
        self.buf[:, 0] += ln.b
        self.x = x_hat * ln.w + ln.b


def qkv_weights(attn: nn.Module) -> tuple[Tensor, Tensor]:
    """``W [3, head, d_model, d_head]`` and ``b [3, head, d_head]`` of q, k, v."""
    w = torch.stack([attn.W_Q, attn.W_K, attn.W_V])
    b = torch.stack([attn.b_Q, attn.b_K, attn.b_V])
    return w, b


def project(attn: nn.Module, inputs: Tensor) -> Float[Tensor, "rows pos 3 head d_head"]:
    """q, k, v of every head from a shared input ``[rows, pos, d]`` or per-(channel, head) inputs
    ``[rows, pos, 3, head, d]``, biases included."""
    w, b = qkv_weights(attn)
    if inputs.dim() == 3:
        out = torch.einsum("rpm,chmk->rpchk", inputs, w)
    else:
        out = torch.einsum("rpchm,chmk->rpchk", inputs, w)
    return out + b


def attend(
    attn: nn.Module, qkv: Float[Tensor, "rows pos 3 head d_head"], additive: Tensor
) -> Float[Tensor, "rows pos head d_head"]:
    """``z = softmax(q k^T / scale + mask) v`` per head (rotary positions and the sliding window
    of ModernBERT's local layers included; a query with every key masked gets ``z = 0``)."""
    q, k, v = qkv.unbind(2)
    rotary = isinstance(attn, RotaryAttention)  # ModernBERT's; BERT blocks: TL's Attention
    if rotary:
        q, k = attn.rotate_positions(q), attn.rotate_positions(k)
    scores = torch.einsum("rqhd,rkhd->rhqk", q, k) / attn.attn_scale + additive
    if rotary and attn.window is not None:
        pos = torch.arange(q.shape[1], device=q.device)
        scores = scores.masked_fill((pos[:, None] - pos[None]).abs() > attn.window, -torch.inf)
    # rows with no key to attend to (padding queries in a sliding window) get a zero pattern,
    # as in the model, but through a softmax of zeros: its gradient is 0, not NaN
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    pattern = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("rhqk,rkhd->rqhd", pattern, v)


def score_head(
    model: HookedReranker, x: Float[Tensor, "rows pos d"], rows: CrossEncoderBatch
) -> Float[Tensor, " rows"]:
    """The score from what the score receiver reads (pre-LN: ``ln_final`` first)."""
    if model.ln_final is not None:
        x = layer_norm(model.ln_final, x)
    with model.running_on(rows):
        return model.score_from_resid(x)


# ---------------------------------------------------------------------- tracked walk
class PointHandler:
    """What a tracked walk asks at each receiver point: the change to add to what the point's
    receivers read (None: nothing). ``contributions`` is ``[rows, S, pos, d]`` (the senders so
    far, in sender order); handlers must not modify it."""

    def pre(self, layer: int, contributions: Tensor) -> Tensor | None:
        """Per-(channel, head) deltas ``[n, pos, 3, head, d]`` for block ``layer``'s q/k/v (for
        the first ``n`` rows)."""
        return None

    def mid(self, layer: int, contributions: Tensor) -> Tensor | None:
        """Delta ``[n, pos, d]`` for block ``layer``'s MLP input (first ``n`` rows)."""
        return None

    def final(self, contributions: Tensor) -> Tensor | None:
        """Delta ``[n, pos, d]`` for the score head's input (first ``n`` rows)."""
        return None


def n_senders(model: HookedReranker) -> int:
    """Senders of the model's edge graph: the input node, every head, every MLP."""
    return 1 + model.cfg.n_layers * (model.cfg.n_heads + 1)


def tracked_layer(
    model: HookedReranker, layer: int, c: Contributions, additive: Tensor, handler: PointHandler
) -> None:
    """One block on rows whose stream is kept as contributions (module doc), in place. A
    handler's deltas may cover only the first rows (the rest read the stream unchanged)."""
    block, pre_ln = model.blocks[layer], is_pre_ln(model)
    attn = block.attn
    x = c.stream()
    delta = handler.pre(layer, c.view)
    qkv = project(attn, layer_norm(block.ln1, x) if pre_ln else x)
    if delta is not None:
        n = len(delta)
        inputs = x[:n, :, None, None, :] + delta
        patched = project(attn, layer_norm(block.ln1, inputs) if pre_ln else inputs)
        qkv = torch.cat([patched, qkv[n:]]) if n < len(qkv) else patched
    z = attend(attn, qkv, additive)
    c.append(torch.einsum("rphk,hkm->rhpm", z, attn.W_O))
    c.add_to_input(attn.b_O)
    if pre_ln:
        mid = c.stream()
        out = block.mlp(layer_norm(block.ln2, _plus(mid, handler.mid(layer, c.view))))
        c.append(out[:, None])
        return
    c.carry(block.ln1)
    out = block.mlp(_plus(c.stream(), handler.mid(layer, c.view)))
    c.append(out[:, None])
    c.carry(block.ln2)


def _plus(x: Tensor, delta: Tensor | None) -> Tensor:
    """``x`` with ``delta`` added to its first rows."""
    if delta is None:
        return x
    n = len(delta)
    return x + delta if n == len(x) else torch.cat([x[:n] + delta, x[n:]])


def tracked_walk(
    model: HookedReranker,
    x0: Float[Tensor, "rows pos d"],
    rows: CrossEncoderBatch,
    handler: PointHandler,
) -> Float[Tensor, " rows"]:
    """Scores of ``rows`` from their embedding outputs ``x0``, keeping contributions (module doc)
    and asking ``handler`` at every receiver point."""
    additive = model.additive_attention_mask(rows.attention_mask.to(x0.device))
    c = Contributions(x0, n_senders(model))
    for layer in range(model.cfg.n_layers):
        tracked_layer(model, layer, c, additive, handler)
    return score_head(model, _plus(c.stream(), handler.final(c.view)), rows)


# ---------------------------------------------------------------------- plain forward
@dataclass
class Slots:
    """One patched (channel, head) input per listed row: ``rows[i]`` reads ``x + delta[i]`` at
    channel ``channel[i]`` (0 q, 1 k, 2 v) of head ``head[i]``."""

    rows: Int[Tensor, " n"]
    channel: Int[Tensor, " n"]
    head: Int[Tensor, " n"]
    delta: Float[Tensor, "n pos d"]


@dataclass
class Kept:
    """What a plain forward with gradients keeps for them: per layer the q/k/v tensors
    (``[rows, pos, 3, head, d_head]``, before rotation) and, pre-LN, ``ln1``'s ``x_hat, sigma``;
    the MLP inputs and the score input as the receivers read them."""

    qkv: list[Tensor] = field(default_factory=list)
    ln1: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    mlp: list[Tensor] = field(default_factory=list)
    score: Tensor | None = None


def plain_layer(
    model: HookedReranker,
    layer: int,
    x: Float[Tensor, "rows pos d"],
    additive: Tensor,
    *,
    slots: Slots | None = None,
    mlp_delta: Tensor | None = None,
    kept: Kept | None = None,
) -> Float[Tensor, "rows pos d"]:
    """One block on a plain stream ``x`` (no contributions), with optional patched q/k/v slots,
    an MLP-input delta, and (``kept``) the receiver inputs kept for gradients."""
    block, pre_ln = model.blocks[layer], is_pre_ln(model)
    attn = block.attn
    if pre_ln:
        stats = None if isinstance(block.ln1, IdentityNorm) else norm_stats(block.ln1, x)
        qkv = project(attn, layer_norm(block.ln1, x))
    else:
        stats, qkv = None, project(attn, x)
    if slots is not None and len(slots.rows):
        w, b = qkv_weights(attn)
        inputs = x[slots.rows] + slots.delta
        if pre_ln:
            inputs = layer_norm(block.ln1, inputs)
        values = torch.einsum("npm,nmk->npk", inputs, w[slots.channel, slots.head])
        values = values + b[slots.channel, slots.head][:, None]
        qkv = qkv.clone()
        qkv[slots.rows, :, slots.channel, slots.head] = values
    if kept is not None:
        kept.qkv.append(qkv)
        if pre_ln:
            kept.ln1.append(
                (stats[0].detach(), stats[1].detach()) if stats is not None else (None, None)
            )
    z = attend(attn, qkv, additive)
    attn_out = torch.einsum("rphk,hkm->rpm", z, attn.W_O) + attn.b_O
    if pre_ln:
        mid = x + attn_out
        mlp_in = mid if mlp_delta is None else mid + mlp_delta
        if kept is not None:
            mlp_in = mlp_in.clone()
            kept.mlp.append(mlp_in)
        return mid + block.mlp(layer_norm(block.ln2, mlp_in))
    m = layer_norm(block.ln1, x + attn_out)
    mlp_in = m if mlp_delta is None else m + mlp_delta
    if kept is not None:
        mlp_in = mlp_in.clone()
        kept.mlp.append(mlp_in)
    return layer_norm(block.ln2, m + block.mlp(mlp_in))


def plain_score(
    model: HookedReranker,
    x: Float[Tensor, "rows pos d"],
    rows: CrossEncoderBatch,
    *,
    delta: Tensor | None = None,
    kept: Kept | None = None,
) -> Float[Tensor, " rows"]:
    """The score head on the final stream (plus a delta), keeping its input for gradients."""
    inputs = x if delta is None else x + delta
    if kept is not None:
        inputs = inputs.clone()
        kept.score = inputs
    return score_head(model, inputs, rows)


def plain_forward(
    model: HookedReranker,
    x: Float[Tensor, "rows pos d"],
    rows: CrossEncoderBatch,
    *,
    start: int = 0,
    kept: Kept | None = None,
    first_layer: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Float[Tensor, " rows"]:
    """Scores of ``rows`` from block ``start``'s input ``x`` (0: the embedding output).
    ``first_layer(x, additive)``, if given, runs block ``start`` instead of the plain block."""
    additive = model.additive_attention_mask(rows.attention_mask.to(x.device))
    for layer in range(start, model.cfg.n_layers):
        if layer == start and first_layer is not None:
            x = first_layer(x, additive)
        else:
            x = plain_layer(model, layer, x, additive, kept=kept)
    return plain_score(model, x, rows, kept=kept)


def input_grads(
    model: HookedReranker, kept: Kept, grads: list[Tensor], *, compact: bool
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The gradients of the receivers' inputs from those of the kept tensors.

    Returns per layer the q/k/v receivers' gradients -- ``[rows, pos, 3, head, d_head]`` at the
    projections when ``compact`` (post-LN only: the input gradient is then ``g W^T``, the same at
    every path point, see :func:`expand_qkv_grads`), else ``[rows, pos, 3, head, d]`` at the
    input (pre-LN: through this run's ``ln1``) -- the MLP inputs' ``[rows, pos, d]`` and the score
    input's ``[rows, pos, d]``.
    """
    n = model.cfg.n_layers
    g_qkv, g_mlp, g_score = grads[:n], grads[n : 2 * n], grads[2 * n]
    out = []
    for layer, g in enumerate(g_qkv):
        if compact:
            out.append(g)
            continue
        full = expand_qkv_grads(model, layer, g)
        if is_pre_ln(model):
            x_hat, sigma = kept.ln1[layer]
            if x_hat is not None:
                ln1 = model.blocks[layer].ln1
                full = norm_vjp(ln1, x_hat[:, :, None, None], sigma[:, :, None, None], full)
        out.append(full)
    return out, list(g_mlp), g_score


def expand_qkv_grads(
    model: HookedReranker, layer: int, g: Float[Tensor, "rows pos 3 head d_head"]
) -> Float[Tensor, "rows pos 3 head d"]:
    """``g W^T``: q/k/v projection gradients to (post-LN) receiver-input gradients."""
    w, _ = qkv_weights(model.blocks[layer].attn)
    return torch.einsum("rpchk,chmk->rpchm", g, w)


def kept_tensors(kept: Kept) -> list[Tensor]:
    """The kept tensors in :func:`input_grads` order."""
    assert kept.score is not None
    return [*kept.qkv, *kept.mlp, kept.score]


# ---------------------------------------------------------------------- the "mean" source
class _MeanHandler(PointHandler):
    """Accumulates per-part sums of every contribution at every point."""

    def __init__(self, onehot: Tensor, sums: dict[Point, Tensor], n_layers: int):
        self.onehot, self.sums, self.n_layers = onehot, sums, n_layers

    def _add(self, point: Point, c: Tensor) -> None:
        s = torch.einsum("rspd,rpk->skd", c, self.onehot).double()
        self.sums[point] = self.sums[point] + s if point in self.sums else s

    def pre(self, layer: int, contributions: Tensor) -> None:
        self._add(("pre", layer), contributions)

    def mid(self, layer: int, contributions: Tensor) -> None:
        self._add(("mid", layer), contributions)

    def final(self, contributions: Tensor) -> None:
        self._add(("final", self.n_layers), contributions)


def mean_contributions(model: HookedReranker, inputs: EdgeInputs, rows: int) -> dict[Point, Tensor]:
    """Per point, ``[S, 5, d]``: each sender's mean contribution over the real tokens of each part
    of the clean batch (walks over it in chunks of ``rows``; with a process group, each rank
    walks its share and the sums are all-reduced)."""
    sums: dict[Point, Tensor] = {}
    counts = torch.zeros(N_PARTS, dtype=torch.float64)
    n = len(inputs)
    mine = distributed.shard_indices(n) if distributed.sharding() else list(range(n))
    with torch.no_grad():
        for start in range(0, len(mine), rows):
            chunk = take_rows(inputs.clean, torch.tensor(mine[start : start + rows]))
            onehot = part_onehot(chunk.parts, N_PARTS)
            counts += onehot.sum((0, 1)).double().cpu()
            handler = _MeanHandler(onehot, sums, model.cfg.n_layers)
            tracked_walk(model, embed(model, chunk), chunk, handler)
    if distributed.sharding():
        counts = distributed.all_reduce_sum(counts)
        if not sums:  # a rank without pairs: zeros of the right shapes
            sums = _zero_sums(model, inputs)
        sums = {point: distributed.all_reduce_sum(v) for point, v in sorted(sums.items())}
    device = inputs.clean.device
    scale = counts.clamp(min=1).to(device)[None, :, None]
    return {point: (v / scale).to(model.cfg.dtype) for point, v in sums.items()}


def _zero_sums(model: HookedReranker, inputs: EdgeInputs) -> dict[Point, Tensor]:
    cfg = model.cfg
    out = {}
    for layer in range(cfg.n_layers):
        before = 1 + layer * (cfg.n_heads + 1)
        out[("pre", layer)] = torch.zeros(before, N_PARTS, cfg.d_model, dtype=torch.float64)
        mid = before + cfg.n_heads
        out[("mid", layer)] = torch.zeros(mid, N_PARTS, cfg.d_model, dtype=torch.float64)
    total = 1 + cfg.n_layers * (cfg.n_heads + 1)
    out[("final", cfg.n_layers)] = torch.zeros(total, N_PARTS, cfg.d_model, dtype=torch.float64)
    return {k: v.to(inputs.clean.device) for k, v in out.items()}


# ---------------------------------------------------------------------- sizing
def tracked_rows(
    model: HookedReranker, width: int, memory_budget: float = DEFAULT_MEMORY_BUDGET
) -> int:
    """Rows of a tracked walk that fit ``memory_budget`` bytes (a rough, conservative estimate):
    per position about ``6 S d_model`` values for the contributions, their source and
    difference and the LayerNorm temporaries (``S`` = every sender), ``6 n_heads d_model`` for the
    per-head inputs, and the attention scores."""
    cfg = model.cfg
    senders = 1 + cfg.n_layers * (cfg.n_heads + 1)
    per_row = width * (
        6 * senders * cfg.d_model
        + 6 * cfg.n_heads * cfg.d_model
        + 4 * cfg.n_heads * width
        + 6 * cfg.d_mlp
    )
    per_row *= torch.finfo(cfg.dtype).bits // 8
    return max(1, int(memory_budget // per_row))


def prepare_inputs(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike,
    align: Align,
    rows: int,
) -> EdgeInputs:
    """:func:`edge_inputs`, with the per-part means of the ``"mean"`` source computed."""
    inputs = (
        clean
        if isinstance(clean, EdgeInputs)
        else edge_inputs(model, clean, corrupted, align=align)
    )
    if inputs.kind == "mean" and inputs.means is None:
        inputs.means = mean_contributions(model, inputs, rows)
    return inputs


# ---------------------------------------------------------------------- edge sets
class PatchHandler(PointHandler):
    """Adds ``sum_{s patched} (source - current)`` to every receiver's input, per row's mask."""

    def __init__(self, graph: EdgeGraph, lock: Lockstep, masks: Tensor, n_rows: int):
        self.graph, self.lock, self.masks, self.n_rows = graph, lock, masks, n_rows
        self.at: dict[Point, list[int]] = {}
        for i, r in enumerate(graph.receivers):
            self.at.setdefault(r.point, []).append(i)

    def _delta(self, point: Point, contributions: Tensor) -> Tensor | None:
        recv = self.at[point]
        mask = self.masks[:, recv, : contributions.shape[1]]  # [n, J, S, K]
        if not bool(mask.any()):
            return None
        return self.lock.apply_masks(point, contributions, mask)  # [n, pos, J, d]

    def pre(self, layer: int, contributions: Tensor) -> Tensor | None:
        d = self._delta(("pre", layer), contributions)
        return None if d is None else d.unflatten(2, (3, self.graph.n_heads))

    def mid(self, layer: int, contributions: Tensor) -> Tensor | None:
        d = self._delta(("mid", layer), contributions)
        return None if d is None else d[:, :, 0]

    def final(self, contributions: Tensor) -> Tensor | None:
        d = self._delta(("final", self.graph.n_layers), contributions)
        return None if d is None else d[:, :, 0]


def patch_edge_sets(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    sets: Sequence[EdgesLike] | Tensor = ("all",),
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> Float[Tensor, "pair set"]:
    """Exact scores of every pair with each edge set patched (module doc of
    :mod:`patching.edges.engine` for what "patched" means).

    Args:
        clean, corrupted: :class:`AlignedPairs` (corrupted taken from them unless given), or a
            clean batch with a corrupted batch (aligned token for token, or by part with
            ``align="part"``), or ``corrupted="mean"`` / ``"zero"``.
        sets: edge sets: each ``"all"``, a list of labels (``"2/5->3/7.q"``) or indices, or a
            ``[edges]`` boolean mask; or a ``[set, edge]`` boolean tensor.
        graph: the edge graph (default ``edge_graph(model)``; ``parts=True`` for part edges).
        batch_size: rows (pair x set) per forward; default from ``memory_budget`` bytes.

    Returns:
        ``[pair, set]`` float32 scores on the CPU.
    """
    refuse_active_hooks(model, "patch_edge_sets")
    graph = check_graph(model, graph)
    check_batch_size(batch_size)
    width = (clean.clean if not isinstance(clean, CrossEncoderBatch) else clean).input_ids.shape[1]
    rows = batch_size or tracked_rows(model, width, memory_budget)
    inputs = prepare_inputs(model, clean, corrupted, align, rows)
    masks = edge_set_masks(graph, sets).to(inputs.clean.device)
    n, n_sets = len(inputs), len(masks)
    out = torch.empty(n, n_sets)
    pair_of = torch.arange(n).repeat_interleave(n_sets)
    set_of = torch.arange(n_sets).repeat(n)
    with torch.no_grad():
        for lo in range(0, n * n_sets, rows):
            p_rows, s_rows = pair_of[lo : lo + rows], set_of[lo : lo + rows]
            pairs, row_pair = torch.unique(p_rows, return_inverse=True)
            lock = Lockstep(model, inputs, pairs, row_pair)
            handler = PatchHandler(graph, lock, masks[s_rows.to(masks.device)], len(lock.rows))
            scores = tracked_walk(model, lock.x0, lock.rows, handler)
            out[p_rows, s_rows] = scores[: lock.n].float().cpu()
    return out


def patch_edges(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    edges: EdgesLike = "all",
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> Float[Tensor, " pair"]:
    """Exact scores with ``edges`` patched: each edge's receiver reads its sender's source
    contribution instead of the current one; everything downstream is recomputed (LayerNorm
    statistics included). ``edges="all"`` gives the corrupted run's scores and ``[]`` the clean
    run's (to float round-off: see :mod:`patching.edges.engine`).

    ``patch_edges(model, pairs, edges=["input->score"])``; arguments as
    :func:`patch_edge_sets`. Returns ``[pair]`` float32 scores on the CPU.
    """
    refuse_active_hooks(model, "patch_edges")
    return patch_edge_sets(
        model, clean, corrupted, [edges], graph=graph, align=align, batch_size=batch_size,
        memory_budget=memory_budget,
    )[:, 0]  # fmt: skip


__all__ = [
    "EDGE_FAMILIES",
    "Contributions",
    "Kept",
    "PatchHandler",
    "PointHandler",
    "Slots",
    "attend",
    "expand_qkv_grads",
    "input_grads",
    "is_pre_ln",
    "kept_tensors",
    "layer_norm",
    "mean_contributions",
    "n_senders",
    "norm_stats",
    "norm_vjp",
    "patch_edge_sets",
    "patch_edges",
    "plain_forward",
    "plain_layer",
    "plain_score",
    "prepare_inputs",
    "project",
    "qkv_weights",
    "score_head",
    "tracked_layer",
    "tracked_rows",
    "tracked_walk",
]
