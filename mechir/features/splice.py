"""Splicing SAEs and transcoders into the hooked forward: :func:`sae_hooks`.

At an SAE's site, with ``x`` the activation of a real token, ``f = encode(x)`` its features,
``x_hat = decode(f)`` the reconstruction and ``e = x - x_hat`` the error term, the hook returns

* ``error="keep"``:   ``decode(f') + e``, computed as ``x + (decode(f') - x_hat)``, so that
  without an edit the activation is ``x`` bit for bit and the model scores exactly as before;
* ``error="detach"``: ``decode(f') + e.detach()`` (the same value; no gradient through ``e``);
* ``error="drop"``:   ``decode(f')`` (the model runs on the reconstruction);

where ``f'`` is ``f`` with the edits applied (:class:`FeatureEdit`: ablate, clamp, scale or
steer chosen features) at the tokens of ``parts`` only. A transcoder (input site -> output site)
is spliced at its output site: ``y`` replaced by ``decode(encode(x_in)) (+ y - y_hat)``, its
input read in the same forward pass.

Padding positions are left alone; MonoT5's decoder sites (one position, no input token) are
spliced at every position. The hooks keep no state: a transcoder's input is kept in the running
forward pass's frame (:func:`mechir.running.per_forward`), so a hook list is thread-safe, built
once, and composes with every other factory by ``+``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jaxtyping import Bool, Float

from mechir.features.saes import (
    decode,
    encode,
    is_transcoder,
    sae_site,
    transcoder_output_site,
)
from mechir.features.source import check_site
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import PartLike, parse_parts
from mechir.running import Hooks, per_forward

torch = lazy_import("torch")

ErrorMode = Literal["keep", "drop", "detach"]
ERROR_MODES: tuple[str, ...] = ("keep", "drop", "detach")
EDIT_MODES: tuple[str, ...] = ("ablate", "clamp", "scale", "steer")


@dataclass(frozen=True)
class FeatureEdit:
    """An edit of chosen features: ``ablate`` (``f_i <- 0``), ``clamp`` (``f_i <- value``),
    ``scale`` (``f_i <- value * f_i``) or ``steer`` (``f_i <- f_i + value``)."""

    features: tuple[int, ...]
    mode: str = "ablate"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {self.mode!r}: choose one of {EDIT_MODES}")
        object.__setattr__(self, "features", tuple(int(i) for i in self.features))
        if not self.features:
            raise ValueError("an edit needs at least one feature index")

    def check(self, d_sae: int) -> None:
        bad = [i for i in self.features if not 0 <= i < d_sae]
        if bad:
            raise ValueError(
                f"feature indices {bad} out of range: the SAE has {d_sae} (0-{d_sae - 1})"
            )

    def apply(
        self, f: Float[torch.Tensor, "*rows d_sae"], where: Bool[torch.Tensor, "*rows"]
    ) -> Float[torch.Tensor, "*rows d_sae"]:
        """``f`` with the edit applied at the rows ``where``."""
        idx = torch.tensor(self.features, device=f.device)
        sel = f[..., idx]
        if self.mode == "ablate":
            new = torch.zeros_like(sel)
        elif self.mode == "clamp":
            new = torch.full_like(sel, self.value)
        elif self.mode == "scale":
            new = sel * self.value
        else:
            new = sel + self.value
        out = f.clone()
        out[..., idx] = torch.where(where[..., None], new, sel)
        return out


SaesArg = Any  # an SAE, SAEs, or {site: SAE}
EditArg = (
    FeatureEdit | Sequence[FeatureEdit] | Mapping[str, FeatureEdit | Sequence[FeatureEdit]] | None
)


def sae_by_site(saes: SaesArg) -> dict[str, Any]:
    """``{site: sae}`` from one SAE, a sequence (sites from their metadata) or a mapping. A
    transcoder is keyed by its *output* site (where it is spliced)."""
    if isinstance(saes, Mapping):
        return dict(saes)
    items = saes if isinstance(saes, (list, tuple)) else [saes]
    out: dict[str, Any] = {}
    for sae in items:
        site = transcoder_output_site(sae) if is_transcoder(sae) else sae_site(sae)
        if site in out:
            raise ValueError(f"two SAEs for site {site!r}: splice one SAE per site")
        out[site] = sae
    return out


def _edits_by_site(edit: EditArg, sites: Sequence[str]) -> dict[str, list[FeatureEdit]]:
    if edit is None:
        return {}
    if isinstance(edit, Mapping):
        unknown = set(edit) - set(sites)
        if unknown:
            raise ValueError(f"edits for sites without an SAE: {sorted(unknown)}")
        return {s: [e] if isinstance(e, FeatureEdit) else list(e) for s, e in edit.items()}
    if len(sites) != 1:
        raise ValueError("several SAEs are spliced: give edits as {site: FeatureEdit}")
    return {sites[0]: [edit] if isinstance(edit, FeatureEdit) else list(edit)}


def _position_mask(mask: torch.Tensor, n_positions: int, site: str, parts: Any) -> torch.Tensor:
    """The batch's ``[batch, pos]`` mask, or all-true at a decoder site (no input positions)."""
    if n_positions == mask.shape[1]:
        return mask
    if parts is not None:
        raise ValueError(
            f"site {site!r} has {n_positions} positions and reads no input token: parts= cannot "
            "select its positions (leave parts unset for decoder sites)"
        )
    return torch.ones(mask.shape[0], n_positions, dtype=torch.bool, device=mask.device)


