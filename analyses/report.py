"""Gather the studies' outputs into one static HTML page (tables and plots).

Every study directory under the given roots that has a ``summary.json`` (written with its
``summary.md``) becomes one section: the run's setting from ``config.json``, then the summary's
headings, text, tables and images. Images are embedded as data URIs by default, so the page is a
single self-contained file that can be mailed or archived.

Example::

    python -m analyses.report results/ -o report.html
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechir import outputs

#: What a refusal to write over a page mechir did not write tells the user.
REPORT_ADVICE = "choose another -o/--output or move the file away"
#: Section order of the bundled studies (others follow alphabetically).
STUDY_ORDER = (
    "direction_ablation",
    "matching_heads",
    "qk_svd",
    "neuron_attribution",
    "patching_tfc1",
    "circuit_discovery",
    "axioms",
)

#: Font stack: system UI fonts first, then families with wide Unicode coverage (Noto covers
#: CJK, Devanagari, Arabic, ...; DejaVu Sans most European and symbol ranges), so tokens of any
#: script render rather than showing as empty boxes.
FONTS = (
    'system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "Noto Sans CJK JP", '
    '"Noto Sans Devanagari", "Noto Sans Arabic", "DejaVu Sans", "Arial Unicode MS", '
    '"Apple Color Emoji", "Segoe UI Emoji", "Noto Color Emoji", sans-serif'
)
MONO_FONTS = '"DejaVu Sans Mono", "Noto Sans Mono", Menlo, Consolas, monospace'

CSS = """
body { font-family: FONTS; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
div.table-scroll { max-width: 100%; overflow-x: auto; margin: .6rem 0 1.2rem; }
div.table-scroll > table { margin: 0; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
section.run { border-top: 1px solid #bbb; margin-top: 2.5rem; padding-top: .5rem; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; font-size: .85rem; }
code { background: #f4f4f4; padding: 0 .2rem; font-family: MONO_FONTS; }
p, li, figcaption { overflow-wrap: anywhere; }
nav ul { columns: 2; }
.setting { font-size: .85rem; color: #444; }
""".replace("MONO_FONTS", MONO_FONTS).replace("FONTS", FONTS)


def find_runs(roots: Sequence[str | Path]) -> list[Path]:
    """Study output directories (those with a ``summary.json``) under ``roots``, in study order."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such results directory")
        found.update(p.parent for p in root.rglob("summary.json"))

    def key(d: Path) -> tuple[int, str, str]:
        study = _study_of(d)
        rank = STUDY_ORDER.index(study) if study in STUDY_ORDER else len(STUDY_ORDER)
        return rank, study, str(d)

    return sorted(found, key=key)


def _study_of(directory: Path) -> str:
    config = directory / "config.json"
    if config.exists():
        return json.loads(config.read_text(encoding="utf-8")).get("study", directory.parent.name)
    return directory.parent.name


def inline(text: str) -> str:
    """Escape ``text`` and render the summaries' inline markup (```code```, ``**bold**``)."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _image_src(path: Path, embed: bool, page_dir: Path) -> str:
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        mime = "image/svg+xml" if path.suffix == ".svg" else f"image/{path.suffix.lstrip('.')}"
        return f"data:{mime};base64,{data}"
    try:
        return html.escape(str(path.resolve().relative_to(page_dir.resolve())))
    except ValueError:
        return html.escape(path.resolve().as_uri())


def render_block(block: dict[str, Any], directory: Path, *, embed: bool, page_dir: Path) -> str:
    """One summary block as HTML (headings are shifted one level down, under the run's h2)."""
    kind = block["type"]
    if kind == "heading":
        level = min(6, int(block["level"]) + 1)
        return f"<h{level}>{inline(block['text'])}</h{level}>"
    if kind == "paragraph":
        return f"<p>{inline(block['text'])}</p>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block["items"]) + "</ul>"
    if kind == "table":
        numeric = block.get("numeric") or [False] * len(block["columns"])
        head = "".join(f"<th>{inline(c)}</th>" for c in block["columns"])
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="num">{inline(c)}</td>' if num else f"<td>{inline(c)}</td>"
                for c, num in zip(row, numeric)
            )
            + "</tr>"
            for row in block["rows"]
        )
        caption = f"<caption>{inline(block['caption'])}</caption>" if block.get("caption") else ""
        # wide tables scroll inside their box instead of running past the page
        return (
            f'<div class="table-scroll"><table>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
        )
    if kind == "image":
        path = directory / block["path"]
        caption = block.get("caption") or ""
        if not path.exists():
            return f"<p><em>missing image {inline(block['path'])}</em></p>"
        src = _image_src(path, embed, page_dir)
        return (
            f'<figure><img src="{src}" alt="{html.escape(caption or path.name)}">'
            f"<figcaption>{inline(caption)}</figcaption></figure>"
        )
    raise ValueError(f"{directory}/summary.json: unknown block type {kind!r}")


def _anchor(directory: Path) -> str:
    return "run-" + re.sub(r"[^A-Za-z0-9_-]+", "-", str(directory)).strip("-")


def render_run(directory: Path, *, embed: bool, page_dir: Path) -> tuple[str, str]:
    """``(title, html)`` of one study output directory."""
    summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    study = _study_of(directory)
    title = f"{summary.get('title') or study} — {directory.name}"
    parts = [f'<section class="run" id="{_anchor(directory)}">', f"<h2>{inline(title)}</h2>"]
    config_path = directory / "config.json"
    if config_path.exists():
        record = json.loads(config_path.read_text(encoding="utf-8"))
        updated = record.get("updated", "?")
        parts.append(
            f'<p class="setting">study <code>{html.escape(study)}</code> · directory '
            f"<code>{html.escape(str(directory))}</code> · last run {html.escape(updated)}"
            f" · command <code>{html.escape(record.get('command', '?'))}</code></p>"
        )
    if summary.get("subtitle"):
        parts.append(f"<p>{inline(summary['subtitle'])}</p>")
    parts += [render_block(b, directory, embed=embed, page_dir=page_dir) for b in summary["blocks"]]
    parts.append("</section>")
    return title, "\n".join(parts)


def build_report(
    roots: Sequence[str | Path],
    output: str | Path,
    *,
    embed: bool = True,
    title: str = "mechir studies",
) -> Path:
    """Write the HTML page gathering every study run under ``roots``; returns its path.

    Raises:
        FileNotFoundError: a root does not exist.
        ValueError: no study summary was found under the roots.
        mechir.outputs.ForeignFileError: ``output`` exists and mechir did not write it (it is
            never replaced).
    """
    outputs.check_writable(output, advice=REPORT_ADVICE)
    runs = find_runs(roots)
    if not runs:
        raise ValueError(
            f"no study summaries (summary.json) under {', '.join(map(str, roots))}; "
            "run a study first"
        )
    output = Path(output)
    page_dir = output.parent
    sections = [render_run(d, embed=embed, page_dir=page_dir) for d in runs]
    toc = "".join(
        f'<li><a href="#{_anchor(d)}">{inline(t)}</a></li>' for d, (t, _) in zip(runs, sections)
    )
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    page = (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f'<p class="setting">{len(runs)} study run(s), gathered {now} from '
        f"{html.escape(', '.join(map(str, roots)))}.</p>\n"
        f"<nav><ul>{toc}</ul></nav>\n" + "\n".join(s for _, s in sections) + "\n</body></html>\n"
    )
    return outputs.write_text(output, page, advice=REPORT_ADVICE)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analyses.report ROOT... -o report.html``."""
    parser = argparse.ArgumentParser(
        prog="python -m analyses.report",
        description="Gather study outputs (summary.json, PNGs) into one static HTML page.",
    )
    parser.add_argument("roots", nargs="*", default=["results"], help="results directories")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    parser.add_argument("--title", default="mechir studies")
    parser.add_argument(
        "--link-images",
        action="store_true",
        help="link the PNG files instead of embedding them (smaller page, not self-contained)",
    )
    args = parser.parse_args(argv)
    try:
        path = build_report(args.roots, args.output, embed=not args.link_images, title=args.title)
    except (FileNotFoundError, ValueError) as err:
        from mechir.cli_common import UserExit, one_line

        line = f"{parser.prog}: error: {one_line(err)}"
        print(line, file=sys.stderr)
        raise UserExit(line) from None  # exit status 2
    print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
