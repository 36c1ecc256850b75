"""Hooks inside one tower of a bi-encoder (``tower=``) equal a Hugging Face forward-hook oracle:
head knockout and TFC1-style activation patching in the document tower, the query embedding
fixed; embedding-level patching; refusals in one line."""

from __future__ import annotations

import pytest
import torch

from mechir.hooks import (
    direction_ablation_hooks,
    head_knockout_hooks,
    in_tower,
    neuron_ablation_hooks,
    output_patch_hooks,
    patch_hooks,
    tower_source,
)
from mechir.models.biencoder import load_bi_encoder
from mechir.parts import Part
from tests.helpers import DOCUMENTS, QUERIES, tiny_hf_model, tiny_tokenizer

D_HEAD = 8  # tiny BERT: d_model 32, 4 heads


@pytest.fixture(scope="module")
def bi(tmp_path_factory):
    """(hooked mean-pooling cosine bi-encoder, its HF BertModel) on a tiny random BERT."""
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    base = tiny_hf_model(5).bert
    return load_bi_encoder(base, tokenizer=tok, pooling="mean", device="cpu"), base


def _hf_embed(base, tower, attn_hook=None):
    """Mean-pooled HF embedding of a tower batch, with ``attn_hook`` (layer, fn) on the output
    of ``encoder.layer[l].attention.self`` (the heads' outputs before W_O)."""
    handle = None
    if attn_hook is not None:
        layer, fn = attn_hook
        module = base.encoder.layer[layer].attention.self
        handle = module.register_forward_hook(lambda m, a, out: (fn(out[0]), *out[1:]))
    try:
        with torch.no_grad():
            h = base(
                input_ids=tower.input_ids,
                attention_mask=tower.attention_mask,
                token_type_ids=tower.token_type_ids,
            ).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()
    m = tower.attention_mask.float()[..., None]
    return (h * m).sum(1) / m.sum(1)


def _cos(q, d):
    return torch.nn.functional.cosine_similarity(q, d, dim=-1)


def test_head_knockout_in_the_document_tower_equals_hf_oracle(bi):
    model, base = bi
    batch = model.encode(QUERIES, DOCUMENTS)
    layer, head = 1, 2

    def zero_head(z):
        z = z.clone()
        z[..., head * D_HEAD : (head + 1) * D_HEAD] = 0
        return z

    q = _hf_embed(base, batch.queries)
    d_knocked = _hf_embed(base, batch.documents, (layer, zero_head))
    hooks = head_knockout_hooks(model, heads=[f"{layer}/{head}"], tower="document")
    ours = model.score(batch, hooks=hooks, batch_size=3)
    torch.testing.assert_close(ours, _cos(q, d_knocked), atol=1e-5, rtol=0)
    # the query tower only, and both towers
    q_knocked = _hf_embed(base, batch.queries, (layer, zero_head))
    only_query = head_knockout_hooks(model, heads=[f"{layer}/{head}"], tower="query")
    d = _hf_embed(base, batch.documents)
    torch.testing.assert_close(
        model.score(batch, hooks=only_query), _cos(q_knocked, d), atol=1e-5, rtol=0
    )
    both = head_knockout_hooks(model, heads=[f"{layer}/{head}"])
    torch.testing.assert_close(
        model.score(batch, hooks=both), _cos(q_knocked, d_knocked), atol=1e-5, rtol=0
    )
    assert not torch.allclose(ours, model.score(batch), atol=1e-4)  # the knockout matters


def test_tfc1_patching_in_the_document_tower_equals_hf_oracle(bi):
    """Clean documents hold a query term where the corrupted ones hold another word (same
    length); head 0/1's output at the document tokens is patched from the clean run into the
    corrupted one, the query embedding unchanged."""
    model, base = bi
    queries = ["what cat runs", "red car road"]
    clean_docs = ["the cat sleeps in the house", "a red car on the road"]
    corrupt_docs = ["the dog sleeps in the house", "a blue car on the water"]
    ids = ["p0", "p1"]
    clean = model.encode(queries, clean_docs, pair_ids=ids)
    corrupted = model.encode(queries, corrupt_docs, pair_ids=ids)
    layer, head = 0, 1
    source = tower_source(model, clean, [f"blocks.{layer}.attn.hook_z"], tower="document")
    assert source.batch is clean.documents
    hooks = patch_hooks(
        model, source, "z", units=[f"{layer}/{head}"], parts="document", tower="document"
    )
    ours = model.score(corrupted, hooks=hooks, batch_size=1)

    recorded = {}
    _hf_embed(base, clean.documents, (layer, lambda z: recorded.setdefault("z", z.clone())))
    doc = (corrupted.documents.parts == int(Part.DOCUMENT))[..., None]
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)

    def patch(z):
        z = z.clone()
        z[..., cols] = torch.where(doc, recorded["z"][..., cols], z[..., cols])
        return z

    q = _hf_embed(base, corrupted.queries)
    oracle = _cos(q, _hf_embed(base, corrupted.documents, (layer, patch)))
    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, model.score(corrupted), atol=1e-5)


