"""Load pickles without letting them run code.

Unpickling calls whatever global a pickle names (``os.system`` included), so the MMSA files are
read through :class:`RestrictedUnpickler`, whose ``find_class`` admits only what numpy arrays,
numpy scalars and plain containers need. Anything else is refused by name before it is looked
up, so it is never imported, never called. Only local files are read: a pickle from a remote
URI is not something this code should trust at all.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from sslmm_ray.data.sources import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class UnsafePickleError(pickle.UnpicklingError, DataError):
    """The pickle names a global outside the allow-list, or does not come from a local file."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


# Every (module, name) admitted, with the object it resolves to. numpy 1.x pickles say
# ``numpy.core``, numpy 2.x ones ``numpy._core``; both resolve to the running numpy's objects.
_NUMPY_FUNCS: dict[str, Any] = {
    "multiarray._reconstruct": _multiarray._reconstruct,
    "multiarray.scalar": _multiarray.scalar,
    "numeric._frombuffer": _numeric._frombuffer,
}
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}
for _prefix in ("numpy.core", "numpy._core"):
    for _name, _obj in _NUMPY_FUNCS.items():
        _mod, _attr = _name.split(".")
        ALLOWED[(f"{_prefix}.{_mod}", _attr)] = _obj


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in :data:`ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load global {module}.{name}: pickles may hold only numpy arrays, "
                "numpy scalars and plain containers"
            ) from None


def loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


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
    """Unpickle a trusted local file with the restricted unpickler."""
    with local_path(path).open("rb") as f:
        return RestrictedUnpickler(f).load()
