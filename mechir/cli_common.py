"""What every mechir command shares: one-line user errors and how a command runs (run_command),
argparse types of numbers, checks of the common options (output, max length, measures,
candidates), and the option groups commands and studies add (execution, max length, prompt).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "mechir"


class UsageError(ValueError):
    """A user error: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (at least 1)")
    return value


def steps_or_auto(text: str) -> int | str:
    """argparse type: a number of integration steps (an integer >= 1) or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a positive integer nor 'auto'"
        ) from None


def float_range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """argparse type: a finite number (never ``nan`` or ``inf``) within ``[low, high]`` (bounds
    None: unbounded; ``*_open``: the bound itself excluded), refused at parse time in one line
    naming the value and the range, e.g. ``argument --alpha: 'nan' is not a finite number``."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else format(low, 'g')}, "
    span += f"{'inf' if high is None else format(high, 'g')}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text!r} is outside {span}")
        return value

    parse.__name__ = "number"
    return parse


#: argparse types of the studies' float options (see :func:`float_range`).
finite_float = float_range()
positive_float = float_range(0, low_open=True)
nonnegative_float = float_range(0)
fraction = float_range(0, 1, low_open=True, high_open=True)
percent = float_range(0, 100, low_open=True)


def one_line(err: BaseException) -> str:
    """An exception as one line of text (whitespace runs collapsed)."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) or not text:
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


#: Exceptions that are the user's to fix (bad options, files, settings), not bugs.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError)


class UserExit(SystemExit):
    """Exit status 2 after a user error was printed as one line; ``str()`` is that line."""

    def __init__(self, line: str):
        super().__init__(line)
        self.code = 2


def run_command(
    handler: Callable[[argparse.Namespace], int],
    parse: Callable[[], argparse.Namespace],
    *,
    prog: str,
    debug: bool,
    raise_exit: bool = False,
) -> int:
    """Parse and run, turning a user error into one line on stderr and exit status 2
    (``debug``: re-raise with its traceback; ``raise_exit``: raise :class:`UserExit` instead
    of returning 2). Ctrl-C exits with status 130, one line."""
    try:
        return handler(parse())
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted (finished units are kept; rerun to resume)", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        line = f"{prog}: error: {one_line(err)}"
        print(line, file=sys.stderr)
        if raise_exit:
            raise UserExit(line) from None
        return 2


def check_output_writable(path: Path, option: str = "--output") -> None:
    """Fail now, not after the model loaded, if ``path`` cannot be written: it is a directory,
    a parent is a file, or the nearest existing directory refuses a new file. Creates nothing.

    Raises:
        UsageError: naming ``path`` and why.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mechir-probe"):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write in {existing} ({err.strerror})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: the file is not writable")


def resolve_max_length(model: str, max_length: int | None) -> int | None:
    """``--max-length`` checked against the model's position limit and the shortest pair
    (its special tokens plus one query and one document token), or the model directory's
    recorded length when not given (None: the model decides at load time). Also checks, before
    anything is loaded or written, that a local ``model`` path exists
    (:func:`mechir.settings.check_model_source`) and that its ``config.json`` names a family
    mechir loads (:func:`mechir.settings.model_family`).

    Raises:
        UsageError: below the shortest pair or above the model's position limit.
        SettingsError: no such model directory, or an unreadable ``config.json``.
        UnsupportedModelError: a ``model_type`` mechir does not load.
    """
    from mechir.settings import check_model_source, default_max_length, model_family, position_limit

    check_model_source(model)
    family = model_family(model)
    limit = position_limit(model)
    if max_length is None:
        return default_max_length(model)
    special = family.n_special if family is not None else 3
    if max_length < special + 2:
        raise UsageError(
            f"--max-length {max_length} is too small: a pair needs {special} special tokens plus "
            f"at least one query and one document token; use --max-length {special + 2} or more"
        )
    if limit is not None and max_length > limit:
        raise UsageError(
            f"--max-length {max_length} is above the model's position limit: {model} has "
            f"{limit} positions; use --max-length {limit} or less"
        )
    return max_length


def check_measures(measures: Sequence[str]) -> None:
    """Every ``--measures`` name parses as an ir_measures measure (checked before anything is
    loaded, not after every query was scored).

    Raises:
        UsageError: naming the measure.
    """
    import ir_measures

    for measure in measures:
        try:
            ir_measures.parse_measure(measure)
        except Exception as err:  # noqa: BLE001 - ir_measures raises NameError, ValueError, ...
            raise UsageError(
                f"--measures {measure!r} is not an ir_measures measure ({one_line(err)}); "
                "e.g. nDCG@10, P@10, RR, AP, R@100"
            ) from None


