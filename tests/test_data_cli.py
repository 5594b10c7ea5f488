"""`sslmm data synth | import-mmsa | inspect`, end to end through the CLI, against real S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mmsa_fixtures import make_mmsa_dict, write_mmsa_pickle

from sslmm_ray import cli
from sslmm_ray.data import store
from sslmm_ray.data.sources import PRESETS


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console-script entry (``cli.main``) in-process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sslmm", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nothing_at(s3, prefix: str) -> bool:
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return not [o for o in listed.get("Contents", []) if not o["Key"].endswith("/")]


def test_synth_then_inspect_json(s3, monkeypatch, capsys) -> None:
    uri = s3.uri(f"cli/{uuid.uuid4().hex}")
    code, out, err = _main(
        monkeypatch, capsys, "data", "synth", "--preset", "sims", "--scale", "0.01",
        "--seed", "3", "--shard-rows", "5", "--out", uri, "--json",
    )
    assert code == 0, err
    made = json.loads(out)
    assert made["counts"] == {"train": 14, "valid": 8, "test": 8}  # at least 8 per split
    assert made["dims"] == dict(PRESETS["sims"].dims)
    code, out, err = _main(monkeypatch, capsys, "data", "inspect", uri, "--verify", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert {"uri", "name", "family", "label_range", "modalities", "counts", "shards", "bytes",
            "stats", "splits", "created", "format_version"} <= set(info)
    assert info["family"] == "sims" and info["label_range"] == [-1.0, 1.0]
    assert info["modalities"]["vision"] == {"dim": 709, "length": 55}
    assert info["shards"] == 3 + 2 + 2
    norm = info["normalization"]  # train-split statistics are stored
    assert norm["vision"]["features"] == 709 and 0 < norm["vision"]["std_min"]
    code, out, err = _main(monkeypatch, capsys, "data", "inspect", uri)
    assert code == 0 and "normalisation: train mean/std per feature" in out, err
    for split, n in made["counts"].items():
        s = info["splits"][split]
        assert s["count"] == n
        assert set(s["label"]) == {"mean", "std", "min", "max", "positive", "negative", "zero"}
        assert -1.0 <= s["label"]["min"] <= s["label"]["max"] <= 1.0
        for m in ("text", "audio", "vision"):
            assert 1 <= s["lengths"][m]["min"] <= s["lengths"][m]["max"]
    assert "AWS" not in out and "testing" not in json.dumps(info)  # no credential anywhere


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_import_mmsa(tmp_path: Path, s3, monkeypatch, capsys, dataset: str, aligned) -> None:
    pkl = write_mmsa_pickle(tmp_path / "data.pkl", dataset, aligned, n_per_split=(6, 3, 4))
    uri = s3.uri(f"cli/{uuid.uuid4().hex}") if dataset == "mosi" else str(tmp_path / "ds")
    code, out, err = _main(
        monkeypatch, capsys, "data", "import-mmsa", str(pkl), "--dataset", dataset,
        "--out", uri, "--json",
    )
    assert code == 0, err
    manifest = store.open_dataset(uri, s3.options, verify=True)
    preset = PRESETS[dataset]
    assert manifest.counts == {"train": 6, "valid": 3, "test": 4}
    assert manifest.dims == dict(preset.dims)
    assert manifest.lengths == preset.lengths(aligned)
    assert manifest.stats["aligned"] is aligned
    assert manifest.stats["nonfinite_replaced"]["audio"] >= 2  # the -inf values
    for m, d in preset.dims.items():  # statistics of the repaired features: all finite
        assert len(manifest.normalization[m]["std"]) == d
    src = make_mmsa_dict(dataset, aligned, n_per_split=(6, 3, 4))
    info = store.describe(manifest, s3.options)
    for split in ("train", "valid", "test"):
        text_len = src[split]["text_bert"][:, 1, :].sum(axis=1)
        assert info["splits"][split]["lengths"]["text"]["max"] == int(text_len.max())
        rows = store.read_split(manifest, split, s3.options)
        assert sorted(rows["id"].tolist()) == sorted(str(i) for i in src[split]["id"])
        assert (rows["audio_len"] >= 1).all()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "corruption, message",
    [
        ({"payload": "RUNS_CODE"}, r"(posix|os)\.system"),
        ({"drop_key": ("valid", "audio")}, "audio"),
        ({"wrong_dim": ("train", "vision", 21)}, "feature dim 20, expected 21"),
        ({"bad_label": ("test", 1, 4.5)}, "4.5"),
    ],
    ids=["code-payload", "missing-key", "wrong-dim", "label-out-of-range"],
)
def test_bad_pickles_fail_clearly_and_publish_nothing(
    tmp_path: Path, s3, monkeypatch, capsys, corruption, message
) -> None:
    marker = tmp_path / "pwned"
    if corruption.get("payload") == "RUNS_CODE":
        corruption = {"payload": _RunsCode(marker)}
    pkl = write_mmsa_pickle(tmp_path / "bad.pkl", "mosi", False, **corruption)
    prefix = f"cli/{uuid.uuid4().hex}"
    code, out, err = _main(
        monkeypatch, capsys, "data", "import-mmsa", str(pkl), "--dataset", "mosi",
        "--out", s3.uri(prefix),
    )
    assert code == 2
    assert "error:" in err and err.count("\n") <= 3  # one clear line, no traceback
    assert __import__("re").search(message, err), err
    assert not marker.exists()  # the payload never ran
    assert _nothing_at(s3, prefix)


def test_inspect_missing_dataset_is_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = _main(monkeypatch, capsys, "data", "inspect", str(tmp_path / "none"))
    assert code == 2 and "manifest.json not found" in err


def test_unreachable_endpoint_console_script(tmp_path: Path) -> None:
    """The real console script: bounded retries, then exit 2 naming the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sslmm_ray.cli", "data", "synth", "--scale", "0.01",
         "--out", "s3://bucket/ds", "--s3-endpoint", endpoint],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert endpoint in proc.stderr and "unreachable" in proc.stderr
    assert "attempt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 60


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # writes past 1 MiB fail


@pytest.mark.parametrize("case", ["full disk", "unwritable"])
def test_full_or_unwritable_destination_is_one_line(tmp_path: Path, case: str) -> None:
    """A write that the file system refuses is exit 2 with one line, and nothing is published.

    "full disk": a 1 MiB file-size limit on the child (EFBIG, as ENOSPC would stop it midway);
    "unwritable": sysfs refuses new folders even to root, so no chmod trick is needed.
    """
    out = tmp_path / "data" if case == "full disk" else Path(f"/sys/sslmm-{uuid.uuid4().hex}")
    proc = subprocess.run(
        [sys.executable, "-m", "sslmm_ray.cli", "data", "synth", "--scale", "0.05",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        preexec_fn=_limit_file_size if case == "full disk" else None,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(out) in lines[0]
    assert not (out / store.MANIFEST).exists()
    if case == "full disk":
        assert "file size limit" in lines[0]
        assert not list(out.glob("**/*.parquet")), "a half-written shard was left behind"
