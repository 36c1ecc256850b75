"""What ModernBERT adds to the shared family tests, each against a Hugging Face hook oracle:
rotary attention with alternating global / sliding-window layers, the gated MLP's neuron, the
pre-LN block output and the final norm, and [CLS]-only last blocks in patching."""

from __future__ import annotations

import pytest
import torch

from mechir import load_cross_encoder
from mechir.models.registry import family_of
from tests.families.builders import load_hf, wordpiece_tokenizer
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5


@pytest.fixture(scope="module", params=["modernbert", "modernbert-cls"])
def modern(request, family_dirs):
    directory = family_dirs(request.param)
    model = load_cross_encoder(directory, device="cpu")
    return model, load_hf(request.param, directory), model.encode(QUERIES, DOCUMENTS)


def test_layers_alternate_global_and_sliding_window(modern):
    model, hf, batch = modern
    assert model.family is family_of("modernbert")
    windows = [block.attn.window for block in model.blocks]
    assert windows == [None, hf.config.local_attention // 2]
    assert windows[1] < batch.input_ids.shape[1] // 2  # the window masks keys
    thetas = [block.attn.theta for block in model.blocks]
    assert thetas == [hf.config.rope_parameters[t]["rope_theta"] for t in hf.config.layer_types]


def test_attention_patterns_equal_hf_attentions(modern):
    """``hook_pattern`` of every layer = HF's eager attention weights (rotary, window, padding),
    on real query rows; the local layer puts no weight beyond the window, the global one does."""
    model, hf, batch = modern
    with torch.no_grad():
        hf_out = hf(batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    real = batch.attention_mask.bool()
    for layer, expected in enumerate(hf_out.attentions):
        got = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(
            got.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=ATOL, rtol=0
        )
    n = batch.input_ids.shape[1]
    far = (torch.arange(n)[:, None] - torch.arange(n)).abs() > model.blocks[1].attn.window
    assert (cache["blocks.1.attn.hook_pattern"][..., far] == 0).all()
    assert (cache["blocks.0.attn.hook_pattern"][..., far] > 0).any()


def test_gated_neuron_is_the_input_of_hf_wo(modern):
    """``mlp.hook_post`` = act(hook_pre) * hook_pre_linear = what HF's ``mlp.Wo`` reads."""
    model, hf, batch = modern
    seen: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.Wo.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0].detach())
        )
        for i, layer in enumerate(hf.model.layers)
    ]
    try:
        with torch.no_grad():
            hf(batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: ".mlp.hook_" in n)
    real = batch.attention_mask.bool()
    for i in range(model.cfg.n_layers):
        post = cache[f"blocks.{i}.mlp.hook_post"]
        gelu = torch.nn.functional.gelu(cache[f"blocks.{i}.mlp.hook_pre"])
        torch.testing.assert_close(post, gelu * cache[f"blocks.{i}.mlp.hook_pre_linear"])
        torch.testing.assert_close(post[real], seen[i][real], atol=ATOL, rtol=0)


def test_block_output_and_final_hidden_hooks(modern):
    """Pre-LN: a block's output is ``hook_resid_post``; the head reads the final norm's output
    ``hook_final_hidden`` (= HF ``last_hidden_state``), which ``return_type="resid"`` returns."""
    model, hf, batch = modern
    assert model.block_output_name(0) == "blocks.0.hook_resid_post"
    assert model.final_hidden_name == "hook_final_hidden"
    with torch.no_grad():
        last = hf.model(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        resid, cache = model.run_with_cache(
            batch,
            return_type="resid",
            names_filter=["hook_final_hidden", "blocks.0.hook_resid_post"],
        )
        mid = model(batch, stop_at_layer=1)
        rest = model(batch, start_at_layer=1, resid=mid)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(resid[real], last[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["hook_final_hidden"], resid)
    torch.testing.assert_close(mid, cache["blocks.0.hook_resid_post"])
    torch.testing.assert_close(rest, model.score(batch), atol=ATOL, rtol=0)


def test_cls_only_last_block_equals_the_full_block(modern):
    """``run_block(cls_only=True)`` on the last layer (with the final norm) = row 0 of the full
    block; mean pooling needs every position, so there it runs the full block."""
    model, _, batch = modern
    last = model.cfg.n_layers - 1
    with torch.no_grad():
        resid = model(batch, stop_at_layer=last)
        mask = model.additive_attention_mask(batch.attention_mask)
        with model.running_on(batch):
            full = model.run_block(last, resid, mask)
            cls = model.run_block(last, resid, mask, cls_only=True)
            score = model.score_from_resid(cls)
    expected_positions = 1 if model.pooler.pooling == "cls" else resid.shape[1]
    assert cls.shape[1] == expected_positions
    torch.testing.assert_close(cls, full[:, :expected_positions], atol=ATOL, rtol=0)
    torch.testing.assert_close(score, model.score(batch), atol=ATOL, rtol=0)


def test_unsupported_rope_type_is_a_clear_error(family_dirs):
    hf = load_hf("modernbert", family_dirs("modernbert"))
    hf.config.rope_parameters = {
        t: {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0} for t in hf.config.layer_types
    }
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        load_cross_encoder(hf, tokenizer=wordpiece_tokenizer(token_types=False), device="cpu")


def _affine(ln):
    """A LayerNorm that keeps its centring and weight but not its (nonlinear) scaling."""
    return lambda x: (x - x.mean(-1, keepdim=True)) * ln.w + ln.b


def test_atp_star_on_rotary_queries_and_keys_is_exact_on_a_linear_tail(family_dirs):
    """AtP* rotates q, k and the patched difference: exact when the score is affine in the last
    layer's pattern (affine norms, gate fixed to 1 and identity activations after it)."""
    from patching import attribution_patch, patch_sweep, qk_target
    from tests.families.test_analyses import corrupted_pairs

    model = load_cross_encoder(family_dirs("modernbert-cls"), device="cpu")
    last = model.blocks[-1]
    with torch.no_grad():
        last.mlp.W_gate.zero_()
        last.mlp.b_gate.fill_(1.0)
    last.mlp.act = lambda x: x
    for ln in (last.ln1, last.ln2, model.ln_final, model.pooler.ln):
        ln.forward = _affine(ln)
    model.pooler.act = lambda x: x
    pairs = corrupted_pairs(model, model.encode(QUERIES, DOCUMENTS))
    for target in (qk_target("k", heads=["1/0", "1/1"]), qk_target("q", by="part", heads=["1/3"])):
        exact = patch_sweep(model, pairs, target)
        approx = attribution_patch(model, pairs, target, batch_size=3)
        scale = max(1.0, float(exact.patched.nan_to_num().abs().max()))
        torch.testing.assert_close(
            approx.patched, exact.patched, atol=1e-5 * scale, rtol=0, equal_nan=True
        )
        effect = exact.patched - exact.corrupted.view(-1, *[1] * (exact.patched.dim() - 1))
        assert effect.nan_to_num().abs().max() > 1e-2
