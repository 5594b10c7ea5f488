"""MMSA metrics against values worked out by hand on tiny arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sslmm_ray.metrics import (
    METRIC_NAMES,
    compute_metrics,
    dataset_family,
    headline_metric,
    higher_is_better,
)

# MOSI/MOSEI case. Has0 (>= 0) truth FTTTFT, preds FTFTTF -> 3/6 right.
# Has0 F1: class T support 4, TP 2, predicted 3 -> 4/7; class F support 2, TP 1, predicted 3
# -> 2/5; weighted (4*4/7 + 2*2/5)/6 = 3.6/7.
# Non0 drops samples 1 and 5 (true 0): truth FTTF, preds FFTT -> 2/4, F1 0.5 for both classes.
# Mult_acc_7: round-half-even of clipped values: preds -2,0,-0,2,0,-0 vs truth -2,0,1,3,-0,0
# -> 4/6 (-1.5 -> -2 and 0.5 -> 0 as np.round does). Mult_acc_5 clips 2.2 and 2.6 to 2 -> 5/6.
# MAE: (0.5 + 0.3 + 1.2 + 0.4 + 0.9 + 0.1) / 6.
MOSI_PRED = [-1.5, 0.3, -0.2, 2.2, 0.5, -0.1]
MOSI_TRUE = [-2.0, 0.0, 1.0, 2.6, -0.4, 0.0]

# SIMS case with labels exactly on bin edges (-0.1, 0.1, 0.7, 0.0), one pred clipped (-1.6).
# Bins are (lo, hi]. 2 classes: truth 0,1,1,0,0,1 preds 0,0,1,1,0,1 -> 4/6, F1 2/3 per class.
# 3 classes: truth 0,1,2,1,0,2 preds 0,1,2,1,0,1 -> 5/6.
# 5 classes: truth 1,2,3,2,0,4 preds 1,2,4,2,0,2 -> 4/6.
# MAE on clipped values: (0.1 + 0.1 + 0.05 + 0.05 + 0 + 0.8) / 6.
SIMS_PRED = [-0.2, 0.0, 0.75, 0.05, -1.6, 0.1]
SIMS_TRUE = [-0.1, 0.1, 0.7, 0.0, -1.0, 0.9]


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5


def test_mosi_hand_computed() -> None:
    m = compute_metrics(np.array(MOSI_PRED), np.array(MOSI_TRUE), "mosi")
    assert list(m) == list(METRIC_NAMES["mosi"])
    expected = {
        "Has0_acc_2": 0.5,
        "Has0_F1_score": 3.6 / 7,
        "Non0_acc_2": 0.5,
        "Non0_F1_score": 0.5,
        "Mult_acc_5": 5 / 6,
        "Mult_acc_7": 4 / 6,
        "MAE": 3.4 / 6,
        "Corr": _pearson(MOSI_PRED, MOSI_TRUE),
    }
    assert m == pytest.approx(expected, abs=1e-12)
    assert all(type(v) is float for v in m.values())


def test_mosei_same_definitions_as_mosi() -> None:
    assert compute_metrics(MOSI_PRED, MOSI_TRUE, "mosei") == compute_metrics(
        MOSI_PRED, MOSI_TRUE, "synthetic-mosi"
    )


def test_non0_excludes_true_zeros_only() -> None:
    # Wrong signs only where the truth is 0: Non0 is perfect, Has0 is not.
    pred = [1.0, -1.0, -0.5, 0.5]
    true = [2.0, -2.0, 0.0, 0.0]
    m = compute_metrics(pred, true, "mosi")
    assert m["Non0_acc_2"] == 1.0 and m["Non0_F1_score"] == 1.0
    assert m["Has0_acc_2"] == 0.75  # -0.5 vs truth 0 (>= 0) is the one miss
    # A zero PREDICTION is kept in Non0 and counts as negative (not > 0).
    assert compute_metrics([0.0, 1.0], [1.0, 1.0], "mosi")["Non0_acc_2"] == 0.5


def test_non0_all_zero_labels_is_defined() -> None:
    m = compute_metrics([0.3, -0.2, 0.0], [0.0, 0.0, 0.0], "mosi")
    assert m["Non0_acc_2"] == 0.0 and m["Non0_F1_score"] == 0.0
    assert m["Corr"] == 0.0
    assert all(np.isfinite(v) for v in m.values())


def test_weighted_f1_class_only_in_predictions() -> None:
    # Truth all positive: class "negative" has support 0 and weight 0 (sklearn's result 6/7).
    m = compute_metrics([1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], "mosi")
    assert m["Non0_F1_score"] == pytest.approx(6 / 7)
    assert m["Non0_acc_2"] == 0.75


def test_sims_bin_edges_hand_computed() -> None:
    m = compute_metrics(SIMS_PRED, SIMS_TRUE, "sims")
    assert list(m) == list(METRIC_NAMES["sims"])
    clipped = [max(-1.0, min(1.0, p)) for p in SIMS_PRED]
    expected = {
        "Mult_acc_2": 4 / 6,
        "Mult_acc_3": 5 / 6,
        "Mult_acc_5": 4 / 6,
        "F1_score": 2 / 3,
        "MAE": 1.1 / 6,
        "Corr": _pearson(clipped, SIMS_TRUE),
    }
    assert m == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("value", "c2", "c3", "c5"),
    [
        (-1.0, 0, 0, 0),
        (-0.7, 0, 0, 0),
        (-0.1, 0, 0, 1),
        (0.0, 0, 1, 2),
        (0.1, 1, 1, 2),
        (0.7, 1, 2, 3),
        (1.0, 1, 2, 4),
    ],
)
def test_sims_edges_are_right_closed(value: float, c2: int, c3: int, c5: int) -> None:
    # An edge value belongs to the bin it closes, (lo, hi], in float64 and float32 alike.
    from sslmm_ray.metrics import SIMS_EDGES_2, SIMS_EDGES_3, SIMS_EDGES_5, _bins

    for dtype in (np.float64, np.float32):
        x = np.array([value], dtype=dtype)
        assert _bins(x, SIMS_EDGES_2)[0] == c2
        assert _bins(x, SIMS_EDGES_3)[0] == c3
        assert _bins(x, SIMS_EDGES_5)[0] == c5


def _mmsa_style_bins(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """MMSA's loop, as written there, for a cross-check on random data."""
    out = x.copy()
    for i in range(len(edges) - 1):
        out[np.logical_and(x > edges[i], x <= edges[i + 1])] = i
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sims_matches_mmsa_loop_on_random_data(dtype: type) -> None:
    rng = np.random.default_rng(0)
    grid = np.array([-1.0, -0.7, -0.1, 0.0, 0.1, 0.7, 1.0])
    pred = np.concatenate([rng.uniform(-1.3, 1.3, 200), rng.choice(grid, 100)]).astype(dtype)
    true = np.concatenate([rng.uniform(-1, 1, 200), rng.choice(grid, 100)]).astype(dtype)
    m = compute_metrics(pred, true, "sims")
    p, t = np.clip(pred, -1.0, 1.0), np.clip(true, -1.0, 1.0)
    for name, edges in [
        ("Mult_acc_2", [-1.01, 0.0, 1.01]),
        ("Mult_acc_3", [-1.01, -0.1, 0.1, 1.01]),
        ("Mult_acc_5", [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01]),
    ]:
        ref = np.mean(_mmsa_style_bins(p, edges) == _mmsa_style_bins(t, edges))
        assert m[name] == pytest.approx(ref), name


