"""Loading errors: unsupported architectures, missing heads, missing tokenizers."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
import time

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaModel,
)

from mechir import ModelNotFoundError, UnsupportedModelError, encode, load_cross_encoder
from tests.helpers import tiny_hf_model, tiny_tokenizer

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


SUPPORTED_LIST = "BERT .* ELECTRA .* RoBERTa .* XLM-RoBERTa .* DistilBERT"


@pytest.mark.parametrize(
    "hf",
    [
        AlbertForSequenceClassification(AlbertConfig(**SMALL)),
        GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)),
    ],
    ids=["albert", "gpt2-decoder"],
)
def test_unsupported_in_memory(hf, tmp_path):
    with pytest.raises(UnsupportedModelError, match=SUPPORTED_LIST):
        load_cross_encoder(hf, tokenizer=tiny_tokenizer(tmp_path))


def test_unsupported_directory_albert(tmp_path):
    """An ALBERT classifier: no family loads it, refused before its tokenizer is looked for."""
    AlbertForSequenceClassification(AlbertConfig(**SMALL)).save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="'albert' is not supported.*" + SUPPORTED_LIST):
        load_cross_encoder(tmp_path / "m")


def test_roberta_base_model_without_head(tmp_path):
    RobertaModel(RobertaConfig(**SMALL)).save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="no sequence-classification head"):
        load_cross_encoder(tmp_path / "m")


def test_bert_without_classification_head(tmp_path):
    BertForMaskedLM(BertConfig(**SMALL)).save_pretrained(tmp_path / "mlm")
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "mlm")
    with pytest.raises(UnsupportedModelError, match="no sequence-classification head"):
        load_cross_encoder(tmp_path / "mlm")


def test_head_weights_missing(tmp_path):
    """A BERT checkpoint relabelled as a classifier but without classifier weights."""
    BertForMaskedLM(BertConfig(**SMALL)).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="no trained classification head"):
        load_cross_encoder(tmp_path / "m")


def test_missing_tokenizer(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_cross_encoder(tmp_path / "m")


def test_in_memory_needs_tokenizer():
    with pytest.raises(ValueError, match="needs its tokenizer"):
        load_cross_encoder(tiny_hf_model())


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cross_encoder(str(tmp_path / "nope"))


def test_no_deprecation_warning(tmp_path, recwarn):
    load_cross_encoder(tiny_hf_model(), tokenizer=tiny_tokenizer(tmp_path), device="cpu")
    assert not [
        w
        for w in recwarn
        if issubclass(w.category, DeprecationWarning) and "HookedEncoder" in str(w.message)
    ]


# ---------------------------------------------------------------- offline-first, fail fast
@pytest.fixture
def saved(tmp_path):
    """A complete tiny model directory."""
    directory = tmp_path / "model"
    tiny_hf_model().save_pretrained(directory)
    tiny_tokenizer(tmp_path).save_pretrained(directory)
    return directory


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Online mode, an empty HF cache and a hub that refuses connections (port 9 on localhost)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_unreachable_hub_fails_fast_with_one_line(no_hub):
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_cross_encoder("castorini/monobert-large-msmarco")
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert message == (
        f"model 'castorini/monobert-large-msmarco' not found: no local directory "
        f"{no_hub / 'castorini/monobert-large-msmarco'}, not in the local Hugging Face cache "
        f"({no_hub / 'hf-cache'}), and the hub http://127.0.0.1:9 is unreachable "
        f"(Connection refused); pass a local model directory (config.json + weights + "
        f"tokenizer files) instead, or --model demo in the CLI"
    )
    assert "\n" not in message and elapsed < 15


def test_offline_mode_does_not_try_the_hub(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1")  # would hang if it were tried
    start = time.perf_counter()
    with pytest.raises(
        ModelNotFoundError, match=r"hub was not tried \(offline: HF_HUB_OFFLINE=1\)"
    ):
        load_cross_encoder("org/model")
    assert time.perf_counter() - start < 15


def test_hub_id_is_loaded_from_the_local_cache_first(no_hub, saved):
    """A snapshot in the HF cache layout loads with the hub unreachable."""
    repo = no_hub / "hf-cache" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(saved, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = load_cross_encoder("org/tiny", device="cpu")
    assert model.cfg.n_layers == 2


@pytest.mark.parametrize("name", ["./nope", "nope/x/y", "models/m", "bad name"])
def test_relative_path_that_does_not_exist_is_not_a_hub_id(no_hub, name):
    (no_hub / "models").mkdir()
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=f"{re.escape(name)}: no such model directory"):
        load_cross_encoder(name)
    assert time.perf_counter() - start < 2  # no network at all


def test_directory_without_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=f"{re.escape(str(saved))}: no config.json"):
        load_cross_encoder(saved)


def test_truncated_safetensors_names_the_file(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))}: truncated or corrupted"):
        load_cross_encoder(saved)


def test_non_finite_weights_name_the_tensor(tmp_path):
    hf = tiny_hf_model()
    with torch.no_grad():
        hf.bert.encoder.layer[1].attention.self.query.weight[3, 5] = float("nan")
        hf.bert.encoder.layer[1].attention.self.query.weight[0, 0] = float("inf")
    hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "m")
    with pytest.raises(
        ValueError, match=r"weight 'bert.encoder.layer.1.attention.self.query.weight' has 2 non"
    ):
        load_cross_encoder(tmp_path / "m")
    with pytest.raises(ValueError, match="non-finite values"):
        load_cross_encoder(hf, tokenizer=tiny_tokenizer(tmp_path))


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
@pytest.mark.parametrize(
    ("max_length", "message"),
    [
        (0, "max_length=0 is too small"),
        (-3, "max_length=-3 is too small"),
        (65, "max_length=65 exceeds the model's position limit: it has 64 positions"),
        (2.5, "max_length must be an int, got 2.5"),
    ],
)
def test_max_length_out_of_range(tiny, max_length, message):
    model, _, tokenizer = tiny
    with pytest.raises(ValueError, match=re.escape(message)):
        model.encode("the cat", "a dog", max_length=max_length)
    if max_length != 65:  # without a model, only the lower bound and type are known
        with pytest.raises(ValueError, match=re.escape(message)):
            encode(tokenizer, "the cat", "a dog", max_length=max_length)


def test_encode_without_pairs(tiny):
    model, _, tokenizer = tiny
    with pytest.raises(ValueError, match="empty batch"):
        model.encode([], [])
    with pytest.raises(ValueError, match="empty batch"):
        encode(tokenizer, [], [])


class _NotFoundEverywhere(http.server.BaseHTTPRequestHandler):
    """Answers 404 to every request (as a captive proxy or firewall does)."""

    def do_HEAD(self):  # noqa: N802 - the http.server API
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def test_hub_that_answers_but_cannot_provide_the_model(no_hub, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundEverywhere)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    try:
        start = time.perf_counter()
        with pytest.raises(ModelNotFoundError) as err:
            load_cross_encoder("org/model")
        elapsed = time.perf_counter() - start
    finally:
        server.shutdown()
    message = str(err.value)
    assert message.startswith(
        f"model 'org/model' not found: no local directory {no_hub / 'org/model'}, not in the "
        f"local Hugging Face cache ({no_hub / 'hf-cache'}), and the hub {endpoint} did not "
        "provide it ("
    )
    assert message.endswith(
        "; pass a local model directory (config.json + weights + tokenizer "
        "files) instead, or --model demo in the CLI"
    )
    assert "\n" not in message and elapsed < 15


def test_prompt_options_are_refused_by_families_without_a_prompt(tmp_path):
    from tests.helpers import tiny_hf_model

    with pytest.raises(ValueError, match="template: BERT reads no prompt"):
        load_cross_encoder(tiny_hf_model(0), tokenizer=tiny_tokenizer(tmp_path), template="{query}")


def test_no_progress_silences_the_loading_bars_for_that_call_only(tmp_path, capfd):
    """Issue 30: ``--no-progress`` (``progress=False``) hides transformers' "Loading weights"
    bar; the process-wide switches of transformers and huggingface_hub are restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from tests.helpers import tiny_hf_model, tiny_tokenizer

    tiny_hf_model().save_pretrained(tmp_path)
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path)
    from mechir.loading import hf_progress_bars

    with hf_progress_bars(True):  # bars on, as for a user (restored after the test)
        capfd.readouterr()
        load_cross_encoder(tmp_path, device="cpu")  # the reference: the bar is shown
        assert "Loading weights" in capfd.readouterr().err
        load_cross_encoder(tmp_path, device="cpu", progress=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
