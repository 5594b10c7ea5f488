"""Hostile MMSA pickles (issue 12): no crash, no code run, no memory blow-up, one error line.

Each crafted file goes through the real ``sslmm data import-mmsa`` in a child process under a
2 GiB address-space cap (a normal import needs well under that): a segfault would show as a
negative exit status, an allocation over the cap as a MemoryError traceback. The children run
side by side in one module fixture, since each one spends most of its ~3 s importing.
Mutated valid pickles (Hypothesis) go through the in-process loader, plus one child process
that loads a batch of seeded mutants, so that a crash cannot hide behind an exception.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mmsa_fixtures import make_mmsa_dict, write_mmsa_pickle

from sslmm_ray.data import safe_pickle
from sslmm_ray.data.mmsa import from_mmsa_dict, load_pickle
from sslmm_ray.data.sources import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP = 2 << 30  # RLIMIT_AS for the children; the CLI's imports need about a third of it
SPLITS = ("train", "valid", "test")


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _child_env() -> dict[str, str]:
    """The children import this worktree's code, whatever is installed."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


class _Reduce:
    """Pickles as ``fn(*args)`` (and ``BUILD`` with ``state``), whatever ``fn`` is."""

    def __init__(self, fn: Any, args: tuple, state: Any = None) -> None:
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self) -> tuple:
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _mmsa_with(path: Path, payload: Any) -> None:
    write_mmsa_pickle(path, "mosi", False, payload=payload)


def _deep_tuple_key(path: Path, depth: int = 1_000_000) -> None:
    """``{((...((),)...),): None}``: hashing the key recursed a million C frames (segfault)."""
    path.write_bytes(b"\x80\x02})" + b"\x85" * depth + b"Ns.")


def _getattr_import(path: Path, marker: Path) -> None:
    """Protocol 0: ``getattr(__import__('os'), 'system')('touch marker')``."""
    path.write_bytes(
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR"
        + f"(Vtouch {marker}\ntR.".encode()
    )


def _edit(path: Path, split: str, key: str, value: Any) -> None:
    data = make_mmsa_dict("mosi", False)
    data[split][key] = value
    path.write_bytes(pickle.dumps(data, protocol=4))


def _markup_key(path: Path) -> None:
    """A missing key, reported with the file's own key names: one of them is rich markup and
    holds a newline; the error must stay one line and must not break the console."""
    data = make_mmsa_dict("mosi", False)
    del data["test"]["vision"]
    data["test"]["[/]\n[bold]x"] = 1
    path.write_bytes(pickle.dumps(data, protocol=4))


@dataclass
class Case:
    """One hostile file: ``write(path, marker)`` makes it; ``expect`` is in the error line."""

    write: Callable[[Path, Path], None]
    expect: str = ""


CASES: dict[str, Case] = {
    "ndarray_object_buffer": Case(
        lambda p, m: _mmsa_with(p, _Reduce(np.ndarray, ((4,), np.dtype(object), b"A" * 32))),
        "numpy.ndarray",
    ),
    "bytearray_huge": Case(lambda p, m: _mmsa_with(p, _Reduce(bytearray, (1 << 40,))),
                           "bytearray"),
    "reconstruct_huge_object": Case(
        lambda p, m: _mmsa_with(p, _Reduce(_reconstruct, (np.ndarray, (1 << 33,),
                                                          np.dtype(object)))),
        "_reconstruct",
    ),
    "setstate_huge_object": Case(
        lambda p, m: _mmsa_with(p, _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                           (1, (1 << 33,), np.dtype(object), False, []))),
        "budget",
    ),
    "setstate_object_from_bytes": Case(
        lambda p, m: _mmsa_with(p, _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                           (1, (4,), np.dtype(object), False, b"A" * 32))),
        "object array",
    ),
    "deep_tuple_key": Case(lambda p, m: _deep_tuple_key(p), "nesting deeper"),
    "huge_memo_index": Case(lambda p, m: p.write_bytes(b"\x80\x04N" + b"r\xf0\xff\xff\xff."),
                            "memo index"),
    "huge_declared_length": Case(
        lambda p, m: p.write_bytes(b"\x80\x04\x8e" + (1 << 60).to_bytes(8, "little") + b"."),
        "declares",
    ),
    "truncated": Case(
        lambda p, m: p.write_bytes(pickle.dumps(make_mmsa_dict("mosi", True), protocol=4)[:5000]),
        "truncated",
    ),
    "object_labels": Case(
        lambda p, m: _edit(p, "train", "regression_labels", np.array(["x"] * 8, dtype=object)),
        "'train' key 'regression_labels'",
    ),
    "nested_list_ids": Case(
        lambda p, m: _edit(p, "valid", "id", [[f"a{k}", [k]] for k in range(4)]),
        "'valid' key 'id'",
    ),
    "markup_and_newline_in_key": Case(
        lambda p, m: _markup_key(p),
        "'test' key 'vision': missing",
    ),
    "os_system": Case(lambda p, m: _mmsa_with(p, _Reduce(os.system, (f"touch {m}",))),
                      "system"),
    "subprocess": Case(lambda p, m: _mmsa_with(p, _Reduce(subprocess.call, (["touch", str(m)],))),
                       "subprocess"),
    "eval": Case(lambda p, m: _mmsa_with(p, _Reduce(eval, (f"open({str(m)!r}, 'w')",))),
                 "eval"),
    "builtins_getattr": Case(lambda p, m: _getattr_import(p, m), "getattr"),
}




