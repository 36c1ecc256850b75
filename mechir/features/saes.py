"""SAELens SAEs as mechir uses them: training configs by architecture name, loading from
SAELens's save format, the site an SAE reads, and encode / decode of a site activation whatever
its shape.

SAELens (the optional extra ``mechir[features]``) is imported inside the functions only. An SAE
is any ``sae_lens.SAE`` (inference form: ``TopKSAE``, ``JumpReLUSAE``, ``StandardSAE``,
``Transcoder``, ...); its site is ``sae.cfg.metadata.hook_name`` (SAELens 6 keeps it in the
metadata) and a transcoder's output site is ``sae.cfg.metadata.hook_name_out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxtyping import Float

from mechir.lazy import lazy_import

torch = lazy_import("torch")

#: Training architectures: name -> what SAELens saves it as (BatchTopK's training encode depends
#: on the batch, so it is saved, loaded and spliced as JumpReLU with its learnt threshold).
ARCHITECTURES: dict[str, str] = {
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "standard": "standard",
}


def require_sae_lens() -> Any:
    """The ``sae_lens`` module, or an ``ImportError`` saying which extra to install."""
    try:
        import sae_lens
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "sparse features need SAELens: pip install 'mechir[features]' (sae-lens>=6.54,<7)"
        ) from err
    return sae_lens


def training_config(
    architecture: str,
    *,
    d_in: int,
    d_sae: int,
    site: str,
    k: int = 32,
    l1_coefficient: float = 1.0,
    l0_coefficient: float = 1.0,
    normalize_activations: str = "none",
    model_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    **extra: Any,
) -> Any:
    """A SAELens ``TrainingSAEConfig`` of ``architecture`` (:data:`ARCHITECTURES`) reading
    ``site``: ``k`` active latents for TopK / BatchTopK (on average for BatchTopK), the L1
    coefficient of the standard SAE, the L0 coefficient of JumpReLU; ``extra`` goes to the
    config class (e.g. ``aux_loss_coefficient``, ``jumprelu_bandwidth``)."""
    require_sae_lens()
    from sae_lens.saes import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown SAE architecture {architecture!r}: choose one of {tuple(ARCHITECTURES)}"
        )
    if d_sae < 1 or d_in < 1:
        raise ValueError(f"d_in and d_sae must be >= 1, got d_in={d_in}, d_sae={d_sae}")
    common = dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype,
        device=device,
        normalize_activations=normalize_activations,
        metadata=SAEMetadata(hook_name=site, model_name=model_name),
    )
    if architecture in ("topk", "batchtopk"):
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be within 1..d_sae={d_sae}, got {k}")
        cls = TopKTrainingSAEConfig if architecture == "topk" else BatchTopKTrainingSAEConfig
        return cls(k=k, **common, **extra)
    if architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(l0_coefficient=l0_coefficient, **common, **extra)
    return StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, **common, **extra)


def load_sae(path: str | Path, *, device: str = "cpu") -> Any:
    """An SAE (or transcoder) saved in SAELens's format (``cfg.json`` and
    ``sae_weights.safetensors``, by mechir or by SAELens itself), loaded with SAELens."""
    require_sae_lens()
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise ValueError(f"{path}: no cfg.json (not a directory saved in SAELens's format)")
    return plain_mode(SAE.load_from_disk(str(path), device=device))


def sae_site(sae: Any) -> str:
    """The hook name the SAE reads (``sae.cfg.metadata.hook_name``)."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    name = getattr(metadata, "hook_name", None)
    if not name:
        raise ValueError(
            "the SAE names no site (sae.cfg.metadata.hook_name is empty): pass it as "
            "saes={hook_name: sae}"
        )
    return name


def is_transcoder(sae: Any) -> bool:
    """Whether ``sae`` maps one site to another (a SAELens transcoder: ``cfg.d_out``)."""
    return hasattr(sae.cfg, "d_out")


def transcoder_output_site(sae: Any) -> str:
    """The hook name a transcoder writes (``sae.cfg.metadata.hook_name_out``)."""
    name = getattr(sae.cfg.metadata, "hook_name_out", None)
    if not name:
        raise ValueError("the transcoder names no output site (cfg.metadata.hook_name_out)")
    return name


def _reshapes_itself(sae: Any) -> bool:
    return bool(getattr(sae, "hook_z_reshaping_mode", False))


def encode(sae: Any, act: Float[torch.Tensor, "*rows d"]) -> Float[torch.Tensor, "*rows d_sae"]:
    """Feature activations of site activations ``[..., d]`` (attention ``z`` flattened to
    ``n_heads * d_head`` by the caller, :func:`mechir.features.source.flatten_site`)."""
    if _reshapes_itself(sae):  # SAELens's hook_z mode would unflatten on its own
        raise ValueError(
            "this SAE reshapes hook_z itself (cfg.reshape_activations='hook_z'): load it with "
            "mechir.features.saes.load_sae, which turns that off (mechir flattens z itself)"
        )
    if act.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"activation of width {act.shape[-1]} but the SAE reads d_in={sae.cfg.d_in}: is it "
            "the SAE of this site?"
        )
    return sae.encode(act.to(sae.dtype))


def decode(
    sae: Any, features: Float[torch.Tensor, "*rows d_sae"]
) -> Float[torch.Tensor, "*rows d"]:
    """The reconstruction of feature activations (flattened for attention ``z``)."""
    return sae.decode(features)


def plain_mode(sae: Any) -> Any:
    """``sae`` with SAELens's own hook_z reshaping off (mechir flattens ``z`` itself)."""
    if _reshapes_itself(sae):
        sae.turn_off_forward_pass_hook_z_reshaping()
    return sae


__all__ = [
    "ARCHITECTURES",
    "decode",
    "encode",
    "is_transcoder",
    "load_sae",
    "plain_mode",
    "require_sae_lens",
    "sae_site",
    "training_config",
    "transcoder_output_site",
]
