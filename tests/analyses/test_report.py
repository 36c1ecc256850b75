"""``python -m analyses.report``: one static HTML page from the studies' summaries, checked in
a real headless browser (Debian's chromium) when it is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import plots
from analyses.report import build_report, main
from analyses.summary import Summary


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def parse(path: Path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture()
def results_root(tmp_path, direction_ablation_run) -> Path:
    """A results tree: the tiny direction-ablation run and a hand-made summary of another study."""
    root = tmp_path / "results"
    shutil.copytree(direction_ablation_run, root / "direction_ablation" / "tiny")
    other = root / "qk_svd" / "hand-made"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"study": "qk_svd", "config": {}}))
    plots.heatmap(
        np.arange(6.0).reshape(2, 3), other / "grid.png", row_labels="ab", col_labels="xyz"
    )
    s = Summary("Hand-made <study>", "text with `code`, **bold** and <script>alert(1)</script>")
    s.heading("A table").table(pd.DataFrame({"head": ["0/1", "1/2"], "score": [0.5, np.nan]}))
    s.image("grid.png", "a grid").image("missing.png", "not there")
    s.write(other)
    return root


def test_report_gathers_every_summary(results_root, tmp_path):
    page = build_report([results_root], tmp_path / "report.html")
    text = page.read_text(encoding="utf-8")
    assert text.index("Attention direction ablation") < text.index("Hand-made")  # study order
    html = parse(page)
    assert html.tags.get("script", 0) == 0 and "&lt;script&gt;" in text  # text is escaped
    assert "<code>code</code>" in text and "<strong>bold</strong>" in text
    assert all(src.startswith("data:image/png;base64,") for src in html.images)
    da = json.loads((results_root / "direction_ablation/tiny/summary.json").read_text())
    n_images = sum(b["type"] == "image" for b in da["blocks"]) + 1  # + grid.png
    assert len(html.images) == n_images and html.tags["table"] >= 4
    assert "missing image missing.png" in text


def test_report_links_images_and_cli(results_root, tmp_path):
    assert main([str(results_root), "-o", str(tmp_path / "r.html"), "--link-images"]) == 0
    srcs = parse(tmp_path / "r.html").images
    assert srcs and all((tmp_path / s).exists() for s in srcs)
    with pytest.raises(SystemExit, match="no study summaries"):
        (tmp_path / "empty").mkdir()
        main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.html")])
    with pytest.raises(SystemExit, match="no such results directory"):
        main([str(tmp_path / "absent")])


CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.tables = document.querySelectorAll("table tbody tr").length;
});
</script></body>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rendered_body(page: Path, script: str, tmp_path: Path, *args: str) -> str:
    """The ``<body ...>`` tag of ``page`` after chromium ran ``script`` (set as its last child)."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", script), encoding="utf-8")
    dom = chromium(*args, "--dump-dom", checked.as_uri(), profile=tmp_path / "profile").stdout
    return dom[dom.index("<body") : dom.index(">", dom.index("<body"))]


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium) to load the report",
)
def test_report_renders_in_headless_chromium(results_root, tmp_path):
    page = build_report([results_root], tmp_path / "report.html")
    body = rendered_body(page, CHECK_IMAGES, tmp_path)
    attrs = dict(part.split("=") for part in body.split()[1:] if "=" in part)
    images = int(attrs["data-images"].strip('"'))
    assert images == len(parse(page).images) > 0
    assert int(attrs["data-decoded"].strip('"')) == images  # every embedded PNG decodes
    assert int(attrs["data-tables"].strip('"')) > 10
    shot = tmp_path / "shot.png"
    chromium(
        "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri(), profile=tmp_path / "p2"
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


NON_LATIN = ["日本語", "Ωμέγα", "привет", "عربي", "हिन्दी", "##ß"]


@pytest.fixture()
def wide_root(tmp_path) -> Path:
    """A summary with a 40-column table and tokens of several scripts."""
    run = tmp_path / "results" / "qk_svd" / "wide"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"study": "qk_svd", "config": {}}))
    s = Summary("Wide", "tokens " + " ".join(NON_LATIN))
    frame = pd.DataFrame({f"column_{i:02d}_with_a_long_name": [i * 1.5] for i in range(40)})
    frame.insert(0, "token", NON_LATIN[0])
    s.heading("Wide table").table(frame)
    s.write(run)
    return tmp_path / "results"


def test_report_wide_tables_scroll_and_non_latin_tokens(wide_root, tmp_path):
    page = build_report([wide_root], tmp_path / "report.html")
    raw = page.read_bytes()
    text = raw.decode("utf-8")  # written as UTF-8, and the page says so
    assert '<meta charset="utf-8">' in text
    for token in NON_LATIN:  # verbatim, not mangled or replaced by entities
        assert token.encode("utf-8") in raw
    # every table sits in a box that scrolls horizontally
    assert text.count("<table>") == text.count('<div class="table-scroll"><table>') >= 1
    css = text[text.index("<style>") : text.index("</style>")]
    rule = css[css.index("div.table-scroll {") :]
    assert "overflow-x: auto" in rule[: rule.index("}")]
    body_rule = css[css.index("body {") :]
    fonts = body_rule[: body_rule.index(";")]
    assert '"Noto Sans"' in fonts and '"DejaVu Sans"' in fonts and '"Noto Sans CJK SC"' in fonts


CHECK_OVERFLOW = """<script>
window.addEventListener("load", () => {
  const box = document.querySelector("div.table-scroll");
  document.body.dataset.page = document.documentElement.scrollWidth <= window.innerWidth;
  document.body.dataset.box = box.scrollWidth > box.clientWidth;
});
</script></body>"""


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium) to load the report",
)
def test_report_wide_table_scrolls_in_headless_chromium(wide_root, tmp_path):
    page = build_report([wide_root], tmp_path / "report.html")
    body = rendered_body(page, CHECK_OVERFLOW, tmp_path, "--window-size=900,800")
    assert 'data-page="true"' in body  # the page itself does not scroll sideways
    assert 'data-box="true"' in body  # the table's box does
