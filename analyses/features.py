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
   (completeness), attribution patching vs exact ablation of the top features (Pearson, time).

Example (the embedded demo)::

    python -m analyses.features --model demo --dataset demo
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from analyses.base import Stage, Study, Unit, UsageError
from analyses.summary import Summary
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

    def check(self) -> None:
        a = self.args
        if a.steps < 1 or a.train_batch < 1 or a.k < 1:
            raise UsageError("--steps, --train-batch and --k must be >= 1")
        if a.train_queries < 1 or a.eval_queries < 1:
            raise UsageError("--train-queries and --eval-queries must be >= 1")

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
        from mechir.features.source import collect_activations, save_rows

        out: dict[str, Any] = {"site": self.site}
        for which, qids in zip(("train", "eval"), self.query_split):
            pairs = self.pairs_of(qids)
            start = time.perf_counter()
            rows = collect_activations(
                self.model,
                pairs,
                self.site,
                pairs_per_forward=self.args.batch_size,
                max_length=self.args.max_length,
                special_tokens=self.args.special_tokens,
            )
            seconds = time.perf_counter() - start
            save_rows(rows, self.output / f"activations.{which}.pt")
            out[which] = {
                "queries": len(qids),
                "pairs": len(pairs),
                "rows": len(rows),
                "seconds": seconds,
                "pairs_per_s": len(pairs) / seconds,
            }
        return out

    def compute_train(self) -> dict[str, Any]:
        from mechir.features.saes import training_config
        from mechir.features.source import RowStream
        from mechir.features.training import train_sae

        a = self.args
        train, held = self.rows("train"), self.rows("eval")
        d_in = train.acts.shape[1]
        cfg = training_config(
            a.architecture,
            d_in=d_in,
            d_sae=a.d_sae or 4 * d_in,
            site=self.site,
            k=a.k,
            l1_coefficient=a.l1,
            l0_coefficient=a.l1,
            normalize_activations="expected_average_only_in",
            model_name=str(a.model),
        )
        g = torch.Generator().manual_seed(a.seed)
        eval_acts = held.acts[torch.randperm(len(held), generator=g)[:8192]]
        log = self.output / "training.jsonl"
        log.unlink(missing_ok=True)
        start = time.perf_counter()
        train_sae(
            cfg,
            RowStream(train.acts, batch_size=a.train_batch, seed=a.seed),
            steps=a.steps,
            batch_size=a.train_batch,
            lr=a.lr,
            eval_acts=eval_acts,
            eval_every=a.eval_every,
            log=log,
            output=self.output / "sae",
            checkpoint=self.output / "sae_checkpoint",
            seed=a.seed,
            progress=a.progress,
        )
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        return {
            "seconds": time.perf_counter() - start,
            "training_rows": len(train),
            "log": rows,
            **rows[-1],
        }

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
        start = time.perf_counter()
        ig = feature_attribution(
            self.model, batch, self.sae, n_steps="auto", feature_baseline=fm, error_baseline=em
        )
        t_ig = time.perf_counter() - start
        start = time.perf_counter()
        atp = feature_attribution(self.model, batch, self.sae, method="atp")
        t_atp = time.perf_counter() - start
        top = atp.features.abs().sum(0).topk(min(self.args.top_features, self.sae.cfg.d_sae))
        top = [i for i, v in zip(top.indices.tolist(), top.values.tolist()) if v > 0]
        start = time.perf_counter()
        exact = feature_ablation_effects(self.model, batch, self.sae, top)
        t_exact = time.perf_counter() - start
        est = atp.features[:, top]
        pearson = float(torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1])
        return {
            "pairs": len(batch),
            "ig_steps": ig.n_steps,
            "ig_relative_completeness_error": ig.relative_completeness_error(),
            "ig_delta_mean": float(ig.delta.mean()),
            "ig_error_share": float((ig.error.abs() / ig.total.abs().clamp_min(1e-12)).mean()),
            "ig_seconds": t_ig,
            "atp_features": len(top),
            "atp_vs_exact_pearson": pearson,
            "atp_seconds": t_atp,
            "exact_seconds": t_exact,
            "exact_over_atp_time": t_exact / max(t_atp, 1e-9),
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
        table.to_csv(self.output / "feature_statistics.csv", index=False)
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
        (self.output / "cards.html").write_text(
            feature_cards_html(cards, title=f"Top matching features at {self.site}"),
            encoding="utf-8",
        )
        (self.output / "features.json").write_text(json.dumps(cards), encoding="utf-8")
        return {"top_matching": top.to_dict("list"), "dead": int((table.frequency == 0).sum())}

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
    rows.to_csv(study.output / "fidelity.csv", index=False)
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
    return s


build_parser = Features.parser
main = Features.main

if __name__ == "__main__":
    raise SystemExit(main())
