"""Block integer codes (mechir.compact): the per-block error bound, shapes and dtypes, kept
tensors, ragged and all-zero blocks, the low-bit packing, the safetensors round trip."""

from __future__ import annotations

import json

import pytest
import torch

from mechir.compact import (
    BITS,
    FORMAT,
    block_steps,
    compress_state_dict,
    decompress_state_dict,
    dequantize_blocks,
    join_codes,
    load_compact,
    quantize_blocks,
    save_compact,
    split_codes,
)
from mechir.fingerprint import tensors_fingerprint


def _heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[torch.rand(*shape, generator=g) < 0.01] *= 80  # a few outliers, as in real checkpoints
    return w


def _steps_per_element(absmax: torch.Tensor, group: int, n: int, bits: int) -> torch.Tensor:
    return torch.repeat_interleave(block_steps(absmax, bits), group, dim=-1)[..., :n]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "group"), [((12, 64), 16), ((5, 37), 16), ((3, 4, 10), 3)])
def test_error_within_half_a_step_per_block(shape, group, bits):
    """|w - w'| <= s_b / 2 for every weight (s_b its block's step), up to float32 rounding of
    the product q * s_b; a ragged last block (37 = 2 * 16 + 5) obeys it too."""
    w = _heavy_tailed(*shape)
    codes, absmax = quantize_blocks(w, group, bits)
    n_blocks = -(-shape[-1] // group)
    assert codes.shape == w.shape and codes.dtype == torch.int32
    assert absmax.shape == (*shape[:-1], n_blocks) and absmax.dtype == torch.float16
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    back = dequantize_blocks(codes, absmax, group, bits)
    assert back.shape == w.shape and back.dtype == torch.float32
    step = _steps_per_element(absmax, group, shape[-1], bits)
    ulp = torch.finfo(torch.float32).eps * w.abs()
    assert ((w - back).abs() <= step / 2 + ulp).all()
    # the block maximum is stored rounded up, never below the true one (no clipping)
    peaks = torch.nn.functional.pad(w.abs(), (0, -shape[-1] % group))
    peaks = peaks.reshape(*shape[:-1], n_blocks, group).amax(-1)
    assert (absmax.float() >= peaks).all()
    assert (absmax.float() <= peaks * (1 + 2**-10)).all()


def test_blocks_are_independent():
    """A large weight only coarsens its own block: the other blocks of the row keep their step."""
    w = torch.full((1, 32), 0.01)
    w[0, 3] = 5.0
    codes, absmax = quantize_blocks(w, 16)
    back = dequantize_blocks(codes, absmax, 16)
    assert absmax[0, 1].item() == pytest.approx(0.01, rel=1e-3)
    assert (back[0, 16:] - w[0, 16:]).abs().max() <= 0.01 / 32767 / 2 + 1e-9
    assert (back[0, :16] - w[0, :16]).abs().max() > 1e-6  # coarse next to the outlier


def test_all_zero_blocks_and_exact_values():
    w = torch.zeros(4, 48)
    w[1, 16:32] = torch.linspace(-1, 1, 16)
    w[2, 0] = -3.0
    codes, absmax = quantize_blocks(w, 16)
    back = dequantize_blocks(codes, absmax, 16)
    assert torch.equal(back[0], w[0]) and torch.equal(back[3], w[3])  # exact zeros
    assert (absmax[0] == 0).all() and (codes[0] == 0).all()
    assert back[2, 0].item() == -3.0  # a block maximum representable in float16 is exact
    assert (back[1, 16:32] - w[1, 16:32]).abs().max() <= 1 / 32767 / 2 + 1e-7


@pytest.mark.parametrize("bits", BITS)
def test_split_and_join_codes(bits):
    """int16 high part + packed low bits reassemble every code, including the extremes and a
    count not divisible by the codes per byte."""
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-qmax, qmax + 1, (3, 7), generator=g, dtype=torch.int32)
    codes[0, 0], codes[0, 1], codes[1, 2] = qmax, -qmax, 0
    high, low = split_codes(codes, bits)
    assert high.dtype == torch.int16 and high.shape == codes.shape
    k = bits - 16
    if k == 0:
        assert low is None
    else:
        assert low.dtype == torch.uint8 and low.numel() == -(-codes.numel() * k // 8)
    assert torch.equal(join_codes(high, low, bits), codes)


def test_more_bits_shrink_the_error():
    w = _heavy_tailed(64, 96, seed=3)
    errs = {}
    for bits in BITS:
        codes, absmax = quantize_blocks(w, 16, bits)
        errs[bits] = float((dequantize_blocks(codes, absmax, 16, bits) - w).abs().max())
    assert errs[16] > 1.8 * errs[17] > 3.4 * errs[18] > 12 * errs[20]


def test_state_dict_round_trip(tmp_path):
    """2-D+ float tensors are coded, 1-D / small / integer tensors are kept bit for bit; the
    file holds the layout and the digest of the dequantized state."""
    state = {
        "emb.weight": _heavy_tailed(300, 40, seed=4),
        "attn.weight": _heavy_tailed(64, 64, seed=5),
        "ln.weight": torch.randn(64),
        "tiny.weight": torch.randn(2, 64),  # 128 elements < min_numel
        "position_ids": torch.arange(10).unsqueeze(0),
        "frozen.weight": _heavy_tailed(64, 80, seed=6),
    }
    per_tensor = {"emb.weight": (32, 16), "frozen.weight": None}
    tensors, meta = compress_state_dict(state, group=16, bits=18, per_tensor=per_tensor)
    assert meta["format"] == FORMAT
    assert json.loads(meta["layout"]) == {"emb.weight": [32, 16], "attn.weight": [16, 18]}
    assert set(tensors) == {
        "emb.weight::codes",
        "emb.weight::absmax",
        "attn.weight::codes",
        "attn.weight::absmax",
        "attn.weight::low",
        "ln.weight",
        "tiny.weight",
        "position_ids",
        "frozen.weight",
    }
    assert tensors["emb.weight::absmax"].shape == (300, 2)
    back = decompress_state_dict(tensors, meta)
    assert set(back) == set(state)
    for name in ("ln.weight", "tiny.weight", "position_ids", "frozen.weight"):
        assert back[name].dtype == state[name].dtype and torch.equal(back[name], state[name])
    for name, (g, b) in {"emb.weight": (32, 16), "attn.weight": (16, 18)}.items():
        assert back[name].dtype == torch.float32 and back[name].shape == state[name].shape
        _, absmax = quantize_blocks(state[name], g, b)
        step = _steps_per_element(absmax, g, state[name].shape[-1], b)
        assert ((back[name] - state[name]).abs() <= step / 2 + 1e-7).all()
        assert not torch.equal(back[name], state[name])

    path = tmp_path / "m.safetensors"
    written = save_compact(path, state, group=16, bits=18, per_tensor=per_tensor)
    assert written["state_sha256"] == tensors_fingerprint(back)
    loaded, file_meta = load_compact(path)
    assert file_meta == written
    assert tensors_fingerprint(loaded) == written["state_sha256"]
    # fewer bytes than float32: 2 + 2/32 bytes and 2 + 1/4 + 2/16 bytes per coded weight
    assert path.stat().st_size < sum(v.numel() * v.element_size() for v in state.values())


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="not in the state dict"):
        compress_state_dict({"a": torch.zeros(4, 4)}, per_tensor={"b": None})
    with pytest.raises(ValueError, match="block size must be >= 1"):
        quantize_blocks(torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="code width must be one of"):
        quantize_blocks(torch.zeros(2, 4), 4, bits=19)
    with pytest.raises(ValueError, match="float16's range"):
        quantize_blocks(torch.full((2, 4), 1e5), 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_blocks(torch.tensor([[float("nan"), 1.0]]), 2)
    with pytest.raises(ValueError, match="need block maxima of shape"):
        dequantize_blocks(torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 1), 4)
    with pytest.raises(ValueError, match="not a mechir.blockint16 checkpoint"):
        decompress_state_dict({"a": torch.zeros(1)}, {"format": "pt"})
    tensors, meta = compress_state_dict({"a": torch.ones(8, 8)}, group=4, bits=17, min_numel=1)
    del tensors["a::low"]
    with pytest.raises(ValueError, match="need their packed low bits"):
        decompress_state_dict(tensors, meta)
