"""HookedCrossEncoder vs Hugging Face: hidden states and scores, tiny and shared models."""

from __future__ import annotations

import pytest
import torch

from mechir import load_cross_encoder
from mechir.running import running_batch
from tests.helpers import (
    DOCUMENTS,
    QUERIES,
    SHARED_MAX_LENGTH,
    SHARED_MODEL,
    requires_shared,
    tiny_cross_encoder,
    tiny_hf_model,
)

ATOL = 1e-5


def hf_outputs(hf, batch):
    with torch.no_grad():
        out = hf(
            input_ids=batch.input_ids,
            token_type_ids=batch.token_type_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )
    return out.logits, out.hidden_states


def assert_parity(model, hf, batch, atol=ATOL):
    logits, hidden = hf_outputs(hf, batch)
    names = [f"blocks.{i}.hook_normalized_resid_post" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        mine, cache = model.run_with_cache(batch, return_type="logits", names_filter=names)
    real = batch.attention_mask.bool()
    for i, name in enumerate(names):  # padding rows are meaningless; compare real tokens
        torch.testing.assert_close(cache[name][real], hidden[i + 1][real], atol=atol, rtol=1e-5)
    torch.testing.assert_close(mine, logits, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_parity_tiny(tmp_path, num_labels):
    model, hf, _ = tiny_cross_encoder(tmp_path, num_labels=num_labels)
    batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
    assert batch.attention_mask.sum(-1).unique().numel() > 1, "batch must contain padding"
    assert_parity(model, hf, batch)


@pytest.mark.parametrize(
    "dtype,init,atol", [(torch.float64, 0.3, 1e-10), (torch.float32, 0.05, ATOL)]
)
def test_parity_bert_large_shape(tmp_path, dtype, init, atol):
    """24 layers and 16 heads (BERT-large's layout) at small width: catches shape assumptions.
    In float64 the two implementations agree to rounding; in float32 with BERT-like weight scales
    within 1e-5 (large random weights amplify float32 rounding over 24 layers)."""
    model, hf, _ = tiny_cross_encoder(
        tmp_path,
        dtype=dtype,
        num_labels=2,
        n_layers=24,
        n_heads=16,
        d_model=64,
        d_mlp=96,
        initializer_range=init,
    )
    assert_parity(model, hf, model.encode(QUERIES, DOCUMENTS, max_length=64), atol=atol)


def test_padding_does_not_change_scores(tiny, tiny_batch):
    model, _, _ = tiny
    together = model.score(tiny_batch)
    alone = torch.cat([model.score(tiny_batch[i]) for i in range(len(tiny_batch))])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_score_types_two_labels(tmp_path):
    model, hf, _ = tiny_cross_encoder(tmp_path, num_labels=2)
    batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
    logits, _ = hf_outputs(hf, batch)
    # default: the binary logit z1 - z0, which ranks exactly like the softmax probability
    assert model.score_type == "binary_logit"
    default = model.score(batch)
    torch.testing.assert_close(default, logits[:, 1] - logits[:, 0], atol=ATOL, rtol=0)
    assert torch.equal(default.argsort(), logits.softmax(-1)[:, 1].argsort())
    model.score_type = "logit"
    torch.testing.assert_close(model.score(batch), logits[:, 1], atol=ATOL, rtol=0)
    model.score_type = "log_prob"
    torch.testing.assert_close(model.score(batch), logits.log_softmax(-1)[:, 1], atol=ATOL, rtol=0)
    model.score_type = "prob"
    torch.testing.assert_close(model.score(batch), logits.softmax(-1)[:, 1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="score_type"):
        model.score_type = "probability"


def test_score_head_hook_points(tiny, tiny_batch):
    model, _, _ = tiny
    with torch.no_grad():
        score, cache = model.run_with_cache(tiny_batch)
    assert cache["pooler.hook_pooler_out"].shape == (len(tiny_batch), model.cfg.d_model)
    assert cache["classifier.hook_logits"].shape == (len(tiny_batch), 1)
    torch.testing.assert_close(cache["hook_score"], score)
    # hooks on the score path apply inside score()
    zero_pool = [("pooler.hook_pooler_out", lambda x, hook: torch.zeros_like(x))]
    with model.hooks(fwd_hooks=zero_pool):
        hooked = model.score(tiny_batch)
    bias = model.classifier.b.detach()[0]
    torch.testing.assert_close(hooked, bias.expand(len(tiny_batch)))
    assert not torch.allclose(model.score(tiny_batch), hooked), "hooks must not leak"


def test_score_batch_size_equal_and_on_cpu(tiny, tiny_batch):
    model, _, _ = tiny
    full = model.score(tiny_batch)
    assert full.device.type == "cpu" and full.dtype == torch.float32
    torch.testing.assert_close(model.score(tiny_batch, batch_size=3), full, atol=ATOL, rtol=0)


def test_load_from_local_directory(tmp_path):
    hf = tiny_hf_model(num_labels=2)
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path)
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model = load_cross_encoder(tmp_path / "model", device="cpu")
    batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
    assert_parity(model, hf, batch)


@pytest.mark.shared
def test_parity_shared_model():
    requires_shared()
    from transformers import AutoModelForSequenceClassification

    model = load_cross_encoder(SHARED_MODEL, device="cpu")
    hf = AutoModelForSequenceClassification.from_pretrained(
        SHARED_MODEL, attn_implementation="eager"
    ).eval()
    queries = QUERIES + ["0-dimensional biomaterials show inductive properties."]
    docs = DOCUMENTS + ["Biomaterials " * 400]  # truncated to max_length
    batch = model.encode(queries, docs, max_length=SHARED_MAX_LENGTH)
    assert batch.input_ids.shape[1] == SHARED_MAX_LENGTH
    assert_parity(model, hf, batch)


def test_layer_norm_fast_path_equals_hooked_path(tiny, tiny_batch):
    """Hooking a LayerNorm's scale switches to TransformerLens's step-by-step computation; both
    paths give the same scores, and the hook sees the real scale."""
    model, _, _ = tiny
    fast = model.score(tiny_batch)
    seen = []
    hooks = [
        (f"blocks.{i}.ln{j}.hook_scale", lambda x, hook: seen.append(x) or x)
        for i in range(model.cfg.n_layers)
        for j in (1, 2)
    ]
    hooks.append(("embed.ln.hook_normalized", lambda x, hook: seen.append(x) or x))
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks), fast, atol=1e-5, rtol=0)
    assert len(seen) == 2 * model.cfg.n_layers + 1
    assert all((x > 0).all() and x.shape[-1] == 1 for x in seen[1:])  # scales, after embed.ln


