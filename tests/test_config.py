"""Configuration: round trip, overrides, and errors that name the key."""

from __future__ import annotations

import json

import pytest

from sslmm_ray import config
from sslmm_ray.config import ConfigError


def test_defaults_round_trip_through_json(tmp_path):
    cfg = config.load(overrides=["finetune.tau=0.9", "model.hidden=32"])
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = config.load(path)
    assert again == cfg
    assert json.loads(path.read_text())["finetune"]["tau"] == 0.9


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("finetune:\n  tau: 0.7\n  epochs: 3\ntune:\n  label_ratios: [0.1, 0.5]\n")
    cfg = config.load(path, ["finetune.epochs=5"])
    assert cfg.finetune.tau == 0.7
    assert cfg.finetune.epochs == 5  # the override wins over the file
    assert cfg.tune.label_ratios == [0.1, 0.5]
    assert cfg.pretrain.epochs == config.PretrainConfig().epochs  # untouched sections default


def test_replace_ignores_unset_flags():
    cfg = config.load(overrides=["finetune.tau=0.6"])
    out = config.replace(cfg, finetune={"tau": None, "lambda_rec": 0.5})
    assert out.finetune.tau == 0.6 and out.finetune.lambda_rec == 0.5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.taux=0.5", "finetune.taux"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        config.load(overrides=[override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.tau=1.5", "finetune.tau"),
        ("finetune.label_ratio=0", "finetune.label_ratio"),
        ("finetune.missing_rate=1.0", "finetune.missing_rate"),
        ("pretrain.epochs=0", "pretrain.epochs"),
        ("model.backend=gpu", "model.backend"),
        ("finetune.protocol=sample", "finetune.protocol"),
        ("tune.label_ratios=[0.1,2]", "tune.label_ratios.1"),
    ],
)
def test_bad_value_is_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config.load(overrides=[override])


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(overrides=["tau"])


def test_normalize_defaults_on_and_can_be_switched_off():
    assert config.load().data.normalize is True
    cfg = config.load(overrides=["data.normalize=false"])
    assert cfg.data.normalize is False
    assert config.from_dict(json.loads(cfg.to_json())).data.normalize is False
