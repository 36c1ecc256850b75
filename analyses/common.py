"""What every bundled study shares: command-line options, the output directory with its config
check, model and collection loading, and the resumable loop over units of work.

A study is run as ``python -m analyses.<study> [options]``. Its output directory (default
``results/<study>/<run-name>/``) holds:

- ``config.json`` -- the options that determine the results (model and a fingerprint of its
  weights, dataset, split, depth, queries, max length, seed and the study's own settings) and,
  separately, the runtime options of the latest run (device, batch size). Rerunning into a
  directory whose ``config.json`` differs in a result-determining option is an error
  (:class:`ConfigMismatchError`), never a silent mix;
- ``results.jsonl`` -- one line per finished unit of work (:class:`~mechir.store.ResultsStore`);
  units already there are skipped, so the same command resumes an interrupted run;
- ``timings.jsonl`` -- the seconds each unit took, kept apart from the results so that
  identical runs write byte-identical ``results.jsonl`` and tables;
- ``summary.md`` / ``summary.json``, CSV tables and PNG plots, written once every unit is done,
  through :mod:`mechir.outputs` (as ``config.json``): a file there that mechir did not write,
  or that was edited since, is never modified (recorded in ``.mechir-outputs.json``).

Under ``torchrun --nproc_per_node N -m analyses.<study>`` the unfinished units are split across
the ranks (strided, in unit order); each rank appends to its own shard ``results.rank<r>.jsonl``
and rank 0 merges the shards into ``results.jsonl`` and alone writes the tables, plots and
summary (:func:`writes_outputs`). Shards left by a killed run are merged when the directory is
next opened, with any number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechir import outputs
from mechir.cli import missing_dirs, remove_empty_dirs
from mechir.cli_common import (
    PROMPT_OPTIONS,
    OneLineParser,
    add_execution_options,
    add_max_length_option,
    add_prompt_options,
    check_output_writable,
    check_prompt_options,
    no_candidates_reason,
    positive_int,
    prompt_options,
    resolve_max_length,
    run_command,
)
from mechir.lazy import lazy_import
from mechir.store import (
    ConfigMismatchError,
    ResultsStore,
    config_diff,
    merge_shards,
    shard_path,
    shard_paths,
)

distributed = lazy_import("mechir.distributed")

DEFAULT_MODEL = "castorini/monobert-large-msmarco"
DEFAULT_DATASET = "msmarco-passage/trec-dl-2019/judged"
DEFAULT_RESULTS = Path("results")

#: Options that change how a run executes but not what it computes (not checked on resume).
RUNTIME_OPTIONS: frozenset[str] = frozenset(
    {"device", "batch_size", "output", "run_name", "max_units", "progress", "func", "debug"}
    | {"preset"}  # a preset's values are recorded, not its name
)


#: What a refusal to write over a file mechir did not write tells the user of a study.
OUTPUT_ADVICE = (
    "choose another --output (or --run-name) or move the file away, then rerun (finished "
    "units are kept)"
)


class UsageError(ValueError):
    """A study option is invalid (reported as a clean error, without a traceback)."""


# ---------------------------------------------------------------------- options
class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default, except for flags, None and help texts that already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "(default" in text:
            return text
        return super()._get_help_string(action)


class PresetParser(OneLineParser):
    """A study's parser with ``--preset NAME``: the preset's values become the defaults of the
    options it names, so options given on the command line still win (in any order)."""

    def __init__(self, *args: Any, presets: Mapping[str, Mapping[str, Any]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.presets = {k: dict(v) for k, v in presets.items()}
        self.add_argument(
            "--preset",
            choices=sorted(self.presets),
            default=None,
            help="a named setting: "
            + "; ".join(f"{k}: {_preset_text(v)}" for k, v in self.presets.items())
            + " (options given on the command line still win)",
        )

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = sys.argv[1:] if args is None else list(args)
        probe = argparse.ArgumentParser(add_help=False)
        probe.add_argument("--preset", default=None)
        chosen = probe.parse_known_args(argv)[0].preset
        if chosen not in self.presets:  # none, or an unknown name refused by the parse
            return super().parse_known_args(argv, namespace)
        preset = self.presets[chosen]
        saved = {dest: self.get_default(dest) for dest in preset}
        self.set_defaults(**preset)
        try:
            return super().parse_known_args(argv, namespace)
        finally:  # the parser itself keeps its own defaults
            self.set_defaults(**saved)


def _preset_text(values: Mapping[str, Any]) -> str:
    """``{"limit_queries": 4, "matching": False}`` -> ``"limit-queries 4, matching off"``."""
    parts = []
    for dest, value in values.items():
        if isinstance(value, bool):
            shown = "on" if value else "off"
        elif isinstance(value, (list, tuple)):
            shown = " ".join(map(str, value))
        else:
            shown = value
        parts.append(f"{dest.replace('_', '-')} {shown}")
    return ", ".join(parts)


def study_parser(
    study: str,
    description: str | None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> argparse.ArgumentParser:
    """An argument parser with the options every study shares (its own are added by the study),
    and ``--preset`` when the study names ``presets`` (name -> option destination -> value).

    Defaults name the papers' setting: MonoBERT-large on TREC DL 2019 (judged queries), BM25
    top-100 candidates.
    """
    common = dict(
        prog=f"python -m analyses.{study}",
        description=description,
        formatter_class=_DefaultsHelpFormatter,
    )
    parser = PresetParser(**common, presets=presets) if presets else OneLineParser(**common)
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local directory or 'demo'")
    g.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="ir_datasets id, local collection directory (docs.tsv, queries*.tsv, ...) or 'demo'",
    )
    g.add_argument("--split", default=None, help="split of a local collection (test, quick, ...)")
    g.add_argument("--run", default=None, help="first-stage TREC run to take candidates from")
    g.add_argument(
        "--depth", type=positive_int, default=100, help="candidates per query (first stage)"
    )
    g.add_argument(
        "--limit-queries", type=positive_int, default=None, help="first N judged queries only"
    )
    add_max_length_option(g)
    add_prompt_options(g)
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    r = parser.add_argument_group("execution")
    add_execution_options(r)
    r.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output directory (default: results/<study>/<run-name>/)",
    )
    r.add_argument(
        "--run-name",
        default=None,
        help="name of the default output directory (default: from model, dataset and split)",
    )
    r.add_argument(
        "--max-units",
        type=positive_int,
        default=None,
        help="compute at most N new units of work, then stop (rerun to continue)",
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def slug(text: str) -> str:
    """A file-name-safe short name: ``"../shared/models/minilm-l6"`` -> ``"minilm-l6"``."""
    text = str(text).rstrip("/")
    if Path(text).exists():
        text = Path(text).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def default_run_name(args: argparse.Namespace, *extra: str) -> str:
    """``<model>__<dataset>[-<split>][__<extra>...]``, e.g. ``monobert-large-msmarco__...``."""
    dataset = slug(args.dataset) + (f"-{args.split}" if args.split else "")
    return "__".join([slug(args.model), dataset, *[slug(e) for e in extra if e]])


def output_dir(args: argparse.Namespace, study: str, *extra: str) -> Path:
    """``--output`` or ``results/<study>/<--run-name or default_run_name(args, *extra)>``."""
    if args.output is not None:
        return Path(args.output)
    return DEFAULT_RESULTS / study / (args.run_name or default_run_name(args, *extra))


def _normalise(value: Any) -> Any:
    """Local paths as absolute paths (so ``../x`` and ``/abs/x`` compare equal); JSON types."""
    if isinstance(value, Path) or (
        isinstance(value, str) and value and os.path.exists(value) and os.sep in value
    ):
        return str(Path(value).resolve())
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def study_config(args: argparse.Namespace, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The result-determining options of ``args``: everything except runtime options and
    ``exclude`` (a study's work-list options, whose units are keyed by what they compute)."""
    skip = RUNTIME_OPTIONS | set(exclude)
    config = {
        k: _normalise(v)
        for k, v in sorted(vars(args).items())
        if k not in skip and not k.startswith("_") and not (k in PROMPT_OPTIONS and v is None)
    }
    return json.loads(json.dumps(config))


