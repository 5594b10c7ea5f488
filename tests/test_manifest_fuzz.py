"""Property-based: a mutated manifest opens and reads, or fails with one user error.

A manifest is the store's root of trust (shapes, shard paths, counts, statistics). Whatever a
byte flip, a truncation or an edited field makes of it, opening and reading the dataset ends in
success or a one-line user error (exit 2 in the CLI), never another exception, and nothing
outside the dataset folder is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslmm_ray.data import store, synth
from sslmm_ray.errors import UserError

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["../x", "/etc/passwd", "train", "gen-0/../../x", "victim/x.parquet"]),
)
JSON_VALUE = st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6), inner, max_size=3), max_leaves=8,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest-fuzz") / "data"
    store.write_dataset(synth.generate("mosi", scale=0.02, aligned=True, seed=5), str(root))
    return root


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (key/index path) inside the manifest's JSON tree."""
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


def _set(data: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    data[path[0]] = _set(data[path[0]], path[1:], value)
    return data


def _open_and_read(uri: str) -> None:
    manifest = store.open_dataset(uri, verify=True)
    for split in ("train", "valid", "test"):
        if manifest.counts.get(split):
            store.read_split(manifest, split)


@st.composite
def mutated_manifest(draw: st.DrawFn, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "edit", "delete"]))
    if kind == "flip":
        out = bytearray(original)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    data = json.loads(original)
    path = draw(st.sampled_from(_paths(data)[1:]))
    if kind == "delete":
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    else:
        data = _set(data, path, draw(JSON_VALUE))
    return json.dumps(data).encode()


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifest_opens_or_is_one_user_error(
    dataset: Path, tmp_path: Path, data: st.DataObject
) -> None:
    original = (dataset / store.MANIFEST).read_bytes()
    copy = tmp_path / "copy"
    if not copy.exists():
        shutil.copytree(dataset, copy)
    (copy / store.MANIFEST).write_bytes(data.draw(mutated_manifest(original)))
    try:
        _open_and_read(str(copy))
    except UserError as err:  # DataError, or StorageError for bytes that are not JSON
        assert "\n" not in str(err).strip(), str(err)
    finally:
        (copy / store.MANIFEST).write_bytes(original)


def test_the_unmutated_manifest_reads(dataset: Path) -> None:
    _open_and_read(str(dataset))  # the property above is not vacuous
