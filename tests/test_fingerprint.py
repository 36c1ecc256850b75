"""Weights fingerprints: stable, sensitive to any weight, equal for files and state dicts of
the same checkpoint only when the bytes are equal."""

from __future__ import annotations

import hashlib

import torch

from mechir.fingerprint import (
    files_fingerprint,
    state_dict_fingerprint,
    weight_files,
)
from mechir.model_files import weights_fingerprint
from tests.helpers import tiny_hf_model


def test_directory_fingerprint_is_a_hash_of_the_weight_files(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "m")
    files = weight_files(tmp_path / "m")
    assert [f.name for f in files] == ["model.safetensors"]
    data = files[0].read_bytes()
    inner = f"model.safetensors\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n"
    expected = "sha256:" + hashlib.sha256(inner.encode()).hexdigest()
    assert weights_fingerprint(tmp_path / "m") == expected == files_fingerprint(files)
    (tmp_path / "m" / "config.json").write_text("{}")  # only weights count
    assert weights_fingerprint(str(tmp_path / "m")) == expected


def test_fingerprint_changes_with_one_weight_and_not_otherwise(tmp_path):
    a, b = tiny_hf_model(), tiny_hf_model()
    assert state_dict_fingerprint(a) == state_dict_fingerprint(b) == weights_fingerprint(a)
    with torch.no_grad():
        b.classifier.bias += 1e-7
    assert state_dict_fingerprint(a) != state_dict_fingerprint(b)
    a.save_pretrained(tmp_path / "m")
    first = weights_fingerprint(tmp_path / "m")
    b.save_pretrained(tmp_path / "m")  # replaced in place
    assert weights_fingerprint(tmp_path / "m") != first


def test_nothing_to_fingerprint(tmp_path):
    assert weights_fingerprint(tmp_path) is None  # a directory without weights
    assert weights_fingerprint(tmp_path / "absent") is None
    assert weights_fingerprint("no-such-org/no-such-model") is None  # not cached, not fetched
