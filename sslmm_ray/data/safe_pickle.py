"""Load pickles without letting them run code, crash the process or exhaust memory.

Unpickling calls whatever global a pickle names (``os.system`` included), and numpy's own
unpickling helpers trust their arguments (``ndarray(shape, 'O', buffer)`` turns file bytes into
object pointers). So a file is read in two passes:

1. :func:`scan` walks the opcodes without building anything: every declared length must fit in
   the file, the simulated nesting depth stays under :data:`MAX_DEPTH` (a million nested tuples
   overflow the C stack when hashed), and the objects the opcodes create are charged to a
   :class:`Budget` (a multiple of the file size, see :func:`budget_for`).
2. :class:`RestrictedUnpickler` resolves only the globals real numpy pickles use, and only to
   checking stand-ins: arrays are built only as numpy pickles build them (``_reconstruct`` then
   ``ndarray.__setstate__`` with a bytes payload of exactly the right size, or ``_frombuffer``
   for protocol 5), dtypes are rebuilt from a validated type code, object arrays may hold only
   ``str``/``bytes``/``int``/``float``/``bool``/``None``, and each allocation is charged to the
   budget before it is made. Numpy values stay placeholders while the opcodes run (so no later
   opcode can reach a real array) and are swapped in by :func:`_finish`.

Every failure becomes one :class:`DataError` line naming the file. Only local files are read: a
pickle from a remote URI is not something this code should trust at all.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import pickletools
import re
import reprlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import numpy as np

from sslmm_ray.data.sources import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

#: Deepest simulated nesting accepted; real MMSA files need about 8.
MAX_DEPTH = 100
#: The budget is ``BUDGET_FACTOR * file size + BUDGET_MARGIN`` bytes.
BUDGET_FACTOR = 4
BUDGET_MARGIN = 64 << 20
_OBJECT_COST = 64  # bytes charged per object an opcode creates (a small list or str)
_SLOT_COST = 16  # bytes per stack, mark or memo slot (the C unpickler grows memo 2x)
_MAX_NDIM = 32
_ELEMENT_TYPES = (str, bytes, int, float, bool, type(None))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def brief(obj: Any) -> str:
    """A short, one-line repr of a value from an untrusted file: bounded in length, depth and
    cost (numpy's repr of an array spans lines)."""
    try:
        return " ".join(_REPR.repr(obj).split())
    except (ValueError, RecursionError):  # an int too long to print, say
        return f"<{type(obj).__name__}>"


class UnsafePickleError(pickle.UnpicklingError, DataError):
    """The pickle names a global outside the allow-list, or does not come from a local file."""


class Budget:
    """Bytes a single load may still allocate; charged before each allocation."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.used + nbytes > self.limit:
            raise UnsafePickleError(
                f"{what} would take {nbytes} bytes, over the allocation budget of {self.limit} "
                f"bytes for this file ({self.used} already used)"
            )
        self.used += nbytes


def budget_for(size: int) -> Budget:
    """The allocation budget for a pickle of ``size`` bytes."""
    return Budget(BUDGET_FACTOR * size + BUDGET_MARGIN)


# --------------------------------------------------------------------------- pass 1: opcodes

_LENGTH_PREFIX = {
    pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1),
    pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
    pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4),
    pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8),
}
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


def scan(f: IO[bytes], end: int, budget: Budget) -> None:
    """Check the opcode stream of ``f`` (up to offset ``end``) before anything is unpickled.

    Payloads are skipped, not read, so a declared length of 2**60 costs nothing. The stack is
    simulated as nesting depths: a container is one deeper than what it holds.
    """
    stack: list[int] = []  # depth of each stack item
    marks: list[int] = []  # stack heights at each MARK, as the C unpickler keeps them
    memo: dict[int, int] = {}
    memo_slots = 0
    while True:
        pos = f.tell()
        code = f.read(1)
        if not code:
            raise UnsafePickleError(f"truncated pickle: no STOP opcode before byte {pos}")
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise UnsafePickleError(f"unknown opcode {code!r} at byte {pos}")
        arg, payload = _read_arg(f, op, end, pos)
        name = op.name
        if name == "STOP":
            return
        fence = marks[-1] if marks else 0
        if name == "MARK":
            budget.charge(_SLOT_COST, "a MARK")
            marks.append(len(stack))
            continue
        if name in _PUTS or name == "MEMOIZE":
            if len(stack) <= fence:
                raise UnsafePickleError(f"{name} on an empty stack (byte {pos})")
            idx = len(memo) if name == "MEMOIZE" else int(arg)
            if idx >= memo_slots:
                budget.charge(2 * _SLOT_COST * (idx + 1 - memo_slots), f"memo index {idx}")
                memo_slots = idx + 1
            memo[idx] = stack[-1]
            continue
        if name in _GETS:
            budget.charge(_SLOT_COST, "a memo reference")
            stack.append(memo.get(int(arg), 0))
            continue
        if name == "POP" and marks and len(stack) == marks[-1]:
            marks.pop()  # as the C unpickler does: POP right after MARK drops the mark
            continue
        before = op.stack_before
        if pickletools.markobject in before:
            if not marks:
                raise UnsafePickleError(f"{name} without a MARK (byte {pos})")
            start = marks.pop()
            sliced = stack[start:]
            del stack[start:]
            fence = marks[-1] if marks else 0
            below = _pop(stack, before.index(pickletools.markobject), fence, name, pos)
        else:
            sliced, below = [], _pop(stack, len(before), fence, name, pos)
        if name == "DUP":
            stack.extend(below * 2)
            continue
        inner = sliced + (below[1:] if name in _MUTATORS else below)
        depth = 1 + max(inner, default=-1)
        if name in _MUTATORS:
            depth = max(depth, below[0])
        if depth > MAX_DEPTH:
            raise UnsafePickleError(f"nesting deeper than {MAX_DEPTH} levels (byte {pos})")
        for _ in op.stack_after:
            budget.charge(_OBJECT_COST + payload, f"the {name} object at byte {pos}")
            stack.append(depth)


def _pop(stack: list[int], n: int, fence: int, name: str, pos: int) -> list[int]:
    """The top ``n`` items, or the C unpickler's stack-underflow error."""
    if len(stack) - n < fence:
        raise UnsafePickleError(f"stack underflow at {name} (byte {pos})")
    out = stack[len(stack) - n :]
    del stack[len(stack) - n :]
    return out


def _read_arg(f: IO[bytes], op: pickletools.OpcodeInfo, end: int, pos: int) -> tuple[Any, int]:
    """The opcode's argument and payload size; counted payloads are skipped, not read."""
    if op.arg is None:
        return None, 0
    if op.arg.n in _LENGTH_PREFIX:
        fmt, width = _LENGTH_PREFIX[op.arg.n]
        raw = f.read(width)
        if len(raw) != width:
            raise UnsafePickleError(f"truncated pickle: {op.name} at byte {pos}")
        length = int(struct.unpack(fmt, raw)[0])
        if length < 0 or length > end - f.tell():
            raise UnsafePickleError(
                f"{op.name} at byte {pos} declares {length} bytes; the file has "
                f"{max(end - f.tell(), 0)} left"
            )
        f.seek(length, os.SEEK_CUR)
        return None, length
    try:
        value = op.arg.reader(f)
    except ValueError as err:  # pickletools' readers: short reads, bad text numbers
        raise UnsafePickleError(f"malformed {op.name} at byte {pos}: {err}") from None
    if op.name == "FRAME" and value > end - f.tell():
        raise UnsafePickleError(f"FRAME at byte {pos} declares {value} bytes past the end")
    return value, len(value) if isinstance(value, str | bytes) else 0


# --------------------------------------------------------------------------- pass 2: objects


class _Pending:
    """A numpy value under construction; :func:`_finish` swaps it for the real one."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # so it can never become a key: see _finish

    def resolve(self) -> Any:
        raise NotImplementedError


class _DtypeSpec(_Pending):
    """``numpy.dtype(code, align, copy)`` plus its BUILD state, rebuilt from the checked code."""

    __slots__ = ("byteorder", "built", "code", "elsize", "value")
    _CODE = re.compile(r"(?:[biufc]\d{1,2}|[SU]\d{1,9}|O\d)\Z")

    def __init__(self, code: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(code, str) or not self._CODE.match(code):
            raise UnsafePickleError(
                f"refused dtype {brief(code)}: only numeric, str, bytes and object dtypes load"
            )
        if align not in (0, 1) or copy not in (0, 1):
            raise UnsafePickleError("malformed dtype arguments")
        self.code, self.byteorder, self.elsize = code, "=", -1
        self.built, self.value = False, None

    def __setstate__(self, state: Any) -> None:
        if self.built or not isinstance(state, tuple) or len(state) != 8 or state[0] != 3:
            raise UnsafePickleError("malformed dtype state")
        _, byteorder, subarray, names, fields, elsize, _align, _flags = state
        if byteorder not in ("<", ">", "|", "=") or (subarray, names, fields) != (None,) * 3:
            raise UnsafePickleError("refused dtype state: structured or sub-array dtypes")
        if type(elsize) is not int:
            raise UnsafePickleError("malformed dtype state")
        self.byteorder, self.elsize, self.built = byteorder, elsize, True

    def resolve(self) -> np.dtype:
        if self.value is None:
            dt = np.dtype(self.code)
            if dt.kind in "SU" and self.elsize != -1:
                unit = 4 if dt.kind == "U" else 1
                if self.elsize <= 0 or self.elsize % unit:
                    raise UnsafePickleError(f"malformed dtype size {self.elsize}")
                dt = np.dtype(f"{dt.kind}{self.elsize // unit}")
            if dt.itemsize == 0:
                raise UnsafePickleError(f"refused zero-size dtype {dt}")
            if self.byteorder in "<>" and dt.kind not in "OSb" and dt.itemsize > 1:
                dt = dt.newbyteorder(self.byteorder)
            self.value = dt
        return self.value


def _dtype_of(obj: Any) -> np.dtype:
    if not isinstance(obj, _DtypeSpec):
        raise UnsafePickleError(f"expected a numpy dtype, got {type(obj).__name__}")
    return obj.resolve()


def _shape_of(obj: Any) -> tuple[int, ...]:
    if (
        not isinstance(obj, tuple)
        or len(obj) > _MAX_NDIM
        or any(type(d) is not int or not 0 <= d < 2**62 for d in obj)
    ):
        raise UnsafePickleError(f"malformed array shape {brief(obj)}")
    return obj


def _check_values(data: bytes | bytearray, dt: np.dtype) -> None:
    """Raw bytes numpy would misread: bools other than 0/1, str code points past U+10FFFF."""
    if dt.kind == "b" and data and int(np.frombuffer(data, np.uint8).max()) > 1:
        raise UnsafePickleError("bool array with values other than 0 and 1")
    if dt.kind == "U" and data:
        units = np.frombuffer(data, dtype=np.dtype(np.uint32).newbyteorder(dt.byteorder))
        if int(units.max()) > 0x10FFFF:
            raise UnsafePickleError("str array with characters past U+10FFFF")


class _ArrayState(_Pending):
    """What ``_reconstruct`` returns: an array that exists only once its state is checked."""

    __slots__ = ("budget", "value")

    def __init__(self, budget: Budget) -> None:
        self.budget: Budget = budget
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.value is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("malformed array state")
        if len(state) == 5 and state[0] != 1:
            raise UnsafePickleError(f"unknown array state version {brief(state[0])}")
        shape, dt, fortran, data = (_shape_of(state[-4]), _dtype_of(state[-3]), *state[-2:])
        if fortran not in (0, 1):
            raise UnsafePickleError("malformed array state")
        n = math.prod(shape)
        if dt.hasobject:
            self.budget.charge(8 * n, f"an object array of shape {shape}")
            if type(data) is not list or len(data) != n:
                raise UnsafePickleError(f"object array of shape {shape} without {n} elements")
            for x in data:
                if type(x) not in _ELEMENT_TYPES:
                    raise UnsafePickleError(
                        f"refused object array element of type {type(x).__name__}: object "
                        "arrays may hold only str, bytes, int, float, bool and None"
                    )
        else:
            self.budget.charge(n * dt.itemsize, f"an array of shape {shape} and dtype {dt}")
            if type(data) is not bytes or len(data) != n * dt.itemsize:
                raise UnsafePickleError(
                    f"array of shape {shape} and dtype {dt} needs {n * dt.itemsize} payload bytes"
                )
            _check_values(data, dt)
        arr = _multiarray._reconstruct(np.ndarray, (0,), b"b")
        arr.__setstate__((1, shape, dt, bool(fortran), data))
        if not dt.hasobject and arr.base is data:
            arr.flags.writeable = False  # it is the bytes object's memory: never write to it
        self.value = arr

    def resolve(self) -> np.ndarray:
        if self.value is None:
            raise UnsafePickleError("array without a state")
        return self.value


class _Done(_Pending):
    """A numpy value already built and checked, kept out of reach of later opcodes."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError("refused BUILD on a finished numpy value")

    def resolve(self) -> Any:
        return self.value


class _Global:
    """An allowed global: callable with checked arguments, immune to BUILD."""

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Callable[..., Any] | None) -> None:
        self.name, self.fn = name, fn

    def __call__(self, *args: Any) -> Any:
        if self.fn is None:
            raise UnsafePickleError(f"refused call of {self.name}")
        return self.fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"refused BUILD on {self.name}")