def test_query_output_fixed_equals_running_the_query_tower(bi):
    model, _ = bi
    batch = model.encode(QUERIES, DOCUMENTS)
    with torch.no_grad():
        q, _ = model(batch, return_type="towers")
        fixed = model(batch, query_output=q)
    torch.testing.assert_close(fixed, model.score(batch), atol=1e-6, rtol=0)


def test_swapping_the_pooled_document_embedding(bi):
    model, _ = bi
    a = model.encode(QUERIES, DOCUMENTS, pair_ids=["0", "1", "2", "3"])
    b = model.encode(QUERIES, DOCUMENTS[::-1], pair_ids=["0", "1", "2", "3"])
    source = tower_source(model, a, [model.output_hook_name], tower="document")
    swapped = model.score(b, hooks=output_patch_hooks(model, source), batch_size=2)
    torch.testing.assert_close(swapped, model.score(a), atol=1e-6, rtol=0)


def test_direction_ablation_inside_a_tower_and_the_refusal(bi):
    model, base = bi
    batch = model.encode(QUERIES, DOCUMENTS)
    hooks = direction_ablation_hooks(model, attending="document", attended="cls", tower="document")
    # oracle: document rows of every layer's attention pattern lose their [CLS] column
    cls_col = batch.documents.parts == int(Part.CLS)
    doc_rows = batch.documents.parts == int(Part.DOCUMENT)
    removed = doc_rows[:, :, None] & cls_col[:, None, :]  # [batch, query_pos, key_pos]
    from transformers.models.bert import modeling_bert

    def eager_with_ablation(module, query, key, value, attention_mask, scaling, dropout=0.0, **k):
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.softmax(weights, dim=-1) * ~removed[:, None]
        out = torch.matmul(weights, value).transpose(1, 2).contiguous()
        return out, weights

    original = modeling_bert.eager_attention_forward
    modeling_bert.eager_attention_forward = eager_with_ablation
    try:
        d = _hf_embed(base, batch.documents)
    finally:
        modeling_bert.eager_attention_forward = original
    q = _hf_embed(base, batch.queries)
    ablated = model.score(batch, hooks=hooks)
    torch.testing.assert_close(ablated, _cos(q, d), atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.score(batch), atol=1e-4)  # the oracle ablated too
    with pytest.raises(ValueError, match="no cross-attention"):
        direction_ablation_hooks(model, attending="query", attended="document")
    with pytest.raises(ValueError, match="no cross-attention"):
        direction_ablation_hooks(model, directions="no_interaction")


def test_tower_on_a_cross_encoder_is_refused_and_both_changes_nothing(
    tiny, tiny_batch, unchecked_shapes
):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="no towers"):
        head_knockout_hooks(model, heads=["0/1"], tower="document")
    with pytest.raises(ValueError, match="unknown tower 'doc'"):
        neuron_ablation_hooks(model, {0: [1]}, tower="doc")
    hooks = head_knockout_hooks(model, heads=["0/1"])
    assert in_tower(model, hooks, "both") is hooks
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=head_knockout_hooks(model, heads=["0/1"], tower="both")),
        model.score(tiny_batch, hooks=hooks),
    )


def test_neuron_ablation_in_one_tower_leaves_the_other_alone(bi):
    model, _ = bi
    batch = model.encode(QUERIES, DOCUMENTS)
    hooks = neuron_ablation_hooks(model, {0: [1, 5], 1: [3]}, tower="query")
    with torch.no_grad():
        q0, d0 = model(batch, return_type="towers")
        with model.hooks(fwd_hooks=hooks):
            q1, d1 = model(batch, return_type="towers")
    torch.testing.assert_close(d1, d0, atol=0, rtol=0)
    assert not torch.allclose(q1, q0, atol=1e-5)


def test_analyses_needing_cross_attention_refuse_a_bi_encoder_and_qk_circuits_run(bi):
    from mechir.circuits import qk_svd, qk_svd_reference
    from mechir.matching import attention_statistics

    model, _ = bi
    batch = model.encode(QUERIES, DOCUMENTS)
    with pytest.raises(ValueError, match="separate towers"):
        attention_statistics(model, batch.documents)
    fast, reference = qk_svd(model), qk_svd_reference(model)  # the tower's weights: as ever
    torch.testing.assert_close(fast.S, reference.S, atol=1e-4, rtol=1e-4)


def test_run_with_cache_caches_one_tower_and_serves_as_a_patching_source(bi):
    model, _ = bi
    ids = ["p0", "p1"]
    clean = model.encode(QUERIES[:2], ["the cat sleeps", "a red car"], pair_ids=ids)
    corrupted = model.encode(QUERIES[:2], ["the dog sleeps", "a blue car"], pair_ids=ids)
    with pytest.raises(ValueError, match="caches one tower"):
        model.run_with_cache(clean)
    _, cache = model.run_with_cache(clean.documents)
    assert cache.batch is clean.documents
    from_cache = patch_hooks(model, cache, "resid_pre", layers=[1], tower="document")
    source = tower_source(model, clean, ["blocks.1.hook_resid_pre"], tower="document")
    from_source = patch_hooks(model, source, "resid_pre", layers=[1], tower="document")
    patched = model.score(corrupted, hooks=from_cache)
    torch.testing.assert_close(
        patched, model.score(corrupted, hooks=from_source), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(patched, model.score(clean), atol=1e-6, rtol=0)  # every position
