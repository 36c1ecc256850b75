"""The documentation site builds with ``mkdocs build --strict`` (broken references fail)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter")
    ),
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for page in ("index.html", "api/hooks/index.html", "tutorials/01_first_hook/index.html"):
        assert (site / page).stat().st_size > 1000, page
    api = (site / "api" / "hooks" / "index.html").read_text(encoding="utf-8")
    assert "direction_ablation_hooks" in api  # rendered from the docstrings
    tutorial = (site / "tutorials" / "01_first_hook" / "index.html").read_text(encoding="utf-8")
    assert "hook_z" in tutorial and "running_batch" in tutorial
