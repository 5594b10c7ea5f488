"""The experimental protocols: label ratio and missing modalities (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from sslmm_ray.data import protocols, synth
from sslmm_ray.data.protocols import ProtocolSpec
from sslmm_ray.data.sources import MODALITIES
from sslmm_ray.errors import UserError


@pytest.fixture(scope="module")
def split() -> dict[str, np.ndarray]:
    """A MOSI-shaped training split with a few hundred rows (aligned: short frames, fast)."""
    raw = synth.generate("mosi", scale=0.2, aligned=True, seed=3)
    return raw.splits["train"]


@pytest.fixture(scope="module")
def small(split) -> dict[str, np.ndarray]:
    """The first 48 rows, for the tests that copy every array."""
    return {k: v[:48] for k, v in split.items()}


def _present(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([batch[f"{m}_mask"].any(axis=1) for m in MODALITIES], axis=1)


def test_sample_keys_are_stable_and_distinct() -> None:
    ids = [f"synth-mosi-train-{i:05d}" for i in range(20000)]
    keys = protocols.sample_keys(ids)
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == len(ids)
    np.testing.assert_array_equal(protocols.sample_keys(ids[::-1]), keys[::-1])
    # a pure function of the id: pinned so that masks cannot drift between releases
    assert protocols.sample_keys(["a"])[0] == protocols.sample_keys(np.array(["a"]))[0]


def test_same_seed_same_split_and_masks_other_seed_differs(split) -> None:
    ids, labels = split["id"], split["label"]
    a = protocols.labeled_keys(ids, labels, 0.3, seed=7)
    b = protocols.labeled_keys(ids, labels, 0.3, seed=7)
    c = protocols.labeled_keys(ids, labels, 0.3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for proto in ("modality", "frame"):
        x = protocols.apply(split, ProtocolSpec(0.5, proto, seed=7, labeled_keys=a))
        y = protocols.apply(split, ProtocolSpec(0.5, proto, seed=7, labeled_keys=b))
        z = protocols.apply(split, ProtocolSpec(0.5, proto, seed=8, labeled_keys=c))
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert not np.array_equal(x["audio_mask"], z["audio_mask"])


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.9])
def test_label_ratio_stratified_by_sign(split, ratio: float) -> None:
    ids, labels = split["id"], split["label"]
    keep = protocols.labeled_mask(ids, labels, ratio, seed=1)
    assert abs(keep.mean() - ratio) <= 1.5 / len(ids) * 3
    for sign in (-1, 0, 1):
        members = np.sign(labels) == sign
        if members.sum():
            assert keep[members].sum() == round(ratio * members.sum())
    keys = protocols.labeled_keys(ids, labels, ratio, seed=1)
    batch = protocols.apply(split, ProtocolSpec(labeled_keys=keys))
    np.testing.assert_array_equal(batch["labeled"], keep)
    assert (batch["label"][~keep] == 0).all()
    np.testing.assert_array_equal(batch["label"][keep], labels[keep])


def test_label_ratio_bounds() -> None:
    with pytest.raises(ValueError, match="label ratio"):
        protocols.labeled_mask(np.array(["a"]), np.array([1.0]), 0.0, seed=0)
    keep = protocols.labeled_mask(np.array(["a", "b"]), np.array([1.0, -1.0]), 1.0, seed=0)
    assert keep.all()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.6, 2 / 3])
def test_modality_rate_met_and_one_kept(split, rate: float) -> None:
    batch = protocols.apply(split, ProtocolSpec(rate, "modality", seed=11))
    present = _present(batch)
    assert present.any(axis=1).all()  # at least one modality per sample
    n = present.size
    tol = 3 * np.sqrt(rate * (1 - rate) / n) + 0.01
    assert abs((~present).mean() - rate) <= tol, ((~present).mean(), rate)


def test_modality_rate_above_reach_is_refused_with_the_maximum_named(split) -> None:
    with pytest.raises(UserError, match=r"0\.9 is not reachable.*at most 0\.6667"):
        ProtocolSpec(0.9, "modality", seed=2)
    batch = protocols.apply(split, ProtocolSpec(2 / 3, "modality", seed=2))  # the maximum
    assert (_present(batch).sum(axis=1) == 1).all()
    frame = ProtocolSpec(0.9, "frame", seed=2)  # frame level reaches it
    assert frame.missing_rate == 0.9


@pytest.mark.parametrize(
    "overrides",
    [
        ["missing.rate=0.7"],
        ["tune.missing_rates=[0.5,0.7]"],
    ],
)
def test_config_refuses_unreachable_rates(overrides) -> None:
    from sslmm_ray import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="not reachable"):
        config_mod.load(overrides=overrides)
    frame_level = ["missing.protocol=frame"]
    frame = config_mod.load(overrides=[*overrides, *frame_level])
    assert frame is not None
    assert max(config_mod.load().tune.missing_rates) <= config_mod.MAX_MODALITY_RATE


def test_calibration_solves_the_rate_equation() -> None:
    for r in (0.05, 0.25, 0.5, 0.66):
        q = protocols.calibrated_draw_prob(r)
        assert abs(q - q**3 / 3 - r) < 1e-9


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_frame_rate_met(split, rate: float) -> None:
    batch = protocols.apply(split, ProtocolSpec(rate, "frame", seed=5))
    valid = total = 0
    for m in MODALITIES:
        frames = np.arange(split[m].shape[1])[None, :] < split[f"{m}_len"][:, None]
        mask = batch[f"{m}_mask"]
        assert not (mask & ~frames).any()  # never a padding frame
        valid += frames.sum()
        total += (frames & ~mask).sum()
    tol = 3 * np.sqrt(rate * (1 - rate) / valid) + 0.005
    assert abs(total / valid - rate) <= tol
    assert _present(batch).any(axis=1).all()


@pytest.mark.parametrize("proto", ["modality", "frame"])
def test_masks_independent_of_batch_composition(small, proto: str) -> None:
    split = small
    spec = ProtocolSpec(0.5, proto, seed=4)
    whole = protocols.apply(split, spec)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(split["id"]))
    for chunk in np.array_split(order, 7):
        part = protocols.apply({k: v[chunk] for k, v in split.items()}, spec)
        for k, v in part.items():
            np.testing.assert_array_equal(v, whole[k][chunk], err_msg=k)


@pytest.mark.parametrize("proto", ["modality", "frame"])
def test_garbage_in_hidden_slots_and_unlabeled_labels_changes_nothing(small, proto) -> None:
    split = small
    keys = protocols.labeled_keys(split["id"], split["label"], 0.3, seed=9)
    spec = ProtocolSpec(0.5, proto, seed=9, labeled_keys=keys)
    clean = protocols.apply(split, spec)
    dirty = {k: v.copy() for k, v in split.items()}
    rng = np.random.default_rng(1)
    for m in MODALITIES:
        hidden = ~clean[f"{m}_mask"]  # missing frames, missing modalities and padding
        garbage = rng.standard_normal(dirty[m].shape).astype(np.float32) * 1e6
        garbage.flat[:: 97] = np.nan
        garbage.flat[1:: 89] = np.inf
        dirty[m] = np.where(hidden[:, :, None], garbage, dirty[m])
    unlabeled = ~clean["labeled"]
    dirty["label"] = np.where(unlabeled, np.float32(1e9), dirty["label"])
    out = protocols.apply(dirty, spec)
    for k in clean:
        np.testing.assert_array_equal(out[k], clean[k], err_msg=k)
    for m in MODALITIES:
        assert np.isfinite(out[m]).all()
        assert (out[m][~out[f"{m}_mask"]] == 0).all()


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="missing rate"):
        ProtocolSpec(1.0)
    with pytest.raises(ValueError, match="protocol"):
        ProtocolSpec(0.1, "sample")  # type: ignore[arg-type]
    spec = ProtocolSpec(labeled_keys=np.array([5, 3, 5], dtype=np.uint64))
    np.testing.assert_array_equal(spec.labeled_keys, [3, 5])


@pytest.mark.parametrize("proto", ["modality", "frame"])
def test_inplace_gives_the_same_batch_and_copies_what_it_does_not_own(small, proto) -> None:
    """``inplace=True`` zeroes hidden frames in the caller's writable float32 arrays (as the
    pipeline does after normalising) with the same result as the copying path, NaN included;
    read-only arrays (Arrow views) are copied regardless, and the default never writes."""
    spec = ProtocolSpec(0.5, proto, seed=5)
    before = {k: v.copy() for k, v in small.items()}
    expected = protocols.apply(small, spec)
    for k, v in small.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)  # the default copied
    owned = {k: v.copy() for k, v in small.items()}
    for m in MODALITIES:
        owned[m] = owned[m].astype(np.float32)
        owned[m][~expected[f"{m}_mask"]] = np.nan  # garbage where frames are hidden
    frozen = {k: v.copy() for k, v in owned.items()}
    for m in MODALITIES:
        frozen[m].flags.writeable = False
    for arrays in (owned, frozen):
        out = protocols.apply(arrays, spec, inplace=True)
        for k in expected:
            np.testing.assert_array_equal(out[k], expected[k], err_msg=k)
    for m in MODALITIES:
        assert np.shares_memory(protocols.apply(owned, spec, inplace=True)[m], owned[m])
        assert np.isnan(frozen[m]).any()  # read-only input untouched (it was copied)
