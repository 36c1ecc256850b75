"""Path patching: batched == reference, unrelated senders change nothing, step 1 by hand."""

from __future__ import annotations

import einops
import pytest
import torch

from patching import (
    path_freeze_hooks,
    path_patch,
    path_patch_reference,
    split_qkv_input,
)

CONFIGS = {
    "one receiver, qkv": dict(receivers=["2/1"], channels="qkv"),
    "two layers, q, frozen MLPs": dict(receivers=["1/0", "2/3"], channels="q", freeze_mlps=True),
    "chosen senders, kv": dict(receivers=["1/2"], channels="kv", senders=["2/0", "1/1", "0/3"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_path_patching_equals_reference(model3, pairs, name):
    kwargs = CONFIGS[name]
    fast = path_patch(model3, pairs, batch_size=5, **kwargs)
    ref = path_patch_reference(model3, pairs, **kwargs)
    assert fast.dims == ("layer", "head") and fast.method == "path"
    assert torch.equal(fast.patched.isnan(), ref.patched.isnan())
    torch.testing.assert_close(fast.patched, ref.patched, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(fast.clean, ref.clean, atol=1e-5, rtol=0)


def test_default_senders_are_the_heads_before_the_last_receiver_layer(model3, pairs):
    result = path_patch(model3, pairs[:1], ["2/0"])
    assert (~result.patched[0].isnan()).sum(-1).tolist() == [4, 4, 0]


def test_unrelated_senders_change_nothing(model3, pairs):
    # senders in the receivers' layer or later have no path into the receivers' inputs
    senders = ["1/0", "1/3", "2/1", "2/2"]
    result = path_patch(model3, pairs, ["1/2", "1/1"], senders=senders)
    done = ~result.patched.isnan()
    assert done.sum() == len(pairs) * len(senders)
    corrupted = result.corrupted[:, None, None].expand_as(done)
    torch.testing.assert_close(result.patched[done], corrupted[done], atol=1e-5, rtol=0)
    # a real sender does change the score
    real = path_patch(model3, pairs, ["1/2", "1/1"], senders=["0/0"])
    assert (real.patched[:, 0, 0] - real.corrupted).abs().max() > 1e-3


def test_step1_residual_by_hand(model3, pairs):
    """Sender 0/2, everything else frozen (MLPs too): the input of layer 1 is
    ln2(ln1(resid_pre_0 + z' W_O + b_O) + mlp_out_0(corrupted)), z' = corrupted z, head 2 clean."""
    pair = pairs[0]
    with torch.no_grad():
        _, clean = model3.run_with_cache(pair.clean)
        _, corr = model3.run_with_cache(pair.corrupted)
        block = model3.blocks[0]
        z = corr["blocks.0.attn.hook_z"].clone()
        z[:, :, 2] = clean["blocks.0.attn.hook_z"][:, :, 2]
        attn_out = einops.einsum(z, block.attn.W_O, "b p h d, h d m -> b p m") + block.attn.b_O
        mid = block.ln1(corr["blocks.0.hook_resid_pre"] + attn_out)
        expected = block.ln2(mid + corr["blocks.0.hook_mlp_out"])
        stored = {}
        hooks = path_freeze_hooks(model3, clean, corr, "0/2", freeze_mlps=True)
        hooks.append(("blocks.1.hook_resid_pre", lambda act, hook: stored.setdefault("x", act)))
        model3.run_with_hooks(pair.corrupted, fwd_hooks=hooks)
    torch.testing.assert_close(stored["x"], expected, atol=1e-5, rtol=1e-5)
    assert (expected - corr["blocks.1.hook_resid_pre"]).abs().max() > 1e-3


def test_split_qkv_input_is_restored(model3):
    assert model3.cfg.use_split_qkv_input is False
    with pytest.raises(RuntimeError):
        with split_qkv_input(model3):
            assert model3.cfg.use_split_qkv_input is True
            raise RuntimeError("boom")
    assert model3.cfg.use_split_qkv_input is False


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_path_errors(model3, pairs):
    with pytest.raises(ValueError, match="channels"):
        path_patch(model3, pairs, ["2/0"], channels="qx")
    with pytest.raises(ValueError, match="head 9 out of range"):
        path_patch(model3, pairs, ["2/9"])
    with pytest.raises(ValueError, match="layer 5 out of range"):
        path_freeze_hooks(model3, {}, {}, "5/0")