ATTENTION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def _attention_run(model, batch, attention_cls, extra_hooks=()):
    """Scores and every attention hook value with each block's attention forward taken from
    ``attention_cls`` (same module, same parameters)."""
    kept = [block.attn.__class__ for block in model.blocks]
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x.detach().clone()

    names = [f"blocks.{i}.attn.{h}" for i in range(model.cfg.n_layers) for h in ATTENTION_HOOKS]
    try:
        for block in model.blocks:
            block.attn.__class__ = attention_cls
        scores = model.score(batch, hooks=[*extra_hooks, *((n, keep) for n in names)])
    finally:
        for block, cls in zip(model.blocks, kept):
            block.attn.__class__ = cls
    return scores, seen


@pytest.mark.parametrize("mask_a_row", [False, True])
def test_encoder_attention_equals_transformer_lens_attention(tiny, tiny_batch, mask_a_row):
    """The lean attention forward gives TransformerLens's hook values and scores, including a
    fully masked row (-inf everywhere: NaN after the softmax, zeros in both)."""
    from transformer_lens.components import Attention

    from mechir.models.encoder import EncoderAttention

    model, _, _ = tiny
    assert all(type(block.attn) is EncoderAttention for block in model.blocks)

    def mask_row(scores, hook):
        scores = scores.clone()
        scores[:, :, 1, :] = -torch.inf  # query position 1 reads nothing
        return scores

    extra = [("blocks.0.attn.hook_attn_scores", mask_row)] if mask_a_row else []
    lean, lean_seen = _attention_run(model, tiny_batch, EncoderAttention, extra)
    ref, ref_seen = _attention_run(model, tiny_batch, Attention, extra)
    torch.testing.assert_close(lean, ref, atol=1e-5, rtol=1e-5)
    assert lean_seen.keys() == ref_seen.keys() and len(ref_seen) == 6 * model.cfg.n_layers
    for name, value in ref_seen.items():
        torch.testing.assert_close(lean_seen[name], value, atol=1e-5, rtol=1e-5)
    if mask_a_row:
        assert (lean_seen["blocks.0.attn.hook_pattern"][:, :, 1] == 0).all()


def test_encoder_attention_falls_back_where_it_does_not_cover(tiny, tiny_batch):
    """With per-head results on (``use_attn_result``) TransformerLens's own forward runs, so
    ``hook_result`` fires, and the scores are unchanged."""
    model, _, _ = tiny
    plain = model.score(tiny_batch)
    seen = []
    model.cfg.use_attn_result = True
    try:
        got = model.score(
            tiny_batch, hooks=[("blocks.0.attn.hook_result", lambda x, hook: seen.append(x.shape))]
        )
    finally:
        model.cfg.use_attn_result = False
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    assert seen and seen[0][2] == model.cfg.n_heads  # [batch, pos, head, d_model]


def test_block_level_api_equals_forward(tiny, tiny_batch):
    model, _, _ = tiny
    with torch.no_grad():
        resid = model(tiny_batch, return_type="resid")
        x = model.embed(tiny_batch.input_ids, tiny_batch.token_type_ids)
        additive = model.additive_attention_mask(tiny_batch.attention_mask)
        for layer in range(model.cfg.n_layers - 1):
            x = model.run_block(layer, x, additive)
        full = model.run_block(model.cfg.n_layers - 1, x, additive)
        cls = model.run_block(model.cfg.n_layers - 1, x, additive, cls_only=True)
        torch.testing.assert_close(full, resid)
        assert cls.shape[1] == 1
        # float32 round-off only: a 1-query matmul accumulates in another order than a 160-query one
        torch.testing.assert_close(cls[:, 0], resid[:, 0], atol=5e-6, rtol=0)
        torch.testing.assert_close(model.score_from_resid(cls), model(tiny_batch))