_NDARRAY = _Global("numpy.ndarray", None)  # only ever an argument of _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals real numpy pickles use, each checked.

    Run :func:`scan` over the same bytes first: the depth and size checks live there.
    """

    def __init__(self, file: IO[bytes], budget: Budget) -> None:
        super().__init__(file)
        self.budget = budget
        self.allowed = self._globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load global {module[:80]}.{name[:80]}: pickles may hold only numpy "
                "arrays, numpy scalars and plain containers"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id")

    def _reconstruct(self, subtype: Any, shape: Any, typecode: Any) -> _ArrayState:
        if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise UnsafePickleError("refused _reconstruct arguments other than numpy's own")
        return _ArrayState(self.budget)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any) -> _Done:
        dt, shape = _dtype_of(dtype), _shape_of(shape)
        n = math.prod(shape)
        if dt.hasobject or type(buf) not in (bytes, bytearray) or order not in ("C", "F"):
            raise UnsafePickleError("refused _frombuffer arguments")
        if len(buf) != n * dt.itemsize:
            raise UnsafePickleError(f"array of shape {shape} needs {n * dt.itemsize} bytes")
        _check_values(buf, dt)
        self.budget.charge(n * dt.itemsize, f"an array of shape {shape} and dtype {dt}")
        return _Done(_numeric._frombuffer(buf, dt, shape, order))

    def _scalar(self, dtype: Any, data: Any = None) -> _Done:
        dt = _dtype_of(dtype)
        if dt.hasobject or type(data) is not bytes or len(data) != dt.itemsize:
            raise UnsafePickleError(f"malformed numpy scalar of dtype {dt}")
        _check_values(data, dt)
        return _Done(_multiarray.scalar(dt, data))

    def _bytearray(self, data: Any = b"", encoding: Any = None) -> bytearray:
        if isinstance(data, str) and encoding in ("latin-1", "latin1"):
            data = data.encode("latin-1")
        if type(data) is not bytes:
            raise UnsafePickleError("refused bytearray() of anything but bytes")
        self.budget.charge(len(data), "a bytearray")
        return bytearray(data)

    def _collection(self, kind: type) -> Callable[..., Any]:
        def make(items: Any = ()) -> Any:
            if type(items) not in (list, tuple, set, frozenset):
                raise UnsafePickleError(f"refused {kind.__name__}() of {type(items).__name__}")
            self.budget.charge(_OBJECT_COST * (len(items) + 1), f"a {kind.__name__}")
            return kind(items)

        return make

    def _globals(self) -> dict[tuple[str, str], _Global]:
        """Every (module, name) numpy 1.x and 2.x pickles of arrays, dtypes and scalars use."""
        out = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Global("dtype", _DtypeSpec)}
        for prefix in ("numpy.core", "numpy._core"):
            out[(f"{prefix}.multiarray", "_reconstruct")] = _Global(
                "_reconstruct", self._reconstruct
            )
            out[(f"{prefix}.multiarray", "scalar")] = _Global("scalar", self._scalar)
            out[(f"{prefix}.numeric", "_frombuffer")] = _Global("_frombuffer", self._frombuffer)
        out[("_codecs", "encode")] = _Global("_codecs.encode", _latin1_encode)
        for builtins in ("builtins", "__builtin__"):
            out[(builtins, "set")] = _Global("set", self._collection(set))
            out[(builtins, "frozenset")] = _Global("frozenset", self._collection(frozenset))
            out[(builtins, "bytearray")] = _Global("bytearray", self._bytearray)
            out[(builtins, "complex")] = _Global("complex", _complex)
        return out


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {brief(encoding)}")
    return codecs.encode(text, "latin1")


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise UnsafePickleError("refused complex() of anything but numbers")
    return complex(real, imag)


def _finish(root: Any) -> Any:
    """Swap every placeholder for its numpy value, iteratively (the data may be deep or cyclic).

    Placeholders are unhashable, so they sit only in dict values and list or tuple items; a
    tuple holding one is refused rather than rebuilt.
    """
    if isinstance(root, _Pending):
        return root.resolve()
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            items: Any = obj.items()
        elif isinstance(obj, list):
            items = enumerate(obj)
        elif isinstance(obj, tuple | set | frozenset):
            for x in obj:
                if isinstance(x, _Pending | _Global):
                    raise UnsafePickleError("numpy values inside tuples or sets are not loaded")
                todo.append(x)
            continue
        else:
            continue
        for key, value in items:
            if isinstance(obj, dict):
                todo.append(key)  # a key may be a tuple: checked in the branch above
            if isinstance(value, _Pending):
                obj[key] = value.resolve()
            elif isinstance(value, _Global):
                raise UnsafePickleError(f"refused bare global {value.name}")
            else:
                todo.append(value)
    if isinstance(root, _Global):
        raise UnsafePickleError(f"refused bare global {root.name}")
    return root


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_file(f: IO[bytes], size: int, name: str = "pickle") -> Any:
    """Scan, then unpickle the ``size`` bytes of seekable ``f``; any failure is one
    :class:`DataError` line starting with ``name``."""
    try:
        budget = budget_for(size)
        scan(f, size, budget)
        f.seek(0)
        return _finish(RestrictedUnpickler(f, budget).load())
    except Exception as err:  # hostile input may raise anything: one line, never a traceback
        cls = UnsafePickleError if isinstance(err, UnsafePickleError) else DataError
        raise cls(f"{name}: {_one_line(err)}") from err


def loads(data: bytes) -> Any:
    """Unpickle ``data`` safely (see :func:`load_file`)."""
    return load_file(io.BytesIO(data), len(data))


def local_path(path: str | Path) -> Path:
    """``path`` as a local file path; a remote URI (s3://, http://, ...) is refused."""
    text = str(path)
    scheme = urlparse(text).scheme
    if scheme == "file":
        text = urlparse(text).path
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise UnsafePickleError(
            f"pickles are loaded only from trusted local paths, not {text!r}: copy the file "
            "to local disk first if you trust it"
        )
    p = Path(text)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def load_local(path: str | Path) -> Any:
    """Unpickle a local file safely; any failure is one :class:`DataError` line naming it."""
    p = local_path(path)
    with p.open("rb") as f:
        return load_file(f, os.fstat(f.fileno()).st_size, str(p))
