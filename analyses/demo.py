"""The main job on the embedded demo, offline, in one command: ``mechir demo`` (or
``python -m analyses.demo``). ``mechir demo`` is :data:`COMMAND`, declared in the
``mechir.commands`` entry-point group of ``pyproject.toml`` (the library never imports the
studies).

Runs the direction-ablation study (:mod:`analyses.direction_ablation`, Table 1 of "Understanding
Matching Mechanisms in Cross-Encoders") on the demo model and collection (:mod:`mechir.demo`):
the unablated model and four groups -- no query<->document interaction, query->document,
document->query, CLS reads query+document -- each removed in every layer, mode ``zero``. Then it
gathers the study's tables and plots into the HTML report (:mod:`analyses.report`) and prints
where everything is and a five-line summary. Rerunning the same command resumes an interrupted
run (finished units are kept in ``results.jsonl``) and rewrites the summary and the report.

About 3 minutes on 2 idle CPU cores (5 units x 1,000 pairs at 160 tokens, ~30 ms a pair).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mechir.cli_common import add_execution_options, positive_int
from mechir.cli_plugins import Command
from mechir.demo import (
    DEMO,
    DEMO_COLLECTION_NAME,
    DEMO_DEPTH,
    DEMO_MAX_LENGTH,
    DEMO_MODEL_NAME,
)

#: The groups of the demo's Table 1, in the order they are reported.
GROUPS = ("no_interaction", "query_to_document", "document_to_query", "cls_reads_query_document")
GROUP_LABELS = {
    "no_interaction": "no query<->document interaction",
    "query_to_document": "query->document",
    "document_to_query": "document->query",
    "cls_reads_query_document": "CLS reads query+document",
}
DEFAULT_OUTPUT = Path("results") / "demo"
MEASURE = "nDCG@10"


DESCRIPTION = (
    "The main job, offline: the direction-ablation study (Table 1 groups, all layers) on the "
    "embedded demo model and collection, then its tables, plots, summary and HTML report. Rerun "
    "the same command to resume."
)


def demo_queries(text: str) -> int:
    """argparse type of ``--limit-queries``: at least 2 queries (the summary's paired
    t-tests), refused before anything runs."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} is too few: the summary's paired t-tests need at least 2 queries"
        )
    return value


def add_demo_options(p: argparse.ArgumentParser) -> None:
    """The demo's own options (``--device``/``--batch-size`` come from the CLI's)."""
    p.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"output directory ({DEFAULT_OUTPUT})"
    )
    p.add_argument(
        "--limit-queries",
        type=demo_queries,
        default=None,
        help="first N of the 50 demo queries only (a quicker, smaller run; own output directory)",
    )
    p.add_argument(
        "--random-shuffles", type=positive_int, default=200, help="shuffles of the random floor"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_command_options(p: argparse.ArgumentParser) -> None:
    """Every option of the demo: its own and ``--device``/``--batch-size``/``--debug``."""
    add_demo_options(p)
    add_execution_options(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analyses.demo", description=DESCRIPTION)
    add_command_options(p)
    return p


def study_dir(args: argparse.Namespace) -> Path:
    """The direction-ablation output directory of this demo run (one per ``--limit-queries``)."""
    name = "direction_ablation" + (
        f"__{args.limit_queries}q" if args.limit_queries is not None else ""
    )
    return Path(args.output) / name


def study_argv(args: argparse.Namespace) -> list[str]:
    """The :mod:`analyses.direction_ablation` command line this demo runs."""
    argv = [
        "--model", DEMO,
        "--dataset", DEMO,
        "--depth", str(DEMO_DEPTH),
        "--max-length", str(DEMO_MAX_LENGTH),
        "--conditions", *GROUPS,
        "--layers", "all",
        "--mode", "zero",
        "--random-shuffles", str(args.random_shuffles),
        "--batch-size", str(args.batch_size),
        "--output", str(study_dir(args)),
    ]  # fmt: skip
    if args.device is not None:
        argv += ["--device", args.device]
    if args.limit_queries is not None:
        argv += ["--limit-queries", str(args.limit_queries)]
    if not args.progress:
        argv.append("--no-progress")
    return argv


def summary_lines(directory: Path) -> list[str]:
    """Five lines: the setting and the unablated model against its floors, then one line per
    group removed in every layer (value, change, Holm-adjusted p)."""
    import pandas as pd

    table = pd.read_csv(directory / "table.csv")
    refs = pd.read_csv(directory / "references.csv").set_index("ranking")[MEASURE]
    per_query = pd.read_csv(directory / "per_query.csv")
    base = per_query[per_query.unit == "none"]
    first = next((v for k, v in refs.items() if k.startswith("first-stage")), float("nan"))
    random = next((v for k, v in refs.items() if k.startswith("random")), float("nan"))
    lines = [
        f"{DEMO_MODEL_NAME} on the {DEMO_COLLECTION_NAME} ({base.qid.nunique()} queries "
        f"used): unablated {MEASURE} {base[MEASURE].mean():.4f} (BM25 order {first:.4f}, random "
        f"order {random:.4f})"
    ]
    for group in GROUPS:
        row = table[table.condition == group]
        if not len(row):
            lines.append(f"  {GROUP_LABELS[group]}: not computed")
            continue
        r = row.iloc[0]
        verdict = "significant" if bool(r["significant"]) else "not significant"
        lines.append(
            f"  {GROUP_LABELS[group]} removed in layers {r['layers']}: {MEASURE} "
            f"{r[MEASURE]:.4f} ({r['delta']:+.4f}; p_holm {r['p_holm']:.2g}, {verdict})"
        )
    return lines


def run_demo(args: argparse.Namespace) -> int:
    """Run (or resume) the study, write the report, print the paths and the summary."""
    from analyses import direction_ablation
    from analyses.report import build_report
    from mechir import outputs

    directory = study_dir(args)
    report_path = Path(args.output) / "report.html"
    # before any work: the report is never written over a page mechir did not write
    outputs.check_writable(report_path, advice="choose another --output or move the file away")
    print(f"mechir demo: direction ablation on the embedded demo -> {directory}", file=sys.stderr)
    status = direction_ablation.main(study_argv(args))
    if status != 0 or not (directory / "summary.json").exists():
        return status or 1
    report = build_report(
        [directory],
        report_path,
        title="mechir demo: attention direction ablation on the embedded SciFact demo",
    )
    print(f"report:  {report}")
    print(f"summary: {directory / 'summary.md'}")
    print(f"tables:  {directory / 'table.csv'}, {directory / 'per_query.csv'}")
    print(f"plots:   {', '.join(str(p) for p in sorted(directory.glob('*.png')))}")
    print("\n".join(summary_lines(directory)))
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_demo(args)


#: ``mechir demo`` (entry point ``demo = "analyses.demo:COMMAND"`` of ``mechir.commands``).
COMMAND = Command(
    help="the main job, offline: direction ablation on the embedded demo, HTML report",
    description=DESCRIPTION,
    add_options=add_command_options,
    run=_run,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``mechir demo [options]`` / ``python -m analyses.demo [options]``: a user error is one
    line and exit status 2."""
    from mechir.cli_common import run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(
        run_demo,
        lambda: build_parser().parse_args(argv),
        prog="python -m analyses.demo",
        debug="--debug" in argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