@dataclass
class Run:
    path: Path
    marker: Path
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every case through ``sslmm data import-mmsa``, a few children at a time."""
    root = tmp_path_factory.mktemp("hostile")
    procs: dict[str, tuple[Path, Path, subprocess.Popen[str]]] = {}
    runs: dict[str, Run] = {}

    def reap(name: str) -> None:
        path, marker, proc = procs.pop(name)
        _, err = proc.communicate(timeout=180)
        runs[name] = Run(path, marker, proc.returncode, err)

    for name, case in CASES.items():
        path, marker = root / f"{name}.pkl", root / f"{name}.pwned"
        case.write(path, marker)
        if len(procs) >= 4:
            reap(next(iter(procs)))
        cmd = [sys.executable, "-m", "sslmm_ray.cli", "data", "import-mmsa", str(path),
               "--dataset", "mosi", "--out", str(root / f"{name}_out")]
        procs[name] = (path, marker, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
            cwd=root, preexec_fn=_cap_memory,
        ))
    for name in list(procs):
        reap(name)
    yield runs


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_pickle_is_one_error_line(cli_runs: dict[str, Run], name: str) -> None:
    run = cli_runs[name]
    assert run.returncode == 2, f"exit {run.returncode}: {run.stderr[-2000:]}"
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert str(run.path) in lines[0] and lines[0].startswith("error: ")
    assert CASES[name].expect in lines[0]
    assert not run.marker.exists(), "the pickle ran code"
    assert not (run.path.parent / f"{name}_out").exists(), "nothing may be written"


def test_valid_file_still_imports_under_the_cap(tmp_path: Path) -> None:
    path = write_mmsa_pickle(tmp_path / "ok.pkl", "sims", False)
    proc = subprocess.run(
        [sys.executable, "-m", "sslmm_ray.cli", "data", "import-mmsa", str(path),
         "--dataset", "sims", "--out", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, env=_child_env(), preexec_fn=_cap_memory, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"file": "ok.pkl"' in proc.stdout


# ------------------------------------------------------------------ what real numpy writes


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_numpy_pickles_use_only_allowed_globals(protocol: int) -> None:
    """The allow-list is exactly what numpy's own pickles name (checked, not assumed)."""
    obj = {"f": np.ones((2, 3), np.float32), "i": np.arange(3), "o": np.array(["a"], object),
           "u": np.array(["xy"]), "s": np.float32(1), "b": np.array([True]),
           "F": np.asfortranarray(np.ones((2, 2)))}
    data = pickle.dumps(obj, protocol=protocol)
    names: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):  # the stock unpickler: this data is our own
        def find_class(self, module: str, name: str) -> Any:
            names.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    allowed = set(safe_pickle.RestrictedUnpickler(io.BytesIO(b""), safe_pickle.budget_for(0))
                  .allowed)
    assert names <= allowed
    assert ("numpy", "ndarray") in names or protocol == 5
    back = safe_pickle.loads(data)
    for key, value in obj.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].dtype == np.asarray(value).dtype


def test_arrays_backed_by_file_bytes_are_read_only() -> None:
    """``__setstate__`` may keep the payload ``bytes`` as the array's memory: never write it."""
    back = safe_pickle.loads(pickle.dumps(np.arange(2000, dtype=np.float32), protocol=4))
    assert back.sum() == np.arange(2000).sum()
    assert back.flags.writeable is False or back.base is None


def test_object_arrays_of_plain_values_load_but_not_of_containers() -> None:
    ok = np.array(["a", b"b", 3, 2.5, None, True], dtype=object)
    assert safe_pickle.loads(pickle.dumps(ok)).tolist() == ok.tolist()
    bad = np.empty(2, dtype=object)
    bad[0], bad[1] = [1], {"x": 1}
    with pytest.raises(DataError, match="object array element of type list"):
        safe_pickle.loads(pickle.dumps(bad))


def test_budget_scales_with_the_file() -> None:
    """A shape the payload does not pay for is refused before numpy allocates it."""
    evil = _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                   (1, (1 << 28,), np.dtype(np.float64), False, b""))
    with pytest.raises(DataError, match="allocation budget"):
        safe_pickle.loads(pickle.dumps(evil))
    assert safe_pickle.budget_for(1 << 20).limit == 4 * (1 << 20) + (64 << 20)


# ------------------------------------------------------------------ property-based


def _tiny(aligned: bool, protocol: int) -> dict[str, Any]:
    """A small MMSA dict (few frames and features) so that mutations hit structure, not floats."""
    data = make_mmsa_dict("mosi", aligned, (3, 2, 2), seed=1)
    for split in data.values():
        for m in ("text", "audio", "vision"):
            split[m] = np.ascontiguousarray(split[m][:, :4, :3])
        split["text_bert"] = np.ascontiguousarray(split["text_bert"][:, :, :4])
    return data


