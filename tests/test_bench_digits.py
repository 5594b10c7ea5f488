"""The offline real-data benchmark: the digits builder, the peers' data, and one short run."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sslmm_ray import cli
from sslmm_ray import config as config_mod
from sslmm_ray.bench import accuracy, digits, peers
from sslmm_ray.config import MODALITIES
from sslmm_ray.data import mmsa, pipeline, protocols, store
from sslmm_ray.data.sources import RawDataset
from sslmm_ray.errors import UserError

N_DIGITS = 1797  # scikit-learn's bundled copy of UCI optdigits (test set)


# ------------------------------------------------------------------------- the digits builder


def test_digits_shapes_labels_and_sign_balance() -> None:
    data = digits.build(seed=0)
    assert sum(len(d["id"]) for d in data.values()) == N_DIGITS
    grid = set(np.round(digits.labels_of(np.arange(10)), 6))
    for split, d in data.items():
        n = len(d["id"])
        assert d["text"].shape == (n, 8, 8), split
        assert d["audio"].shape == (n, 1, 64), split
        assert d["vision"].shape == (n, 16, 9), split
        assert d["text_bert"].shape == (n, 3, 8) and (d["text_bert"][:, 1] == 1).all()
        assert (d["audio_lengths"] == 1).all() and (d["vision_lengths"] == 16).all()
        y = d["regression_labels"]
        assert y.dtype == np.float32 and y.min() >= -3 and y.max() <= 3
        assert set(np.round(y, 6)) <= grid
        assert not (y == 0).any()  # a sign classifier and the Non0 metrics see every row
        positive = (y > 0).mean()
        assert 0.45 < positive < 0.55, (split, positive)  # digits 5-9 vs 0-4
        for m in MODALITIES:
            assert np.isfinite(d[m]).all()


def test_digits_split_is_deterministic_disjoint_and_stratified() -> None:
    a, b, other = digits.build(seed=0), digits.build(seed=0), digits.build(seed=1)
    for split in a:
        assert list(a[split]["id"]) == list(b[split]["id"])
        np.testing.assert_array_equal(a[split]["vision"], b[split]["vision"])
    assert list(a["train"]["id"]) != list(other["train"]["id"])
    ids = {s: set(d["id"]) for s, d in a.items()}
    assert not (ids["train"] & ids["valid"] or ids["train"] & ids["test"]
                or ids["valid"] & ids["test"])
    assert len(ids["train"] | ids["valid"] | ids["test"]) == N_DIGITS
    _, targets = digits._load_digits()
    parts = digits.split_indices(targets, seed=0)
    for digit in range(10):
        n = int((targets == digit).sum())
        assert int((targets[parts["train"]] == digit).sum()) == round(0.6 * n)
        assert int((targets[parts["valid"]] == digit).sum()) == round(0.2 * n)


# ------------------------------------------------------------------- peers see SSLMM's data


@pytest.fixture(scope="module")
def digits_raw() -> RawDataset:
    return mmsa.from_mmsa_dict(digits.build(seed=0), "mosi")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> str:
    """Written exactly as the benchmark writes it (through ``load_pickle``)."""
    return accuracy.write_data("digits", tmp_path_factory.mktemp("digits"))


def _cell(ratio: float, rate: float, seed: int) -> config_mod.ExperimentConfig:
    return config_mod.load(overrides=[
        f"finetune.label_ratio={ratio}", f"missing.rate={rate}", f"finetune.seed={seed}",
        f"missing.seed={seed}",
    ])


def test_peers_see_the_labeled_rows_and_masks_of_finetune_specs(digits_store: str) -> None:
    manifest = store.open_dataset(digits_store)
    cfg = _cell(0.1, 0.5, seed=3)
    data = peers.load_splits(manifest, cfg.finetune, missing=cfg.missing)
    train, test = data["train"], data["test"]
    specs = pipeline.finetune_specs(manifest, cfg.finetune, missing=cfg.missing)
    keys = protocols.sample_keys(train.ids)
    np.testing.assert_array_equal(np.sort(keys[train.labeled]), specs["train"].labeled_keys)
    truth = store.read_split(manifest, "train")
    by_id = dict(zip(truth["id"], truth["label"], strict=True))
    labels = np.array([by_id[i] for i in train.ids])
    for sign in (-1, 1):
        stratum = np.sign(labels) == sign
        assert train.labeled[stratum].sum() == round(0.1 * stratum.sum())
    assert (train.label[~train.labeled] == 0).all()  # withheld before a peer could read it
    assert test.labeled.all()
    # The modality-level protocol hides about half of the (sample, modality) pairs, keeps one.
    assert abs(1 - train.present.mean() - 0.5) < 0.05 and train.present.any(axis=1).all()
    for split, d in data.items():
        masks = protocols.observed_masks(store.read_split(manifest, split), specs[split])
        np.testing.assert_array_equal(
            d.present, np.stack([masks[m].any(axis=1) for m in MODALITIES], axis=1))


def _scramble(raw: RawDataset, hidden: dict[str, dict[str, np.ndarray]]) -> RawDataset:
    """A copy whose values in the given (row id, modality) pairs are replaced by noise."""
    out = copy.deepcopy(raw)
    rng = np.random.default_rng(0)
    for split, arrays in out.splits.items():
        for m in MODALITIES:
            rows = np.isin(arrays["id"], hidden[split][m])
            assert rows.sum() == len(hidden[split][m]), (split, m)
            arrays[m][rows] = rng.normal(0, 50, arrays[m][rows].shape).astype(np.float32)
    return out


def _features(uri: str, cfg: config_mod.ExperimentConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rows sorted by id: the peers' preprocessed train and test inputs, and the splits."""
    data = peers.load_splits(store.open_dataset(uri), cfg.finetune, missing=cfg.missing)
    order = {s: np.argsort(d.ids) for s, d in data.items()}
    train, test = data["train"], data["test"]
    prep = peers.preprocessing().fit(train.x[train.labeled])
    return (prep.transform(train.x)[order["train"]], prep.transform(test.x)[order["test"]],
            {s: (d, order[s]) for s, d in data.items()})