# ---------------------------------------------------------------------- the output directory
def prepare_output(
    output: Path,
    study: str,
    config: dict[str, Any],
    runtime: dict[str, Any],
    command: str = "",
) -> dict[str, Any]:
    """Create ``output`` and its ``config.json``, or check an existing one matches ``config``.

    The caller holds the lock of ``output``'s results store (:func:`open_study` takes it first),
    so that no other run checks or writes ``config.json`` in between.

    Raises:
        ConfigMismatchError: the directory belongs to another study, was computed with other
            result-determining options, or holds results without a ``config.json``.
    """
    output.mkdir(parents=True, exist_ok=True)
    path = output / "config.json"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    saved = read_study_record(output, study)
    if saved is not None:
        diff = config_diff(saved.get("config", {}), config)
        if diff:
            raise ConfigMismatchError(
                f"{output} holds results computed with other options ("
                + "; ".join(diff)
                + "). Rerun with the same options to resume, or choose another --output or "
                "--run-name for the new setting."
            )
        created = saved.get("created", now)
    else:
        if (output / "results.jsonl").exists():
            raise ConfigMismatchError(
                f"{output} has results.jsonl but no config.json, so its setting is unknown; "
                "use another --output"
            )
        created = now
    record = {
        "study": study,
        "config": config,
        "runtime": runtime,
        "versions": _versions(),
        "created": created,
        "updated": now,
        "command": command,
    }
    outputs.write_json(path, record, advice=OUTPUT_ADVICE)
    return record


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mechir", "torch", "transformer-lens", "transformers", "ir-measures"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def read_study_record(output: Path, study: str | None = None) -> dict[str, Any] | None:
    """The ``config.json`` record of the study output directory ``output`` (None when there is
    none), checked to be a study record (of ``study``, when given).

    Raises:
        ConfigMismatchError: one line naming the file and the cause: it is not UTF-8 JSON, not
            a study record (a JSON object with ``"study"`` and ``"config"``), or the record of
            another study.
    """
    path = Path(output) / "config.json"
    if not path.exists():
        return None
    advice = "choose another --output or move the file away"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigMismatchError(
            f"{path} is not JSON ({err}), so not a mechir study record; {advice}"
        ) from None
    except OSError as err:
        raise ConfigMismatchError(f"{path} cannot be read ({err.strerror}); {advice}") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("study"), str)
        or not isinstance(record.get("config"), dict)
    ):
        raise ConfigMismatchError(
            f'{path} is JSON but not a mechir study record (no "study" and "config" '
            f"entries); {advice}"
        )
    if study is not None and record["study"] != study:
        raise ConfigMismatchError(
            f"{output} holds results of study {record['study']!r}, not {study!r} (see {path}); "
            "use another --output"
        )
    return record