def test_binary_logit_of_three_labels_is_the_log_odds(tmp_path):
    model, hf, _ = tiny_cross_encoder(tmp_path, num_labels=3)
    batch = model.encode(QUERIES, DOCUMENTS, max_length=64)
    logits, _ = hf_outputs(hf, batch)
    p = logits.softmax(-1)[:, 1]
    torch.testing.assert_close(model.score(batch), (p / (1 - p)).log(), atol=1e-4, rtol=0)


def test_one_label_default_is_the_logit(tiny, tiny_batch):
    model, hf, _ = tiny
    logits, _ = hf_outputs(hf, tiny_batch)
    torch.testing.assert_close(model.score(tiny_batch), logits[:, 0], atol=ATOL, rtol=0)


def test_start_and_stop_at_layer_equal_the_full_forward(tiny, tiny_batch):
    model, _, _ = tiny
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch)  # hooked LayerNorms: step-by-step path
        full = model(tiny_batch)
        for layer in range(model.cfg.n_layers + 1):
            resid = model(tiny_batch, stop_at_layer=layer)
            name = (
                f"blocks.{layer}.hook_resid_pre"
                if layer < model.cfg.n_layers
                else f"blocks.{layer - 1}.hook_normalized_resid_post"
            )
            torch.testing.assert_close(resid, cache[name], atol=1e-5, rtol=0)
            rest = model(tiny_batch, start_at_layer=layer, resid=resid)
            torch.testing.assert_close(rest, full, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        model(tiny_batch, stop_at_layer=9)
    with pytest.raises(ValueError, match="pass resid="):
        model(tiny_batch, start_at_layer=1)


def test_running_batch_is_the_batch_of_each_forward(tiny, tiny_batch):
    model, _, _ = tiny
    seen = []
    record = lambda act, hook: seen.append(running_batch(hook).parts.clone())  # noqa: E731
    model.score(tiny_batch, hooks=[("blocks.0.hook_resid_pre", record)], batch_size=3)
    assert [len(p) for p in seen] == [3, 1]
    assert torch.equal(seen[1], tiny_batch[3].parts)
    # bare ids: parts inferred from [CLS]/[SEP]
    seen.clear()
    model.run_with_hooks(
        tiny_batch.input_ids,
        tiny_batch.token_type_ids,
        tiny_batch.attention_mask,
        fwd_hooks=[("blocks.0.hook_resid_pre", record)],
    )
    assert torch.equal(seen[0], tiny_batch.parts)
    with pytest.raises(RuntimeError, match="no forward pass is running"):
        _ = model.running_batch


def test_unknown_hook_names_are_clear_errors(tiny, tiny_batch):
    model, _, _ = tiny
    noop = lambda act, hook: act  # noqa: E731
    with pytest.raises(ValueError, match="layer 7 out of range, the model has 2 layers"):
        model.run_with_hooks(tiny_batch, fwd_hooks=[("blocks.7.attn.hook_z", noop)])
    with pytest.raises(ValueError, match="did you mean 'blocks.0.attn.hook_z'"):
        model.run_with_hooks(tiny_batch, fwd_hooks=[("blocks.0.attn.hook_zz", noop)])


def test_backward_hooks_fire_on_every_hook_point(tiny, tiny_batch):
    model, _, _ = tiny
    fired = []
    grad = lambda g, hook: fired.append(hook.name)  # noqa: E731
    names = ["blocks.0.ln1.hook_normalized", "blocks.1.ln2.hook_scale", "embed.ln.hook_normalized"]
    with model.hooks(bwd_hooks=[(n, grad) for n in names]):
        model(tiny_batch).sum().backward()
    model.zero_grad(set_to_none=True)
    assert sorted(fired) == sorted(names)


def test_run_with_cache_gradients_on_a_batch(tiny, tiny_batch):
    """incl_bwd on a batch caches the gradient of the summed score: per pair, its own score's."""
    model, _, _ = tiny
    name = "blocks.1.hook_resid_mid"
    _, cache = model.run_with_cache(tiny_batch, names_filter=name, incl_bwd=True)
    model.zero_grad(set_to_none=True)
    for i in [0, 2]:
        _, alone = model.run_with_cache(tiny_batch[i], names_filter=name, incl_bwd=True)
        model.zero_grad(set_to_none=True)
        width = alone[name + "_grad"].shape[1]
        torch.testing.assert_close(
            cache[name + "_grad"][i : i + 1, :width], alone[name + "_grad"], atol=1e-6, rtol=0
        )


def test_non_finite_scores_are_an_error(tmp_path, tiny_batch):
    model, _, _ = tiny_cross_encoder(tmp_path)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="4 of 4 scores are NaN or infinite"):
        model.score(tiny_batch)
