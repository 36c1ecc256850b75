"""The tutorials of the documentation site (``docs/tutorials/*.py``) run end to end.

Each is a jupytext percent-format script executed with ``runpy`` in a temporary directory with
matplotlib's Agg backend, on the embedded demo model and collection (``"demo"``, offline), as a
user without any ``MECHIR_*`` setting runs them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[2] / "docs" / "tutorials").glob("*.py"))


def test_tutorials_01_to_06_in_percent_format():
    assert [t.name[:2] for t in TUTORIALS] == ["01", "02", "03", "04", "05", "06"]
    for tutorial in TUTORIALS:
        text = tutorial.read_text(encoding="utf-8")
        assert "formats: py:percent" in text and text.count("# %% [markdown]") >= 3, tutorial
        assert "plt.show()" in text, f"{tutorial.name} shows no plot"
        # the docs run from an installed mechir, without the test suite's helpers
        assert "from tests" not in text and "import tests" not in text, tutorial.name


@pytest.mark.slow
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs(tutorial, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    for name in ("MECHIR_MODEL", "MECHIR_DATASET", "MECHIR_SPLIT", "MECHIR_LLM"):
        monkeypatch.delenv(name, raising=False)  # the tutorials' defaults: the embedded demo
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(len(plt.get_fignums())))
    try:
        runpy.run_path(str(tutorial), run_name="__main__")
        assert shown and all(n > 0 for n in shown), "every plt.show() has a figure to show"
    finally:
        plt.close("all")
