"""Defaults set once (environment, mechir.toml, user config) and model-derived defaults."""

from __future__ import annotations

import json

import pytest

from mechir.cli import build_parser
from mechir.settings import (
    SettingsError,
    check_model_source,
    default_max_length,
    position_limit,
    user_defaults,
)


def test_precedence_environment_over_project_over_user_file(tmp_path):
    home = tmp_path / "xdg"
    (home / "mechir").mkdir(parents=True)
    (home / "mechir" / "config.toml").write_text('model = "user-org/m"\nsplit = "dev"\ndepth = 7\n')
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "mechir.toml").write_text('dataset = "data"\nsplit = "quick"\nbatch-size = 8\n')
    env = {"XDG_CONFIG_HOME": str(home), "MECHIR_DEPTH": "20", "MECHIR_DEVICE": "cpu"}
    assert user_defaults(env, cwd=project) == {
        "model": "user-org/m",  # user file
        "dataset": str(project / "data"),  # project file, relative to the file
        "split": "quick",  # project file beats user file
        "batch_size": 8,
        "depth": 20,  # environment beats both files
        "device": "cpu",
    }
    only = tmp_path / "only.toml"
    only.write_text('model = "x/y"\n')
    assert user_defaults({"MECHIR_CONFIG": str(only)}, cwd=project) == {"model": "x/y"}


@pytest.mark.parametrize(
    ("env", "files", "message"),
    [
        ({"MECHIR_DEPTH": "ten"}, {}, "MECHIR_DEPTH: depth must be an integer, got 'ten'"),
        ({}, {"mechir.toml": "colour = 1\n"}, "unknown key 'colour'"),
        ({}, {"mechir.toml": "model = [\n"}, "not valid TOML"),
        ({}, {"mechir.toml": "max_length = 1.5\n"}, "max_length must be an integer"),
        ({"MECHIR_CONFIG": "/nonexistent.toml"}, {}, "MECHIR_CONFIG=/nonexistent.toml"),
    ],
)
def test_invalid_settings_name_the_culprit(tmp_path, env, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        user_defaults({"XDG_CONFIG_HOME": str(tmp_path / "none"), **env}, cwd=tmp_path)


def test_defaults_reach_the_cli_parser_and_lift_required(tmp_path):
    parser = build_parser({"model": "org/m", "dataset": "d", "batch_size": 4, "colour": 1})
    args = parser.parse_args(["rerank", "--output", str(tmp_path / "r")])
    assert (args.model, args.dataset, args.batch_size) == ("org/m", "d", 4)
    args = parser.parse_args(["rerank", "--output", "r", "--model", "cli/m"])
    assert args.model == "cli/m"  # the command line wins


def model_dir(tmp_path, tokenizer=None, sbert=None, positions=512):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    if tokenizer is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer}))
    if sbert is not None:
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": sbert}))
    return d


@pytest.mark.parametrize(
    ("tokenizer", "sbert", "expected"),
    [
        (None, None, 512),  # the position limit
        (256, None, 256),  # the tokenizer's training length
        (int(1e30), None, 512),  # transformers' "no limit" placeholder is not a length
        (512, 160, 160),  # sentence-transformers' max_seq_length first
        (None, 4096, 512),  # above the position limit: ignored
    ],
)
def test_default_max_length(tmp_path, tokenizer, sbert, expected):
    d = model_dir(tmp_path, tokenizer, sbert)
    assert default_max_length(d) == expected and position_limit(d) == 512


def test_model_source_checks(tmp_path):
    check_model_source("org/name")  # a hub id is left to the loader
    check_model_source(model_dir(tmp_path))
    with pytest.raises(SettingsError, match="no such model directory"):
        check_model_source(tmp_path / "absent")
    with pytest.raises(SettingsError, match="no config.json"):
        check_model_source(tmp_path)