# ---------------------------------------------------------------------- a study run
@dataclass
class StudyRun:
    """An opened study output directory: where to write, what was asked, what is done.

    Leaving its ``with`` block by an exception before any unit was stored removes what the
    run created (:meth:`discard`), so that the corrected command starts afresh."""

    study: str
    args: argparse.Namespace
    output: Path
    config: dict[str, Any]
    store: ResultsStore
    #: what opening the study created: directories, and whether config.json / results.jsonl
    new_dirs: list[Path] = field(default_factory=list)
    new_files: tuple[bool, bool] = (False, False)

    def close(self) -> None:
        self.store.close()

    def discard(self) -> None:
        """After a failed run (one process): when no unit is stored, remove the ``config.json``
        and ``results.jsonl`` this run created, release the lock and remove the directories it
        created (if empty); a directory with results keeps everything. Under torchrun only the
        lock is released (another rank may still store a unit)."""
        alone = distributed.world_size() == 1
        if alone and not len(self.store) and not shard_paths(self.store.path):
            if self.new_files[0]:
                outputs.remove(self.output / "config.json")  # only if mechir wrote it
            if self.new_files[1]:
                self.store.path.unlink(missing_ok=True)  # empty: no unit is stored
        self.close()
        if alone:
            remove_empty_dirs(self.new_dirs)

    def __enter__(self) -> StudyRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def open_study(
    study: str,
    args: argparse.Namespace,
    *,
    work_options: Iterable[str] = (),
    run_name_extra: Sequence[str] = (),
) -> StudyRun:
    """Resolve the output directory, check or save its config and open its results store.

    ``work_options`` name the study's options that only choose *which* units to compute (units
    are keyed by what they compute, so such lists may grow between runs of one directory).
    """
    from mechir.model_files import weights_fingerprint

    output = output_dir(args, study, *run_name_extra)
    # the weights' fingerprint makes weights replaced in place a config mismatch
    config = {
        **study_config(args, exclude=work_options),
        "weights": weights_fingerprint(args.model),
    }
    runtime = {
        k: _normalise(v) for k, v in vars(args).items() if k not in config and not k.startswith("_")
    }
    runtime = json.loads(json.dumps(runtime, default=str))
    argv = getattr(args, "_argv", None)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", f"analyses.{study}", *map(str, argv)])
    new_dirs = missing_dirs(output)
    new_files = (not (output / "config.json").exists(), not (output / "results.jsonl").exists())
    if distributed.world_size() == 1:
        store = _open_store(output, study, config, runtime, command)
    else:  # rank 0 checks the directory and merges old shards; the others read its store
        opened: Any = None
        if distributed.is_main():
            try:
                opened = _open_store(output, study, config, runtime, command)
            except Exception as err:  # every rank raises it, none waits forever
                opened = err
        error = distributed.all_gather_objects(opened if isinstance(opened, Exception) else None)
        if error[0] is not None:
            raise error[0]
        store = (
            opened if distributed.is_main() else ResultsStore(output / "results.jsonl", lock=False)
        )
    return StudyRun(study, args, output, config, store, new_dirs, new_files)


