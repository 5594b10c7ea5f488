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
        ("missing.rate=1.0", "missing.rate"),
        ("pretrain.epochs=0", "pretrain.epochs"),
        ("model.backend=gpu", "model.backend"),
        ("missing.protocol=sample", "missing.protocol"),
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


@pytest.mark.parametrize(
    "override",
    [
        "finetune.weight_decay=.inf",  # NonNegFloat: inf passed ge=0 before
        "pretrain.grad_clip=.inf",
        "finetune.lambda_rec=.nan",
        "pretrain.temperature=.inf",
        "finetune.cpus_per_worker=.inf",
        "finetune.confidence_kappa=.nan",
        "tune.label_ratios=[.nan]",
    ],
)
def test_infinite_and_nan_floats_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}[.0-9]*': .*finite"):
        config.load(overrides=[override])


@pytest.mark.parametrize("section", ["pretrain", "finetune", "tune"])
def test_seeds_are_bounded(section):
    assert getattr(config.load(overrides=[f"{section}.seed={2**32 - 1}"]), section).seed
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError, match=f"'{section}.seed'"):
            config.load(overrides=[f"{section}.seed={bad}"])


def test_max_failures_default_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(config.MAX_FAILURES_ENV, raising=False)
    cfg = config.load()
    assert (cfg.pretrain.max_failures, cfg.finetune.max_failures, cfg.tune.max_failures) == (
        0, 0, 0)  # local runs: a failure is a bug to see at once
    monkeypatch.setenv(config.MAX_FAILURES_ENV, "3")  # what the cluster jobs set
    cfg = config.load()
    assert (cfg.pretrain.max_failures, cfg.finetune.max_failures, cfg.tune.max_failures) == (
        3, 3, 3)
    path = tmp_path / "exp.yaml"
    path.write_text("finetune:\n  max_failures: 1\n")
    cfg = config.load(path, ["tune.max_failures=5"])  # file and overrides still win
    assert (cfg.pretrain.max_failures, cfg.finetune.max_failures, cfg.tune.max_failures) == (
        3, 1, 5)
    monkeypatch.setenv(config.MAX_FAILURES_ENV, "many")
    with pytest.raises(ConfigError, match="SSLMM_MAX_FAILURES"):
        config.load()


def test_resume_differences_name_what_may_not_change():
    saved = config.load(overrides=["finetune.epochs=5", "finetune.workers=2"]).to_dict()

    def diffs(*overrides: str) -> list[str]:
        now = config.load(overrides=["finetune.epochs=5", "finetune.workers=2", *overrides])
        return config.resume_differences(saved, now.to_dict(), "finetune")

    assert diffs() == []
    # where and how long it runs may change
    assert diffs("finetune.epochs=8", "finetune.workers=1", "finetune.max_failures=3",
                 "data.s3_endpoint=http://x:9000", "model.backend=dense",
                 "pretrain.lr=0.01",
                 "tune.samples=3") == []
    # what it learns may not, and neither may fewer epochs than it has checkpoints for
    assert diffs("finetune.tau=0.8", "model.hidden=32", "finetune.epochs=4") == [
        "model.hidden: 64 -> 32", "finetune.epochs: 5 -> 4", "finetune.tau: 0.95 -> 0.8"]
    legacy = {**saved, "data": {k: v for k, v in saved["data"].items() if k != "normalize"}}
    now = config.load(overrides=["finetune.epochs=5", "finetune.workers=2"]).to_dict()
    assert config.resume_differences(legacy, now, "finetune") == []  # key added later


def test_missingness_is_one_section_with_its_own_seed():
    """Both stages read ``missing``; keys of the former per-stage layout are refused by name,
    and the mask seed is not the training seed."""
    from sslmm_ray.data import pipeline
    from sslmm_ray.train.stages import FINETUNE, PRETRAIN

    cfg = config.load(overrides=["missing.rate=0.3", "missing.seed=5", "finetune.seed=9",
                                 "pretrain.seed=2"])
    want = {"missing_rate": 0.3, "protocol": "modality", "seed": 5}
    assert PRETRAIN.protocol(cfg) == FINETUNE.protocol(cfg) == want
    assert pipeline.missing_spec(cfg.missing) == want
    for old in ("finetune.missing_rate=0.3", "pretrain.protocol=frame"):
        with pytest.raises(ConfigError, match=r"is now 'missing\."):
            config.load(overrides=[old])


def test_cli_help_is_derived_from_the_config_fields():
    """Each setting is documented once, on its field; the command line shows that text and
    the field's default."""
    from typer.testing import CliRunner

    from sslmm_ray.cli import app

    assert config.describe("finetune.tau") == (
        "Pseudo-label confidence threshold. (config finetune.tau, default 0.95)")
    assert "default 20" in config.describe("pretrain.epochs")  # the stage's own default
    assert config.describe("pretrain.seed") == config.describe("finetune.seed").replace(
        "finetune", "pretrain")  # inherited description, documented once
    shown = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "250"}).output
    for key in ("finetune.tau", "finetune.lambda_rec", "missing.rate", "missing.seed",
                "finetune.epochs", "model.fusion"):
        assert config.describe(key) in shown, key
