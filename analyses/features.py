"""Sparse features of a reranker: train an SAE (through SAELens) on one site of the model from
the candidates of training queries, measure its ranking-aware fidelity on held-out queries
against PCA at the same L0, read its matching features as cards, and attribute the score to its
features and error node (validated against exact ablation).

The collection's judged queries are split by order: the first ``--train-queries`` give the
training activations, the next ``--eval-queries`` are held out for every measurement. Stages,
each a resumable unit (``results.jsonl``):

1. ``activations``: the site's activations over the training and held-out candidates (fp16
   caches ``activations.train.pt`` / ``activations.eval.pt``);
2. ``train``: the SAE (``--architecture``, ``--d-sae``, ``--k``, ``--steps``), SAELens's format
   in ``sae/``, evaluation every ``--eval-every`` steps in ``training.jsonl``;
3. ``fidelity``: reconstruction (FVU, L0, dead, dense) and ranking fidelity with the error
   dropped (score FVU, Spearman, listwise KL score over mean ablation, Kendall tau, top-10
   overlap, nDCG@10 change with its paired test), for the SAE and PCA with ``k = round(L0)``;
4. ``features``: per-feature statistics (parts, matched terms, relevance, IDF, direct effect),
   the top matching features with HTML cards (``cards.html``) and JSON (``features.json``);
5. ``attribution``: integrated gradients over features + error node on held-out relevant pairs
   (completeness), attribution patching vs exact ablation of the top features (Pearson);
6. ``circuit`` (cross-encoders): a second SAE at ``--circuit-site`` (default: the same hook one
   layer later; ``sae_down/``, ``training_down.jsonl``), then the contrastive feature circuit of
   held-out relevant pairs against copies whose query content words are replaced
   (:func:`patching.edges.replace_query_words`; :mod:`mechir.features.circuits`): node
   effects (``--circuit-method``), pruning by cumulative influence, replacement and
   completeness scores, attribution patching against exact patching of the top nodes, and the
   faithfulness curve by node budget measured exactly (``circuit.json``,
   ``circuit_faithfulness.csv`` / ``.png``, ``circuit.svg`` drawn by
   :func:`patching.edges.circuit_svg`).

Times are kept apart from the results (``timings.jsonl``), so that identical runs write
byte-identical results; ``benchmarks/bench_features.py`` and
``benchmarks/bench_feature_circuits.py`` measure speed.

Example (the embedded demo)::

    python -m analyses.features --model demo --dataset demo

With its defaults it ran in 3 min 37 s wall (6 CPU-minutes) on this project's idle 2-core CPU:
activations 14 s, training the first SAE 29 s, fidelity 67 s, attribution 36 s, cards 5 s, the
second SAE 45 s, the circuit 13 s. Its circuit (8 held-out relevant pairs, 3,074 nodes) reaches
faithfulness 0.88 with 15 nodes (0.5%) and 0.98 with 31 (1%).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from analyses.base import Stage, Study, Unit, UsageError
from analyses.summary import Summary
from mechir import outputs
from mechir.lazy import lazy_import

pd = lazy_import("pandas")
torch = lazy_import("torch")

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")


class Features(Study):
    name = "features"

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("sparse features")
        g.add_argument(
            "--site",
            default=None,
            help="hook name (default: blocks.<n_layers // 2>.hook_resid_pre)",
        )
        g.add_argument("--architecture", default="topk", choices=ARCHITECTURES)
        g.add_argument("--d-sae", type=int, default=None, help="latents (default 4 x d_in)")
        g.add_argument("--k", type=int, default=32, help="active latents (TopK / BatchTopK)")
        g.add_argument("--l1", type=float, default=1.0, help="L1 (standard) / L0 (JumpReLU)")
        g.add_argument("--steps", type=int, default=600, help="training steps")
        g.add_argument("--train-batch", type=int, default=256, help="activations per step")
        g.add_argument("--lr", type=float, default=1e-3)
        g.add_argument("--eval-every", type=int, default=150, help="steps between evaluations")
        g.add_argument("--train-queries", type=int, default=30, help="first N judged queries")
        g.add_argument("--eval-queries", type=int, default=20, help="the next N (held out)")
        g.add_argument(
            "--no-special-tokens",
            dest="special_tokens",
            action="store_false",
            help="train and splice on query and document tokens only",
        )
        g.add_argument("--cards", type=int, default=12, help="top matching features with cards")
        g.add_argument(
            "--min-frequency",
            type=float,
            default=1e-3,
            help="features firing less often are not ranked as matching features",
        )
        g.add_argument(
            "--attribution-pairs", type=int, default=8, help="held-out relevant pairs attributed"
        )
        g.add_argument(
            "--top-features",
            type=int,
            default=50,
            help="features ablated exactly to validate attribution patching",
        )
        g.add_argument(
            "--circuit-site",
            default=None,
            help="the circuit's second SAE site (default: the --site hook one block later; the "
            "last block's output after its hook_resid_pre)",
        )
        g.add_argument(
            "--circuit-pairs", type=int, default=8, help="held-out relevant pairs in the circuit"
        )
        g.add_argument("--circuit-method", default="atp", choices=("atp", "ig"))
        g.add_argument(
            "--circuit-down-nodes",
            type=int,
            default=16,
            help="downstream features whose incoming edges are computed",
        )
        g.add_argument("--circuit-steps", type=int, default=8, help="IG steps per site")
        g.add_argument(
            "--circuit-influence",
            type=float,
            default=0.8,
            help="pruning keeps the fewest nodes with this share of the total |effect|",
        )
        g.add_argument(
            "--circuit-budgets",
            type=float,
            nargs="+",
            default=[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25],
            help="node budgets of the faithfulness curve, as fractions of the nodes",
        )
        g.add_argument(
            "--filler",
            default=None,
            help="the token replacing query words (default: the mask token, else 'a')",
        )

    def check(self) -> None:
        a = self.args
        if a.steps < 1 or a.train_batch < 1 or a.k < 1:
            raise UsageError("--steps, --train-batch and --k must be >= 1")
        if a.train_queries < 1 or a.eval_queries < 1:
            raise UsageError("--train-queries and --eval-queries must be >= 1")
        if a.circuit_pairs < 1 or a.circuit_steps < 1:
            raise UsageError("--circuit-pairs and --circuit-steps must be >= 1")
        if not 0 < a.circuit_influence <= 1 or not all(0 < b <= 1 for b in a.circuit_budgets):
            raise UsageError("--circuit-influence and --circuit-budgets must be in (0, 1]")

    # ------------------------------------------------------------------ data
    @cached_property
    def site(self) -> str:
        return self.args.site or f"blocks.{self.shape['n_layers'] // 2}.hook_resid_pre"

    @cached_property
    def query_split(self) -> tuple[list[str], list[str]]:
        a = self.args
        qids = self.collection.query_ids(a.limit_queries)
        train, held = (
            qids[: a.train_queries],
            qids[a.train_queries : a.train_queries + a.eval_queries],
        )
        if not held:
            raise UsageError(
                f"{len(qids)} judged queries: none left for evaluation after --train-queries "
                f"{a.train_queries}; lower it"
            )
        return train, held

    def pairs_of(self, qids: list[str]) -> list[Any]:
        return self.collection.candidates(depth=self.args.depth, query_ids=qids)

    def rows(self, which: str) -> Any:
        from mechir.features.source import load_rows

        return load_rows(self.output / f"activations.{which}.pt")

    @cached_property
    def sae(self) -> Any:
        from mechir.features.saes import load_sae

        return load_sae(self.output / "sae")

    # ------------------------------------------------------------------ units
    def compute_activations(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site}
        for which, qids in zip(("train", "eval"), self.query_split):
            out[which] = self.collect(self.site, which, qids)
        return out

    def collect(self, site: str, which: str, qids: list[str], suffix: str = "") -> dict[str, Any]:
        """Collect ``site``'s activations over the candidates of ``qids`` into
        ``activations.<which><suffix>.pt`` (fp16)."""
        from mechir.features.source import collect_activations, save_rows

        pairs = self.pairs_of(qids)
        rows = collect_activations(
            self.model,
            pairs,
            site,
            pairs_per_forward=self.args.batch_size,
            max_length=self.args.max_length,
            special_tokens=self.args.special_tokens,
        )
        with outputs.output_file(self.output / f"activations.{which}{suffix}.pt") as tmp:
            save_rows(rows, tmp)
        return {"queries": len(qids), "pairs": len(pairs), "rows": len(rows)}

    def train(self, site: str, suffix: str = "") -> dict[str, Any]:
        """Train the SAE of ``site`` on ``activations.train<suffix>.pt`` (evaluated on
        ``activations.eval<suffix>.pt``) into ``sae<suffix>/``, its log in
        ``training<suffix>.jsonl``."""
        import tempfile
        from pathlib import Path

        from mechir.features.saes import training_config
        from mechir.features.source import RowStream
        from mechir.features.training import train_sae

        a = self.args
        train, held = self.rows(f"train{suffix}"), self.rows(f"eval{suffix}")
        d_in = train.acts.shape[1]
        cfg = training_config(
            a.architecture,
            d_in=d_in,
            d_sae=a.d_sae or 4 * d_in,
            site=site,
            k=a.k,
            l1_coefficient=a.l1,
            l0_coefficient=a.l1,
            normalize_activations="expected_average_only_in",
            model_name=str(a.model),
        )
        g = torch.Generator().manual_seed(a.seed)
        eval_acts = held.acts[torch.randperm(len(held), generator=g)[:8192]]
        with (
            outputs.output_file(self.output / f"training{suffix}.jsonl") as log,
            tempfile.TemporaryDirectory() as saved,
        ):
            train_sae(
                cfg,
                RowStream(train.acts, batch_size=a.train_batch, seed=a.seed),
                steps=a.steps,
                batch_size=a.train_batch,
                lr=a.lr,
                eval_acts=eval_acts,
                eval_every=a.eval_every,
                log=log,
                output=saved,
                checkpoint=self.output / f"sae_checkpoint{suffix}",
                seed=a.seed,
                progress=a.progress,
            )
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            for path in sorted(Path(saved).iterdir()):
                outputs.write_bytes(self.output / f"sae{suffix}" / path.name, path.read_bytes())
        return {"training_rows": len(train), "log": rows, **rows[-1]}

    def compute_train(self) -> dict[str, Any]:
        return self.train(self.site)

    def compute_fidelity(self, codec: str) -> dict[str, Any]:
        from mechir.features.fidelity import PCABaseline, fidelity_table
        from mechir.features.training import evaluate_sae

        train, held = self.rows("train"), self.rows("eval")
        if codec == "sae":
            model_codec = self.sae
        else:
            l0 = evaluate_sae(self.sae, held.acts[:8192])["l0"]
            model_codec = PCABaseline(train.acts, max(1, round(l0)), site=self.site)
        pairs = self.pairs_of(self.query_split[1])
        row = fidelity_table(
            self.model,
            pairs,
            {codec: model_codec},
            site=self.site,
            eval_acts=held.acts,
            mean=train.acts.mean(0),
            qrels=self.collection.qrels,
            batch_size=self.args.batch_size,
            max_length=self.args.max_length,
        )[0]
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}

    def attribution_pairs(self) -> Any:
        a = self.args
        pairs = []
        for qid in self.query_split[1]:
            for docid in self.collection.relevant(qid):
                if docid in self.collection.docs:
                    pairs.append(self.collection.pair(qid, docid))
        pairs = pairs[: a.attribution_pairs]
        if not pairs:
            raise ValueError("no relevant held-out pair to attribute")
        return self.model.encode(
            [p.query for p in pairs], [p.document for p in pairs], max_length=a.max_length
        )

    def compute_attribution(self) -> dict[str, Any]:
        from mechir.features.attribution import (
            feature_ablation_effects,
            feature_attribution,
            node_means,
        )

        batch = self.attribution_pairs()
        fm, em = node_means(self.sae, self.rows("train").acts[:20000])
        ig = feature_attribution(
            self.model, batch, self.sae, n_steps="auto", feature_baseline=fm, error_baseline=em
        )
        atp = feature_attribution(self.model, batch, self.sae, method="atp")
        top = atp.features.abs().sum(0).topk(min(self.args.top_features, self.sae.cfg.d_sae))
        top = [i for i, v in zip(top.indices.tolist(), top.values.tolist()) if v > 0]
        exact = feature_ablation_effects(self.model, batch, self.sae, top)
        est = atp.features[:, top]
        pearson = float(torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1])
        return {
            "pairs": len(batch),
            "ig_steps": ig.n_steps,
            "ig_relative_completeness_error": ig.relative_completeness_error(),
            "ig_delta_mean": float(ig.delta.mean()),
            "ig_error_share": float((ig.error.abs() / ig.total.abs().clamp_min(1e-12)).mean()),
            "atp_features": len(top),
            "atp_vs_exact_pearson": pearson,
            "atp_mean": atp.features.mean(0).tolist(),
        }

    def compute_features(self) -> dict[str, Any]:
        from mechir.features.cards import (
            feature_activations,
            feature_card,
            feature_cards_html,
            feature_statistics,
            token_idf,
        )

        held = self.rows("eval")
        pairs = self.pairs_of(self.query_split[1])
        relevant = torch.tensor(
            [self.collection.qrels.get(p.qid, {}).get(p.docid, 0) > 0 for p in pairs]
        )
        docs = list(self.collection.docs.values())
        idf = token_idf(docs, self.model.tokenizer)
        direct = self.store.get("attribution")
        effect = torch.tensor(direct["atp_mean"]) if direct else None
        f = feature_activations(self.sae, held)
        table = feature_statistics(f, held, relevant=relevant, idf=idf, direct_effect=effect)
        outputs.write_csv(table, self.output / "feature_statistics.csv", index=False)
        live = table[table.frequency >= self.args.min_frequency]
        top = live.sort_values("matching", ascending=False).head(self.args.cards)
        tok = self.model.tokenizer
        cards = [
            feature_card(
                int(r.feature),
                r._asdict(),
                f,
                held,
                lambda t: tok.convert_ids_to_tokens(t),
                pair_label=lambda i: (
                    f"{pairs[i].qid}/{pairs[i].docid}" + (" (relevant)" if relevant[i] else "")
                ),
            )
            for r in top.itertuples(index=False)
        ]
        outputs.write_text(
            self.output / "cards.html",
            feature_cards_html(cards, title=f"Top matching features at {self.site}"),
        )
        outputs.write_text(self.output / "features.json", json.dumps(cards))
        return {"top_matching": top.to_dict("list"), "dead": int((table.frequency == 0).sum())}

    # ------------------------------------------------------------------ circuit
    @cached_property
    def circuit_site(self) -> str:
        if self.args.circuit_site:
            return self.args.circuit_site
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", self.site)
        if m is not None and int(m.group(1)) + 1 < self.shape["n_layers"]:
            return f"blocks.{int(m.group(1)) + 1}.{m.group(2)}"
        if m is not None and m.group(2) == "hook_resid_pre":  # the last block: its output
            return f"blocks.{m.group(1)}.hook_resid_post"
        raise UsageError(f"no block after {self.site!r}: give --circuit-site (a later hook)")

    @cached_property
    def sae_down(self) -> Any:
        from mechir.features.saes import load_sae

        return load_sae(self.output / "sae_down")

    def compute_circuit_sae(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.circuit_site}
        for which, qids in zip(("train", "eval"), self.query_split):
            out[which] = self.collect(self.circuit_site, which, qids, suffix="_down")
        return {**out, **self.train(self.circuit_site, suffix="_down")}

    def circuit_batches(self) -> Any:
        """Held-out relevant pairs and their copies with the query content words replaced."""
        from analyses.circuit_discovery import filler_of
        from patching.edges import replace_query_words

        items = [
            self.collection.pair(qid, docid)
            for qid in self.query_split[1]
            for docid in self.collection.relevant(qid)
            if docid in self.collection.docs
        ]
        if not items:
            raise ValueError("no relevant held-out pair for the circuit: raise --eval-queries")
        pairs, _ = replace_query_words(
            self.model.tokenizer,
            items,
            max_length=self.args.max_length or self.model.max_length,
            filler=filler_of(self.model, self.args),
            qrels=self.collection.qrels,
        )
        n = self.args.circuit_pairs
        return pairs.clean[:n], pairs.corrupted[:n], pairs.pair_ids[:n]

    def compute_circuit(self) -> dict[str, Any]:
        from mechir.features.circuits import (
            baseline_nodes,
            contrastive_faithfulness,
            feature_circuit,
            node_patch_hooks,
            prune_by_influence,
        )
        from mechir.features.saes import sae_site

        a = self.args
        up, down = self.sae, self.sae_down
        clean, corrupted, ids = self.circuit_batches()
        c = feature_circuit(
            self.model,
            clean,
            up,
            down,
            corrupted=corrupted,
            n_down=a.circuit_down_nodes,
            method=a.circuit_method,
            n_steps=a.circuit_steps,
        )
        effect = c.node_effects()
        kept = prune_by_influence(effect, a.circuit_influence)
        n = c.n_nodes
        budgets = sorted({0, n, len(kept), *(max(1, round(f * n)) for f in a.circuit_budgets)})
        curve = contrastive_faithfulness(self.model, clean, corrupted, up, down, c, budgets)
        split = contrastive_faithfulness(
            self.model, clean, corrupted, up, down, c, budgets, per_site=True
        )
        for row, other in zip(curve, split):
            row["faithfulness_per_site"] = other["faithfulness"]
        # attribution patching against exact patching of the top nodes, one at a time
        saes = {sae_site(up): up, sae_site(down): down}
        base = baseline_nodes(self.model, corrupted, saes)
        d_up, d_down = up.cfg.d_sae, down.cfg.d_sae
        exact = []
        for node in effect.abs().argsort(descending=True)[:10].tolist():
            keep = torch.ones(n, dtype=torch.bool)
            keep[node] = False
            masks = {
                sae_site(up): (keep[:d_up], bool(keep[d_up])),
                sae_site(down): (keep[d_up + 1 : d_up + 1 + d_down], bool(keep[-1])),
            }
            with torch.no_grad():
                hooks = node_patch_hooks(self.model, saes, base, masks)
                s = float(self.model.score(clean, hooks=hooks).sum())
            exact.append(
                {"node": c.node_label(node), "estimate": float(effect[node]), "exact": c.clean - s}
            )
        est, ex = (
            torch.tensor([r["estimate"] for r in exact]),
            torch.tensor([r["exact"] for r in exact]),
        )
        pearson = float(torch.corrcoef(torch.stack([est, ex]))[0, 1]) if len(exact) > 1 else None
        kept_set = set(kept)
        down_rows = [(row, j) for row, j in enumerate(c.down_nodes) if d_up + 1 + j in kept_set]
        up_kept = [i for i in kept if i <= d_up]
        edges = [
            {"sender": c.node_label(i), "receiver": f"down:{j}", "weight": float(c.edges[row, i])}
            for row, j in down_rows
            for i in up_kept
        ]
        edges += [
            {"sender": c.node_label(i), "receiver": "score", "weight": float(effect[i])}
            for i in kept
            if i > d_up
        ]
        reached = [
            r["fraction_of_nodes"]
            for r in curve
            if max(r["faithfulness"], r["faithfulness_per_site"]) >= 0.8
        ]
        return {
            "up_site": sae_site(up),
            "down_site": sae_site(down),
            "pair_ids": ids,
            "method": a.circuit_method,
            "clean": c.clean,
            "corrupted": c.baseline,
            "nodes": n,
            "kept": [{"node": c.node_label(i), "effect": float(effect[i])} for i in kept],
            "influence": a.circuit_influence,
            "edges": edges,
            "completeness_error": c.completeness_error(),
            "replacement_score": c.replacement_score(),
            "completeness_score": c.completeness_score(),
            "atp_vs_exact": exact,
            "atp_vs_exact_pearson": pearson,
            "faithfulness": curve,
            "fraction_for_0.8": min(reached) if reached else None,
        }

    def stages(self) -> Iterator[Stage]:
        a = self.args
        key = f"{self.site}:{a.architecture}:{a.d_sae}:{a.k}:{a.steps}"
        yield Stage(
            "activations",
            [Unit("activations", "site activations")],
            lambda u: self.compute_activations(),
        )
        yield Stage("train", [Unit("train", f"train {key}")], lambda u: self.compute_train())
        yield Stage(
            "fidelity",
            [Unit(f"fidelity:{c}", c, c) for c in ("sae", "pca")],
            lambda u: self.compute_fidelity(u.spec),
        )
        yield Stage(
            "attribution",
            [Unit("attribution", "attribution")],
            lambda u: self.compute_attribution(),
        )
        yield Stage(
            "features", [Unit("features", "feature cards")], lambda u: self.compute_features()
        )
        if self.model.family.kind != "encoder":  # query-corrupted pairs: cross-encoders only
            return
        ckey = f"{self.circuit_site}:{a.circuit_method}:{a.circuit_pairs}:{a.circuit_influence}"
        yield Stage(
            "circuit",
            [
                Unit("circuit:sae", f"train {self.circuit_site}"),
                Unit("circuit", f"circuit {ckey}"),
            ],
            lambda u: (
                self.compute_circuit_sae() if u.id == "circuit:sae" else self.compute_circuit()
            ),
        )

    def summarize(self) -> Summary:
        return summarize(self)


def summarize(study: Features) -> Summary:
    store = study.store
    s = Summary("Sparse features", subtitle=f"{study.args.model} at {study.site}")
    train = store.get("train")
    acts = store.get("activations")
    s.heading("Setting")
    s.facts(
        study.setting(
            site=study.site,
            architecture=study.args.architecture,
            k=study.args.k,
            steps=study.args.steps,
            training_rows=train["training_rows"],
            train_queries=acts["train"]["queries"],
            held_out_queries=acts["eval"]["queries"],
        )
    )
    s.heading("Activation collection")
    s.table(pd.DataFrame([{"split": w, **acts[w]} for w in ("train", "eval")]))
    s.heading("Training (evaluated on held-out activations)")
    s.table(pd.DataFrame(train["log"])[["step", "samples", "fvu", "l0", "dead", "dense"]])
    s.heading("Fidelity with the error dropped (held-out queries), SAE vs PCA at equal L0")
    cols = [
        "codec",
        "fvu",
        "l0",
        "dead",
        "dense",
        "score_fvu",
        "spearman",
        "kl_score",
        "kendall_tau",
        "top10_overlap",
        "ndcg10",
        "ndcg10_change",
        "ndcg10_p",
    ]
    rows = pd.DataFrame([store.get("fidelity:sae"), store.get("fidelity:pca")])
    outputs.write_csv(rows, study.output / "fidelity.csv", index=False)
    s.table(rows[[c for c in cols if c in rows]])
    att = store.get("attribution")
    s.heading("Attribution to the score")
    s.table(pd.DataFrame([{k: v for k, v in att.items() if k != "atp_mean"}]))
    feats = store.get("features")
    s.heading("Top matching features (cards: cards.html, data: features.json)")
    top = pd.DataFrame(feats["top_matching"])
    keep = [
        c
        for c in (
            "feature",
            "frequency",
            "mean_active",
            "matching",
            "share_query",
            "share_document",
            "relevant_mean",
            "nonrelevant_mean",
            "idf_corr",
            "direct_effect",
        )
        if c in top
    ]
    s.table(top[keep])
    circuit = store.get("circuit")
    if circuit is None:
        s.heading("Feature circuit")
        s.paragraph(
            "Not run: query-corrupted pairs are built for cross-encoders ([CLS] query [SEP] "
            "document [SEP]); this model is a prompt-based reranker."
        )
        return s
    summarize_circuit(study, s, circuit, store.get("circuit:sae"))
    return s


def summarize_circuit(
    study: Features, s: Summary, circuit: dict[str, Any], down: dict[str, Any]
) -> None:
    """The circuit section: facts, faithfulness curve (CSV + plot), AtP vs exact patching, the
    kept nodes and the drawing (``circuit.json``, ``circuit.svg``)."""
    from analyses import plots

    out = study.output
    outputs.write_json(out / "circuit.json", circuit)
    s.heading("Feature circuit: relevant pairs against query-corrupted copies")
    errors = circuit["completeness_error"]
    s.facts(
        {
            "sites": f"{circuit['up_site']} -> {circuit['down_site']}",
            "second SAE (held-out FVU, L0)": f"{down['fvu']:.3f}, {down['l0']:.1f}",
            "pairs": len(circuit["pair_ids"]),
            "summed score clean / corrupted": f"{circuit['clean']:.3f} / "
            f"{circuit['corrupted']:.3f}",
            "node effects": circuit["method"],
            "nodes (features + 2 error nodes)": circuit["nodes"],
            f"kept at {circuit['influence']:.0%} influence": len(circuit["kept"]),
            "completeness error (up, down)": f"{errors['up']:.3f}, {errors['down']:.3f}",
            "replacement score": f"{circuit['replacement_score']:.3f}",
            "completeness score": f"{circuit['completeness_score']:.3f}",
            "AtP vs exact patching, top 10 nodes (Pearson)": circuit["atp_vs_exact_pearson"],
            "smallest node fraction with faithfulness >= 0.8": circuit["fraction_for_0.8"],
        }
    )
    curve = pd.DataFrame(circuit["faithfulness"])
    outputs.write_csv(curve, out / "circuit_faithfulness.csv", index=False)
    s.paragraph(
        "Faithfulness measured exactly: the model run with every node outside the circuit "
        "(features and error nodes) at its value on the corrupted pair, "
        "(s(circuit) - s(corrupted)) / (s(clean) - s(corrupted)) over the summed scores; the "
        "nodes of largest |effect| over both sites (faithfulness) or half the budget at each "
        "site (faithfulness_per_site: each site is a complete cut, so a circuit needs nodes at "
        "both)."
    )
    s.table(curve)
    shown = curve[curve.nodes > 0]
    series = {"one ranking": (shown.fraction_of_nodes.tolist(), shown.faithfulness.tolist())}
    if "faithfulness_per_site" in shown:  # absent from circuits stored before it was measured
        series["half per site"] = (
            shown.fraction_of_nodes.tolist(),
            shown.faithfulness_per_site.tolist(),
        )
    plots.line_plot(
        series,
        out / "circuit_faithfulness.png",
        title="Feature circuit faithfulness by node budget (exact)",
        xlabel="fraction of nodes kept",
        ylabel="faithfulness",
        references={"target": 0.8},
        logx=True,
    )
    s.image("circuit_faithfulness.png", "faithfulness by node budget")
    s.heading("Attribution patching vs exact patching of single nodes", 3)
    s.table(pd.DataFrame(circuit["atp_vs_exact"]))
    outputs.write_text(out / "circuit.svg", circuit_drawing(circuit))
    s.heading("Kept nodes (drawing: circuit.svg)", 3)
    s.paragraph(
        "In circuit.svg, column 0/i is the i-th upstream node below, column 1/i the i-th "
        "downstream one (the head columns of patching.edges' drawing; hover an edge for its "
        "nodes); mlp boxes are unused."
    )
    s.table(pd.DataFrame(circuit["kept"]))


def circuit_drawing(circuit: dict[str, Any], max_nodes: int = 12) -> str:
    """The stored circuit drawn by :func:`patching.edges.circuit_svg`: its graph's layers are the
    two SAE sites (upstream nodes as layer 0's heads, downstream ones as layer 1's), each edge
    ``up -> down`` read at the downstream node's query input, ``down -> score`` into the score;
    widths ``|effect|``, red where patching the edge lowers the score."""
    from dataclasses import dataclass

    from patching.edges import circuit_svg
    from patching.edges.attribution import EdgeScores
    from patching.edges.graph import EdgeGraph, Receiver, Sender

    @dataclass(frozen=True)
    class NodeSender(Sender):
        name: str = ""

        @property
        def label(self) -> str:
            return self.name

    @dataclass(frozen=True)
    class NodeReceiver(Receiver):
        name: str = ""

        @property
        def label(self) -> str:
            return self.name

    kept = [k["node"] for k in circuit["kept"]]
    ups = [k for k in kept if k.startswith("up:")][:max_nodes]
    downs = [k for k in kept if k.startswith("down:")][:max_nodes]
    senders = (
        [Sender("input")]
        + [NodeSender("head", 0, r, name=k) for r, k in enumerate(ups)]
        + [NodeSender("head", 1, r, name=k) for r, k in enumerate(downs)]
    )
    receivers = [NodeReceiver("q", 1, r, name=k) for r, k in enumerate(downs)]
    receivers.append(Receiver("score", 2))
    sender_of = {sd.label: i for i, sd in enumerate(senders)}
    receiver_of = {r.label: i for i, r in enumerate(receivers)}
    rows = [
        (sender_of[e["sender"]], receiver_of[e["receiver"]], e["weight"])
        for e in circuit["edges"]
        if e["sender"] in sender_of and e["receiver"] in receiver_of
    ]
    graph = EdgeGraph(
        n_layers=2,
        n_heads=max(len(ups), len(downs), 1),
        parts=False,
        senders=tuple(senders),
        receivers=tuple(receivers),
        reach=torch.full((len(receivers),), len(senders), dtype=torch.long),
        edge_receiver=torch.tensor([r for _, r, _ in rows], dtype=torch.long),
        edge_sender=torch.tensor([sd for sd, _, _ in rows], dtype=torch.long),
        edge_part=torch.zeros(len(rows), dtype=torch.long),
    )
    # EdgeScores' sign: m(patched) - m(clean), the negative of a node's effect
    weights = -torch.tensor([w for _, _, w in rows], dtype=torch.float32)[None]
    scores = EdgeScores(
        graph=graph,
        method=circuit["method"],
        scores=weights,
        pair_scores=weights,
        clean=torch.tensor([circuit["clean"]]),
        corrupted=torch.tensor([circuit["corrupted"]]),
        units=["summed"],
        pair_ids=["summed"],
        source="query words replaced",
    )
    title = (
        f"feature circuit {circuit['up_site']} (0/i) -> {circuit['down_site']} (1/i) -> score, "
        f"{len(kept)} of {circuit['nodes']} nodes"
    )
    return circuit_svg(graph, torch.arange(len(rows)), scores, title=title)


build_parser = Features.parser
main = Features.main

if __name__ == "__main__":
    raise SystemExit(main())