def _collection_file(dataset: Any, split: str | None, stem: str, suffix: str) -> Path | None:
    """The ``stem[.split].suffix`` file of a local collection directory, if it exists."""
    if dataset is None or not Path(str(dataset)).is_dir():
        return None
    path = Path(str(dataset)) / (f"{stem}.{split}.{suffix}" if split else f"{stem}.{suffix}")
    return path if path.is_file() else None


def no_candidates_reason(
    collection: Any, qids: Sequence[str], dataset: Any = None, split: str | None = None
) -> str:
    """Why ``collection`` gives no first-stage candidates for the selected ``qids``, naming the
    file to fix: an empty queries file, qrels that judge none of the queries, a run without
    those queries, or no run at all (``dataset``/``split``: where a local collection's files
    are)."""
    if not collection.queries:
        path = _collection_file(dataset, split, "queries", "tsv")
        where = f"the queries file {path}" if path else collection.name
        return (
            f"{where} holds no queries (expected 'qid<TAB>query text' lines); add queries or "
            "choose another --dataset/--split"
        )
    if not qids:
        path = _collection_file(dataset, split, "qrels", "txt")
        where = f"the qrels file {path}" if path else f"the qrels of {collection.name}"
        return (
            f"{where} judge none of the {len(collection.queries)} queries of {collection.name} "
            "(mechir reranks judged queries only); check the query ids"
        )
    if collection.run is not None and collection.run_name:
        return (
            f"the run {collection.run_name} has no candidates for the {len(qids)} selected "
            f"queries of {collection.name}; give another run with --run"
        )
    return (
        f"{collection.name}: no first-stage candidates for the {len(qids)} selected queries; "
        "give a run with --run"
    )


# ---------------------------------------------------------------------- parsers
def add_execution_options(p: Any) -> None:
    """``--device``, ``--batch-size`` and ``--debug`` (shared with the studies)."""
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="pairs per forward pass")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def add_max_length_option(p: Any) -> None:
    """``--max-length`` (shared with the studies); see :func:`resolve_max_length`."""
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="tokens per pair (default: what the model directory records, else its position limit)",
    )


def answer_tokens(text: str) -> tuple[str, str]:
    """``--answer-tokens yes,no``: the relevant and the non-relevant answer."""
    tokens = tuple(t.strip() for t in text.split(","))
    if len(tokens) != 2 or not all(tokens):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the relevant and the non-relevant answer token, e.g. 'yes,no'"
        )
    return tokens  # type: ignore[return-value]


#: The options of prompt-based rerankers (MonoT5, LLM rerankers).
PROMPT_OPTIONS: tuple[str, ...] = ("template", "instruction", "answer_tokens")


def add_prompt_options(p: Any) -> None:
    """``--template``, ``--instruction``, ``--answer-tokens`` (shared with the studies): the
    prompt of a prompt-based reranker; each defaults to its family's own."""
    p.add_argument(
        "--template",
        default=None,
        help="prompt of a prompt-based reranker (MonoT5, LLM rerankers), with {query} and "
        "{document} (and {instruction}) (default: the family's own prompt)",
    )
    p.add_argument(
        "--instruction", default=None, help="the instruction of an LLM reranker's prompt"
    )
    p.add_argument(
        "--answer-tokens",
        type=answer_tokens,
        default=None,
        metavar="YES,NO",
        help="relevant and non-relevant answer tokens: score = logit(YES) - logit(NO) "
        "(default: the family's own)",
    )


def prompt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The prompt options given on the command line (None ones left out), as
    :func:`mechir.load_cross_encoder` keywords."""
    return {k: getattr(args, k) for k in PROMPT_OPTIONS if getattr(args, k, None) is not None}


def check_prompt_options(args: argparse.Namespace) -> None:
    """Prompt options (:data:`PROMPT_OPTIONS`) for a model whose family reads no prompt are an
    error before anything is loaded or written (when the model's files are local).

    Raises:
        UsageError: naming the options and the family.
    """
    from mechir.settings import model_family

    given = prompt_options(args)
    family = model_family(args.model) if given else None
    if family is not None and family.kind == "encoder":
        raise UsageError(
            f"{', '.join(given)}: {family.name} reads no prompt (only prompt-based rerankers "
            "such as MonoT5 and LLM rerankers do); drop the option"
        )