def test_constant_prediction_corr_defined_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(np.full(5, 0.1), np.array([-2.0, -1.0, 0.5, 1.0, 3.0]), "mosi")
        s = compute_metrics(np.full(5, 0.1, dtype=np.float32), np.linspace(-1, 1, 5), "sims")
    assert m["Corr"] == 0.0 and s["Corr"] == 0.0
    assert m["Has0_acc_2"] == 0.6  # everything predicted non-negative, 3 of 5 are


def test_torch_tensor_input() -> None:
    torch = pytest.importorskip("torch")
    pred = torch.tensor(MOSI_PRED, requires_grad=True).view(-1, 1)  # (N, 1) like a head
    true = torch.tensor(MOSI_TRUE, dtype=torch.float64)
    m = compute_metrics(pred, true, "mosi")
    ref = compute_metrics(np.array(MOSI_PRED, dtype=np.float32), MOSI_TRUE, "mosi")
    assert m == ref
    assert m["Non0_acc_2"] == 0.5
    s = compute_metrics(torch.tensor(SIMS_PRED), torch.tensor(SIMS_TRUE), "sims")
    assert s["Mult_acc_3"] == pytest.approx(5 / 6)  # float32 edges behave as in float64


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        compute_metrics([1.0, 2.0], [1.0], "mosi")
    with pytest.raises(ValueError, match="zero samples"):
        compute_metrics([], [], "sims")
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics([np.nan, 1.0], [1.0, 1.0], "mosi")
    with pytest.raises(ValueError, match="iemocap"):
        compute_metrics([1.0], [1.0], "iemocap")


def test_names_family_headline_direction() -> None:
    assert dataset_family("MOSEI") == "mosei"
    assert dataset_family("synthetic-mosi") == "mosi"
    assert dataset_family("synth_sims") == "sims"
    assert headline_metric("mosi") == "Non0_acc_2"
    assert headline_metric("mosei") == "Non0_acc_2"
    assert headline_metric("sims") == "Mult_acc_2"
    assert higher_is_better("Non0_acc_2") and higher_is_better("Corr")
    assert not higher_is_better("MAE")
    with pytest.raises(ValueError, match="Loss"):
        higher_is_better("Loss")


def test_bench_accuracy_summary_states_the_goal_in_points() -> None:
    from sslmm_ray.bench.accuracy import summarize

    def run(acc: float) -> dict[str, float]:
        return {"Non0_acc_2": acc, "Non0_F1_score": acc, "MAE": 1.0, "Corr": 0.5}

    out = summarize({
        "sslmm": [run(0.70), run(0.74)],
        "supervised_only": [run(0.68), run(0.70)],
        "no_pseudo_labels": [run(0.71), run(0.71)],
        "fully_labeled": [run(0.75), run(0.75)],
    })
    assert out["summary"]["sslmm"]["Non0_acc_2"] == pytest.approx({"mean": 0.72, "std": 0.02})
    assert out["gain_vs_supervised_points"] == pytest.approx(3.0)
    assert out["headroom_points"] == pytest.approx(6.0)
    assert out["ablation_cost_points"] == pytest.approx({"no_pseudo_labels": 1.0})
