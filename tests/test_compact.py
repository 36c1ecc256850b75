"""Block integer codes (mechir.compact): the per-block error bound, shapes and dtypes, kept
tensors, ragged and all-zero blocks, the low-bit packing, the safetensors round trip."""

from __future__ import annotations

import json

import pytest
import torch

from mechir.compact import (
    BITS,
    FORMAT,
    FORMAT_VERSION,
    SCALE_DTYPES,
    block_error_bounds,
    block_steps,
    compress_state_dict,
    decompress_state_dict,
    dequantize_blocks,
    join_codes,
    load_compact,
    min_block_max,
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


def _per_element(per_block: torch.Tensor, group: int, like: torch.Tensor) -> torch.Tensor:
    """A per-block value repeated over the block's elements, shaped as ``like``."""
    return torch.repeat_interleave(per_block, group, dim=-1)[..., : like.shape[-1]]


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "group"), [((12, 64), 16), ((5, 37), 16), ((3, 4, 10), 3)])
def test_error_within_half_a_step_per_block(shape, group, bits, scale_dtype):
    """|w - w'| <= s_b / 2 for every weight (s_b its block's step), up to float32 rounding of
    the product q * s_b; a ragged last block (37 = 2 * 16 + 5) obeys it too."""
    w = _heavy_tailed(*shape)
    codes, absmax = quantize_blocks(w, group, bits, scale_dtype=scale_dtype)
    n_blocks = -(-shape[-1] // group)
    assert codes.shape == w.shape and codes.dtype == torch.int32
    assert absmax.shape == (*shape[:-1], n_blocks) and absmax.dtype == scale_dtype
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
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[scale_dtype]
    assert (absmax.float() <= peaks * (1 + 2.0**-mantissa)).all()


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
    assert json.loads(meta["layout"]) == {
        "emb.weight": [32, 16, "float32"],
        "attn.weight": [16, 18, "float32"],
    }
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
        assert torch.equal(tensors[name + "::absmax"], quantize_blocks(state[name], g, b)[1])
        bound = _per_element(block_error_bounds(tensors[name + "::absmax"], b), g, back[name])
        assert ((back[name] - state[name]).abs() <= bound).all()
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
        quantize_blocks(torch.full((2, 4), 1e5), 4, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16's range"):
        quantize_blocks(torch.full((2, 4), 3.39e38), 4)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        quantize_blocks(torch.ones(2, 4), 4, scale_dtype=torch.float32)
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


# ---------------------------------------------------------------------- the bound and its floor
#: c_b of the module docstring: |w - w'| <= c_b max|w| per block (format version 2).
RELATIVE = {16: 1.550e-5, 17: 7.81e-6, 18: 3.97e-6, 20: 1.082e-6}
MAGNITUDES = (1.0, 1e-3, 3e-5, 1e-6, 1e-8, 1e-10, 1e-20, 1e-30, 1e-33, 1e-36, 1e-40, 1e-44)


def _magnitudes_tensor(seed: int = 0) -> torch.Tensor:
    """One row per magnitude (16 blocks of 16 each), down to float32 subnormals."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(256, generator=g) * m for m in MAGNITUDES]
    return torch.stack(rows)


def _block_peaks(w: torch.Tensor, group: int) -> torch.Tensor:
    pad = torch.nn.functional.pad(w.abs(), (0, -w.shape[-1] % group))
    return pad.reshape(*w.shape[:-1], -1, group).amax(-1)


@pytest.mark.parametrize("bits", BITS)
def test_bound_holds_for_tiny_blocks_and_is_relative_above_the_floor(bits):
    """Version 2 (bfloat16 maxima): the per-block bound holds from 1 down to float32
    subnormals, in float64 arithmetic; it is c_b of the block maximum for every block whose
    maximum is at least M_min, and under 6.7e-39 below it."""
    w = _magnitudes_tensor()
    codes, absmax = quantize_blocks(w, 16, bits)
    assert absmax.dtype == torch.bfloat16
    err = (dequantize_blocks(codes, absmax, 16, bits).double() - w.double()).abs()
    bound = _per_element(block_error_bounds(absmax, bits), 16, w).double()
    assert (err <= bound).all()
    peaks = _per_element(_block_peaks(w, 16), 16, w).double()
    floor = min_block_max(bits)
    assert 3.8e-34 < floor < 6.2e-33
    above = peaks >= floor
    assert above[:8].all() and not above[-3:].any()  # down to 1e-30 relative, 1e-36 on: floor
    assert (err[above] <= RELATIVE[bits] * peaks[above]).all()
    assert (err[~above] <= 6.7e-39).all() and (err[~above] > 0).any()
    assert float((err[above] / peaks[above]).max()) > 0.9 * RELATIVE[bits] / (1 + 2**-7)  # tight


def test_version_1_maxima_have_an_absolute_floor():
    """Version 1 (float16 maxima, still read): |w - w'| <= 1.54e-5 max|w| + 9.2e-13, relative
    only for block maxima of at least 2**-14; 1e-10 blocks are off by ~1e-2 of their maximum.
    The per-block bound holds everywhere."""
    w = _magnitudes_tensor()[:6]  # float16 maxima cannot go below 2**-24
    codes, absmax = quantize_blocks(w, 16, scale_dtype=torch.float16)
    err = (dequantize_blocks(codes, absmax, 16).double() - w.double()).abs()
    assert (err <= _per_element(block_error_bounds(absmax, 16), 16, w).double()).all()
    peaks = _per_element(_block_peaks(w, 16), 16, w).double()
    assert (err <= 1.54e-5 * peaks + 9.2e-13).all()
    normal = peaks >= 2**-14
    assert (err[normal] <= 1.54e-5 * peaks[normal]).all()
    assert (err[~normal] > 1.54e-5 * peaks[~normal]).any()  # the floor is real
    assert float((err[5] / peaks[5]).max()) > 1e-3  # 1e-10 blocks: documented, not hidden
    assert absmax[5].float().min() == 2**-24


def _bf16_up(x: float) -> float:
    """The smallest bfloat16 >= x >= 0, from float32 bits (bfloat16 = their top 16 bits)."""
    import struct

    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if bits & 0xFFFF:
        bits = (bits & 0xFFFF0000) + 0x10000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _reference_codes(w: torch.Tensor, group: int, bits: int) -> tuple[list, list]:
    """Block codes by a Python loop over blocks, in float32 scalars (numpy), from the format's
    definition: maxima rounded up to bfloat16, floored at up(qmax 2**-126)."""
    import numpy as np

    qmax = 2 ** (bits - 1) - 1
    floor = _bf16_up(float(np.float32(qmax * 2.0**-126)))
    codes, maxima = [], []
    for row in w.tolist():
        row_codes, row_max = [], []
        for start in range(0, len(row), group):
            block = np.array(row[start : start + group], dtype=np.float32)
            peak = float(np.abs(block).max())
            m = max(_bf16_up(peak), floor) if peak > 0 else 0.0
            step = np.float32(m) / np.float32(qmax) if m > 0 else np.float32(1)
            row_codes += [int(np.clip(np.round(x / step), -qmax, qmax)) for x in block]
            row_max.append(m)
        codes.append(row_codes)
        maxima.append(row_max)
    return codes, maxima


@pytest.mark.parametrize("bits", [16, 20])
def test_codes_equal_a_per_block_loop(bits):
    w = torch.cat([_magnitudes_tensor(1)[:, :37], _heavy_tailed(4, 37, seed=2)])
    codes, absmax = quantize_blocks(w, 16, bits)
    ref_codes, ref_max = _reference_codes(w, 16, bits)
    assert codes.tolist() == ref_codes and absmax.float().tolist() == ref_max


# ---------------------------------------------------------------------- dtypes and old files
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_survives_the_round_trip(tmp_path, dtype):
    """A float16 / bfloat16 / float32 / float64 checkpoint comes back in its dtype, within twice
    the bound for the 16-bit dtypes (the cast back may pick w itself at worst)."""
    w = (_heavy_tailed(64, 96, seed=7) * 3).to(dtype)
    state = {"w": w, "bias": torch.randn(96).to(dtype)}
    meta = save_compact(tmp_path / "m.safetensors", state, min_numel=1)
    back, file_meta = load_compact(tmp_path / "m.safetensors")
    assert file_meta["format_version"] == FORMAT_VERSION == "2"
    assert {k: v.dtype for k, v in back.items()} == {"w": dtype, "bias": dtype}
    assert torch.equal(back["bias"], state["bias"])
    assert tensors_fingerprint(back) == meta["state_sha256"]
    _, absmax = quantize_blocks(w, 16)
    bound = _per_element(block_error_bounds(absmax), 16, w).double()
    factor = 2 if dtype in (torch.float16, torch.bfloat16) else 1
    f32 = w.float().double()  # float64 is coded from its float32 rounding
    assert ((back["w"].double() - f32).abs() <= factor * bound).all()
    assert not torch.equal(back["w"], w)


def test_version_1_files_still_load(tmp_path):
    """A file as version 1 wrote it (float16 maxima, [group, bits] layout, float32 out)."""
    from safetensors.torch import save_file

    w = _heavy_tailed(8, 40, seed=8)
    codes, absmax = quantize_blocks(w, 16, 17, scale_dtype=torch.float16)
    high, low = split_codes(codes, 17)
    tensors = {"w::codes": high, "w::low": low, "w::absmax": absmax, "b": torch.ones(3)}
    meta = {"format": FORMAT, "format_version": "1", "layout": json.dumps({"w": [16, 17]})}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    back, _ = load_compact(tmp_path / "v1.safetensors")
    assert back["w"].dtype == torch.float32
    assert torch.equal(back["w"], dequantize_blocks(codes, absmax, 16, 17))
    assert torch.equal(back["b"], torch.ones(3))
    meta_v2 = {**meta, "format_version": "2"}  # float16 maxima under version 2: refused
    with pytest.raises(ValueError, match="format version 2 stores them in torch.bfloat16"):
        decompress_state_dict(tensors, meta_v2)
    with pytest.raises(ValueError, match="upgrade mechir"):
        decompress_state_dict(tensors, {**meta, "format_version": "9"})
    assert SCALE_DTYPES == {"1": torch.float16, "2": torch.bfloat16}


def test_unknown_parts_are_refused_and_tied_kept_tensors_are_saved(tmp_path):
    tensors, meta = compress_state_dict({"w": torch.randn(128, 64)})
    tensors["w::extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match="w::extra: not a part"):
        decompress_state_dict(tensors, meta)
    t = torch.randn(8)
    save_compact(tmp_path / "tied.safetensors", {"a": t, "b": t, "c": t[:4]})
    back, _ = load_compact(tmp_path / "tied.safetensors")
    assert torch.equal(back["a"], t) and torch.equal(back["b"], t) and torch.equal(back["c"], t[:4])
