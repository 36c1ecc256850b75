"""Naive references for edge patching and edge attribution, on the model's own forward pass.

Nothing here shares code with :mod:`patching.edges.engine`: contributions are rebuilt sender by
sender, in Python loops, from the activations TransformerLens caches (``hook_full_embed``,
``attn.hook_z``, ``hook_mlp_out`` and the LayerNorms' ``hook_scale``), and patched runs are the
model's own forward with receivers patched by hooks:

* post-LN (BERT, ELECTRA, RoBERTa, XLM-R, DistilBERT): the heads' split inputs
  ``blocks.{l}.hook_{q,k,v}_input`` (TransformerLens ``use_split_qkv_input``), a forward pre-hook
  on ``blocks.{l}.mlp`` (the ``ln1`` output it reads) and one on the pooler (the final hidden
  states);
* pre-LN (ModernBERT): ``attn.hook_q/k/v`` recomputed from ``ln1`` of the patched input for the
  patched heads, forward pre-hooks on ``blocks.{l}.ln2`` and on ``ln_final``.

The current run's contributions are rebuilt at every receiver from what the recording hooks saw
so far in that same run. One forward per edge set; gradients one path point at a time. Slow, and
meant to be: it is the oracle of the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechir.attribution.integration import integration_rule
from mechir.interface import HookedReranker
from mechir.parts import PARTS, CrossEncoderBatch
from patching.edges.graph import EdgeGraph, EdgesLike, edge_graph
from patching.edges.sources import Align, CorruptedLike, EdgeInputs, edge_inputs
from patching.path import split_qkv_input
from patching.perturbations import AlignedPairs

Get = Callable[[str], Tensor]


def _pre_ln(model: HookedReranker) -> bool:
    return not model.abilities.post_ln


def _carry_one(c: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return w * (c - c.mean(-1, keepdim=True)) / scale


def contributions_upto(model: HookedReranker, get: Get, point: tuple[str, int]) -> list[Tensor]:
    """Every sender's contribution (sender order) at ``point``, from recorded activations
    ``get(hook_name)`` of one run: built sender by sender, LayerNorm by LayerNorm."""
    kind, at = point
    cfg = model.cfg
    contributions = [get("hook_full_embed")]
    for layer in range(cfg.n_layers):
        if kind == "pre" and layer == at:
            return contributions
        block = model.blocks[layer]
        attn = block.attn
        z = get(f"blocks.{layer}.attn.hook_z")
        contributions[0] = contributions[0] + attn.b_O
        for h in range(cfg.n_heads):
            contributions.append(z[:, :, h] @ attn.W_O[h])
        if not _pre_ln(model):
            scale = get(f"blocks.{layer}.ln1.hook_scale")
            contributions = [_carry_one(c, block.ln1.w, scale) for c in contributions]
            contributions[0] = contributions[0] + block.ln1.b
        if kind == "mid" and layer == at:
            return contributions
        contributions.append(get(f"blocks.{layer}.hook_mlp_out"))
        if not _pre_ln(model):
            scale = get(f"blocks.{layer}.ln2.hook_scale")
            contributions = [_carry_one(c, block.ln2.w, scale) for c in contributions]
            contributions[0] = contributions[0] + block.ln2.b
    return contributions


def _record_names(model: HookedReranker) -> list[str]:
    names = ["hook_full_embed"]
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
        names += [f"blocks.{layer}.hook_resid_pre"]
        if not _pre_ln(model):
            names += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"]
    return names


def _points(model: HookedReranker) -> list[tuple[str, int]]:
    n = model.cfg.n_layers
    return [(k, layer) for layer in range(n) for k in ("pre", "mid")] + [("final", n)]


def source_contributions(
    model: HookedReranker, inputs: EdgeInputs
) -> dict[tuple[str, int], list[Tensor]]:
    """Per point, every sender's source contribution ``[pair, pos, d]`` (clean width)."""
    out: dict[tuple[str, int], list[Tensor]] = {}
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(inputs.clean, names_filter=_record_names(model))
        corrupted_cache = None
        if inputs.corrupted is not None:
            _, corrupted_cache = model.run_with_cache(
                inputs.corrupted, names_filter=_record_names(model)
            )
    onehot = _onehot(inputs.clean)  # [b, p, 5]
    for point in _points(model):
        if inputs.kind == "token":
            out[point] = contributions_upto(model, corrupted_cache.__getitem__, point)
        elif inputs.kind == "zero":
            out[point] = [
                torch.zeros_like(c) for c in contributions_upto(model, clean_cache.__getitem__,
                                                                point)
            ]  # fmt: skip
        elif inputs.kind == "mean":
            cs = contributions_upto(model, clean_cache.__getitem__, point)
            counts = onehot.sum((0, 1)).clamp(min=1)
            means = [torch.einsum("bpd,bpk->kd", c, onehot) / counts[:, None] for c in cs]
            out[point] = [torch.einsum("kd,bpk->bpd", m, onehot) for m in means]
        else:  # part
            cs = contributions_upto(model, corrupted_cache.__getitem__, point)
            src_onehot = _onehot(inputs.corrupted)
            counts = src_onehot.sum(1).clamp(min=1)  # [b, 5]
            per = [torch.einsum("bpd,bpk->bkd", c, src_onehot) / counts[..., None] for c in cs]
            out[point] = [torch.einsum("bkd,bpk->bpd", m, onehot) for m in per]
    return out


