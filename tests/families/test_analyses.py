"""Every analysis runs unchanged on every family, each checked against an oracle outside mechir
where one exists: Hugging Face with its eager attention function replaced (direction ablation),
Hugging Face with weight surgery (head knockout, neuron ablation), the HF query/key weights
(QK alignment); and the batched kernels against their per-cell / naive references (NIG,
patching)."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from mechir import CrossEncoderBatch, Part, circuits
from mechir.attribution import neuron_integrated_gradients, neuron_integrated_gradients_reference
from mechir.hooks import direction_ablation_hooks, head_knockout_hooks, neuron_ablation_hooks
from patching import AlignedPairs, head_target, patch_sweep, patch_sweep_reference, resid_target
from tests.families.builders import SPECS
from tests.hooks.test_attention import hand_keep

ATOL = 1e-5


# ------------------------------------------------------------------ Hugging Face oracles
def hf_scores(hf, batch, name):
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if SPECS[name].has_token_types:
        kwargs["token_type_ids"] = batch.token_type_ids
    with torch.no_grad():
        return hf(**kwargs).logits[:, 0]


def hf_attention_modules(hf):
    """The self-attention modules of a HF encoder, in layer order."""
    return [
        m
        for m in hf.modules()
        if type(m).__name__.endswith("SelfAttention") or type(m).__name__ == "ModernBertAttention"
    ]


def hf_linear(hf, layer, which):
    """The HF linear layer reading the heads (``"attn_out"``) or the neurons (``"mlp_out"``)."""
    if hasattr(hf, "model") and hasattr(hf.model, "layers"):  # ModernBERT
        block = hf.model.layers[layer]
        return block.attn.Wo if which == "attn_out" else block.mlp.Wo
    names = {
        "attn_out": ("attention.output.dense", "attention.out_lin"),
        "mlp_out": ("output.dense", "ffn.lin2"),
    }[which]
    for name, module in hf.named_modules():
        parts = name.split(".")
        if f"layer.{layer}." in name + "." and name.endswith(names) and "layer" in parts:
            if parts[parts.index("layer") + 1] == str(layer):
                if which == "mlp_out" and "attention" in name:
                    continue
                return module
    raise LookupError(f"no {which} linear for layer {layer}")


def masked_eager_attention(keep_per_layer, layer_of, mode):
    """An eager attention function applying direction ablation to the post-softmax pattern."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        scaling = query.size(-1) ** -0.5 if scaling is None else scaling
        scores = query @ key.transpose(2, 3) * scaling
        pad = attention_mask < -1e30 if attention_mask is not None else None
        keep = keep_per_layer.get(layer_of[id(module)])
        if pad is not None:
            scores = scores.masked_fill(pad, float("-inf"))
        if keep is not None and mode == "renormalize":
            scores = scores.masked_fill(keep[:, None] == 0, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        if keep is not None and mode == "zero":
            probs = probs * keep[:, None]
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attention


def masked_softmax_nn(keep_per_layer, n_layers, mode):
    """For DeBERTa, whose attention calls ``nn.functional.softmax`` itself: a stand-in for the
    module's ``nn`` whose softmax applies direction ablation (layer = call number mod layers).
    HF fills padding with ``finfo.min``; it becomes ``-inf`` so fully removed rows are zero."""
    calls = iter(range(10**6))

    def softmax(scores, dim=-1):
        keep = keep_per_layer.get(next(calls) % n_layers)
        scores = scores.masked_fill(scores == torch.finfo(scores.dtype).min, float("-inf"))
        if keep is not None and mode == "renormalize":
            scores = scores.masked_fill(keep[:, None] == 0, float("-inf"))
        probs = torch.softmax(scores, dim).nan_to_num(0.0)
        return probs * keep[:, None] if keep is not None and mode == "zero" else probs

    return SimpleNamespace(functional=SimpleNamespace(softmax=softmax))


# ------------------------------------------------------------------ hooks
@pytest.mark.parametrize("mode", ["zero", "renormalize"])
@pytest.mark.parametrize(
    "attending,attended,layers",
    [
        ((Part.QUERY,), (Part.DOCUMENT,), [0, 1]),
        ((Part.CLS,), tuple(Part)[:5], [1]),  # CLS reads nothing: all-removed rows
        ((Part.DOCUMENT, Part.SEP2), (Part.QUERY, Part.SEP1), [0]),
    ],
)
def test_direction_ablation_matches_hf_with_masked_attention(
    family, monkeypatch, attending, attended, layers, mode
):
    name, model, hf, batch = family
    keep = hand_keep(batch, [int(p) for p in attending], [int(p) for p in attended])
    layer_of = {id(m): i for i, m in enumerate(hf_attention_modules(hf))}
    assert len(layer_of) == model.cfg.n_layers
    module = sys.modules[type(hf).__module__]
    if hasattr(module, "eager_attention_forward"):
        oracle = masked_eager_attention({layer: keep for layer in layers}, layer_of, mode)
        monkeypatch.setattr(module, "eager_attention_forward", oracle)
    else:  # DeBERTa: its disentangled attention runs its own softmax
        n = model.cfg.n_layers
        monkeypatch.setattr(module, "nn", masked_softmax_nn(dict.fromkeys(layers, keep), n, mode))
    expected = hf_scores(hf, batch, name)
    hooks = direction_ablation_hooks(
        model, attending=attending, attended=attended, layers=layers, mode=mode
    )
    got = model.score(batch, hooks=hooks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4), "ablation had no effect"


def test_head_knockout_equals_hf_weight_surgery(family):
    name, model, hf, batch = family
    heads = [(0, 1), (1, 2), (1, 3)]
    got = model.score(batch, hooks=head_knockout_hooks(model, heads=["0/1", "1/2", "L1H3"]))
    surgered = copy.deepcopy(hf)
    d_head = model.cfg.d_head
    with torch.no_grad():
        for layer, h in heads:
            hf_linear(surgered, layer, "attn_out").weight[:, h * d_head : (h + 1) * d_head] = 0
    torch.testing.assert_close(got, hf_scores(surgered, batch, name), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4)


def test_neuron_ablation_equals_hf_weight_surgery(family):
    name, model, hf, batch = family
    neurons = {0: [1, 5, 100], 1: [0, 7]}
    got = model.score(batch, hooks=neuron_ablation_hooks(model, neurons=neurons))
    surgered = copy.deepcopy(hf)
    with torch.no_grad():
        for layer, idx in neurons.items():
            hf_linear(surgered, layer, "mlp_out").weight[:, idx] = 0
    torch.testing.assert_close(got, hf_scores(surgered, batch, name), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-5)


# ------------------------------------------------------------------ NIG, patching, circuits
@pytest.mark.parametrize("path", ["input", "activation"])
def test_nig_batched_equals_naive_reference(family, path):
    _, model, _, batch = family
    kwargs = dict(n_steps=4, path=path, method="gauss_legendre", aggregate="part")
    got = neuron_integrated_gradients(model, batch, max_batch=5, **kwargs)
    want = neuron_integrated_gradients_reference(model, batch, **kwargs)
    scale = want.attributions.abs().max()
    assert scale > 0
    assert (got.attributions - want.attributions).abs().max() <= 1e-5 * scale
    torch.testing.assert_close(got.scores, want.scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.unexplained, want.unexplained, atol=ATOL * 10, rtol=0)
    torch.testing.assert_close(got.scores, model.score(batch), atol=ATOL, rtol=0)


def corrupted_pairs(model, batch):
    """Clean pairs and the same pairs with every document token replaced by the query's first
    token (same lengths and parts: aligned)."""
    ids = batch.input_ids.clone()
    first_query = ids[:, 1:2].expand_as(ids)
    doc = batch.parts == int(Part.DOCUMENT)
    ids[doc] = first_query[doc]
    corrupted = CrossEncoderBatch(ids, batch.token_type_ids, batch.attention_mask, batch.parts)
    return AlignedPairs.from_batches(batch, corrupted)


@pytest.mark.parametrize(
    "target", [resid_target("resid_pre"), head_target(by="part")], ids=["resid", "heads"]
)
def test_patching_sweep_batched_equals_per_cell(family, target):
    _, model, _, batch = family
    pairs = corrupted_pairs(model, batch)
    fast = patch_sweep(model, pairs, target, batch_size=5)
    ref = patch_sweep_reference(model, pairs, target)
    assert fast.dims == ref.dims and fast.coords == ref.coords
    torch.testing.assert_close(fast.patched, ref.patched, atol=ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(fast.clean, model.score(batch), atol=ATOL, rtol=0)
    assert fast.patched.isfinite().any()


def test_qk_alignment_equals_trace_of_hf_query_key_weights(family):
    _, model, hf, _ = family
    table = circuits.qk_alignment(model, dtype=torch.float64)
    h, d = model.cfg.n_heads, model.cfg.d_head
    expected = []
    for attn in hf_attention_modules(hf):
        if hasattr(attn, "Wqkv"):  # ModernBERT: fused [Q; K; V] rows, positions ignored
            wq, wk, _ = attn.Wqkv.weight.detach().double().view(3, h, d, -1)
        elif hasattr(attn, "in_proj"):  # DeBERTa-v1: fused rows per head [q_h; k_h; v_h]
            wq, wk, _ = attn.in_proj.weight.detach().double().view(h, 3, d, -1).unbind(1)
        elif hasattr(attn, "query_proj"):  # DeBERTa-v2: the content term's weights
            wq, wk = (
                lin.weight.detach().double().view(h, d, -1)
                for lin in (attn.query_proj, attn.key_proj)
            )
        else:
            q = getattr(attn, "query", None) or attn.q_lin
            k = getattr(attn, "key", None) or attn.k_lin
            wq, wk = (lin.weight.detach().double().view(h, d, -1) for lin in (q, k))
        expected.append((wq * wk).sum((1, 2)))
    torch.testing.assert_close(
        torch.tensor(table["alignment"].to_numpy()), torch.cat(expected), rtol=1e-10, atol=1e-10
    )


def test_token_embeddings_are_what_layer_zero_sees(family):
    """``circuits.token_embeddings`` at (segment, position) = ``hook_full_embed`` of the batch."""
    name, model, _, batch = family
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter="hook_full_embed")
    layer0 = cache["hook_full_embed"]
    for b, pos in [(0, 0), (0, 2), (1, int(batch.lengths[1]) - 1)]:
        segment = int(batch.token_type_ids[b, pos])
        table = circuits.token_embeddings(model, token_type=segment, position=pos)
        torch.testing.assert_close(
            table[batch.input_ids[b, pos]], layer0[b, pos], atol=ATOL, rtol=0
        )
