"""A compact, near-lossless storage format for float checkpoints: block integer codes.

Each floating-point tensor with at least two dimensions (and at least ``min_numel`` elements) is
cut along its last dimension into blocks of ``G`` consecutive elements (the last block of a row
may be shorter) and stored as ``b``-bit integer codes (``b`` in 16, 17, 18, 20; ``qmax =
2**(b-1) - 1``) with one 2-byte *block maximum* per block:

    m_b = max(up(max_{i in b} |w_i|), M_min)   (rounded up, so m_b >= max |w_i|; 0 for a zero block)
    s_b = fp32(m_b) / qmax                     (the block's step, computed in float32)
    q_i = round(w_i / s_b)  in [-qmax, qmax]
    w'_i = q_i * s_b                           (dequantized, float32)

Because the step is computed from the *stored* maximum, the dequantized weights are exactly those
the codes were made for: every reader gets the same bits.

**Error bound.** For every weight, with float32 rounding of the division and the product included
(:func:`block_error_bounds` gives it per block, from the stored maxima)::

    |w_i - w'_i| <= s_b / 2 + 2**-23 (1 + 2**-20) m_b

The block maxima are stored

- in format version 2 (written now) as bfloat16, float32's range: ``up`` rounds up to bfloat16
  (``m_b <= max|w| (1 + 2**-7)``) and ``M_min = up(qmax * 2**-126)`` keeps every step a normal
  float32. So ``|w_i - w'_i| <= c_b max_b |w|`` with ``c_b`` = 1.550e-5, 7.81e-6, 3.97e-6, 1.082e-6
  for b = 16, 17, 18, 20, for every block whose maximum is at least ``M_min`` (3.9e-34 for
  b = 16, 6.2e-33 for b = 20); below that floor the error is at most the bound at ``m_b =
  M_min``, under 6.7e-39 (about float32's smallest normal / 2). Magnitudes up to bfloat16's
  largest (3.39e38) are stored;
- in format version 1 (files written before; still read) as float16: ``up`` rounds up to float16
  and float16's smallest subnormal, 2**-24 = 6e-8, is the smallest maximum it stores, so
  ``m_b <= max|w| (1 + 2**-10) + 2**-24``. So ``|w_i - w'_i| <= c_b max_b |w| + f_b`` with
  ``c_b`` = 1.54e-5 and the floor ``f_b`` = 9.2e-13 for b = 16: the bound is relative only for
  blocks whose maximum is well above 6e-8 (at most c_b when it is at least 2**-14 = 6.1e-5); a
  block with maximum 1e-10 can be off by 1e-2 of it. Magnitudes above 65504 cannot be stored.

Other tensors (1-D LayerNorm weights, biases, small tensors, integer buffers) are stored
unchanged. A quantized tensor is returned in the dtype it was given (format version 2; version 1
returned float32): float16 and bfloat16 checkpoints stay float16 and bfloat16, ``w'`` being
rounded once more to that dtype; as ``w`` itself is one of the values that rounding can pick,
the error after it is at most twice the bound (float64 tensors are coded from their float32
rounding, which adds its own relative 2**-24). Storage:
``b / 8 + 2 / G`` bytes per quantized element, against 4 for float32.

The file is plain safetensors: a kept tensor under its own name, a quantized one as
``<name>::codes`` (int16, the tensor's shape: the high 16 bits of the codes), ``<name>::low``
(the other ``b - 16`` bits, packed; only when ``b > 16``) and ``<name>::absmax`` (the block
maxima, shaped as the tensor with the last dimension replaced by the number of blocks); the
header metadata holds the format name and version, the block size, code width and dtype of
every quantized tensor and, for provenance, whatever the writer adds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
from jaxtyping import Float, Int16, Int32, UInt8
from torch import Tensor

from mechir.fingerprint import tensors_fingerprint

#: The format's name, recorded in the file's metadata.
FORMAT = "mechir.blockint16"
#: The version written now; every version in :data:`SCALE_DTYPES` is read.
FORMAT_VERSION = "2"
#: The dtype of the stored block maxima, by format version.
SCALE_DTYPES = {"1": torch.float16, "2": torch.bfloat16}
#: Code widths: int16 codes, optionally with k = 1, 2 or 4 more low bits packed apart.
BITS = (16, 17, 18, 20)
CODES = "::codes"
LOW = "::low"
ABSMAX = "::absmax"
#: The float32 rounding of the division and the product, per unit of the block maximum.
_ROUNDING = 2.0**-23 * (1 + 2.0**-20)


def _round_up(x: Float[Tensor, "*any"], dtype: torch.dtype) -> Float[Tensor, "*any"]:
    """Values of ``dtype`` >= ``x`` (float32, non-negative): round, then step up where
    rounding went down."""
    h = x.to(dtype)
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def min_block_max(bits: int = 16, scale_dtype: torch.dtype = torch.bfloat16) -> float:
    """``M_min``: the smallest stored block maximum of a non-zero block, ``up(qmax * 2**-126)``
    in ``scale_dtype``, so that every step ``m_b / qmax`` is a normal float32."""
    floor = torch.tensor(_qmax(bits) * 2.0**-126, dtype=torch.float32)
    return float(_round_up(floor, scale_dtype))


def _blocks(w: Tensor, group: int) -> Tensor:
    """``[*rows, n]`` -> ``[*rows, ceil(n / G), G]``, zero-padded at the end of each row."""
    n = w.shape[-1]
    pad = -n % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], (n + pad) // group, group)


def block_steps(
    absmax: Float[Tensor, "*rows blocks"], bits: int = 16
) -> Float[Tensor, "*rows blocks"]:
    """Each block's step ``s_b = fp32(m_b) / (2**(bits-1) - 1)`` from its stored block
    maximum; an all-zero block gets step 1 (its codes are 0)."""
    m = absmax.float()
    return torch.where(m > 0, m / _qmax(bits), torch.ones_like(m))


def block_error_bounds(
    absmax: Float[Tensor, "*rows blocks"], bits: int = 16
) -> Float[Tensor, "*rows blocks"]:
    """The largest ``|w_i - w'_i|`` of each block from its stored maximum (float32 rounding of
    ``w / s_b`` and ``q * s_b`` included; the quantized weights before any cast back to float16
    or bfloat16): ``s_b / 2 + 2**-23 (1 + 2**-20) m_b``, 0 for an all-zero block."""
    m = absmax.float()
    bound = block_steps(absmax, bits) / 2 + _ROUNDING * m
    return torch.where(m > 0, bound, torch.zeros_like(m))


def _qmax(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"code width must be one of {BITS} bits, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_blocks(
    w: Float[Tensor, "*rows n"],
    group: int,
    bits: int = 16,
    *,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[Int32[Tensor, "*rows n"], Float[Tensor, "*rows blocks"]]:
    """Block codes of ``w`` (``|q| <= 2**(bits-1) - 1``, held as int32) and the block maxima
    in ``scale_dtype`` (``blocks = ceil(n / group)``): bfloat16 as format version 2 writes
    them, or float16 as version 1 did (see the module docstring for the bound of each).

    Raises:
        ValueError: ``group`` < 1, ``bits`` not in :data:`BITS`, ``scale_dtype`` is neither
            float16 nor bfloat16, ``w`` is not floating point or not finite, or a magnitude is
            beyond ``scale_dtype``'s range.
    """
    qmax = _qmax(bits)
    if group < 1:
        raise ValueError(f"block size must be >= 1, got {group}")
    if scale_dtype not in SCALE_DTYPES.values():
        raise ValueError(f"block maxima are float16 or bfloat16, got {scale_dtype}")
    if not w.is_floating_point():
        raise ValueError(f"only floating-point tensors are quantized, got {w.dtype}")
    w = w.detach().to("cpu", torch.float32)
    if w.ndim == 0:
        raise ValueError("a 0-d tensor has no last dimension to cut into blocks; keep it as is")
    if not torch.isfinite(w).all():
        raise ValueError("the tensor has NaN or infinite values; block codes cannot store them")
    blocks = _blocks(w, group)
    peak = blocks.abs().amax(dim=-1)
    top = torch.finfo(scale_dtype).max
    if peak.numel() and float(peak.max()) > top:
        raise ValueError(
            f"a magnitude of {float(peak.max()):.3g} is beyond {scale_dtype}'s range ({top:.6g}); "
            "keep this tensor as is (raise min_numel or store it unquantized)"
        )
    absmax = _round_up(peak, scale_dtype)
    floor = torch.tensor(min_block_max(bits, scale_dtype), dtype=scale_dtype)
    absmax = torch.where(peak > 0, torch.maximum(absmax, floor), absmax)
    step = block_steps(absmax, bits).unsqueeze(-1)
    codes = torch.round(blocks / step).clamp(-qmax, qmax).to(torch.int32)
    codes = codes.reshape(*w.shape[:-1], -1)[..., : w.shape[-1]]
    return codes.contiguous(), absmax.contiguous()


def dequantize_blocks(
    codes: Int32[Tensor, "*rows n"],
    absmax: Float[Tensor, "*rows blocks"],
    group: int,
    bits: int = 16,
) -> Float[Tensor, "*rows n"]:
    """``w'_i = q_i * fp32(m_b) / (2**(bits-1) - 1)`` (float32), the inverse of
    :func:`quantize_blocks` (block maxima of either format version).

    Raises:
        ValueError: the shapes of ``codes`` and ``absmax`` do not match ``group``.
    """
    n = codes.shape[-1]
    n_blocks = -(-n // group)
    if absmax.shape != (*codes.shape[:-1], n_blocks):
        raise ValueError(
            f"codes {tuple(codes.shape)} with block size {group} need block maxima of shape "
            f"{(*codes.shape[:-1], n_blocks)}, got {tuple(absmax.shape)}"
        )
    step = block_steps(absmax, bits).unsqueeze(-1)
    blocks = _blocks(codes.to(torch.float32), group) * step
    return blocks.reshape(*codes.shape[:-1], -1)[..., :n].contiguous()


def split_codes(
    codes: Int32[Tensor, "*shape"], bits: int
) -> tuple[Int16[Tensor, "*shape"], UInt8[Tensor, " packed"] | None]:
    """Codes of ``bits = 16 + k`` bits as int16 high parts ``q >> k`` and the low ``k`` bits
    ``q & (2**k - 1)`` packed ``8 // k`` to a byte (row-major, zero-padded); None when k = 0."""
    k = bits - 16
    _qmax(bits)
    high = (codes >> k).to(torch.int16)
    if k == 0:
        return high, None
    per_byte = 8 // k
    low = (codes & (2**k - 1)).reshape(-1)
    low = torch.nn.functional.pad(low, (0, -low.numel() % per_byte)).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * k
    return high, (low << shifts).sum(dim=1).to(torch.uint8)