def combine(
    x: Float[torch.Tensor, "batch pos d"],
    x_hat: Float[torch.Tensor, "batch pos d"],
    x_hat_edited: Float[torch.Tensor, "batch pos d"],
    error: str,
) -> Float[torch.Tensor, "batch pos d"]:
    """The spliced activation (module docstring): keep, detach or drop the error ``x - x_hat``."""
    if error == "keep":
        return x + (x_hat_edited - x_hat)
    if error == "detach":
        return x_hat_edited + (x - x_hat).detach()
    return x_hat_edited


def sae_hooks(
    model: HookedReranker,
    saes: SaesArg,
    *,
    error: ErrorMode = "keep",
    edit: EditArg = None,
    parts: PartLike | Iterable[PartLike] | None = None,
    splice_parts: PartLike | Iterable[PartLike] | None = None,
) -> Hooks:
    """Hooks splicing ``saes`` (an SAE, a list, or ``{site: sae}``; transcoders too) into the
    model's forward pass (see the module docstring for the math).

    Args:
        error: ``"keep"`` (the model scores exactly as before unless edited), ``"detach"`` or
            ``"drop"`` (the model runs on the reconstruction).
        edit: :class:`FeatureEdit` (one SAE), a list of them, or ``{site: edit(s)}``.
        parts: the parts whose tokens the edits change (default: every real token).
        splice_parts: the parts whose tokens are spliced at all (default: every real token;
            e.g. ``("query", "document")`` for an SAE trained without special tokens).
    """
    if error not in ERROR_MODES:
        raise ValueError(f"unknown error mode {error!r}: choose one of {ERROR_MODES}")
    by_site = sae_by_site(saes)
    if not by_site:
        raise ValueError("no SAE to splice")
    for site in by_site:
        check_site(model, site)
    edits = _edits_by_site(edit, list(by_site))
    for site, site_edits in edits.items():
        for e in site_edits:
            e.check(by_site[site].cfg.d_sae)
    edit_parts = parse_parts(parts) if parts is not None else None
    spliced_parts = parse_parts(splice_parts) if splice_parts is not None else None
    edit_mask = per_forward(
        lambda b: b.mask(edit_parts) if edit_parts is not None else b.attention_mask.bool()
    )
    splice_mask = per_forward(
        lambda b: b.mask(spliced_parts) if spliced_parts is not None else b.attention_mask.bool()
    )
    inputs = per_forward(lambda b: {})  # transcoder inputs of this forward pass
    hooks: Hooks = []
    for site, sae in by_site.items():
        site_edits = edits.get(site, [])
        if is_transcoder(sae):
            site_in = sae_site(sae)
            check_site(model, site_in)
            hooks.append((site_in, _keep_input(inputs, site_in)))
        else:
            site_in = None
        hooks.append(
            (
                site,
                _splice_fn(
                    sae,
                    site,
                    site_in,
                    site_edits,
                    error,
                    edit_mask,
                    splice_mask,
                    inputs,
                    edit_parts,
                    spliced_parts,
                ),
            )
        )
    return hooks


def _keep_input(inputs: Any, site_in: str) -> Any:
    def keep(act: torch.Tensor, hook: Any) -> None:
        inputs(hook)[site_in] = act

    return keep


def _splice_fn(
    sae: Any,
    site: str,
    site_in: str | None,
    edits: list[FeatureEdit],
    error: str,
    edit_mask: Any,
    splice_mask: Any,
    inputs: Any,
    edit_parts: Any,
    spliced_parts: Any,
) -> Any:
    def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = act.shape
        x = act.reshape(*shape[:2], -1) if act.dim() == 4 else act
        if site_in is None:
            source = x
        else:
            got = inputs(hook).get(site_in)
            if got is None:
                raise ValueError(f"transcoder input {site_in!r} did not run before {site!r}")
            source = got.reshape(*got.shape[:2], -1) if got.dim() == 4 else got
        f = encode(sae, source)
        x_hat = decode(sae, f).to(x.dtype)
        if edits:
            where = _position_mask(edit_mask(hook), x.shape[1], site, edit_parts)
            edited = f
            for e in edits:
                edited = e.apply(edited, where.to(f.device))
            x_hat_edited = decode(sae, edited).to(x.dtype)
        else:
            x_hat_edited = x_hat
        out = combine(x, x_hat, x_hat_edited, error)
        real = _position_mask(splice_mask(hook), x.shape[1], site, spliced_parts).to(x.device)
        out = torch.where(real[..., None], out, x)
        return out.reshape(shape)

    return splice


__all__ = [
    "EDIT_MODES",
    "ERROR_MODES",
    "FeatureEdit",
    "combine",
    "sae_by_site",
    "sae_hooks",
]
