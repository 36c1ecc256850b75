"""The two attention paths of the lean encoder and decoder attention (``mechir.models.encoder``):
the explicit softmax (every hook value as TransformerLens's own attention computes it) and the
fused ``scaled_dot_product_attention``, run only when no hook of this forward pass reads or
changes the scores or the pattern. Oracles: TransformerLens's own ``Attention.forward`` (the
same modules with their class swapped back) and Hugging Face."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from mechir import load_cross_encoder
from mechir.hooks import direction_ablation_hooks
from mechir.models.encoder import EncoderAttention
from tests.families.builders import (
    DECODER_SPECS,
    SPECS,
    load_hf,
    save_tiny_decoder,
)
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5
BERT_BLOCK_FAMILIES = ("bert", "electra", "roberta", "xlm-roberta", "distilbert")
ATTENTION_POINTS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


@pytest.fixture(scope="module", params=BERT_BLOCK_FAMILIES)
def encoder(request, family_dirs):
    """``(name, model, hf, batch)`` of a BERT-block family (padded batch)."""
    directory = family_dirs(request.param)
    model = load_cross_encoder(directory, device="cpu")
    assert isinstance(model.blocks[0].attn, EncoderAttention)
    batch = model.encode(QUERIES, DOCUMENTS)
    assert batch.attention_mask.sum(-1).unique().numel() > 1, "batch must contain padding"
    return request.param, model, load_hf(request.param, directory), batch


@pytest.fixture(scope="module", params=tuple(DECODER_SPECS))
def decoder(request, tmp_path_factory):
    directory = save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_cross_encoder(directory, device="cpu")


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The ids of the threads that called ``scaled_dot_product_attention``, one per call."""
    calls: list[int] = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@contextlib.contextmanager
def transformer_lens_attention(model):
    """Every block's attention computed by TransformerLens's own forward (the class the lean
    attention derives from), on the same module: the reference of the explicit path."""
    kept = [block.attn.__class__ for block in model.blocks]
    for block in model.blocks:
        block.attn.__class__ = next(
            c for c in type(block.attn).__mro__ if c.__module__.startswith("transformer_lens")
        )
    try:
        yield model
    finally:
        for block, cls in zip(model.blocks, kept):
            block.attn.__class__ = cls


def attention_names(model, points=ATTENTION_POINTS, *, block_out=True):
    names = [f"blocks.{i}.attn.{p}" for i in range(model.cfg.n_layers) for p in points]
    if block_out:
        names += [f"blocks.{i}.hook_attn_out" for i in range(model.cfg.n_layers)]
    return [*names, "hook_score"]


def cached(model, batch, names, hooks=()):
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        score, cache = model.run_with_cache(batch, names_filter=names)
    return score, cache


def assert_caches_equal(mine, ref, names, atol=ATOL):
    for name in names:
        torch.testing.assert_close(mine[name], ref[name], atol=atol, rtol=1e-5, msg=name)


def watch_pattern(model):
    """A hook that reads (and keeps) every layer's pattern: the explicit path must run."""
    return [
        (f"blocks.{i}.attn.hook_pattern", lambda a, hook: None) for i in range(model.cfg.n_layers)
    ]


# ---------------------------------------------------------------------- explicit path
def test_explicit_path_every_attention_hook_equals_transformer_lens(encoder, sdpa_calls):
    _, model, _, batch = encoder
    names = attention_names(model)
    score, mine = cached(model, batch, names)  # the cache watches the pattern: explicit path
    assert sdpa_calls == []
    with transformer_lens_attention(model):
        ref_score, ref = cached(model, batch, names)
    assert_caches_equal(mine, ref, names)
    torch.testing.assert_close(score, ref_score, atol=ATOL, rtol=1e-5)


def test_explicit_path_whole_row_removed_equals_transformer_lens(encoder, sdpa_calls):
    """``renormalize`` with [CLS] reading nothing: the [CLS] row of the scores is all -inf,
    its pattern row zeros (not NaN), in every layer."""
    _, model, _, batch = encoder
    hooks = direction_ablation_hooks(model, directions="cls_reads_nothing", mode="renormalize")
    names = attention_names(model)
    score, mine = cached(model, batch, names, hooks)
    assert sdpa_calls == []
    with transformer_lens_attention(model):
        ref_score, ref = cached(model, batch, names, hooks)
    assert_caches_equal(mine, ref, names)
    assert torch.isneginf(mine["blocks.0.attn.hook_attn_scores"][:, :, 0]).all()
    assert (mine["blocks.0.attn.hook_pattern"][:, :, 0] == 0).all()
    torch.testing.assert_close(score, ref_score, atol=ATOL, rtol=1e-5)
    assert torch.isfinite(score).all()