def _onehot(batch: CrossEncoderBatch) -> Tensor:
    return torch.stack([batch.parts == int(p) for p in PARTS], -1).float()


def _part_weight(batch: CrossEncoderBatch, graph: EdgeGraph, k: int) -> Tensor:
    """``[b, p, 1]`` weight of the positions of part edge ``k`` (every position without parts)."""
    if not graph.parts:
        return torch.ones(*batch.parts.shape, 1, device=batch.parts.device)
    return (batch.parts == int(PARTS[k])).float()[..., None]


class _Patcher:
    """The hooks of one patched forward: records the current run, patches the receivers."""

    def __init__(
        self,
        model: HookedReranker,
        graph: EdgeGraph,
        batch: CrossEncoderBatch,
        source: dict,
        mask: Tensor,
    ):
        self.model, self.graph, self.batch, self.source, self.mask = (
            model, graph, batch, source, mask,
        )  # fmt: skip
        self.records: dict[str, Tensor] = {}

    def delta(self, receiver: int) -> Tensor | None:
        r = self.graph.receivers[receiver]
        point = r.point
        senders = self.mask[receiver].nonzero().tolist()
        if not senders:
            return None
        current = contributions_upto(self.model, self.records.__getitem__, point)
        total = torch.zeros_like(current[0])
        for s, k in senders:
            w = _part_weight(self.batch, self.graph, k)
            total = total + w * (self.source[point][s] - current[s])
        return total

    def record(self, act: Tensor, hook: Any) -> None:
        self.records[hook.name] = act.detach()

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self.record) for name in _record_names(self.model)]


def _receiver_index(graph: EdgeGraph) -> dict[tuple[str, int, int], int]:
    return {(r.kind, r.layer, r.head): i for i, r in enumerate(graph.receivers)}


def _patched_forward(
    model: HookedReranker,
    graph: EdgeGraph,
    batch: CrossEncoderBatch,
    source: dict,
    mask: Tensor,
    extra: list | None = None,
) -> Tensor:
    """The model's forward with the receivers of ``mask`` ([R, S, K]) patched by hooks."""
    patcher = _Patcher(model, graph, batch, source, mask)
    index = _receiver_index(graph)
    cfg = model.cfg
    fwd = patcher.hooks() + list(extra or [])
    pre_ln = _pre_ln(model)
    for layer in range(cfg.n_layers):
        for c, kind in enumerate("qkv"):
            heads = [(h, index[(kind, layer, h)]) for h in range(cfg.n_heads)]
            if pre_ln:
                fwd.append(
                    (f"blocks.{layer}.attn.hook_{kind}", _pre_ln_qkv(patcher, layer, c, heads))
                )
            else:
                fwd.append((f"blocks.{layer}.hook_{kind}_input", _split_input(patcher, heads)))
    with ExitStack() as stack:
        for layer in range(cfg.n_layers):
            block = model.blocks[layer]
            module = block.ln2 if pre_ln else block.mlp
            receiver = index[("mlp", layer, -1)]
            handle = module.register_forward_pre_hook(_pre_hook(patcher, receiver))
            stack.callback(handle.remove)
        final = model.ln_final if pre_ln else model.pooler
        handle = final.register_forward_pre_hook(
            _pre_hook(patcher, index[("score", cfg.n_layers, -1)])
        )
        stack.callback(handle.remove)
        if not pre_ln:
            stack.enter_context(split_qkv_input(model))
        with model.hooks(fwd_hooks=fwd):
            return model(batch)