BASES = {(a, p): pickle.dumps(_tiny(a, p), protocol=p) for a in (True, False) for p in (2, 4, 5)}
_OPCODES = [ord(op.code) for op in pickletools.opcodes]
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
    | st.binary(max_size=4)
    | hnp.arrays(st.sampled_from([np.float32, np.int64, np.bool_, "U3", "S2"]),
                 hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))
    | hnp.arrays(object, hnp.array_shapes(min_dims=0, max_dims=3, max_side=3),
                 elements=st.text(max_size=3) | st.integers() | st.none()
                 | st.lists(st.integers(), max_size=2)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3)
    | st.tuples(c, c),
    max_leaves=8,
)


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    """A valid tiny MMSA pickle with byte flips, a truncation, an opcode splice or a field edit."""
    aligned, protocol = draw(st.sampled_from(sorted(BASES)))
    data = BASES[(aligned, protocol)]
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "field"]))
    if kind == "flip":
        buf = bytearray(data)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, len(buf) - 1),
                                                  st.integers(0, 255)), min_size=1, max_size=6)):
            buf[pos] = value
        return bytes(buf)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "splice":
        starts = [pos for _, _, pos in pickletools.genops(data)]
        at = draw(st.sampled_from(starts))
        insert = bytes([draw(st.sampled_from(_OPCODES))]) + draw(st.binary(max_size=9))
        cut = draw(st.integers(0, 4))
        return data[:at] + insert + data[at + cut :]
    obj = _tiny(aligned, protocol)
    split = draw(st.sampled_from(SPLITS))
    key = draw(st.sampled_from([*obj[split], "extra"]))
    obj[split][key] = draw(_VALUES)
    return pickle.dumps(obj, protocol=protocol)


@settings(max_examples=200, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutants())
def test_mutated_pickles_load_or_raise_data_error(data: bytes) -> None:
    try:
        from_mmsa_dict(safe_pickle.loads(data), "mosi")
    except DataError as err:
        assert "\n" not in str(err)


_BATCH_DRIVER = """
import sys
from sslmm_ray.data.mmsa import load_pickle
from sslmm_ray.data.sources import DataError
for path in sys.argv[1:]:
    try:
        load_pickle(path, "mosi")
    except DataError:
        pass
print("done", len(sys.argv) - 1)
"""


def test_mutants_in_a_capped_child_never_crash(tmp_path: Path) -> None:
    """Seeded byte-level mutants in one child: a segfault or abort would be a signal exit."""
    rng = np.random.default_rng(12)
    paths = []
    for k in range(120):
        data = bytearray(BASES[sorted(BASES)[k % len(BASES)]])
        if k % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"m{k}.pkl"
        path.write_bytes(bytes(data))
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-c", _BATCH_DRIVER, *paths], capture_output=True, text=True,
        env=_child_env(), preexec_fn=_cap_memory, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"done {len(paths)}"


def test_in_process_cases_raise_data_error_naming_the_file(tmp_path: Path) -> None:
    """The same hostile files, in process: a DataError naming the file, nothing else."""
    for name, case in CASES.items():
        path, marker = tmp_path / f"{name}.pkl", tmp_path / f"{name}.pwned"
        case.write(path, marker)
        with pytest.raises(DataError) as info:
            load_pickle(path, "mosi")
        assert str(path) in str(info.value), name
        assert not marker.exists(), name


def _state(dtype: Any, payload: bytes, shape: tuple[int, ...]) -> _Reduce:
    """An array pickled as numpy does, with a payload of our choosing."""
    return _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                   (1, shape, np.dtype(dtype), False, payload))


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (_state("<U1", b"\xff\xff\xff\xff" * 8, (8,)), "past U\\+10FFFF"),
        (np.array([f"a{k}" for k in range(7)] + ["\ud800"], dtype=object), "not valid unicode"),
        (np.array([10**5000] + list(range(7)), dtype=object), "64-bit int"),
        (np.array([f"x{k}" * (k * 200 + 1) for k in range(8)], dtype=object), "1024"),
        (np.array(["same"] * 8, dtype=object), "not unique"),
        ({"a": 1}, "expected a numpy array, got dict"),
        # Found by the Hypothesis test in a fresh clone: numpy's repr of an array spans lines.
        ([np.zeros((5, 1), np.float32)], "ids must be str or 64-bit int"),
    ],
    ids=["bad_code_point", "lone_surrogate", "huge_int", "too_long", "duplicate", "dict",
         "array_in_list"],
)
def test_hostile_ids_are_data_errors(tmp_path: Path, value: Any, pattern: str) -> None:
    """Ids reach pyarrow and error messages: each must be a short, valid, unique string."""
    path = tmp_path / "ids.pkl"
    _edit(path, "train", "id", value)
    with pytest.raises(DataError, match=pattern) as info:
        load_pickle(path, "mosi")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bool_payload_other_than_0_and_1_is_refused() -> None:
    with pytest.raises(DataError, match="bool array"):
        safe_pickle.loads(pickle.dumps(_state(np.bool_, b"\x02", (1,))))