def test_direction_ablation_runs_explicit_and_scores_as_transformer_lens(encoder, sdpa_calls):
    _, model, _, batch = encoder
    hooks = direction_ablation_hooks(model, directions="query_to_document")
    ablated = model.score(batch, hooks=hooks)
    assert sdpa_calls == []  # the hook is on hook_pattern: no fused layer
    with transformer_lens_attention(model):
        reference = model.score(batch, hooks=hooks)
    torch.testing.assert_close(ablated, reference, atol=ATOL, rtol=1e-5)
    assert (ablated - model.score(batch)).abs().max() > 1e-3  # the ablation does something


# ---------------------------------------------------------------------- fused path
def test_fused_path_equals_explicit_and_hf(encoder, sdpa_calls):
    """Hooks on q, k, v, z and the block output still fire on the fused path, with the explicit
    path's values; the score equals the explicit path's and Hugging Face's."""
    name, model, hf, batch = encoder
    outside = attention_names(model, ("hook_q", "hook_k", "hook_v", "hook_z"))
    fused_score, fused = cached(model, batch, outside)
    assert len(sdpa_calls) == model.cfg.n_layers
    explicit_score, explicit = cached(model, batch, outside, watch_pattern(model))
    assert len(sdpa_calls) == model.cfg.n_layers  # no more fused calls
    assert_caches_equal(fused, explicit, outside)
    torch.testing.assert_close(fused_score, explicit_score, atol=ATOL, rtol=0)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if SPECS[name].has_token_types:
        kwargs["token_type_ids"] = batch.token_type_ids
    with torch.no_grad():
        hf_score = hf(**kwargs).logits[:, 0]
    torch.testing.assert_close(model.score(batch), hf_score, atol=ATOL, rtol=1e-5)


def test_pairs_without_tokens_give_zeros_on_both_paths(encoder, sdpa_calls):
    """A row of the attention mask with no token: every query of it reads nothing (zeros, as
    TransformerLens's attention gives), on the fused and the explicit path alike."""
    _, model, _, batch = encoder
    mask = batch.attention_mask.clone()
    mask[1] = 0
    args = (batch.input_ids, batch.token_type_ids, mask)
    with torch.no_grad():
        fused = model(*args, return_type="resid")
        assert len(sdpa_calls) == model.cfg.n_layers
        with model.hooks(fwd_hooks=watch_pattern(model)):
            explicit = model(*args, return_type="resid")
        with transformer_lens_attention(model):
            reference = model(*args, return_type="resid")
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(explicit, reference, atol=ATOL, rtol=1e-5)


