"""The edge engine: a forward pass that knows every sender's contribution to the residual stream.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.models.registry import FAMILIES
from mechir.parts import CrossEncoderBatch, Part

Point = tuple[str, int]

#: Number of input parts of part-split edges (CLS, query, SEP1, document, SEP2).
N_PARTS = 5


# ---------------------------------------------------------------------- model pieces
#: Families whose blocks the engine follows (attention, MLP and LayerNorms of ``EncoderSpec``):
#: those declaring ``Family.edge_circuits`` (a model's ``abilities.edges``).
EDGE_FAMILIES = tuple(f.name for f in FAMILIES if f.edge_circuits)


def is_pre_ln(model: HookedReranker) -> bool:
    """ModernBERT-style blocks (the stream is a plain sum; receivers normalize what they read);
    a one-line error for a model whose blocks the engine does not follow (``abilities.edges``
    is False: DeBERTa, MonoT5, decoder LLMs)."""
    if not model.abilities.edges:
        raise ValueError(
            f"edge circuits follow the blocks of {', '.join(EDGE_FAMILIES)}; "
            f"the {model.family.name} family is not supported"
        )
    return not model.abilities.post_ln


def layer_norm(ln: nn.Module, v: Tensor) -> Tensor:
    """A model LayerNorm module's function (ModernBERT's layer-0 ``IdentityNorm`` is the
    identity)."""
    if not hasattr(ln, "w"):
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
    if not hasattr(ln, "w"):
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
    rotate = getattr(attn, "rotate_positions", None)
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    scores = torch.einsum("rqhd,rkhd->rhqk", q, k) / attn.attn_scale + additive
    window = getattr(attn, "window", None)
    if window is not None:
        pos = torch.arange(q.shape[1], device=q.device)
        scores = scores.masked_fill((pos[:, None] - pos[None]).abs() > window, -torch.inf)
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
        *(
            torch.cat([getattr(b, name) for b in padded])
            for name in ("input_ids", "token_type_ids", "attention_mask", "parts")
        )
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
        stats = norm_stats(block.ln1, x) if hasattr(block.ln1, "w") else None
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


__all__ = [
    "N_PARTS",
    "Kept",
    "PointHandler",
    "Slots",
    "attend",
    "Contributions",
    "cat_batches",
    "embed",
    "expand_qkv_grads",
    "input_grads",
    "is_pre_ln",
    "kept_tensors",
    "layer_norm",
    "n_senders",
    "norm_stats",
    "norm_vjp",
    "pad_batch",
    "part_onehot",
    "plain_forward",
    "plain_layer",
    "plain_score",
    "project",
    "qkv_weights",
    "score_head",
    "take_rows",
    "tracked_layer",
    "tracked_walk",
]
