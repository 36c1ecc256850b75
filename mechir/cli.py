"""The ``mechir`` console command: ``mechir score``, ``mechir rerank`` and ``mechir demo``.

Defaults for ``--model``, ``--dataset``, ``--split``, ``--run``, ``--depth``, ``--max-length``,
``--device`` and ``--batch-size`` can be set once in ``MECHIR_*`` environment variables or a
``mechir.toml`` (see :mod:`mechir.settings`). A user error (a bad option, a missing file, a
settings mismatch) prints one line and exits with status 2; ``--debug`` shows the traceback.

Only light modules are imported at start, so ``--help`` and argument errors answer at once;
torch, transformers and TransformerLens are imported when a command runs. A new subcommand is
one ``_<name>_parser`` function plus one handler registered in :data:`COMMANDS`; another package
adds one as a :class:`mechir.cli_plugins.Command` in the ``mechir.commands`` entry-point group
(``mechir demo`` comes from the studies this way: the library never imports them). What commands
and studies share (user errors, option types, common checks) is :mod:`mechir.cli_common`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mechir.cli_common import (
    PROG,
    OneLineParser,
    UsageError,
    add_execution_options,
    add_max_length_option,
    add_prompt_options,
    check_measures,
    check_output_writable,
    check_prompt_options,
    no_candidates_reason,
    positive_int,
    prompt_options,
    resolve_max_length,
    run_command,
)
from mechir.cli_plugins import _plugin_parser, plugin_commands
from mechir.interface import HookedReranker


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id, local cross-encoder directory or 'demo'")
    add_max_length_option(p)
    add_prompt_options(p)
    add_execution_options(p)


def _score_parser(sub: Any) -> argparse.ArgumentParser:
    s = sub.add_parser("score", help="score (query, document) pairs")
    _common(s)
    s.add_argument("--query", action="append", default=[], help="query text (repeatable)")
    s.add_argument("--document", action="append", default=[], help="document text (repeatable)")
    s.add_argument("--pairs", type=Path, help="TSV file of 'query<TAB>document' lines")
    s.add_argument("--output", type=Path, help="write scores as JSON lines here (default: stdout)")
    return s


def _rerank_parser(sub: Any) -> argparse.ArgumentParser:
    r = sub.add_parser(
        "rerank",
        help="rerank a collection's candidates and evaluate (resumable)",
        description="Rerank the first-stage candidates of a collection's judged queries and "
        "evaluate. Finished queries are kept losslessly in OUTPUT.mechir.jsonl (locked, settings "
        "checked), so the same command resumes an interrupted run; the TREC run OUTPUT is "
        "written from it when every selected query is done.",
    )
    _common(r)
    r.add_argument(
        "--dataset", required=True, help="ir_datasets id, local collection directory or 'demo'"
    )
    r.add_argument("--split", default=None, help="split of a local collection (test, quick, ...)")
    r.add_argument("--run", type=Path, default=None, help="first-stage TREC run (candidates)")
    r.add_argument(
        "--depth", type=positive_int, default=100, help="candidates per query from the run"
    )
    r.add_argument(
        "--limit-queries", type=positive_int, default=None, help="first N judged queries only"
    )
    r.add_argument("--measures", nargs="+", default=["nDCG@10"])
    r.add_argument("--output", type=Path, required=True, help="TREC run file to write")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return r


def build_parser(
    defaults: dict[str, Any] | None = None, *, plugins: bool = True
) -> argparse.ArgumentParser:
    """The ``mechir`` parser with ``defaults`` (from :func:`mechir.settings.user_defaults`);
    ``plugins``: with the commands of other packages (:func:`plugin_commands`; finding them
    scans the installed distributions' entry points, tens of milliseconds)."""
    from mechir.settings import apply_defaults

    parser = OneLineParser(
        prog=PROG, description=__doc__.split("\n\n")[0], parents=[], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for build in (_score_parser, _rerank_parser):
        apply_defaults(build(sub), defaults or {})
    for name, command in plugin_commands().items() if plugins else ():
        if name not in COMMANDS:
            apply_defaults(_plugin_parser(sub, name, command), defaults or {})
    return parser


# ---------------------------------------------------------------------- score
def _score_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """The pairs to score, ``(queries, documents, where)``: the ``--query``/``--document``
    pairs, then the ``--pairs`` file's lines; ``where`` names each pair's origin.

    Raises:
        UsageError: unpaired options, a malformed or empty ``--pairs`` file, nothing to score,
            an empty query or document (naming where).
    """
    queries, docs = list(args.query), list(args.document)
    if len(queries) != len(docs):
        raise UsageError(f"{len(queries)} --query but {len(docs)} --document; give them in pairs")
    where = [f"--query/--document pair {i}" for i in range(1, len(queries) + 1)]
    if args.pairs:
        given = len(queries)
        from mechir.data import text_lines  # a byte that is not UTF-8: its file and line

        for n, line in text_lines(args.pairs):
            if line.strip():
                q, sep, d = line.partition("\t")
                if not sep:
                    raise UsageError(f"{args.pairs}:{n}: expected 'query<TAB>document'")
                queries.append(q)
                docs.append(d)
                where.append(f"{args.pairs}:{n}")
        if len(queries) == given:
            raise UsageError(
                f"--pairs {args.pairs} holds no pairs (the file is empty or blank); expected "
                "'query<TAB>document' lines"
            )
    if not queries:
        raise UsageError("nothing to score: give --query/--document or --pairs")
    for origin, q, d in zip(where, queries, docs):
        for what, text in (("query", q), ("document", d)):
            if not text.strip():
                raise UsageError(f"{origin}: the {what} is empty")
    return queries, docs, where


#: What a refusal to write over a file mechir did not write tells the user of a command.
OUTPUT_ADVICE = "choose another --output or move the file away"


def truncated_pairs(tokenizer: Any, batch: Any, documents: Sequence[str]) -> list[int]:
    """Indices of the pairs of ``batch`` whose document was cut to fit the max length: fewer
    document tokens in the batch than ``tokenizer`` gives for the whole document."""
    from mechir.parts import Part

    kept = (batch.parts == int(Part.DOCUMENT)).sum(-1).tolist()
    full = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return [i for i, (k, ids) in enumerate(zip(kept, full)) if k < len(ids)]


def _score(args: argparse.Namespace) -> int:
    from mechir.settings import check_device

    queries, docs, where = _score_inputs(args)
    if args.output:
        from mechir import outputs

        check_output_writable(args.output)
        outputs.check_writable(args.output, advice=OUTPUT_ADVICE)
    check_device(args.device)
    max_length = resolve_max_length(args.model, args.max_length)
    check_prompt_options(args)

    from mechir.loading import load_cross_encoder

    model = load_cross_encoder(args.model, device=args.device, **prompt_options(args))
    batch = model.encode(queries, docs, max_length=max_length)
    scores = model.score(batch, batch_size=args.batch_size).tolist()
    lines = [
        json.dumps({"query": q, "document": d[:80], "score": s})
        for q, d, s in zip(queries, docs, scores)
    ]
    text = "".join(line + "\n" for line in lines)
    if args.output:
        outputs.write_text(args.output, text, advice=OUTPUT_ADVICE)
    else:
        sys.stdout.write(text)
    cut = truncated_pairs(model.tokenizer, batch, docs)
    if cut:
        print(
            f"{PROG} score: {len(cut)} of {len(queries)} pairs truncated to "
            f"{max_length or model.max_length} tokens (the document cut to fit --max-length; "
            f"first: {where[cut[0]]})",
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------- rerank
def _normalised_source(value: Any) -> Any:
    """Local paths as absolute paths, other values (hub ids, ir_datasets ids) as given."""
    if value is None:
        return None
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what creating ``path``
    makes, for :func:`remove_empty_dirs` after a failed run)."""
    path = Path(path).absolute()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(dirs: Sequence[Path]) -> None:
    """Remove each of ``dirs`` (deepest first) that is empty; leave the others alone."""
    for directory in dirs:
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): it holds something else, keep it
            pass


class RerankOutput:
    """The files of one ``mechir rerank --output OUTPUT``: the lossless store
    ``OUTPUT.mechir.jsonl`` (one line per query: candidate ids and full-precision scores), its
    settings ``OUTPUT.mechir.json`` and what mechir wrote from it (``OUTPUT``, the TREC run,
    and ``OUTPUT.per_query.csv``). The settings, the run and the CSV are written through
    :mod:`mechir.outputs`: a file mechir did not write, or that was changed since, is never
    modified.

    The store's lock is taken first; the settings are read and checked under it. A store
    without results (none stored, no shards) adopts the settings of the run that opens it. One
    process writes nothing before the model is loaded (:meth:`check_scoring`), and a run that
    fails before its first query is stored removes what it created (:meth:`discard`), so the
    corrected command starts afresh. Under torchrun rank 0 writes the settings at once
    (:meth:`save`: every rank's shard then has them) and a failed run only releases the lock.

    Raises:
        mechir.outputs.ForeignFileError: ``OUTPUT``, the CSV or the settings file exists and
            mechir did not write it (or it was changed since).
        ConfigMismatchError: the store holds results computed with other settings.
        StoreLockedError: another process writes the same output.
    """

    def __init__(self, output: Path, settings: dict[str, Any]):
        from mechir.store import ResultsStore

        self.output = Path(output)
        self.csv = self.output.with_suffix(".per_query.csv")
        self.meta_path = self.output.with_name(self.output.name + ".mechir.json")
        self._new_dirs = missing_dirs(self.output.parent)
        self._new_store = not self.store_path(self.output).exists()
        try:
            self.store = ResultsStore(self.store_path(self.output))
        except BaseException:
            remove_empty_dirs(self._new_dirs)
            raise
        try:
            self._open(settings)
        except BaseException:
            self.store.close()
            remove_empty_dirs(self._new_dirs)
            raise

    def _open(self, settings: dict[str, Any]) -> None:
        from mechir import outputs
        from mechir.store import ConfigMismatchError, config_diff

        for path in (self.meta_path, self.output, self.csv):
            outputs.check_writable(path, advice=OUTPUT_ADVICE)
        self._new_meta = not self.meta_path.exists()
        saved = None if self._new_meta else json.loads(self.meta_path.read_text(encoding="utf-8"))
        if saved is None and self.has_results():
            raise UsageError(
                f"{self.store.path} has results but {self.meta_path} (their settings) is missing; "
                "choose another --output"
            )
        # the score type is known once the model is loaded: checked by check_scoring
        scored = dict(saved.get("settings", {})) if saved and self.has_results() else {}
        score_type = scored.pop("score_type", None)
        diff = config_diff(scored, settings) if scored else []
        if diff:
            raise ConfigMismatchError(
                f"{self.store.path} holds results computed with other settings ("
                + "; ".join(diff)
                + "); rerun with the same settings to resume, or choose another --output"
            )
        self.settings = settings if score_type is None else {**settings, "score_type": score_type}
        #: the run and the CSV were written (by this run or an earlier one)
        self.written = self.output.exists() or self.csv.exists()

    @staticmethod
    def store_path(output: Path) -> Path:
        """The lossless store of ``--output OUTPUT``: ``OUTPUT.mechir.jsonl`` (under torchrun
        each rank appends to its shard ``OUTPUT.mechir.rank<r>.jsonl`` beside it)."""
        return Path(output).with_name(Path(output).name + ".mechir.jsonl")

    def has_results(self) -> bool:
        """Whether the store holds a query, or ranks of an earlier run left shards."""
        from mechir.store import shard_paths

        return bool(len(self.store) or shard_paths(self.store.path))

    def save(self) -> None:
        """Write the settings file (``OUTPUT.mechir.json``) as they stand."""
        from mechir import outputs

        outputs.write_json(self.meta_path, {"settings": self.settings}, advice=OUTPUT_ADVICE)

    def check_scoring(self, score_type: str) -> None:
        """Record the model's score type, or check it against the stored one."""
        check_score_type(self.settings.get("score_type"), score_type, self.store.path)
        self.settings = {**self.settings, "score_type": score_type}
        self.save()

    def write(self, run: dict[str, dict[str, float]], per_query: Any) -> None:
        """Write the TREC run (full precision) and the per-query CSV atomically."""
        from mechir import outputs
        from mechir.data import format_run

        outputs.write_text(self.output, format_run(run, exact=True), advice=OUTPUT_ADVICE)
        outputs.write_csv(per_query, self.csv, advice=OUTPUT_ADVICE)
        self.written = True
        self.save()

    def discard(self) -> None:
        """After a failed run: when no result was stored and nothing written, remove the
        settings file and store file this run created, release the lock and remove the
        directories this run created (if empty); otherwise only release the lock (a store with
        real results stays)."""
        from mechir import outputs

        if not self.has_results() and not self.written:
            if self._new_meta:
                outputs.remove(self.meta_path)  # only if mechir wrote it
            if self._new_store:
                self.store.path.unlink(missing_ok=True)
        self.close()
        remove_empty_dirs(self._new_dirs)

    def close(self) -> None:
        self.store.close()


def check_score_type(saved: str | None, score_type: str, store_path: Path) -> None:
    """Raise :class:`~mechir.store.ConfigMismatchError` when the store at ``store_path`` holds
    scores of another type (``saved``; None: nothing recorded yet) than the model gives now."""
    from mechir.store import ConfigMismatchError

    if saved is not None and saved != score_type:
        raise ConfigMismatchError(
            f"{store_path} holds scores of type {saved!r}, the model now scores "
            f"{score_type!r}; choose another --output"
        )


def _rerank(args: argparse.Namespace) -> int:
    from mechir.data import Pair, load_collection
    from mechir.model_files import weights_fingerprint
    from mechir.settings import check_device

    check_output_writable(args.output)
    check_device(args.device)
    check_measures(args.measures)
    max_length = resolve_max_length(args.model, args.max_length)
    check_prompt_options(args)
    col = load_collection(args.dataset, split=args.split, run=args.run)
    qids = col.query_ids(args.limit_queries)
    by_query: dict[str, list[Pair]] = {}
    for p in col.candidates(depth=args.depth, query_ids=qids):
        by_query.setdefault(p.qid, []).append(p)
    for p in (p for ps in by_query.values() for p in ps):
        for what, text in (("query", p.query), ("document", p.document)):
            if not text.strip():
                raise UsageError(
                    f"{col.name}: the {what} of query {p.qid!r}, document {p.docid!r} is empty; "
                    "remove the pair from the run or fix the collection"
                )
    if not by_query:
        raise UsageError(no_candidates_reason(col, qids, args.dataset, args.split))
    settings = {
        "model": _normalised_source(args.model),
        "weights": weights_fingerprint(args.model),
        "dataset": _normalised_source(args.dataset),
        "split": args.split,
        "run": _normalised_source(args.run),
        "depth": args.depth,
        "max_length": max_length,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in prompt_options(args).items()},
    }
    if _launched():  # torchrun: one device per local rank unless --device says
        from mechir import distributed

        args.device = str(distributed.init_from_env(args.device))
        if distributed.world_size() > 1:
            status = _rerank_on_ranks(args, col, by_query, max_length, settings)
            import torch.distributed as dist

            dist.destroy_process_group()
            return status
    out = RerankOutput(args.output, settings)
    try:
        todo = _unfinished(out, by_query)
        if todo or "score_type" not in out.settings:
            model = _load_model(args, out.settings.get("score_type"), out.store.path)
            check_queries_fit(model, by_query, todo, max_length)
            out.check_scoring(model.score_type)
            _score_queries(args, model, out.store, by_query, todo, max_length, unfinished=len(todo))
        return _finish(args, out, col, by_query)
    except BaseException:
        out.discard()
        raise
    finally:
        out.close()


def _launched() -> bool:
    """Whether torchrun (or another launcher) started this process (``RANK`` and
    ``WORLD_SIZE`` set); checked without importing torch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _log(message: str) -> None:
    """A line on stderr, prefixed ``[rank r/w]`` under a process group of several ranks."""
    if _launched():
        from mechir import distributed

        distributed.log(message)
    else:
        print(message, file=sys.stderr)


def _unfinished(out: RerankOutput, by_query: dict[str, list[Any]]) -> list[str]:
    """The selected queries not yet in ``out.store``, after merging the per-rank shards an
    interrupted torchrun run left (any number of ranks).

    Raises:
        ConfigMismatchError: a stored query was scored on other candidates than the run gives.
    """
    from mechir.store import ConfigMismatchError, merge_shards

    if out.store.dropped_torn_line:
        _log(f"{out.store.path}: dropped a torn last line left by an interruption")
    merged = merge_shards(out.store, list(by_query))
    if merged:
        _log(f"{out.store.path}: merged {merged} queries from the shards of an earlier run")
    for qid, stored in ((q, out.store.get(q)) for q in by_query):
        if stored is not None and stored["docids"] != [p.docid for p in by_query[qid]]:
            raise ConfigMismatchError(
                f"{out.store.path}: query {qid} was scored on other candidates than the run "
                "gives now; choose another --output"
            )
    todo = [q for q in by_query if q not in out.store]
    if len(todo) < len(by_query):
        _log(
            f"resuming: {len(by_query) - len(todo)} of {len(by_query)} queries already in "
            f"{out.store.path}"
        )
    return todo


def check_queries_fit(
    model: HookedReranker,
    by_query: dict[str, list[Any]],
    qids: Sequence[str],
    max_length: int | None,
) -> None:
    """Every query of ``qids`` leaves room for a document within ``max_length`` (checked with
    the model's own encoding before anything is scored or stored).

    Raises:
        UsageError: naming the query, its length and the ``--max-length`` to raise.
    """
    texts = {qid: by_query[qid][0].query for qid in qids}
    if not texts:
        return
    try:  # with a one-token document, encoding fails only for a query that leaves no room
        model.encode(list(texts.values()), ["x"] * len(texts), max_length=max_length)
    except ValueError:
        for qid, text in texts.items():
            try:
                model.encode([text], ["x"], max_length=max_length)
            except ValueError as err:
                reason = str(err).removeprefix("pair 0: ")
                raise UsageError(f"query {qid!r}: {reason} (--max-length)") from None
        raise


def _load_model(args: argparse.Namespace, saved_score_type: str | None, store_path: Path) -> Any:
    """The cross-encoder of ``--model``, its score type checked against the stored one."""
    from mechir.loading import load_cross_encoder

    model = load_cross_encoder(
        args.model, device=args.device, progress=args.progress, **prompt_options(args)
    )
    check_score_type(saved_score_type, model.score_type, store_path)
    return model


def _rerank_on_ranks(
    args: argparse.Namespace,
    col: Any,
    by_query: dict[str, list[Any]],
    max_length: int | None,
    settings: dict[str, Any],
) -> int:
    """``mechir rerank`` under a process group of several ranks.

    Rank 0 alone opens the output (lock, settings, foreign files; merges shards an interrupted
    run left) and finds the unfinished queries; every rank learns them (or rank 0's error) from
    one all-gather. Rank ``r`` of ``w`` scores the unfinished queries ``r, r + w, ...`` into its
    own shard (no two processes append to one file; ``score_pairs`` runs unsharded inside);
    after a barrier rank 0 merges the shards in query order and writes the TREC run, the CSV and
    the summary. The other ranks print rank-prefixed log lines only.
    """
    from mechir import distributed
    from mechir.store import ResultsStore, shard_path

    out: RerankOutput | None = None
    opened: tuple[Exception | None, list[str], str | None] = (None, [], None)
    if distributed.is_main():
        try:
            out = RerankOutput(args.output, settings)
            out.save()  # before any rank can store a query in its shard (no discard here)
            todo = _unfinished(out, by_query)
            opened = (None, todo, out.settings.get("score_type"))
        except Exception as err:  # every rank raises it: none waits at a barrier forever
            opened = (err, [], None)
    error, todo, score_type = distributed.all_gather_objects(opened)[0]
    try:
        if error is not None:
            raise error
        store_path = RerankOutput.store_path(args.output)
        if not distributed.is_main():  # no weight-loading bars from the other ranks
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if todo or score_type is None:
            model = _load_model(args, score_type, store_path)
            check_queries_fit(model, by_query, todo, max_length)  # every rank, all queries
            if out is not None:
                out.check_scoring(model.score_type)
            mine = distributed.shard(todo)
            shard = ResultsStore(shard_path(store_path, distributed.rank()))
            try:
                _score_queries(args, model, shard, by_query, mine, max_length, unfinished=len(todo))
            finally:
                shard.close()
            if not distributed.is_main():
                distributed.log(f"scored {len(mine)} of {len(todo)} queries into {shard.path}")
        distributed.barrier()
        if out is None:
            return 0
        return _finish(args, out, col, by_query)
    finally:  # no discard: another rank may still store a query (a stub is adopted later)
        if out is not None:
            out.close()


def _finish(
    args: argparse.Namespace, out: RerankOutput, col: Any, by_query: dict[str, list[Any]]
) -> int:
    """Merge the ranks' shards (if any), put the selected queries in query order (as one
    process writes them), evaluate, write the TREC run and CSV, print the summary."""
    from mechir.evaluation import evaluate
    from mechir.store import merge_shards

    merge_shards(out.store, list(by_query))
    out.store.reorder(list(by_query))
    stored = {row["unit"]: dict(zip(row["docids"], row["scores"])) for row in out.store}
    missing = [q for q in by_query if q not in stored]
    if missing:
        raise RuntimeError(
            f"{len(missing)} queries (first {missing[0]!r}) are missing from {out.store.path} "
            "after every rank finished; rerun the same command to compute them"
        )
    selected = {q: stored[q] for q in by_query}
    result = evaluate(selected, col.qrels, args.measures)
    out.write(stored, result.per_query)
    summary = {
        "model": args.model,
        "dataset": col.name,
        "score_type": out.settings["score_type"],
        "queries": len(selected),
        "pairs": sum(len(ps) for ps in by_query.values()),
        "queries_in_output": len(stored),
        **result.aggregate,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _score_queries(
    args: argparse.Namespace,
    model: HookedReranker,
    store: Any,
    by_query: dict[str, list[Any]],
    todo: list[str],
    max_length: int | None,
    *,
    unfinished: int,
) -> None:
    """Score each query of ``todo`` and add it to ``store`` as one unit (full precision).

    Under a process group each rank passes its share of the unfinished queries; the pairs of
    one query are scored on this rank alone (no sharding inside), and the progress bar (rank 0
    only) counts its share times the number of ranks toward the ``unfinished`` queries of all
    ranks, after the ``len(by_query) - unfinished`` already stored."""
    from mechir import distributed
    from mechir.evaluation import score_pairs

    with (
        distributed.progress_bar(
            len(by_query),
            initial=len(by_query) - unfinished,
            desc="reranking",
            unit="query",
            disable=not args.progress,
        ) as bar,
        distributed.local(),
    ):
        for qid in todo:
            pairs = by_query[qid]
            try:
                scores = score_pairs(
                    model, pairs, batch_size=args.batch_size, max_length=max_length, progress=False
                )
            except ValueError as err:
                raise ValueError(f"query {qid}: {err}") from err
            store.add(qid, {"docids": [p.docid for p in pairs], "scores": scores.tolist()})
            bar.update()


# ---------------------------------------------------------------------- entry point
#: Subcommand name -> handler (the built-in commands; others: :func:`plugin_commands`).
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "score": _score,
    "rerank": _rerank,
}


def _dispatch(args: argparse.Namespace) -> int:
    run = getattr(args, "_run", None) or COMMANDS[args.command]
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mechir <command> ...``; returns the exit status (0, 2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv

    def parse() -> argparse.Namespace:
        from mechir.settings import user_defaults

        builtin = bool(argv) and argv[0] in COMMANDS  # no entry-point scan for score/rerank
        return build_parser(user_defaults(), plugins=not builtin).parse_args(argv)

    prog = PROG
    if _launched() and os.environ["RANK"] != "0":  # torchrun: errors of other ranks are prefixed
        prog = f"[rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}] {PROG}"
    return run_command(_dispatch, parse, prog=prog, debug=debug)


if __name__ == "__main__":  # python -m mechir.cli: run the imported module (one Command class)
    raise SystemExit(importlib.import_module("mechir.cli").main())