def test_gradients_equal_on_both_paths_and_a_backward_hook_on_the_pattern_is_explicit(
    encoder, sdpa_calls
):
    _, model, _, batch = encoder
    grads = {}

    def keep(name):
        def hook(grad, hook):
            grads[name] = grad.detach().clone()

        return hook

    embed_grad = [("hook_full_embed", keep("fused"))]
    with model.hooks(bwd_hooks=embed_grad):
        model(batch).sum().backward()
    assert len(sdpa_calls) == model.cfg.n_layers
    pattern_grad = [("blocks.0.attn.hook_pattern", keep("pattern"))]
    with model.hooks(bwd_hooks=[("hook_full_embed", keep("explicit")), *pattern_grad]):
        model(batch).sum().backward()
    assert len(sdpa_calls) == 2 * model.cfg.n_layers - 1  # layer 0 ran the explicit softmax
    assert grads["pattern"].shape[-1] == grads["pattern"].shape[-2] == batch.input_ids.shape[1]
    torch.testing.assert_close(grads["fused"], grads["explicit"], atol=ATOL, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_watched_is_decided_per_thread(encoder, sdpa_calls):
    """Thread A watches the pattern (its hook waits inside A's forward pass until thread B has
    scored, so B runs while A's hooks are on the model); B watches nothing. A gets the explicit
    pattern and score, B the fused path, each with exactly its own values."""
    _, model, _, batch = encoder
    n = model.cfg.n_layers
    explicit_score, explicit = cached(model, batch, attention_names(model), watch_pattern(model))
    fused_score = model.score(batch)
    sdpa_calls.clear()
    a_inside, b_done = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def watcher(pattern, hook):
        results.setdefault("patterns", {})[hook.name] = pattern.clone()
        if not a_inside.is_set():
            a_inside.set()
            assert b_done.wait(timeout=60), "thread B did not finish"

    def thread_a():
        hooks = [(f"blocks.{i}.attn.hook_pattern", watcher) for i in range(n)]
        results["a"] = model.score(batch, hooks=hooks)
        results["a_thread"] = threading.get_ident()

    def thread_b():
        assert a_inside.wait(timeout=60)
        try:
            results["b"] = model.score(batch)
            results["b_thread"] = threading.get_ident()
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert "a" in results and "b" in results
    assert sdpa_calls == [results["b_thread"]] * n  # B fused every layer, A none
    torch.testing.assert_close(results["a"], explicit_score, atol=0, rtol=0)
    torch.testing.assert_close(results["b"], fused_score, atol=0, rtol=0)
    for name, pattern in results["patterns"].items():
        torch.testing.assert_close(pattern, explicit[name], atol=0, rtol=0)
    assert len(results["patterns"]) == n


# ---------------------------------------------------------------------- decoders
@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_decoder_paths_equal_transformer_lens(decoder, padding_side, sdpa_calls):
    """Causal attention (GQA, rotary, a sliding window for Mistral): the fused path's q/k/v/z
    and score equal the explicit path's; the explicit path's every attention hook equals
    TransformerLens's own forward; left padding (queries without keys) gives no NaN."""
    _, model = decoder
    batch = model.encode(QUERIES, DOCUMENTS, padding_side=padding_side)
    points = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z")
    outside = attention_names(model, points)
    fused_score, fused = cached(model, batch, outside)
    assert len(sdpa_calls) == model.cfg.n_layers
    every = attention_names(model, (*points, "hook_attn_scores", "hook_pattern"))
    explicit_score, explicit = cached(model, batch, every)
    assert len(sdpa_calls) == model.cfg.n_layers
    real = batch.attention_mask.bool()
    for hook_name in outside[:-1]:
        torch.testing.assert_close(
            fused[hook_name][real], explicit[hook_name][real], atol=ATOL, rtol=1e-5
        )
    torch.testing.assert_close(fused_score, explicit_score, atol=ATOL, rtol=0)
    with transformer_lens_attention(model):
        ref_score, ref = cached(model, batch, every)
    assert_caches_equal(explicit, ref, every)
    torch.testing.assert_close(explicit_score, ref_score, atol=ATOL, rtol=1e-5)
    assert torch.isfinite(fused_score).all()  # (Hugging Face parity: tests/families/test_decoder)


# ---------------------------------------------------------------------- ModernBERT
@pytest.mark.parametrize("name", ["modernbert", "modernbert-cls"])
def test_modernbert_fused_equals_explicit(name, family_dirs, sdpa_calls):
    """Rotary attention with local (sliding-window) layers over a padded batch: queries whose
    window holds only padding read nothing on both paths; hook values outside the scores and the
    score equal the explicit path's, which equals Hugging Face's (tests/families/test_parity)."""
    model = load_cross_encoder(family_dirs(name), device="cpu")
    batch = model.encode(QUERIES, DOCUMENTS)
    points = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z")
    outside = attention_names(model, points, block_out=False)
    fused_score, fused = cached(model, batch, outside)
    assert len(sdpa_calls) == model.cfg.n_layers
    explicit_score, explicit = cached(model, batch, outside, watch_pattern(model))
    assert len(sdpa_calls) == model.cfg.n_layers
    assert_caches_equal(fused, explicit, outside)
    torch.testing.assert_close(fused_score, explicit_score, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- declared terms
def test_every_attention_declares_its_terms(family):
    """Every block's attention is an :class:`~mechir.models.attention.AttentionTerms` and
    declares what it has: rotary positions exactly where ``hook_rot_q`` fires (ModernBERT),
    with ``rotate_positions(hook_q) == hook_rot_q``; position score terms exactly in DeBERTa's
    disentangled attention; a window exactly on ModernBERT's local layers."""
    from mechir.models.attention import AttentionTerms
    from mechir.models.deberta import DisentangledAttention

    name, model, _, batch = family
    real = batch.attention_mask.bool()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(("_q", "rot_q")))
    for layer, block in enumerate(model.blocks):
        attn, rotated = block.attn, f"blocks.{layer}.attn.hook_rot_q"
        assert isinstance(attn, AttentionTerms)
        assert (attn.rotate_positions is not None) == (rotated in cache)
        if rotated in cache:
            q = attn.rotate_positions(cache[f"blocks.{layer}.attn.hook_q"])
            torch.testing.assert_close(q[real], cache[rotated][real], atol=ATOL, rtol=1e-5)
        assert (attn.qk_score_delta is not None) == isinstance(attn, DisentangledAttention)
    windows = [block.attn.window for block in model.blocks]
    assert any(w is not None for w in windows) == name.startswith("modernbert"), windows
