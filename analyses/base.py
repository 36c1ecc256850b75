"""The small common base of every bundled study: a study is its question, its options, its units
of work and its tables; :class:`Study` brings the rest.

A study subclasses :class:`Study` and writes four things::

    class MyStudy(Study):
        \"\"\"The question the study answers (first paragraph: the ``--help`` description).\"\"\"

        name = "my_study"                      # python -m analyses.my_study, results/my_study/
        work_options = ("conditions",)         # options that only choose which units to compute

        @classmethod
        def add_options(cls, parser): ...      # the study's own command-line options

        def plan(self) -> list[Unit]: ...      # the units of work, each with a stable id
        def compute(self, unit) -> dict: ...   # one unit -> one JSON row of results.jsonl
        def summarize(self) -> Summary: ...    # the stored rows -> tables, plots, summary.md

    main = MyStudy.main                        # python -m analyses.my_study [options]

and the base brings the common options, the output directory with its config check
(:func:`analyses.common.open_study`), the lazily loaded model, collection and candidates, the
resumable unit loop with progress and ``--max-units`` (:func:`analyses.common.run_units`), the
score type of the model, the summary files and the entry point. A study whose later units
depend on the results of earlier ones overrides :meth:`Study.stages` instead of :meth:`plan` /
:meth:`compute` and yields one :class:`Stage` after another (the base runs each before asking for
the next). See ``analyses/README.md``, "Adding a study".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from analyses.common import (
    OUTPUT_ADVICE,
    ConfigMismatchError,
    StudyRun,
    Unit,
    UsageError,
    candidate_pairs,
    load_data,
    load_model,
    model_shape,
    open_study,
    output_dir,
    read_study_record,
    report_incomplete,
    require_family,
    run_units,
    study_main,
    study_parser,
    writes_outputs,
)
from analyses.summary import Summary
from mechir import outputs
from mechir.store import ResultsStore

__all__ = ["Stage", "Study", "StudyRun", "Summary", "Unit", "UsageError"]

#: The time each unit took, apart from the results (``{"unit", "seconds"}`` per line), so that
#: identical runs write byte-identical results files.
TIMINGS = "timings.jsonl"
#: The score of every directory written before the score type was recorded (mechir's only
#: score then: the relevant class's logit).
LEGACY_SCORE_TYPE = "logit"


@dataclass(frozen=True)
class Stage:
    """One pass of the unit loop: its units and how to compute one (``name`` labels the progress
    bar: ``"<study>: <name>"``)."""

    name: str
    units: Sequence[Unit]
    compute: Callable[[Unit], dict[str, Any]]


class _Stopped(Exception):
    """``--max-units`` new units were computed before every unit was done."""


class Study:
    """Base of the bundled studies (see the module docstring for what a study writes).

    Attributes available to the study's methods: :attr:`args` (the parsed options),
    :attr:`run` (the opened output directory: ``run.output``, ``run.store``), :attr:`shape`
    (``n_layers``, ``n_heads``, ``d_model``, ``d_mlp`` from the model's config alone), and, loaded
    on first use only, :attr:`model`, :attr:`collection` and :attr:`candidates`.
    """

    #: Module and directory name (``python -m analyses.<name>``, ``results/<name>/``).
    name: ClassVar[str] = ""
    #: Options that only choose which units to compute or how to summarise them: they may
    #: change between runs of one output directory (units are keyed by what they compute).
    work_options: ClassVar[tuple[str, ...]] = ()
    #: What the study needs of the model's family (:data:`analyses.common.FAMILY_NEEDS`):
    #: checked from the model's ``config.json`` before anything is opened, and again once the
    #: model is loaded (a hub id's family is known then), before any unit runs.
    needs: ClassVar[tuple[str, ...]] = ()
    #: Named settings for ``--preset NAME``: option destination -> value (the preset's values
    #: become defaults; options given on the command line still win).
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Files the study always writes into its output directory (besides ``summary.md`` and
    #: ``summary.json``), checked before any work (:meth:`check_outputs`).
    output_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run: StudyRun
        self._budget: int | None = getattr(args, "max_units", None)
        self._planned: list[Unit] = []

    # ------------------------------------------------------------------ what a study writes
    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """Add the study's own options to ``parser`` (the common ones are already there)."""

    def check(self) -> None:
        """Validate the options before anything is opened or loaded; raise :class:`UsageError`
        (or ``ValueError``, reported the same way) with what to do."""

    def run_name_extra(self) -> Sequence[str]:
        """Extra parts of the default output directory name (e.g. a mode with its own results)."""
        return ()

    def plan(self) -> Sequence[Unit]:
        """The units of a single-stage study (ids stable across runs: they key the store)."""
        raise NotImplementedError(f"{type(self).__name__} must define plan() or stages()")

    def compute(self, unit: Unit) -> dict[str, Any]:
        """The JSON-serialisable result row of one unit of a single-stage study."""
        raise NotImplementedError(f"{type(self).__name__} must define compute() or stages()")

    def stages(self) -> Iterator[Stage]:
        """The stages to run, in order; a stage may read the stored rows of the earlier ones.
        Default: one stage of :meth:`plan` and :meth:`compute`."""
        yield Stage("", self.plan(), self.compute)

    def summarize(self) -> Summary:
        """Tables, plots and the :class:`~analyses.summary.Summary` of a finished run (the base
        writes ``summary.md`` / ``summary.json``)."""
        raise NotImplementedError(f"{type(self).__name__} must define summarize()")

    # ------------------------------------------------------------------ what the base brings
    @cached_property
    def shape(self) -> dict[str, int]:
        """``n_layers``, ``n_heads``, ``d_model``, ``d_mlp`` of ``--model`` (config only)."""
        return model_shape(self.args)

    @cached_property
    def model(self) -> Any:
        """The cross-encoder of ``--model`` on ``--device``, loaded on first use; its score type
        is recorded in (and checked against) the output directory's ``config.json``."""
        model = load_model(self.args)
        require_family(model.family, self.args.model, self.name, self.needs)
        if hasattr(self, "run"):
            record_score_type(self.run.output, model.score_type, model.num_labels)
        return model

    @cached_property
    def collection(self) -> Any:
        """The collection of ``--dataset`` / ``--split`` / ``--run``, loaded on first use."""
        return load_data(self.args)

    @cached_property
    def candidates(self) -> list[Any]:
        """The first ``--limit-queries`` judged queries' top-``--depth`` candidates."""
        return candidate_pairs(self.args, self.collection)

    @property
    def store(self) -> ResultsStore:
        return self.run.store

    @property
    def output(self) -> Path:
        return self.run.output

    @property
    def score_type(self) -> str:
        """The score type the units were computed with (``model.score_type``): the loaded
        model's, else the one recorded in ``config.json``."""
        if "model" in self.__dict__:
            return self.model.score_type
        return recorded_score_type(self.run.output) or self.model.score_type

    # ------------------------------------------------------------------ running
    @classmethod
    def description(cls) -> str | None:
        """The first paragraph of the study's docstring, else of its module's (``--help``)."""
        module = sys.modules.get(cls.__module__)
        doc = cls.__dict__.get("__doc__") or getattr(module, "__doc__", None) or ""
        return doc.strip().split("\n\n")[0] or None

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The common options and the study's own."""
        parser = study_parser(cls.name, cls.description(), cls.presets)
        cls.add_options(parser)
        return parser

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> int:
        """``python -m analyses.<name> [options]``: exit status 0 when done or stopped by
        ``--max-units``; option, configuration and lock errors exit with a message."""
        return study_main(lambda args: cls(args).execute(), cls.parser(), argv)

    def execute(self) -> int:
        """Check the options, open the output directory, run every stage, then summarise."""
        try:
            if self.needs:
                from mechir.settings import model_family

                family = model_family(self.args.model)
                require_family(family, self.args.model, self.name, self.needs)
            self.check()
        except ValueError as err:
            raise UsageError(str(err)) from None
        extra = list(self.run_name_extra())
        out = output_dir(self.args, self.name, *extra)
        saved = _saved_record(out, self.name)
        self.check_outputs(out)
        with open_study(
            self.name, self.args, work_options=self.work_options, run_name_extra=extra
        ) as self.run:
            if "score_type" in saved and writes_outputs():  # open_study rewrote config.json
                _update_record(self.output, score_type=saved["score_type"])
            self.collection  # noqa: B018 -- a bad --dataset fails before the model loads
            try:
                for stage in self.stages():
                    self.run_stage(stage)
            except _Stopped:
                return report_incomplete(self.run, self._planned)
            if not writes_outputs():  # torchrun: rank 0 writes the outputs
                return 0
            summary = self.summarize()
            summary.write(self.output)
            print(self.output / "summary.md")
        return 0

    def check_outputs(self, output: Path) -> None:
        """Refuse before any work when ``output`` holds a file the study writes
        (:attr:`output_files`, the summary's) that mechir did not write, or a file mechir wrote
        that was changed since (:mod:`mechir.outputs`). Files named from the options are
        checked when they are written (the finished units are kept)."""
        outputs.check_directory(output, advice=OUTPUT_ADVICE)
        for name in ("summary.md", "summary.json", *self.output_files):
            outputs.check_writable(output / name, advice=OUTPUT_ADVICE)

    def run_stage(self, stage: Stage) -> None:
        """Compute the stage's units not yet stored (the one unit loop of every study).

        Raises:
            _Stopped: the ``--max-units`` budget ran out first.
        """
        self._planned += stage.units
        before = len(self.store)
        done = run_units(
            self.store,
            stage.units,
            stage.compute,
            desc=f"{self.name}: {stage.name}" if stage.name else self.name,
            progress=self.args.progress,
            max_units=self._budget,
            timings=self.output / TIMINGS,
        )
        if self._budget is not None:
            self._budget -= len(self.store) - before
        if not done:
            raise _Stopped

    def setting(self, **facts: Any) -> dict[str, Any]:
        """The facts every summary's "Setting" lists (model, score type, dataset), then
        ``facts`` (keyword underscores read as spaces)."""
        args = self.args
        return {
            "model": args.model,
            "score type": self.score_type,
            "dataset": args.dataset + (f" (split {args.split})" if args.split else ""),
            **{k.replace("_", " "): v for k, v in facts.items()},
        }


# ---------------------------------------------------------------------- score type record
def recorded_score_type(output: Path) -> str | None:
    """The score type recorded in ``output/config.json``; :data:`LEGACY_SCORE_TYPE` for a
    directory with results from before it was recorded; None when nothing was computed."""
    record = _saved_record(output)
    if "score_type" in record:
        return record["score_type"]
    results = Path(output) / "results.jsonl"
    return LEGACY_SCORE_TYPE if results.exists() and results.stat().st_size else None


def same_score(a: str, b: str, num_labels: int) -> bool:
    """Whether score types ``a`` and ``b`` give the same scores (with one label, ``logit`` and
    ``binary_logit`` are both the logit)."""
    logits = {"logit", "binary_logit"}
    return a == b or (num_labels == 1 and a in logits and b in logits)


def record_score_type(output: Path, score_type: str, num_labels: int) -> None:
    """Record the score type of the loaded model in ``output/config.json``.

    Raises:
        ConfigMismatchError: the directory's results were computed with another score.
    """
    saved = recorded_score_type(output)
    if saved is not None and not same_score(saved, score_type, num_labels):
        raise ConfigMismatchError(
            f"{output} holds results scored as {saved!r}, but the model now scores as "
            f"{score_type!r}; choose another --output or --run-name for the new score"
        )
    if writes_outputs():  # torchrun: rank 0 writes config.json
        _update_record(output, score_type=score_type)


def _saved_record(output: Path, study: str | None = None) -> dict[str, Any]:
    return read_study_record(output, study) or {}


def _update_record(output: Path, **items: Any) -> None:
    path = Path(output) / "config.json"
    record = {**_saved_record(output), **items}
    outputs.write_json(path, record, advice=OUTPUT_ADVICE)