def _open_store(
    output: Path, study: str, config: dict[str, Any], runtime: dict[str, Any], command: str
) -> ResultsStore:
    """Take the results store's lock, then check or write ``config.json`` and merge the shards
    of an earlier run: two runs started at once never both pass the check, so ``config.json``
    and ``results.jsonl`` always describe one setting."""
    output.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(output / "results.jsonl")  # the lock first (StoreLockedError)
    try:
        prepare_output(output, study, config, runtime, command)
        if store.dropped_torn_line:
            print(f"{output}: dropped a torn last line left by an interruption", file=sys.stderr)
        merged = merge_shards(store)
    except BaseException:
        store.close()
        raise
    if merged:
        print(f"{output}: merged {merged} units from the shards of an earlier run", file=sys.stderr)
    return store


def check_study_args(args: argparse.Namespace, study: str) -> None:
    """Cheap checks before anything is loaded: the device exists, the output directory can be
    written, ``--max-length`` fits the model (and defaults to what its directory records).

    Raises:
        UsageError: naming the offending value.
    """
    from mechir.settings import check_device

    check_device(args.device)
    out = output_dir(args, study)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; give a directory")
    check_output_writable(out / "config.json")
    args.max_length = resolve_max_length(args.model, args.max_length)
    check_prompt_options(args)


#: What a study may need of the model's family, as :class:`~mechir.models.Family` declares it.
FAMILY_NEEDS = ("cross_encoder", "edge_circuits")


def require_family(family: Any, name: str, study: str, needs: Iterable[str]) -> None:
    """Refuse in one line a model whose family lacks what ``study`` needs (``needs``: names of
    :data:`FAMILY_NEEDS`): ``"cross_encoder"``, a cross-encoder's [CLS] token, pair layout and
    embedding matrix (``family.kind == "encoder"``: not MonoT5 nor LLM rerankers);
    ``"edge_circuits"``, blocks the edge engine follows (``family.edge_circuits``). ``family``
    None (a hub id not yet downloaded) passes: the study checks again once the model is loaded.

    Raises:
        UsageError: naming the model, its family and what to run instead.
    """
    if family is None:
        return
    needs = set(needs)
    if needs & set(FAMILY_NEEDS) and family.kind != "encoder":
        raise UsageError(
            f"{name}: the {study} study analyses cross-encoders ([CLS] query [SEP] document "
            f"[SEP]); {family.name} is a prompt-based reranker ({family.kind}): run "
            "patching_tfc1 and the other studies on it"
        )
    if "edge_circuits" in needs and not family.edge_circuits:
        from mechir.models.registry import FAMILIES

        followed = ", ".join(f.name for f in FAMILIES if f.edge_circuits)
        raise UsageError(
            f"{name}: the {study} study patches edges, and the edge engine follows the blocks "
            f"of {followed}; the {family.name} family is not one of them: run the other studies "
            "on it"
        )