def _split_input(patcher: _Patcher, heads: list[tuple[int, int]]) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        for h, r in heads:
            d = patcher.delta(r)
            if d is not None:
                out[:, :, h] = out[:, :, h] + d
        return out

    return hook


def _pre_ln_qkv(patcher: _Patcher, layer: int, c: int, heads: list[tuple[int, int]]) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        model = patcher.model
        block = model.blocks[layer]
        w = (block.attn.W_Q, block.attn.W_K, block.attn.W_V)[c]
        b = (block.attn.b_Q, block.attn.b_K, block.attn.b_V)[c]
        x = patcher.records[f"blocks.{layer}.hook_resid_pre"]
        out = act.clone()
        for h, r in heads:
            d = patcher.delta(r)
            if d is not None:
                out[:, :, h] = block.ln1(x + d) @ w[h] + b[h]
        return out

    return hook


def _pre_hook(patcher: _Patcher, receiver: int) -> Callable:
    def hook(module: Any, args: tuple) -> tuple:
        d = patcher.delta(receiver)
        if d is None:
            return args
        return (args[0] + d, *args[1:])

    return hook


def patch_edges_reference(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs,
    corrupted: CorruptedLike = None,
    edges: EdgesLike = "all",
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
) -> Float[Tensor, " pair"]:
    """The oracle of :func:`patching.edges.patch_edges` (module doc): one forward of the model
    with hooks."""
    graph = graph or edge_graph(model)
    inputs = edge_inputs(model, clean, corrupted, align=align)
    source = source_contributions(model, inputs)
    mask = graph.mask(edges)
    with torch.no_grad():
        return _patched_forward(model, graph, inputs.clean, source, mask).float().cpu()


def edge_attribution_reference(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs,
    corrupted: CorruptedLike = None,
    *,
    method: str = "eap",
    n_steps: int = 8,
    integration: str = "riemann_left",
    graph: EdgeGraph | None = None,
    align: Align = "token",
) -> Float[Tensor, "pair edge"]:
    """The oracle of :func:`patching.edges.edge_attribution` for one fixed rule: per-pair,
    per-edge estimated (``"eap"``, ``"eap_ig"``) or exact (``"exact"``) score changes
    ``s(edge patched) - s(clean)``. Gradients one path point at a time through receiver leaves
    added by hooks; the exact values one hooked forward per edge."""
    graph = graph or edge_graph(model)
    inputs = edge_inputs(model, clean, corrupted, align=align)
    source = source_contributions(model, inputs)
    batch = inputs.clean
    n = len(batch)
    if method == "exact":
        out = torch.empty(n, graph.n_edges)
        with torch.no_grad():
            base = model(batch).float().cpu()
            for e in range(graph.n_edges):
                patched = _patched_forward(model, graph, batch, source, graph.mask([e]))
                out[:, e] = patched.float().cpu() - base
        return out
    if method == "eap":
        alphas, weights = [0.0], [1.0]
    elif method == "eap_ig":
        rule = integration_rule(integration, n_steps)
        alphas, weights = rule.alphas.tolist(), rule.weights.tolist()
    else:
        raise ValueError(f"unknown method {method!r}: use 'eap', 'eap_ig' or 'exact'")
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=_record_names(model))
    clean_contrib = {p: contributions_upto(model, cache.__getitem__, p) for p in _points(model)}
    x0, x0_src = cache["hook_full_embed"], source[("pre", 0)][0]
    grads: dict[int, Tensor] = {}
    lengths = batch.lengths.tolist()
    for alpha, weight in zip(alphas, weights):
        # one pair at a time, without padding: padded rows of a sliding-window layer have no key
        # to attend to, and the model's softmax backward turns them into NaN gradients
        for i, length in enumerate(lengths):
            x = (x0 + alpha * (x0_src - x0))[i : i + 1, :length]
            for r, g in _receiver_grads(model, graph, batch[i], x).items():
                full = torch.zeros(1, x0.shape[1], x0.shape[2])
                full[:, :length] = g
                if r not in grads:
                    grads[r] = torch.zeros_like(x0)
                grads[r][i : i + 1] += weight * full
    out = torch.zeros(n, graph.n_edges)
    for e in range(graph.n_edges):
        r, s, k = (int(t[e]) for t in (graph.edge_receiver, graph.edge_sender, graph.edge_part))
        point = graph.receivers[r].point
        diff = source[point][s] - clean_contrib[point][s]
        w = _part_weight(batch, graph, k)
        out[:, e] = (w * diff * grads[r]).sum((1, 2)).float().cpu()
    return out


