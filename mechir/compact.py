"""A compact, near-lossless storage format for float32 checkpoints: block int16.

Each floating-point tensor with at least two dimensions (and at least ``min_numel`` elements) is
cut along its last dimension into blocks of ``G`` consecutive elements (the last block of a row
may be shorter) and stored as int16 codes with one float16 *block maximum* per block:

    m_b = fp16_up(max_{i in b} |w_i|)          (rounded up, so m_b >= max |w_i|)
    s_b = fp32(m_b) / 32767                    (the block's step, computed in float32)
    q_i = round(w_i / s_b)  in [-32767, 32767]
    w'_i = q_i * s_b                           (dequantized, float32)

so ``|w_i - w'_i| <= s_b / 2`` (plus the float32 rounding of the product): about 1.5e-5 of the
block's largest magnitude. Because the step is computed from the *stored* float16 maximum, the
dequantized weights are exactly those the codes were made for: every reader gets the same bits.
Other tensors (1-D LayerNorm weights, biases, small tensors, integer buffers) are stored
unchanged. Storage: ``2 + 2/G`` bytes per quantized element, against 4 for float32.

The file is plain safetensors: a kept tensor under its own name, a quantized one as
``<name>::codes`` (int16, the tensor's shape) and ``<name>::absmax`` (float16, the shape with
the last dimension replaced by the number of blocks); the header metadata holds the format name,
the block size of every quantized tensor and, for provenance, whatever the writer adds.
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
FORMAT_VERSION = "1"
#: Code widths: int16 codes, optionally with k = 1, 2 or 4 more low bits packed apart.
BITS = (16, 17, 18, 20)
CODES = "::codes"
LOW = "::low"
ABSMAX = "::absmax"


def _fp16_up(x: Float[Tensor, "*any"]) -> Float[Tensor, "*any"]:
    """float16 values >= ``x`` (float32, non-negative, below 65504): round, then step up where
    rounding went down."""
    h = x.to(torch.float16)
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h)


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
    """Each block's step ``s_b = fp32(m_b) / (2**(bits-1) - 1)`` from its stored float16
    maximum; an all-zero block gets step 1 (its codes are 0)."""
    m = absmax.float()
    return torch.where(m > 0, m / _qmax(bits), torch.ones_like(m))


def _qmax(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"code width must be one of {BITS} bits, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_blocks(
    w: Float[Tensor, "*rows n"], group: int, bits: int = 16
) -> tuple[Int32[Tensor, "*rows n"], Float[Tensor, "*rows blocks"]]:
    """Block codes of ``w`` (``|q| <= 2**(bits-1) - 1``, held as int32) and the float16 block
    maxima (``blocks = ceil(n / group)``).

    Raises:
        ValueError: ``group`` < 1, ``bits`` not in :data:`BITS`, ``w`` is not floating point
            or not finite, or a magnitude is beyond float16's range (65504).
    """
    qmax = _qmax(bits)
    if group < 1:
        raise ValueError(f"block size must be >= 1, got {group}")
    if not w.is_floating_point():
        raise ValueError(f"only floating-point tensors are quantized, got {w.dtype}")
    w = w.detach().to("cpu", torch.float32)
    if w.ndim == 0:
        raise ValueError("a 0-d tensor has no last dimension to cut into blocks; keep it as is")
    if not torch.isfinite(w).all():
        raise ValueError("the tensor has NaN or infinite values; block codes cannot store them")
    blocks = _blocks(w, group)
    peak = blocks.abs().amax(dim=-1)
    if peak.numel() and float(peak.max()) > 65504:
        raise ValueError(
            f"a magnitude of {float(peak.max()):.3g} is beyond float16's range (65504); "
            "keep this tensor as is (raise min_numel or store it unquantized)"
        )
    absmax = _fp16_up(peak)
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
    :func:`quantize_blocks`.

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
    """A state dict in block codes (see the module docstring): tensors and safetensors metadata.

    Args:
        state: the float32 (or other) tensors.
        group: block size ``G`` along the last dimension.
        bits: code width (:data:`BITS`).
        per_tensor: ``name -> (group, bits)`` replacing the defaults for that tensor, or
            ``name -> None`` to keep it as it is.
        min_numel: tensors with fewer elements, 1-D tensors and non-float tensors are kept as
            they are.

    Returns:
        ``(tensors, metadata)`` for :func:`safetensors.torch.save_file`.

    Raises:
        ValueError: a name of ``per_tensor`` is not in ``state``, a name contains ``"::"``, or
            a block size or code width is invalid.
    """
    per_tensor = dict(per_tensor or {})
    unknown = sorted(set(per_tensor) - set(state))
    if unknown:
        raise ValueError(f"per_tensor names tensors that are not in the state dict: {unknown[:5]}")
    tensors: dict[str, Tensor] = {}
    layout: dict[str, tuple[int, int]] = {}
    for name, t in state.items():
        if "::" in name:
            raise ValueError(f"tensor name {name!r} contains '::', reserved by the format")
        spec = per_tensor.get(name, (group, bits))
        if spec is not None and t.is_floating_point() and t.ndim >= 2 and t.numel() >= min_numel:
            g, b = spec
            codes, tensors[name + ABSMAX] = quantize_blocks(t, g, b)
            tensors[name + CODES], low = split_codes(codes, b)
            if low is not None:
                tensors[name + LOW] = low
            layout[name] = (g, b)
        else:
            tensors[name] = t.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": json.dumps(layout, sort_keys=True),
    }
    return tensors, metadata


def decompress_state_dict(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> dict[str, Tensor]:
    """The float32 state dict stored by :func:`compress_state_dict` (kept tensors unchanged).

    Raises:
        ValueError: the metadata does not name this format, or a quantized tensor's parts are
            missing or unnamed by the metadata.
    """
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"not a {FORMAT} checkpoint (metadata format {metadata.get('format')!r}); "
            "load it with safetensors directly"
        )
    layout: dict[str, list[int]] = json.loads(metadata["layout"])
    state: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if "::" in key:
            if key.rsplit("::", 1)[0] not in layout:
                raise ValueError(f"{key}: its tensor has no layout in the metadata")
            continue
        state[key] = t
    for name, (g, b) in layout.items():
        if name + CODES not in tensors or name + ABSMAX not in tensors:
            raise ValueError(f"{name}: its codes or block maxima are missing from the file")
        codes = join_codes(tensors[name + CODES], tensors.get(name + LOW), b)
        state[name] = dequantize_blocks(codes, tensors[name + ABSMAX], g, b)
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
    """The float32 state dict in a block int16 safetensors file, and the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return decompress_state_dict(tensors, metadata), metadata