def study_main(
    run: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` (default: the command line; defaults from ``MECHIR_*`` variables and
    ``mechir.toml``, see :mod:`mechir.settings`), check it and run the study. A user error
    prints one line and raises :class:`~mechir.cli_common.UserExit` (``SystemExit``, status 2, its
    text the line); ``--debug`` shows the traceback instead."""
    from mechir.settings import apply_defaults, user_defaults

    argv = sys.argv[1:] if argv is None else list(argv)
    study = parser.prog.rsplit(".", 1)[-1]

    def parse() -> argparse.Namespace:
        apply_defaults(parser, user_defaults())
        args = parser.parse_args(argv)
        args._argv = argv
        check_study_args(args, study)
        if distributed.launched():  # torchrun: one device per local rank unless --device says
            args.device = str(distributed.init_from_env(args.device))
        return args

    return run_command(run, parse, prog=parser.prog, debug="--debug" in argv, raise_exit=True)


def writes_outputs() -> bool:
    """Whether this process writes the tables, plots and summary: a single process does; under
    torchrun only rank 0 (the other ranks stop once every unit is stored)."""
    return distributed.is_main()


# ---------------------------------------------------------------------- model and data
def load_model(args: argparse.Namespace) -> Any:
    """The cross-encoder named by ``--model`` on ``--device``."""
    from mechir import load_cross_encoder

    return load_cross_encoder(
        args.model, device=args.device, progress=args.progress, **prompt_options(args)
    )


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    """``n_layers``, ``n_heads``, ``d_model``, ``d_mlp`` of ``--model`` from its config alone
    (no weights loaded), to plan the units before deciding whether the model is needed."""
    from transformers import AutoConfig

    from mechir.demo import resolve_model
    from mechir.models.registry import family_for_config

    cfg = AutoConfig.from_pretrained(resolve_model(args.model))
    return family_for_config(cfg, str(args.model)).dimensions(cfg)


def load_data(args: argparse.Namespace) -> Any:
    """The collection named by ``--dataset`` (``--split``, ``--run``)."""
    from mechir.data import load_collection

    return load_collection(args.dataset, split=args.split, run=args.run)


def candidate_pairs(args: argparse.Namespace, collection: Any) -> list[Any]:
    """The first ``--limit-queries`` judged queries' top-``--depth`` first-stage candidates.

    Raises:
        ValueError: no candidates (an empty queries file, no judged query, no first-stage run
            for these queries: :func:`mechir.cli_common.no_candidates_reason`).
    """
    qids = collection.query_ids(args.limit_queries)
    pairs = collection.candidates(depth=args.depth, query_ids=qids)
    if not pairs:
        raise ValueError(no_candidates_reason(collection, qids, args.dataset, args.split))
    return pairs


def require_queries(
    candidates: Sequence[Any], args: argparse.Namespace, *, at_least: int, needed_by: str
) -> None:
    """Refuse, before any model work, a selection of fewer than ``at_least`` queries with
    candidates when ``needed_by`` (e.g. the summary's paired t-tests) needs that many.

    Raises:
        UsageError: naming how many queries were selected and the option to change.
    """
    n = len({p.qid for p in candidates})
    if n >= at_least:
        return
    chosen = (
        f"--limit-queries {args.limit_queries} selects"
        if args.limit_queries is not None
        else f"{args.dataset} has"
    )
    fix = (
        f"use --limit-queries {at_least} or more"
        if args.limit_queries is not None and args.limit_queries < at_least
        else "select more queries with candidates (--limit-queries, --dataset, --run)"
    )
    raise UsageError(
        f"{chosen} {n} judged {'query' if n == 1 else 'queries'} with candidates; {needed_by} "
        f"need at least {at_least}: {fix}"
    )


# ---------------------------------------------------------------------- units of work
@dataclass(frozen=True)
class Unit:
    """One resumable unit of work: its stable id (the key in ``results.jsonl``), a short label
    for progress bars and the study's own description of what to compute."""

    id: str
    label: str = ""
    spec: Any = field(default=None, compare=False)


def run_units(
    store: ResultsStore,
    units: Sequence[Unit],
    compute: Callable[[Unit], dict[str, Any]],
    *,
    desc: str = "units",
    progress: bool = True,
    max_units: int | None = None,
    timings: Path | None = None,
) -> bool:
    """Compute every unit not yet in ``store`` (in order, de-duplicated by id), storing each as
    soon as it is done, with a progress bar and ETA. Returns True when all units are stored,
    False when ``max_units`` new units were computed first.

    ``timings``: a results store (e.g. ``timings.jsonl``) that gets ``{"unit", "seconds"}`` of
    each unit computed, kept apart from the results so that identical runs write identical
    results files."""
    from tqdm.auto import tqdm

    first: dict[str, Unit] = {}
    for u in units:
        first.setdefault(u.id, u)
    unique = list(first.values())
    todo = [u for u in unique if u.id not in store]
    if distributed.world_size() > 1:
        return _run_units_on_ranks(store, unique, todo, compute, desc, progress, max_units, timings)
    with (
        _timings_store(timings) as clock,
        tqdm(
            total=len(unique),
            initial=len(unique) - len(todo),
            desc=desc,
            unit="unit",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for n, unit in enumerate(todo):
            if max_units is not None and n >= max_units:
                return False
            bar.set_postfix_str(unit.label or unit.id, refresh=True)
            start = time.perf_counter()
            store.add(unit.id, compute(unit))
            clock.record(unit.id, time.perf_counter() - start)
            bar.update()
    store.reorder([u.id for u in unique])  # after shards of a killed multi-process run
    return True


def _run_units_on_ranks(
    store: ResultsStore,
    unique: list[Unit],
    todo: list[Unit],
    compute: Callable[[Unit], dict[str, Any]],
    desc: str,
    progress: bool,
    max_units: int | None,
    timings: Path | None,
) -> bool:
    """:func:`run_units` under a process group: rank ``r`` computes the units ``r, r + world,
    ...`` of ``todo`` into its shard (library calls inside run unsharded); rank 0 then merges the
    shards into ``store`` in unit order and every rank re-reads it (timings likewise)."""
    batch = todo if max_units is None else todo[: max(max_units, 0)]
    mine = distributed.shard(batch)
    rank = distributed.rank()
    shard = ResultsStore(shard_path(store.path, rank))
    try:
        with (
            _timings_store(None if timings is None else shard_path(timings, rank)) as clock,
            distributed.progress_bar(
                len(unique),
                initial=len(unique) - len(todo),
                desc=desc,
                unit="unit",
                disable=not progress,
                dynamic_ncols=True,
            ) as bar,
            distributed.local(),
        ):
            for unit in mine:
                bar.set_postfix_str(unit.label or unit.id)
                start = time.perf_counter()
                shard.add(unit.id, compute(unit))
                clock.record(unit.id, time.perf_counter() - start)
                bar.update()
    finally:
        shard.close()
    distributed.barrier()
    if distributed.is_main():
        merge_shards(store, [u.id for u in unique])
        if timings is not None:
            with ResultsStore(timings) as times:
                merge_shards(times, [u.id for u in unique])
        if len(batch) == len(todo):
            store.reorder([u.id for u in unique])  # unit order, as one process writes it
    distributed.barrier()
    if not distributed.is_main():
        store.reload()
    return len(batch) == len(todo)


class _Timings:
    """Records ``{"unit", "seconds"}`` rows in a results store of timings (or nowhere)."""

    def __init__(self, store: ResultsStore | None):
        self.store = store

    def record(self, unit: str, seconds: float) -> None:
        if self.store is not None and unit not in self.store:
            self.store.add(unit, {"seconds": round(seconds, 3)})


@contextlib.contextmanager
def _timings_store(path: Path | None) -> Iterator[_Timings]:
    """The timings store at ``path`` (None: timings are not kept), open while the loop runs."""
    if path is None:
        yield _Timings(None)
        return
    with ResultsStore(path) as store:
        merge_shards(store)  # timings of the ranks of an interrupted torchrun run
        yield _Timings(store)


def report_incomplete(run: StudyRun, units: Sequence[Unit]) -> int:
    """Tell the user a run stopped early (``--max-units``) and how to continue; exit status 0."""
    ids = {u.id for u in units}
    done = sum(u in run.store for u in ids)
    if not writes_outputs():
        return 0
    print(
        f"{run.output}: {done}/{len(ids)} units done; rerun the same command to continue "
        "(the summary is written when every unit is done)",
        file=sys.stderr,
    )
    return 0