def _receiver_grads(
    model: HookedReranker, graph: EdgeGraph, batch: CrossEncoderBatch, x0: Tensor
) -> dict[int, Tensor]:
    """``d score / d receiver input`` of every receiver at embedding output ``x0``, through zero
    leaves added to each receiver's input by hooks."""
    cfg = model.cfg
    index = _receiver_index(graph)
    pre_ln = _pre_ln(model)
    shape = (*batch.input_ids.shape, cfg.d_model)
    leaves: dict[int, Tensor] = {}

    def leaf(r: int, *extra: int) -> Tensor:
        leaves[r] = torch.zeros(*shape[:2], *extra, cfg.d_model, requires_grad=True)
        return leaves[r]

    per_layer: dict[tuple[int, int], Tensor] = {}
    fwd: list = [("hook_full_embed", lambda act, hook: x0.detach())]
    records: dict[str, Tensor] = {}
    for layer in range(cfg.n_layers):
        for c, kind in enumerate("qkv"):
            per_layer[(layer, c)] = torch.zeros(
                *shape[:2], cfg.n_heads, cfg.d_model, requires_grad=True
            )
            for h in range(cfg.n_heads):
                leaves[index[(kind, layer, h)]] = per_layer[(layer, c)]
            if pre_ln:
                fwd.append((f"blocks.{layer}.hook_resid_pre", _keep(records)))
                fwd.append(
                    (f"blocks.{layer}.attn.hook_{kind}",
                     _pre_ln_leaf(model, layer, c, per_layer[(layer, c)], records))
                )  # fmt: skip
            else:
                fwd.append((f"blocks.{layer}.hook_{kind}_input", _add_leaf(per_layer[(layer, c)])))
    with ExitStack() as stack:
        for layer in range(cfg.n_layers):
            block = model.blocks[layer]
            module = block.ln2 if pre_ln else block.mlp
            handle = module.register_forward_pre_hook(
                _leaf_pre_hook(leaf(index[("mlp", layer, -1)]))
            )
            stack.callback(handle.remove)
        final = model.ln_final if pre_ln else model.pooler
        score_leaf = leaf(index[("score", cfg.n_layers, -1)])
        handle = final.register_forward_pre_hook(_leaf_pre_hook(score_leaf))
        stack.callback(handle.remove)
        if not pre_ln:
            stack.enter_context(split_qkv_input(model))
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
            score = model(batch)
            unique = list({id(t): t for t in leaves.values()}.values())
            g = torch.autograd.grad(score.sum(), unique, allow_unused=True)
    by_id = {id(t): (gr if gr is not None else torch.zeros_like(t)) for t, gr in zip(unique, g)}
    out: dict[int, Tensor] = {}
    for r, t in leaves.items():
        gr = by_id[id(t)]
        rec = graph.receivers[r]
        out[r] = gr[:, :, rec.head] if rec.kind in ("q", "k", "v") else gr
    return out


def _keep(records: dict[str, Tensor]) -> Callable:
    def hook(act: Tensor, hook: Any) -> None:
        records[hook.name] = act

    return hook


def _add_leaf(leaf: Tensor) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return act + leaf

    return hook


def _pre_ln_leaf(
    model: HookedReranker, layer: int, c: int, leaf: Tensor, records: dict
) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        block = model.blocks[layer]
        w = (block.attn.W_Q, block.attn.W_K, block.attn.W_V)[c]
        b = (block.attn.b_Q, block.attn.b_K, block.attn.b_V)[c]
        x = records[f"blocks.{layer}.hook_resid_pre"]
        per_head = x[:, :, None] + leaf  # [b, p, head, d], normalized position by position
        normed = block.ln1(per_head.flatten(1, 2)).unflatten(1, per_head.shape[1:3])
        return torch.einsum("bphm,hmk->bphk", normed, w) + b

    return hook


def _leaf_pre_hook(leaf: Tensor) -> Callable:
    def hook(module: Any, args: tuple) -> tuple:
        return (args[0] + leaf, *args[1:])

    return hook


__all__ = [
    "contributions_upto",
    "edge_attribution_reference",
    "patch_edges_reference",
    "source_contributions",
]
