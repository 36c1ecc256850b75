"""The TransformerLens internals mechir relies on (:mod:`mechir.models.tl`) are still there.

Each internal listed in :data:`mechir.models.tl.INTERNALS` must exist with the parameters mechir
passes, and the adapter functions must do what the families expect of them. A TransformerLens
upgrade that renames or reshapes one fails here, in one line naming it, instead of silently
changing a forward pass.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest
import torch

from mechir.models import tl
from mechir.models.hooked import FrameAwareHookPoint


def _config(**overrides):
    settings = dict(
        d_model=16, d_head=4, n_heads=4, n_layers=1, n_ctx=8, d_vocab=10, act_fn="gelu",
        attention_dir="causal", positional_embedding_type="rotary", rotary_dim=4,
    )  # fmt: skip
    return tl.HookedTransformerConfig(**{**settings, **overrides})


def test_the_pinned_major_version():
    assert version("transformer-lens").split(".")[0] == "3", (
        "mechir is pinned to TransformerLens 3.x; check every entry of mechir.models.tl.INTERNALS "
        "before moving"
    )


@pytest.mark.parametrize(
    ("owner", "name", "params"),
    tl.INTERNALS,
    ids=[f"{owner.__name__}.{name}" for owner, name, _ in tl.INTERNALS],
)
def test_every_internal_is_there_with_the_parameters_mechir_passes(owner, name, params):
    if params is None:  # an attribute: look on a built instance
        instance = owner(_config()) if owner is tl.Attention else owner()
        assert hasattr(instance, name), f"TransformerLens {owner.__name__} lost {name!r}"
        return
    member = inspect.getattr_static(owner, name, None)
    assert member is not None, f"TransformerLens {owner.__name__} lost {name!r}"
    function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
    found = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
    assert found[: len(params)] == list(params), (
        f"TransformerLens {owner.__name__}.{name} now takes {found}, mechir passes {list(params)}"
    )


def test_attention_direction_reads_the_override_then_the_config():
    attn = tl.Attention(_config())
    assert tl.attention_direction(attn) == "causal"
    assert tl.attention_direction(tl.Attention(_config(attention_dir="bidirectional"))) == (
        "bidirectional"
    )
    attn._attention_dir_override = "bidirectional"
    assert tl.attention_direction(attn) == "bidirectional"


def test_causal_mask_lets_each_query_read_itself_and_earlier_keys():
    mask = tl.causal_mask(tl.Attention(_config()), 3, 5, torch.device("cpu"))
    expected = torch.arange(5)[None, :] <= torch.arange(3)[:, None]
    assert mask.shape == (1, 1, 3, 5)
    assert torch.equal(mask[0, 0], expected)


def test_rotary_base_is_the_configs():
    assert tl.rotary_base(tl.Attention(_config(rotary_base=500))) == 500


def test_t5_buckets_are_exact_for_small_distances_and_signed_when_bidirectional():
    rel = torch.arange(-3, 4)[None, :]
    both = tl.t5_relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    causal = tl.t5_relative_position_bucket(
        rel, bidirectional=False, num_buckets=32, max_distance=128
    )
    assert both.tolist() == [[3, 2, 1, 0, 17, 18, 19]]  # 16 buckets per sign, later keys + 16
    assert causal.tolist() == [[3, 2, 1, 0, 0, 0, 0]]  # every later key in bucket 0


def test_retype_hook_point_keeps_its_hooks_and_refuses_an_unrelated_class(unchecked_shapes):
    point = tl.HookPoint()
    point.add_hook(lambda act, hook: act + 1)
    tl.retype_hook_point(point, FrameAwareHookPoint)
    assert type(point) is FrameAwareHookPoint
    assert point(torch.zeros(2)).tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match="does not extend"):
        tl.retype_hook_point(tl.HookPoint(), torch.nn.Identity)  # type: ignore[arg-type]
