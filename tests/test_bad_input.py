"""One row per bad input of the library: the error type, and a message that names the value.

Each row builds its bad input in a fresh temporary directory (``ctx.tmp``) with the tiny model
(``ctx.model``), calls one public function and expects one exception whose message contains the
offending value (a path, an id, a number), so that a user can find and fix it.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mechir import ModelNotFoundError, encode, load_cross_encoder, selection
from mechir.data import DatasetNotFoundError, load_collection, read_qrels, read_run
from mechir.evaluation import Pair, paired_ttest, rerank
from mechir.models.registry import UnsupportedModelError
from tests.helpers import tiny_hf_model, tiny_tokenizer


def saved_model(ctx: Any, *, nan: bool = False) -> Any:
    hf = tiny_hf_model()
    if nan:
        with torch.no_grad():
            hf.classifier.weight[0, 3] = math.nan
    hf.save_pretrained(ctx.tmp / "model")
    tiny_tokenizer(ctx.tmp).save_pretrained(ctx.tmp / "model")
    return ctx.tmp / "model"


def no_config(ctx: Any) -> None:
    directory = saved_model(ctx)
    (directory / "config.json").unlink()
    ctx.value = str(directory)
    load_cross_encoder(directory)


def unknown_model_type(ctx: Any) -> None:
    directory = saved_model(ctx)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    ctx.value = str(directory / "config.json")
    try:
        load_cross_encoder(directory)
    except UnsupportedModelError as err:  # short: the file, the type, the families; no advice
        assert len(str(err)) < len(ctx.value) + 450 and "pip" not in str(err), str(err)
        raise


def truncated_weights(ctx: Any) -> None:
    weights = saved_model(ctx) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    ctx.value = str(weights)
    load_cross_encoder(weights.parent)


def non_finite_weights(ctx: Any) -> None:
    load_cross_encoder(saved_model(ctx, nan=True))


def written(ctx: Any, name: str, text: str | bytes) -> Any:
    path = ctx.tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    ctx.value = f"{path}:2"
    return path


def collection(ctx: Any, run: str = "q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\n") -> Any:
    (ctx.tmp / "docs.tsv").write_text("d1\tcats purr\nd2\tdogs bark\n")
    (ctx.tmp / "queries.tsv").write_text("q1\tcats\n")
    (ctx.tmp / "qrels.txt").write_text("q1 0 d1 1\n")
    (ctx.tmp / "run.bm25.trec").write_text(run)
    return load_collection(ctx.tmp)


def non_utf8_docs(ctx: Any) -> None:
    collection(ctx)
    load_collection(written(ctx, "docs.tsv", b"d1\tok\nd2\t\xff\n").parent)


def nan_hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
    return x * math.nan


def requires_selection_grammar(name: str) -> Callable[..., Any]:
    if not hasattr(selection, name):
        pytest.skip(f"mechir.selection.{name} (the lead's selection grammar) is not merged yet")
    return getattr(selection, name)


# (id, call, expected exception, the offending value its message must contain)
ROWS: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    # loading
    ("model dir without config.json", no_config, ModelNotFoundError, "<value>"),
    (
        "unknown model_type",
        unknown_model_type,
        UnsupportedModelError,
        "<value>: model_type 'frobnicator' is not supported; mechir loads rerankers "
        "of the families BERT (bert), ELECTRA (electra), RoBERTa (roberta)",
    ),
    ("truncated safetensors", truncated_weights, ValueError, "<value>"),
    (
        "relative path not a hub id",
        lambda c: load_cross_encoder("./no-model"),
        ModelNotFoundError,
        "./no-model",
    ),
    ("non-finite weights", non_finite_weights, ValueError, "'classifier.weight'"),
    (
        "in-memory model without tokenizer",
        lambda c: load_cross_encoder(tiny_hf_model()),
        ValueError,
        "tokenizer",
    ),
    # encode
    (
        "max_length 0",
        lambda c: c.model.encode("cat", "dog", max_length=0),
        ValueError,
        "max_length=0",
    ),
    (
        "max_length -1 (no model)",
        lambda c: encode(c.tokenizer, "cat", "dog", max_length=-1),
        ValueError,
        "max_length=-1",
    ),
    (
        "max_length above positions",
        lambda c: c.model.encode("cat", "dog", max_length=900),
        ValueError,
        "max_length=900",
    ),
    ("encode([], [])", lambda c: c.model.encode([], []), ValueError, "empty batch"),
    ("empty document", lambda c: c.model.encode(["cat", "dog"], ["a", " "]), ValueError, "pair 1"),
    # data
    (
        "run lists a doc twice",
        lambda c: read_run(written(c, "r.trec", "q1 Q0 d1 1 2 t\nq1 Q0 d1 2 1 t\n")),
        ValueError,
        "<value>: qid 'q1' lists docid 'd1' twice",
    ),
    (
        "non-numeric run score",
        lambda c: read_run(written(c, "r.trec", "q1 Q0 d1 1 2 t\nq1 Q0 d2 2 x t\n")),
        ValueError,
        "<value>: score 'x'",
    ),
    (
        "non-integer qrels grade",
        lambda c: read_qrels(written(c, "q.txt", "q1 0 d1 1\nq1 0 d2 yes\n")),
        ValueError,
        "<value>: relevance 'yes'",
    ),
    (
        "non-UTF-8 docs.tsv",
        non_utf8_docs,
        ValueError,
        "<value>: not valid UTF-8",
    ),
    (
        "run names a missing doc",
        lambda c: collection(c, "q1 Q0 d9 1 2.0 t\n").candidates(),
        ValueError,
        "docid 'd9'",
    ),
    ("limit_queries 0", lambda c: collection(c).query_ids(0), ValueError, "limit_queries=0"),
    ("depth -1", lambda c: collection(c).candidates(depth=-1), ValueError, "got -1"),
    (
        "collection path missing",
        lambda c: load_collection("./no-data"),
        DatasetNotFoundError,
        "./no-data",
    ),
    (
        "unknown ir_datasets id",
        lambda c: load_collection("no-such/dataset"),
        DatasetNotFoundError,
        "'no-such/dataset'",
    ),
    # evaluation
    (
        "empty document when scoring",
        lambda c: rerank(c.model, [Pair("q1", "d7", "cat", "")], progress=False),
        ValueError,
        "docid 'd7'",
    ),
    (
        "NaN scores",
        lambda c: rerank(
            c.model,
            [Pair("q1", "d3", "cat", "dog")],
            hooks=[("hook_score", nan_hook)],
            progress=False,
        ),
        ValueError,
        "docid 'd3'",
    ),
    (
        "paired test on one query",
        lambda c: paired_ttest({"q": 1.0}, {"q": 2.0}),
        ValueError,
        "got 1",
    ),
    (
        "paired test with NaN",
        lambda c: paired_ttest({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": math.nan}),
        ValueError,
        "['b']",
    ),
    # selection grammar (the lead's, once merged)
    (
        "layer 2.7",
        lambda c: requires_selection_grammar("select_layers")(c.model, [2.7]),
        ValueError,
        "2.7",
    ),
    (
        "layers [99]",
        lambda c: requires_selection_grammar("select_layers")(c.model, [99]),
        ValueError,
        "99",
    ),
    (
        "heads [-1]",
        lambda c: requires_selection_grammar("select_heads")(c.model, [-1], layers=[0]),
        ValueError,
        "-1",
    ),
]


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
@pytest.mark.parametrize(
    ("call", "error", "needle"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_is_named(call, error, needle, tiny, tmp_path, monkeypatch):
    model, _, tokenizer = tiny
    monkeypatch.chdir(tmp_path)
    ctx = types.SimpleNamespace(tmp=tmp_path, model=model, tokenizer=tokenizer, value=None)
    with pytest.raises(error) as info:
        call(ctx)
    expected = needle.replace("<value>", str(ctx.value))
    assert expected in str(info.value), f"{str(info.value)!r} does not name {expected!r}"
    assert type(info.value) is not KeyError and "\n" not in str(info.value)


def test_transformers_unknown_type_error_is_recognised(tmp_path):
    """A hub download of an unknown ``model_type`` reaches Transformers' own error; mechir
    recognises its text (of the installed version) and replaces it with one short line."""
    from transformers import AutoConfig

    from mechir.loading import _unknown_model_type

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(ValueError) as info:
        AutoConfig.from_pretrained(tmp_path)
    assert _unknown_model_type(str(info.value)) == "frobnicator"
    assert _unknown_model_type("some other error about `x`") is None
