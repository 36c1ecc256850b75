"""The ``mechir`` console command: ``mechir score`` and ``mechir rerank``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mechir.data import Pair, Run, load_collection, read_run, write_run


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or local cross-encoder directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens per pair (default: model)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score (query, document) pairs")
    _add_model_args(s)
    s.add_argument("--query", action="append", default=[], help="query text (repeatable)")
    s.add_argument("--document", action="append", default=[], help="document text (repeatable)")
    s.add_argument("--pairs", type=Path, help="TSV file of 'query<TAB>document' lines")
    s.add_argument("--output", type=Path, help="write scores as JSON lines here (default: stdout)")

    r = sub.add_parser("rerank", help="rerank a collection's candidates and evaluate")
    _add_model_args(r)
    r.add_argument("--dataset", required=True, help="ir_datasets id or local collection directory")
    r.add_argument("--split", default=None, help="split of a local collection (test, quick, ...)")
    r.add_argument("--run", type=Path, default=None, help="first-stage TREC run (candidates)")
    r.add_argument("--depth", type=int, default=100, help="candidates per query from the run")
    r.add_argument("--limit-queries", type=int, default=None)
    r.add_argument("--measures", nargs="+", default=["nDCG@10"])
    r.add_argument("--output", type=Path, required=True, help="TREC run file to write (resumable)")
    return parser


def _score(args: argparse.Namespace) -> int:
    from mechir import load_cross_encoder

    queries, docs = list(args.query), list(args.document)
    if args.pairs:
        for n, line in enumerate(args.pairs.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                q, sep, d = line.partition("\t")
                if not sep:
                    raise SystemExit(f"{args.pairs}:{n}: expected 'query<TAB>document'")
                queries.append(q)
                docs.append(d)
    if not queries:
        raise SystemExit("nothing to score: give --query/--document or --pairs")
    model = load_cross_encoder(args.model, device=args.device)
    batch = model.encode(queries, docs, max_length=args.max_length)
    scores = model.score(batch, batch_size=args.batch_size).tolist()
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for q, d, s in zip(queries, docs, scores):
        out.write(json.dumps({"query": q, "document": d[:80], "score": s}) + "\n")
    if args.output:
        out.close()
    return 0


def _resume(path: Path, expected: dict[str, int]) -> Run:
    """Finished queries of an interrupted run file; an incomplete last query is dropped."""
    if not path.exists():
        return {}
    try:
        done = read_run(path)
    except ValueError:  # a torn last line
        lines = path.read_text(encoding="utf-8").splitlines()[:-1]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        done = read_run(path)
    complete = {q: docs for q, docs in done.items() if len(docs) == expected.get(q, -1)}
    if len(complete) != len(done):
        write_run(complete, path)
    return complete


def _rerank(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from mechir import load_cross_encoder
    from mechir.evaluation import evaluate, score_pairs

    col = load_collection(args.dataset, split=args.split, run=args.run)
    qids = col.query_ids(args.limit_queries)
    pairs = col.candidates(depth=args.depth, query_ids=qids)
    by_query: dict[str, list[Pair]] = {}
    for p in pairs:
        by_query.setdefault(p.qid, []).append(p)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    run = _resume(args.output, {q: len(ps) for q, ps in by_query.items()})
    todo = [q for q in by_query if q not in run]
    if run:
        print(f"resuming: {len(run)} queries already in {args.output}", file=sys.stderr)
    model = load_cross_encoder(args.model, device=args.device)
    with open(args.output, "a", encoding="utf-8") as f:
        for qid in tqdm(todo, desc="reranking", unit="query"):
            ps = by_query[qid]
            scores = score_pairs(
                model, ps, batch_size=args.batch_size, max_length=args.max_length, progress=False
            )
            ranked = sorted(zip(ps, scores.tolist()), key=lambda x: (-x[1], x[0].docid))
            f.write(
                "".join(
                    f"{qid} Q0 {p.docid} {i} {s:.6f} mechir\n" for i, (p, s) in enumerate(ranked, 1)
                )
            )
            f.flush()
            run[qid] = {p.docid: s for p, s in ranked}
    result = evaluate(run, col.qrels, args.measures)
    summary = {
        "model": args.model,
        "dataset": col.name,
        "queries": len(run),
        "pairs": len(pairs),
        **result.aggregate,
    }
    print(json.dumps(summary, indent=2))
    result.per_query.to_csv(args.output.with_suffix(".per_query.csv"), index=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return _score(args) if args.command == "score" else _rerank(args)


if __name__ == "__main__":
    raise SystemExit(main())