def test_a_missing_modality_carries_no_information_to_a_peer(
    digits_raw: RawDataset, tmp_path: Path
) -> None:
    ft = _cell(0.5, 0.5, seed=1)
    base = str(tmp_path / "base")
    store.write_dataset(digits_raw, base)
    x_train, x_test, data = _features(base, ft)
    missing = {s: {m: d.ids[~d.present[:, j]] for j, m in enumerate(MODALITIES)}
               for s, (d, _) in data.items()}
    missing["valid"] = {m: np.array([], object) for m in MODALITIES}
    changed = str(tmp_path / "changed")
    store.write_dataset(_scramble(digits_raw, missing), changed)
    y_train, y_test, changed_data = _features(changed, ft)
    np.testing.assert_array_equal(x_train, y_train)
    np.testing.assert_array_equal(x_test, y_test)
    for name in ("ridge", "label_spreading"):  # and so the predictions do not move either
        a = peers.fit_predict(name, data["train"][0], data["test"][0], seed=0)
        b = peers.fit_predict(name, changed_data["train"][0], changed_data["test"][0], seed=0)
        np.testing.assert_array_equal(a[data["test"][1]], b[changed_data["test"][1]])
    # Control: noise in modalities the protocol keeps does reach the features.
    kept = {s: {m: d.ids[d.present[:, j]] for j, m in enumerate(MODALITIES)}
            for s, (d, _) in data.items()}
    kept["valid"] = missing["valid"]
    control = str(tmp_path / "control")
    store.write_dataset(_scramble(digits_raw, kept), control)
    z_train, _, _ = _features(control, ft)
    assert not np.allclose(x_train, z_train)


def test_classifiers_report_only_what_a_sign_defines() -> None:
    labels = np.array([-2.0, -1.0, 1.0, 2.0])
    signs = np.array([-1.0, 1.0, 1.0, 1.0])
    m = peers.score("logistic", signs, labels, "mosi")
    assert m["Non0_acc_2"] == pytest.approx(0.75) and m["Has0_acc_2"] == pytest.approx(0.75)
    assert m["MAE"] is None and m["Corr"] is None and m["Mult_acc_7"] is None
    assert peers.score("ridge", signs, labels, "mosi")["MAE"] == pytest.approx(1.0)


def test_label_spreading_gives_rows_no_label_reaches_the_labeled_majority() -> None:
    """sklearn leaves them NaN (then 'negative' by argmax); the prior is the honest guess."""
    rng = np.random.default_rng(0)
    reached, cut_off = rng.normal(0, 1, (20, 3)), rng.normal(1000, 1, (20, 3))
    label = np.r_[np.full(15, 1.0), np.full(5, -1.0), np.zeros(20)].astype(np.float32)
    labeled = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    train = peers.Split(np.arange(40).astype(object), np.r_[reached, cut_off], label, labeled,
                        np.ones((40, 3), bool))
    test = peers.Split(np.arange(2).astype(object), np.r_[cut_off[:1], cut_off[:1] + 0.1],
                       np.ones(2, np.float32), np.ones(2, bool), np.ones((2, 3), bool))
    pred = peers.fit_predict("label_spreading", train, test, seed=0)
    np.testing.assert_array_equal(pred, [1.0, 1.0])


