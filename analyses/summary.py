"""A study's summary as a list of blocks (headings, text, tables, images), written both as
``summary.md`` for people and as ``summary.json`` for :mod:`analyses.report`.

Inline markup in text and table cells: ```code``` and ``**bold**`` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mechir.lazy import lazy_import

pd = lazy_import("pandas")


Formats = Mapping[str, str] | str


def format_value(value: Any, fmt: str = ".4f") -> str:
    """A table cell: floats with ``fmt`` (``"-"`` for NaN), other values with ``str``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return format(value, fmt)
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return format_value(value.item(), fmt)
    return str(value)


def table_cells(frame: pd.DataFrame, formats: Formats = ".4f") -> list[list[str]]:
    """Formatted cells of ``frame`` (``formats``: one format, or one per column)."""
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for col, value in zip(frame.columns, record):
            fmt = formats if isinstance(formats, str) else formats.get(col, ".4f")
            cells.append(format_value(value, fmt))
        rows.append(cells)
    return rows


def markdown_table(frame: pd.DataFrame, formats: Formats = ".4f") -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (numeric columns right-aligned)."""
    header = [str(c) for c in frame.columns]
    align = [
        "---:" if pd.api.types.is_numeric_dtype(frame[c]) and frame[c].dtype != bool else "---"
        for c in frame.columns
    ]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table_cells(frame, formats)]
    return "\n".join(lines)


#: Below this many queries, a summary's paired t-tests and held-out fits carry a warning.
MIN_QUERIES = 10


def small_sample_warning(n: int, what: str) -> str | None:
    """The warning a summary shows when ``what`` (paired t-tests, held-out R²) rests on ``n`` <
    :data:`MIN_QUERIES` queries, else None."""
    if n >= MIN_QUERIES:
        return None
    return (
        f"**Small sample:** {what} rest on {n} {'query' if n == 1 else 'queries'} (fewer than "
        f"{MIN_QUERIES}): p-values, significance and R² this small are unreliable (a held-out R² "
        "can fall far below 0); read them as a smoke test, not a finding. Use more queries "
        "(--limit-queries) for conclusions."
    )


class Summary:
    """Blocks of a summary page, rendered to Markdown and saved with a JSON twin.

    Example::

        s = Summary("Direction ablation", subtitle="minilm on scifact")
        s.table(frame, caption="nDCG@10 per condition")
        s.image("heatmap.png", "Δ nDCG@10 per direction")
        s.write(output_dir)
    """

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = title
        self.subtitle = subtitle
        self.blocks: list[dict[str, Any]] = []

    def heading(self, text: str, level: int = 2) -> Summary:
        self.blocks.append({"type": "heading", "level": level, "text": text})
        return self

    def paragraph(self, text: str) -> Summary:
        self.blocks.append({"type": "paragraph", "text": text})
        return self

    def bullets(self, items: Sequence[str]) -> Summary:
        self.blocks.append({"type": "list", "items": list(items)})
        return self

    def small_sample(self, n: int, what: str) -> Summary:
        """The :func:`small_sample_warning` paragraph, when ``n`` queries are too few."""
        warning = small_sample_warning(n, what)
        return self.paragraph(warning) if warning else self

    def facts(self, facts: Mapping[str, Any]) -> Summary:
        """A two-column key/value list (the setting of a run)."""
        return self.bullets([f"**{k}**: {format_value(v)}" for k, v in facts.items()])

    def table(
        self, frame: pd.DataFrame, caption: str | None = None, formats: Formats = ".4f"
    ) -> Summary:
        numeric = [
            bool(pd.api.types.is_numeric_dtype(frame[c]) and frame[c].dtype != bool)
            for c in frame.columns
        ]
        self.blocks.append(
            {
                "type": "table",
                "caption": caption,
                "columns": [str(c) for c in frame.columns],
                "numeric": numeric,
                "rows": table_cells(frame, formats),
                "markdown": markdown_table(frame, formats),
            }
        )
        return self

    def image(self, path: str | Path, caption: str | None = None) -> Summary:
        """An image, by its path relative to the summary's directory."""
        self.blocks.append({"type": "image", "path": str(path), "caption": caption})
        return self

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        if self.subtitle:
            out += [self.subtitle, ""]
        for b in self.blocks:
            kind = b["type"]
            if kind == "heading":
                out += ["#" * b["level"] + " " + b["text"], ""]
            elif kind == "paragraph":
                out += [b["text"], ""]
            elif kind == "list":
                out += [f"- {item}" for item in b["items"]] + [""]
            elif kind == "table":
                if b["caption"]:
                    out += [f"*{b['caption']}*", ""]
                out += [b["markdown"], ""]
            elif kind == "image":
                out += [f"![{b['caption'] or ''}]({b['path']})", ""]
                if b["caption"]:
                    out += [f"*{b['caption']}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "subtitle": self.subtitle, "blocks": self.blocks}

    def write(self, directory: str | Path) -> Path:
        """Write ``summary.md`` and ``summary.json`` into ``directory`` (through
        :mod:`mechir.outputs`: a file there that mechir did not write is refused, never
        replaced); returns the .md path."""
        from mechir import outputs

        d = Path(directory)
        outputs.write_json(d / "summary.json", self.to_dict(), indent=1, ensure_ascii=False)
        return outputs.write_text(d / "summary.md", self.to_markdown())
