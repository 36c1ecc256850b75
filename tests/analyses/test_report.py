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


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium) to load the report",
)
def test_report_renders_in_headless_chromium(results_root, tmp_path):
    page = build_report([results_root], tmp_path / "report.html")
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK_IMAGES), encoding="utf-8")
    dom = chromium("--dump-dom", checked.as_uri(), profile=tmp_path / "profile").stdout
    body = dom[dom.index("<body") : dom.index(">", dom.index("<body"))]
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