# ------------------------------------------------------------------ the benchmark's plumbing


def test_cells_and_names_parse_or_say_what_is_wrong() -> None:
    assert accuracy.parse_cells("0.1:0.5, 0.5:0.5") == [(0.1, 0.5), (0.5, 0.5)]
    for bad in ("0.1", "0.1:x", "0:0.5", "0.5:1.0"):
        with pytest.raises(UserError, match="cell"):
            accuracy.parse_cells(bad)
    assert accuracy.parse_names("none", list(accuracy.VARIANTS), "variants") == []
    assert accuracy.parse_names(None, list(accuracy.VARIANTS), "variants") is None
    with pytest.raises(UserError, match="unknown variants"):
        accuracy.parse_names("sslmm,nope", list(accuracy.VARIANTS), "variants")


def test_summary_compares_with_the_best_peer_and_keeps_peers_out_of_ablations() -> None:
    def run(acc: float, mae: float | None) -> dict[str, float | None]:
        return {"Non0_acc_2": acc, "MAE": mae}

    out = accuracy.summarize({
        "sslmm": [run(0.80, 1.0), run(0.82, 1.2)],
        "no_reconstruction": [run(0.79, 1.0)],
        "ridge": [run(0.70, 1.5)],
        "label_spreading": [run(0.85, None), run(0.87, None)],
    })
    assert out["best_peer"] == "label_spreading"
    assert out["gain_vs_best_peer_points"] == pytest.approx(-5.0)
    assert out["ablation_cost_points"] == pytest.approx({"no_reconstruction": 2.0})
    assert out["summary"]["label_spreading"]["MAE"] == {"mean": None, "std": None}
    text = str(accuracy._cell_text(out["summary"]["label_spreading"]["MAE"]))
    assert text == "—"


# ---------------------------------------------------------------------------- end to end


def test_bench_accuracy_digits_end_to_end(ray_cluster, monkeypatch, capsys) -> None:
    """One cell, one seed, one epoch per stage: every method reports, peers clear chance."""
    args = [
        "bench", "accuracy", "--dataset", "digits", "--seeds", "1", "--cells", "0.5:0.5",
        "--epochs", "1", "--pretrain-epochs", "1", "--variants", "sslmm",
        # A small network and one variant keep the suite short (another variant is only other
        # overrides of the same run_stage path; summarize's comparisons have their own test).
        "--set", "model.hidden=16", "--set", "model.segments=4", "--set", "model.iterations=1",
        "--json",
    ]
    monkeypatch.setattr(sys, "argv", ["sslmm", *args])
    try:
        cli.main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["setting"]["dataset"] == "digits"
    assert result["setting"]["counts"]["train"] == 1078
    (cell,) = result["cells"]
    assert (cell["label_ratio"], cell["missing_rate"]) == (0.5, 0.5)
    methods = ["sslmm", *peers.PEERS]
    assert list(cell["runs"]) == methods and list(cell["summary"]) == methods
    for name in methods:
        (metrics,) = cell["runs"][name]
        assert set(metrics) == {"Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
                                "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"}, name
        assert 0.0 <= metrics["Non0_acc_2"] <= 1.0
        assert (metrics["MAE"] is None) == (name in peers.CLASSIFIERS)
        assert cell["summary"][name]["Non0_acc_2"]["mean"] == metrics["Non0_acc_2"]
    for name in ("ridge", "logistic", "label_spreading"):
        assert cell["runs"][name][0]["Non0_acc_2"] > 0.7, name  # chance is 0.5
    assert cell["best_peer"] in peers.PEERS and "gain_vs_best_peer_points" in cell
    # the offline pseudo-label diagnostic scored the sslmm run against the withheld labels
    (diag,) = cell["pseudo_labels"]
    assert diag["unlabeled"] == 1078 - round(0.5 * 537) - round(0.5 * 541)  # per sign stratum
    assert 0.0 <= diag["pseudo_label_fraction"] <= 1.0
    assert 0.0 <= diag["sign_accuracy_all"] <= 1.0
    # the graph labelled the rows the teacher was unsure of, mostly right (chance is 0.5)
    assert diag["graph_label_fraction"] + diag["pseudo_label_fraction"] > 0.9
    assert diag["sign_accuracy_graph"] > 0.75 and diag["sign_accuracy_used"] > 0.75
