"""IR axioms in a cross-encoder: how often does it agree with TFC1, TFC2, STMC1, LNC1 and LNC2,
which components carry each effect, and does it compute a semantic BM25 (term matching x IDF)?
(Chen et al. 2024, "Axiomatic Causal Interventions for Reverse Engineering Relevance Computation
in Neural Retrieval Models"; Lu, Chen & Eickhoff 2025, "A cross-encoder rediscovers a semantic
variant of BM25"; Câmara & Hauff 2020, diagnostic datasets.)

What it computes, from the first-stage candidates of ``--dataset`` (``--limit-queries``,
``--depth``):

1. **Diagnostics** (:mod:`patching.axioms`): for each axiom, pairs of documents built so that the
   axiom says which must score higher; how often the model agrees (with a sign test).
2. **Components**: every layer's attention (all heads) and MLP knocked out (zeroed), and the
   change of each axiom's mean score gap.
3. **Patching** of the aligned axioms (``--patch-axioms``, default TFC1): block patching (residual
   stream, attention and MLP outputs per layer x part), head patching (layer x head; guided exact
   top-k with ``--guided-k``), position patching (layer x position, first pairs), pattern
   patching (the top heads' attention rows), and head -> [CLS] path patching
   (:func:`patching.semantic_bm25.cls_path_patch`).
4. **Semantic BM25** (Lu et al.): duplicate-token heads; an SVD of the token embeddings against
   the collection's IDF (Spearman of the leading components); a linear soft-TF x IDF fit of the
   top head -> [CLS] heads' effects, with R² on held-out queries; the IDF direction removed from
   the embeddings, and its effect on nDCG@10 (against a random direction).
5. **Seed checks** (options): matching heads scaled at factors 0-2 (``--head-scaling``), the
   QK-subspace ablation of the matching heads against random heads (``--qk-ablation``), the FFN
   share per layer (``--ffn-share``), NIG neuron sets of one half of the queries ablated, fully
   and partly, on the other half (``--nig-percent``), and the same diagnostics and layer profiles
   for other models side by side (``--replicate``).

Example (offline, a few minutes)::

    python -m analyses.axioms --model demo --dataset demo --limit-queries 2 --output DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from analyses.axioms.activation_patching import (
    compute_patching,
    compute_pattern,
    decode_result,
    patch_pairs,
    top_heads,
)
from analyses.axioms.diagnostics import (
    ALIGNED,
    AXIOM_NAMES,
    BASELINE,
    BLOCKS,
    NEEDS,
    STUDY,
    build_sets,
    compute_diagnostic,
    idf_statistics,
    require_cross_encoder,
)
from analyses.axioms.idf import (
    compute_duplicates,
    compute_idf_svd,
    compute_rerank,
    random_direction,
    token_statistics,
)
from analyses.axioms.knockouts import compute_components
from analyses.axioms.nig import compute_nig, nig_selection, nig_split
from analyses.axioms.regression import compute_fit, fit_pairs
from analyses.axioms.replication import compute_replicate
from analyses.axioms.report import summarize
from analyses.axioms.seed_checks import matching_head_list, qk_directions, random_heads
from analyses.base import Stage, Study, Unit, UsageError
from analyses.common import slug, writes_outputs
from analyses.summary import Summary
from mechir import outputs
from mechir.cli_common import finite_float, nonnegative_float, percent, positive_float
from mechir.lazy import lazy_import
from mechir.store import decode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


class Axioms(Study):
    name = STUDY
    needs = NEEDS
    work_options = (
        "min_delta",
        "top",
        "head_scaling",
        "qk_ablation",
        "qk_directions",
        "ffn_share",
        "nig_percent",
        "nig_factors",
        "replicate",
        "idf_factors",
        "measure",
    )

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("diagnostics")
        g.add_argument(
            "--axioms", nargs="+", type=str.upper, choices=AXIOM_NAMES, default=list(AXIOM_NAMES)
        )
        g.add_argument("--max-pairs", type=int, default=100, help="pairs per axiom (at most)")
        g.add_argument(
            "--component-pairs",
            type=int,
            default=16,
            help="pairs per axiom for the per-layer attention / MLP knockouts",
        )
        g.add_argument(
            "--term-choice",
            choices=["random", "first", "max_idf", "min_idf"],
            default="random",
            help="which query term TFC1, TFC2 and STMC1 use (random: seeded per pair)",
        )
        g.add_argument("--filler", default="a", help="filler token of TFC1/TFC2")
        g.add_argument("--lnc2-copies", type=int, default=2, help="LNC2: copies of the document")
        g.add_argument(
            "--idf-from",
            choices=["corpus", "candidates"],
            default="corpus",
            help="documents of the IDF statistics",
        )
        t = p.add_argument_group("patching (Chen et al. 2024; Lu et al. 2025)")
        t.add_argument(
            "--patch-axioms",
            nargs="*",
            type=str.upper,
            choices=ALIGNED,
            default=["TFC1"],
            help="aligned axioms to patch (block, head, position, pattern, head -> CLS)",
        )
        t.add_argument("--patch-pairs", type=int, default=16, help="pairs patched per axiom")
        t.add_argument(
            "--position-pairs", type=int, default=2, help="pairs of position / pattern patching"
        )
        t.add_argument(
            "--guided-k",
            type=int,
            default=0,
            help="head patching: the exact top K heads (guided by attribution patching) instead "
            "of every head",
        )
        t.add_argument(
            "--freeze-mlps", action="store_true", help="head -> CLS paths: freeze MLPs too"
        )
        t.add_argument("--top-heads", type=int, default=3, help="top heads (pattern, fits)")
        t.add_argument(
            "--memory-budget",
            type=positive_float,
            default=2**30,
            help="bytes of one expanded forward",
        )
        t.add_argument(
            "--min-delta",
            type=nonnegative_float,
            default=1e-3,
            help="pairs with |clean - corrupted| below this are excluded (summary option)",
        )
        t.add_argument("--top", type=int, default=10, help="rows of the top-cell tables")
        b = p.add_argument_group("semantic BM25 (Lu et al. 2025)")
        b.add_argument("--svd-components", type=int, default=10, help="leading components")
        b.add_argument(
            "--fit-queries", type=int, default=None, help="queries of the soft-TF x IDF fit"
        )
        b.add_argument(
            "--soft-tf-power", type=positive_float, default=4.0, help="softTF = sum cos^p"
        )
        b.add_argument(
            "--idf-factors",
            nargs="+",
            type=finite_float,
            default=[0.0],
            help="scale the IDF direction of the embeddings by these factors (0 removes it)",
        )
        b.add_argument("--measure", default="nDCG@10")
        s = p.add_argument_group("seed checks")
        s.add_argument(
            "--head-scaling",
            nargs="*",
            type=finite_float,
            default=[],
            help="scale the matching heads (and random heads) by these factors, e.g. 0 0.5 1 1.5 2",
        )
        s.add_argument(
            "--matching-heads", nargs="+", default=None, help="the matching heads (default: found)"
        )
        s.add_argument(
            "--qk-ablation",
            action="store_true",
            help="remove QK singular directions of the matching heads vs random heads",
        )
        s.add_argument(
            "--qk-directions",
            nargs="+",
            default=["top:1", "all"],
            help="directions removed: 'top:K' or 'all'",
        )
        s.add_argument(
            "--ffn-share",
            action="store_true",
            help="each layer's MLP patched and knocked out beside its attention",
        )
        s.add_argument(
            "--nig-percent",
            type=percent,
            default=None,
            help="NIG top-p%% neurons of one half of the queries, ablated on the other half",
        )
        s.add_argument(
            "--nig-factors",
            nargs="+",
            type=finite_float,
            default=[0.0, 0.25, 0.5, 0.75],
            help="partial ablation: neuron activations scaled by these factors",
        )
        s.add_argument("--nig-pairs", type=int, default=32, help="pairs attributed (split A)")
        s.add_argument("--nig-steps", type=int, default=16, help="NIG integration steps")
        s.add_argument(
            "--replicate",
            nargs="*",
            default=[],
            help="other models: diagnostics and layer profiles side by side",
        )

    def check(self) -> None:
        args = self.args
        for name in ("max_pairs", "component_pairs", "patch_pairs", "position_pairs"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if args.top_heads < 1 or args.guided_k < 0 or args.svd_components < 1:
            raise UsageError("--top-heads and --svd-components must be >= 1, --guided-k >= 0")
        if args.lnc2_copies < 2:
            raise UsageError("--lnc2-copies must be >= 2")
        for spec in args.qk_directions:
            if spec != "all" and not (
                spec.startswith("top:") and spec[4:].isdigit() and int(spec[4:]) > 0
            ):
                raise UsageError(f"--qk-directions {spec!r}: use 'all' or 'top:K' (K >= 1)")
        from mechir.settings import model_family

        for name in args.replicate:  # --model: by the base (Study.needs)
            require_cross_encoder(model_family(name), name)
        self.shape  # noqa: B018 -- the model's config is readable

    # ------------------------------------------------------------------ stages
    def stages(self) -> Iterator[Stage]:
        args = self.args
        self.stats = idf_statistics(args, self.collection, self.candidates)
        self.sets = build_sets(self.model, self.collection, self.candidates, self.stats, args)
        if writes_outputs():
            self._write_pairs()
        yield Stage(
            "diagnostics",
            [Unit(f"diag:{ax}", f"{ax} scores", ax) for ax in args.axioms],
            lambda u: compute_diagnostic(self.model, self.sets[u.spec], args),
        )
        yield Stage(
            "components",
            [
                Unit(f"comp:{ax}:{layer}", f"{ax} layer {layer}", (ax, layer))
                for ax in args.axioms
                for layer in range(self.shape["n_layers"])
            ],
            lambda u: compute_components(self.model, self.sets[u.spec[0]], u.spec[1], args),
        )
        yield from self._patching_stages()
        yield from self._bm25_stages()
        yield from self._seed_stages()

    def _write_pairs(self) -> None:
        rows = [
            {"axiom": ax, "pair_id": p.pair_id, "grade": p.grade, "info": json.dumps(dict(p.info))}
            for ax, dset in self.sets.items()
            for p in dset.pairs
        ]
        outputs.write_csv(
            pd.DataFrame(rows, columns=["axiom", "pair_id", "grade", "info"]),
            self.output / "pairs.csv",
        )

    @property
    def patch_axioms(self) -> list[str]:
        return [ax for ax in self.args.patch_axioms if ax in self.sets and self.sets[ax].pairs]

    def analyses(self) -> list[str]:
        out = ["heads", *(f"block:{c}" for c in BLOCKS), "position", "cls_path"]
        if self.args.ffn_share:
            out += ["ffn:attn_out", "ffn:mlp_out"]
        return out

    def _patching_stages(self) -> Iterator[Stage]:
        args = self.args
        self.pairs_of = {
            ax: patch_pairs(self.model, self.sets[ax], args.patch_pairs) for ax in self.patch_axioms
        }
        yield Stage(
            "patching",
            [
                Unit(f"patch:{ax}:{a}", f"{ax} {a}", (ax, a))
                for ax in self.patch_axioms
                for a in self.analyses()
            ],
            lambda u: compute_patching(self.model, self.pairs_of[u.spec[0]], u.spec[1], args),
        )
        units = []
        self.pattern_heads: dict[str, list[str]] = {}
        for ax in self.patch_axioms:
            heads = top_heads(self.result(f"patch:{ax}:heads"), args.top_heads, args.min_delta)
            self.pattern_heads[ax] = heads
            units.append(Unit(f"pattern:{ax}:" + ",".join(heads), f"{ax} patterns", ax))
        self.pattern_units = units
        yield Stage(
            "pattern patching",
            units,
            lambda u: compute_pattern(
                self.model, self.pairs_of[u.spec], self.pattern_heads[u.spec], args
            ),
        )

    def result(self, unit: str) -> Any:
        return decode_result(self.store.get(unit)["result"])

    def _bm25_stages(self) -> Iterator[Stage]:
        args = self.args
        tfc1 = self.sets.get("TFC1")
        units = [Unit("bm25:idf_svd", "embedding SVD vs IDF", "idf_svd")]
        if tfc1 is not None and tfc1.pairs:
            units.insert(0, Unit("bm25:duplicates", "duplicate-token heads", "duplicates"))
        self.fit_heads: list[str] = []
        if self.patch_axioms:
            path = self.result(f"patch:{self.patch_axioms[0]}:cls_path")
            self.fit_heads = top_heads(path, args.top_heads, args.min_delta)
        self.fit_pairs = fit_pairs(self.candidates, args)
        units.append(Unit("bm25:fit:" + ",".join(self.fit_heads), "soft-TF x IDF fit", "fit"))
        units.append(Unit(BASELINE, "rerank, no intervention", "baseline"))

        def compute(u: Unit) -> dict[str, Any]:
            if u.spec == "duplicates":
                return compute_duplicates(self.model, tfc1, args)
            if u.spec == "idf_svd":
                return compute_idf_svd(self.model, self.collection, args)
            if u.spec == "fit":
                idf, _ = token_statistics(self.model, self.collection)
                return compute_fit(self.model, self.fit_pairs, self.fit_heads, idf, args)
            return compute_rerank(self.model, self.candidates, args, None)

        self.bm25_units = units
        yield Stage("semantic BM25", units, compute)
        direction = torch.from_numpy(decode_array(self.store.get("bm25:idf_svd")["direction"]))
        self.idf_units = []
        for f in args.idf_factors:
            self.idf_units += [
                Unit(f"idf_edit:idf:{f:g}", f"IDF direction x{f:g}", ("idf", f)),
                Unit(f"idf_edit:random:{f:g}", f"random direction x{f:g}", ("random", f)),
            ]

        def edit(u: Unit) -> dict[str, Any]:
            from patching.semantic_bm25 import embedding_direction_hooks

            kind, f = u.spec
            v = direction if kind == "idf" else random_direction(len(direction), args.seed)
            hooks = embedding_direction_hooks(self.model, v, factor=f)
            return compute_rerank(self.model, self.candidates, args, hooks)

        yield Stage("IDF direction edit", self.idf_units, edit)

    def _seed_stages(self) -> Iterator[Stage]:
        args = self.args
        self.match_units: list[Unit] = []
        if args.head_scaling or args.qk_ablation:
            yield Stage(
                "matching heads",
                [Unit("seed:matching_heads", "matching heads", None)],
                lambda u: matching_head_list(self.model, self.collection, args),
            )
            heads = self.store.get("seed:matching_heads")["heads"]
            sets = {"matching": heads, "random": random_heads(heads, self.shape, args.seed)}
            self.head_sets = sets
            units = [
                Unit(f"scale:{name}:{f:g}", f"{name} heads x{f:g}", (name, f))
                for name in sets
                for f in args.head_scaling
                if f != 1.0
            ]
            units += [
                Unit(f"qk:{name}:{spec}", f"{name} heads QK {spec}", (name, spec))
                for name in sets
                for spec in (args.qk_directions if args.qk_ablation else [])
            ]
            self.match_units = units

            def compute(u: Unit) -> dict[str, Any]:
                from mechir.hooks import head_scaling_hooks, qk_subspace_ablation_hooks

                name, how = u.spec
                hs = self.head_sets[name]
                if u.id.startswith("scale:"):
                    hooks = head_scaling_hooks(self.model, hs, factor=how)
                else:
                    hooks = qk_subspace_ablation_hooks(
                        self.model, heads=hs, directions=qk_directions(how, self.model, hs)
                    )
                return compute_rerank(self.model, self.candidates, args, hooks) | {"heads": hs}

            yield Stage("matching heads: scaling and QK ablation", units, compute)
        self.nig_units: list[Unit] = []
        if args.nig_percent is not None:
            split_a, split_b = nig_split(self.candidates)
            if not split_a or not split_b:
                raise UsageError("--nig-percent needs at least two queries (--limit-queries)")
            self.nig_b = split_b
            yield Stage(
                "NIG attribution (split A)",
                [Unit("nig:attribution", "NIG on split A", None)],
                lambda u: compute_nig(self.model, split_a, self.collection.qrels, args),
            )
            sel, control = nig_selection(
                self.store.get("nig:attribution"), self.shape["n_layers"], args
            )
            self.nig_sets = {"NIG": sel, "random": control}
            units = [
                Unit(f"nig:{name}:{f:g}", f"{name} neurons x{f:g} on split B", (name, f))
                for name in self.nig_sets
                for f in args.nig_factors
                if f != 1.0
            ]
            self.nig_units = units

            def ablate(u: Unit) -> dict[str, Any]:
                from mechir.hooks import neuron_ablation_hooks

                name, f = u.spec
                hooks = neuron_ablation_hooks(self.model, self.nig_sets[name].neurons(), factor=f)
                row = compute_rerank(self.model, split_b, args, hooks)
                return row | {"neurons": len(self.nig_sets[name])}

            yield Stage("NIG ablation (split B)", units, ablate)
        self.rep_units = [
            Unit(f"replicate:{i}:{slug(m)}", f"replicate {m}", m)
            for i, m in enumerate(args.replicate)
        ]
        if self.rep_units:
            yield Stage(
                "replication",
                self.rep_units,
                lambda u: compute_replicate(u.spec, self.collection, self.candidates, args),
            )

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = Axioms.parser
main = Axioms.main