def join_codes(
    high: Int16[Tensor, "*shape"], low: UInt8[Tensor, " packed"] | None, bits: int
) -> Int32[Tensor, "*shape"]:
    """The inverse of :func:`split_codes`: ``q = (high << k) | low``."""
    k = bits - 16
    _qmax(bits)
    codes = high.to(torch.int32) << k
    if k == 0:
        return codes
    if low is None:
        raise ValueError(f"{bits}-bit codes need their packed low bits")
    per_byte = 8 // k
    shifts = torch.arange(per_byte, dtype=torch.int32) * k
    unpacked = (low.to(torch.int32).unsqueeze(1) >> shifts) & (2**k - 1)
    return codes | unpacked.reshape(-1)[: high.numel()].reshape(high.shape)


def compress_state_dict(
    state: Mapping[str, Tensor],
    *,
    group: int = 16,
    bits: int = 16,
    per_tensor: Mapping[str, tuple[int, int] | None] | None = None,
    min_numel: int = 4096,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A state dict in block codes (see the module docstring): tensors and safetensors metadata
    (format version :data:`FORMAT_VERSION`).

    Args:
        state: the float32 (or float16, bfloat16, other) tensors.
        group: block size ``G`` along the last dimension.
        bits: code width (:data:`BITS`).
        per_tensor: ``name -> (group, bits)`` replacing the defaults for that tensor, or
            ``name -> None`` to keep it as it is.
        min_numel: tensors with fewer elements, 1-D tensors and non-float tensors are kept as
            they are.

    Returns:
        ``(tensors, metadata)`` for :func:`safetensors.torch.save_file` (kept tensors that
        share memory, such as tied weights, are copied apart, as safetensors requires).

    Raises:
        ValueError: a name of ``per_tensor`` is not in ``state``, a name contains ``"::"``, or
            a block size or code width is invalid.
    """
    per_tensor = dict(per_tensor or {})
    unknown = sorted(set(per_tensor) - set(state))
    if unknown:
        raise ValueError(f"per_tensor names tensors that are not in the state dict: {unknown[:5]}")
    scale_dtype = SCALE_DTYPES[FORMAT_VERSION]
    tensors: dict[str, Tensor] = {}
    layout: dict[str, tuple[int, int, str]] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if "::" in name:
            raise ValueError(f"tensor name {name!r} contains '::', reserved by the format")
        spec = per_tensor.get(name, (group, bits))
        if spec is not None and t.is_floating_point() and t.ndim >= 2 and t.numel() >= min_numel:
            g, b = spec
            codes, tensors[name + ABSMAX] = quantize_blocks(t, g, b, scale_dtype=scale_dtype)
            tensors[name + CODES], low = split_codes(codes, b)
            if low is not None:
                tensors[name + LOW] = low
            layout[name] = (g, b, str(t.dtype).removeprefix("torch."))
        else:
            kept = t.detach().to("cpu").contiguous()
            if kept.numel() and kept.untyped_storage().data_ptr() in storages:
                kept = kept.clone()  # tied to a tensor kept before
            storages.add(kept.untyped_storage().data_ptr())
            tensors[name] = kept
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": json.dumps(layout, sort_keys=True),
    }
    return tensors, metadata


def _layout_dtype(name: str, spec: list) -> torch.dtype:
    """The dtype a quantized tensor is returned in: ``[group, bits]`` (version 1: float32) or
    ``[group, bits, dtype]``."""
    if len(spec) == 2:
        return torch.float32
    dtype = getattr(torch, str(spec[2]), None)
    if len(spec) != 3 or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name}: layout {spec} is not [group, bits] or [group, bits, dtype]")
    return dtype


def decompress_state_dict(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> dict[str, Tensor]:
    """The state dict stored by :func:`compress_state_dict`: kept tensors unchanged, quantized
    ones dequantized in the dtype they were given (float32 for format version 1 files).

    Raises:
        ValueError: the metadata does not name this format or a version it reads, or a
            quantized tensor's parts are missing, of the wrong dtype, or unnamed by the layout.
    """
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"not a {FORMAT} checkpoint (metadata format {metadata.get('format')!r}); "
            "load it with safetensors directly"
        )
    version = metadata.get("format_version", "1")
    if version not in SCALE_DTYPES:
        raise ValueError(
            f"{FORMAT} version {version!r} is not one this mechir reads ({sorted(SCALE_DTYPES)}); "
            "upgrade mechir"
        )
    layout: dict[str, list] = json.loads(metadata["layout"])
    state: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if "::" in key:
            name, part = key.rsplit("::", 1)
            if name not in layout or "::" + part not in (CODES, LOW, ABSMAX):
                raise ValueError(f"{key}: not a part of a quantized tensor named by the layout")
            continue
        state[key] = t
    for name, spec in layout.items():
        g, b = int(spec[0]), int(spec[1])
        dtype = _layout_dtype(name, spec)
        if name + CODES not in tensors or name + ABSMAX not in tensors:
            raise ValueError(f"{name}: its codes or block maxima are missing from the file")
        absmax = tensors[name + ABSMAX]
        if absmax.dtype != SCALE_DTYPES[version]:
            raise ValueError(
                f"{name}: block maxima in {absmax.dtype}, but format version {version} stores "
                f"them in {SCALE_DTYPES[version]}"
            )
        codes = join_codes(tensors[name + CODES], tensors.get(name + LOW), b)
        state[name] = dequantize_blocks(codes, absmax, g, b).to(dtype)
    return state


def save_compact(
    path: str | os.PathLike,
    state: Mapping[str, Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    **options,
) -> dict[str, str]:
    """Write ``state`` in block int16 to ``path`` (safetensors); ``options`` go to
    :func:`compress_state_dict`, ``metadata`` is added to the header. Returns the header's
    metadata, which includes ``state_sha256``, :func:`mechir.fingerprint.tensors_fingerprint` of
    the dequantized state."""
    from safetensors.torch import save_file

    tensors, meta = compress_state_dict(state, **options)
    meta["state_sha256"] = tensors_fingerprint(decompress_state_dict(tensors, meta))
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return meta


def load_compact(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict in a block int16 safetensors file (any format version), and the file's
    metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return decompress_state_dict(tensors, metadata), metadata
