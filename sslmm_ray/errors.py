"""The one error type the CLI shows as a single line (exit status 2) instead of a traceback.

Raise a :class:`UserError` (or a subclass) for input the user can fix: a bad flag, a data set,
a URI, a checkpoint. Anything else (a plain ``ValueError`` from deep inside included) is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message says what is wrong and where."""
