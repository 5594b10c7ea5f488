"""MMSA pickle import and the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from mmsa_fixtures import make_mmsa_dict, write_mmsa_pickle

from sslmm_ray.data import safe_pickle
from sslmm_ray.data.mmsa import load_pickle
from sslmm_ray.data.safe_pickle import UnsafePickleError
from sslmm_ray.data.sources import LENGTH_KEYS, MODALITIES, PRESETS, DataError, validate_raw

SPLITS = ("train", "valid", "test")


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
@pytest.mark.parametrize("aligned", [True, False])
def test_import_real_layout(tmp_path: Path, dataset: str, aligned: bool) -> None:
    p = PRESETS[dataset]
    src = make_mmsa_dict(dataset, aligned, seed=5)
    path = write_mmsa_pickle(tmp_path / "data.pkl", dataset, aligned, seed=5)
    raw = load_pickle(path, dataset)  # type: ignore[arg-type]

    validate_raw(raw, dims=p.dims, deep=True)  # finite, zero padding, ranges
    assert raw.name == dataset and raw.label_range == p.label_range
    assert raw.counts() == {"train": 8, "valid": 4, "test": 4}
    assert raw.dims() == dict(p.dims)
    assert raw.max_lengths() == p.lengths(aligned)
    assert raw.stats["aligned"] is aligned
    assert raw.stats["file"] == "data.pkl"
    nonfinite = {m: sum(int((~np.isfinite(src[s][m])).sum()) for s in SPLITS) for m in MODALITIES}
    assert nonfinite["audio"] > 0
    assert raw.stats["nonfinite_replaced"] == nonfinite
    for s in SPLITS:
        arr, d = raw.splits[s], src[s]
        assert arr["id"].tolist() == [str(x) for x in d["id"]]
        np.testing.assert_array_equal(arr["label"], d["regression_labels"])
        text_len = d["text_bert"][:, 1, :].sum(axis=1).astype(int)
        np.testing.assert_array_equal(arr["text_len"], text_len)
        for m in ("audio", "vision"):
            want = text_len if aligned else np.clip(np.asarray(d[f"{m}_lengths"]), 1, None)
            np.testing.assert_array_equal(arr[LENGTH_KEYS[m]], want)
        assert arr["text"].dtype == np.float32
        # valid, finite frames pass through unchanged
        ok = np.isfinite(d["text"])
        np.testing.assert_array_equal(arr["text"][ok], d["text"][ok])
    if not aligned:
        assert raw.stats["lengths_clipped"]["audio"] == 3  # one zero length per split
        assert raw.stats["padding_values_zeroed"]["vision"] > 0


def test_aligned_lengths_come_from_text_mask_even_if_lengths_present(tmp_path: Path) -> None:
    data = make_mmsa_dict("mosi", aligned=True)
    for s in SPLITS:
        data[s]["audio_lengths"] = [1] * len(data[s]["id"])
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(data))
    raw = load_pickle(path, "mosi")
    assert np.array_equal(raw.splits["train"]["audio_len"], raw.splits["train"]["text_len"])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_xyz"
    path = write_mmsa_pickle(tmp_path / "evil.pkl", "mosi", False, payload=_RunsCode(marker))
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system") as info:
        load_pickle(path, "mosi")
    assert "numpy arrays" in str(info.value)
    assert isinstance(info.value, DataError)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    [(eval, ("1",)), (getattr, ("abc", "upper")), (np.load, ("x",)), (Path, ("x",))],
    ids=["eval", "getattr", "numpy.load", "pathlib"],
)
def test_other_globals_are_refused(target: tuple) -> None:
    class Reducer:
        def __reduce__(self):
            return target

    with pytest.raises(UnsafePickleError, match="refused to load global"):
        safe_pickle.loads(pickle.dumps({"x": Reducer()}))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_and_containers_round_trip(protocol: int) -> None:
    obj = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "o": np.array(["a", "bb"], dtype=object),
        "u": np.array(["xyz"]),
        "scalars": [np.float64(1.5), np.int64(3), 2.0, None, True, b"raw", ("t",)],
        "s": {1, 2},
    }
    back = safe_pickle.loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(back["f"], obj["f"])
    assert back["o"].tolist() == ["a", "bb"] and back["u"].tolist() == ["xyz"]
    assert back["scalars"] == obj["scalars"] and back["s"] == {1, 2}


@pytest.mark.parametrize("uri", ["s3://bucket/aligned_50.pkl", "https://example.org/x.pkl"])
def test_remote_paths_are_refused(uri: str) -> None:
    with pytest.raises(UnsafePickleError, match="pickles are loaded only from trusted local paths"):
        load_pickle(uri, "mosi")


def test_file_uri_and_missing_file(tmp_path: Path) -> None:
    path = write_mmsa_pickle(tmp_path / "x.pkl", "sims", True)
    assert load_pickle(f"file://{path}", "sims").counts()["train"] == 8
    with pytest.raises(FileNotFoundError):
        load_pickle(tmp_path / "nope.pkl", "sims")
    with pytest.raises(ValueError, match="unknown MMSA data set"):
        load_pickle(path, "iemocap")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dataset", "aligned", "corruption", "pattern"),
    [
        ("mosi", False, {"drop_key": ("valid", "vision_lengths")}, r"'valid' key 'vision_lengths'"),
        ("mosi", True, {"drop_key": ("test", "regression_labels")}, r"'test' key 'regression_lab"),
        ("sims", False, {"drop_key": ("train", "text_bert")}, r"'train' key 'text_bert': missing"),
        ("mosi", False, {"drop_split": "valid"}, r"missing split\(s\) \['valid'\]"),
        (
            "mosi",
            False,
            {"wrong_dim": ("train", "audio", 74)},
            r"'valid': key 'audio' has feature dim 5, expected 74",
        ),
        (
            "mosei",
            True,
            {"wrong_dim": ("test", "vision", 20)},
            r"'test': key 'vision' has feature dim 20, expected 35",
        ),
        (
            "sims",
            False,
            {"row_mismatch": ("valid", "audio")},
            r"'valid' key 'audio': 3 rows, expected 4",
        ),
        (
            "mosi",
            False,
            {"row_mismatch": ("train", "audio_lengths")},
            r"'train' key 'audio_lengths': 7 rows, expected 8",
        ),
    ],
)
def test_malformed_files_name_split_and_key(
    tmp_path: Path, dataset: str, aligned: bool, corruption: dict, pattern: str
) -> None:
    path = write_mmsa_pickle(tmp_path / "bad.pkl", dataset, aligned, **corruption)
    with pytest.raises(DataError, match=pattern):
        load_pickle(path, dataset)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dataset", "value"), [("mosi", 3.5), ("mosei", -4.0), ("sims", 1.2), ("mosi", np.nan)]
)
def test_label_out_of_range_names_split_and_sample(
    tmp_path: Path, dataset: str, value: float
) -> None:
    path = write_mmsa_pickle(tmp_path / "bad.pkl", dataset, False, bad_label=("test", 2, value))
    sample = make_mmsa_dict(dataset, False)["test"]["id"][2]
    with pytest.raises(DataError, match=rf"split 'test' sample id '{re.escape(sample)}'.*outside"):
        load_pickle(path, dataset)  # type: ignore[arg-type]


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="expected a dict"):
        load_pickle(path, "mosi")


def test_numpy1_pickles_resolve_to_running_numpy() -> None:
    """MMSA files were written by numpy 1.x, whose pickles name ``numpy.core.multiarray``."""
    data = pickle.dumps({"a": np.ones((2, 2), np.float32), "s": np.float32(2)}, protocol=2)
    old = data.replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in old
    back = safe_pickle.loads(old)
    np.testing.assert_array_equal(back["a"], np.ones((2, 2), np.float32))
    assert back["s"] == 2


@pytest.mark.parametrize("aligned", [True, False])
def test_any_feature_set_dims_and_lengths_come_from_the_file(tmp_path: Path, aligned: bool) -> None:
    """MMSA-FET / wav2vec / OpenFace features: no preset pins the dims or the frame counts."""
    from sslmm_ray.bench import digits

    data = digits.build(seed=0)
    if aligned:  # every modality on the text's 8 frames
        for split in data.values():
            split["audio"] = np.repeat(split["audio"], 8, axis=1)
            split["vision"] = split["vision"][:, :8, :]
            del split["audio_lengths"], split["vision_lengths"]
    path = tmp_path / "custom.pkl"
    with path.open("wb") as f:
        pickle.dump(data, f)
    raw = load_pickle(path, "mosi")
    assert raw.stats["aligned"] is aligned
    assert raw.dims() == {"text": 8, "audio": 64, "vision": 9}
    assert raw.max_lengths() == (
        {"text": 8, "audio": 8, "vision": 8} if aligned else {"text": 8, "audio": 1, "vision": 16}
    )
    assert raw.label_range == (-3.0, 3.0)  # the data set name sets the range only
    assert raw.counts() == {s: len(data[s]["id"]) for s in data}
