"""mechir.outputs: files mechir writes are atomic and recorded with their hash; a file mechir
did not write (or that was changed since) is never modified, and refused in one line."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest

from mechir import outputs
from mechir.outputs import RECORD_NAME, ForeignFileError


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_a_new_file_is_written_and_recorded_with_its_hash(tmp_path):
    path = tmp_path / "sub" / "table.txt"
    outputs.write_text(path, "a\n")
    assert path.read_text() == "a\n"
    assert names(path.parent) == [RECORD_NAME, "table.txt"]  # no temporary file left
    record = json.loads((path.parent / RECORD_NAME).read_text())
    assert record["files"] == {"table.txt": outputs.content_hash(b"a\n")}
    assert outputs.is_mechirs(path)
    outputs.write_text(path, "b\n")  # mechir's own file: a rerun replaces it
    assert path.read_text() == "b\n" and outputs.is_mechirs(path)


@pytest.mark.parametrize(
    ("prepare", "why"),
    [
        (lambda p: p.write_text("mine\n"), "exists and was not written by mechir"),
        (
            lambda p: (outputs.write_text(p, "mechir\n"), p.write_text("edited\n")),
            "was changed since mechir wrote it",
        ),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["user's file", "edited after mechir wrote it", "a directory"],
)
def test_a_file_mechir_did_not_write_is_refused_in_one_line_and_left_alone(tmp_path, prepare, why):
    path = tmp_path / "summary.md"
    prepare(path)
    before = path.read_bytes() if path.is_file() else None
    listing = names(tmp_path)
    for write in (
        lambda: outputs.check_writable(path, advice="choose another --output"),
        lambda: outputs.write_text(path, "new\n", advice="choose another --output"),
        lambda: outputs.write_csv(pd.DataFrame({"a": [1]}), path),
    ):
        with pytest.raises(ForeignFileError) as err:
            write()
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"{path} {why}")
        assert "mechir never modifies a file it did not write" in line
    assert "choose another --output" in str(
        pytest.raises(
            ForeignFileError, outputs.check_writable, path, advice="choose another --output"
        ).value
    )
    assert names(tmp_path) == listing  # no temporary file, nothing recorded
    if before is not None:
        assert path.read_bytes() == before


def test_a_symlink_is_never_followed(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("mine\n")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    with pytest.raises(ForeignFileError, match="not a regular file mechir wrote"):
        outputs.write_text(link, "x")
    assert target.read_text() == "mine\n" and link.is_symlink()


def test_a_file_that_appears_while_mechir_writes_is_left_alone(tmp_path):
    path = tmp_path / "report.html"
    with pytest.raises(ForeignFileError, match="report.html exists and was not written by mechir"):
        with outputs.output_file(path) as tmp:
            tmp.write_text("mechir's page")
            path.write_text("the user's page")  # appears after the first check
    assert path.read_text() == "the user's page"
    assert names(tmp_path) == ["report.html"]


def test_a_failed_writer_leaves_nothing(tmp_path):
    path = tmp_path / "plot.png"
    with pytest.raises(RuntimeError, match="boom"):
        with outputs.output_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert names(tmp_path) == []


def test_a_foreign_record_file_is_refused(tmp_path):
    (tmp_path / RECORD_NAME).write_text('{"mine": 1}\n')
    with pytest.raises(ForeignFileError, match="is not mechir's record"):
        outputs.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / RECORD_NAME).read_text() == '{"mine": 1}\n'
    assert not (tmp_path / "a.txt").exists()


def test_check_directory_refuses_an_edited_output_early(tmp_path):
    outputs.write_text(tmp_path / "a.csv", "x\n")
    outputs.write_text(tmp_path / "b.csv", "y\n")
    outputs.check_directory(tmp_path)  # all unchanged
    (tmp_path / "b.csv").write_text("edited\n")
    with pytest.raises(ForeignFileError, match="b.csv was changed since mechir wrote it"):
        outputs.check_directory(tmp_path)


def test_remove_deletes_only_mechirs_own_files(tmp_path):
    own, edited, foreign = (tmp_path / n for n in ("own.txt", "edited.txt", "foreign.txt"))
    outputs.write_text(own, "x")
    outputs.write_text(edited, "x")
    edited.write_text("the user's")
    foreign.write_text("the user's")
    assert outputs.remove(own) and not own.exists()
    assert not outputs.remove(edited) and edited.read_text() == "the user's"
    assert not outputs.remove(foreign) and foreign.read_text() == "the user's"
    outputs.remove(tmp_path / "missing.txt")
    record = json.loads((tmp_path / RECORD_NAME).read_text())["files"]
    assert list(record) == ["edited.txt"]


def test_the_record_goes_when_its_last_file_is_removed(tmp_path):
    outputs.write_text(tmp_path / "a.txt", "x")
    outputs.remove(tmp_path / "a.txt")
    assert names(tmp_path) == []


def test_compressed_tables_and_arrays_are_byte_identical_across_runs(tmp_path):
    """Issue 30: equal data gives equal bytes (no time stamp or file name in the gzip header,
    fixed member times in the npz), and the files read back to the data."""
    frame = pd.DataFrame({"edge": ["a->b", "c->d"], "score": [0.25, -1.5]})
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "layers": np.asarray([0, 1])}
    first, second = tmp_path / "one", tmp_path / "two"
    for d in (first, second):
        outputs.write_csv(frame, d / "edges.csv.gz")
        outputs.write_npz(d / "mean.npz", **arrays)
        os.utime(d / "edges.csv.gz", (0, 0))
    for name in ("edges.csv.gz", "mean.npz"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert gzip.decompress((first / "edges.csv.gz").read_bytes())[:2] == b"ed"
    assert (first / "edges.csv.gz").read_bytes()[4:8] == b"\0\0\0\0"  # MTIME 0
    pd.testing.assert_frame_equal(pd.read_csv(first / "edges.csv.gz"), frame)
    with np.load(first / "mean.npz") as loaded:
        assert sorted(loaded.files) == ["layers", "x"]
        np.testing.assert_array_equal(loaded["x"], arrays["x"])


def test_save_figure_writes_the_format_of_the_suffix(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    path = outputs.save_figure(fig, tmp_path / "curve.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and outputs.is_mechirs(path)
