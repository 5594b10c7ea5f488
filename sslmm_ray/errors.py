"""The one error type the CLI shows as a single line (exit status 2) instead of a traceback.

Raise a :class:`UserError` (or a subclass) for input the user can fix: a bad flag, a data set,
a URI, a checkpoint. Anything else (a plain ``ValueError`` from deep inside included) is a bug
and keeps its traceback.

Every message is passed through :func:`redact` on construction, so a URL's ``user:password@``
part can never reach a terminal or a log through one of these errors.
"""

from __future__ import annotations

import re

# scheme://userinfo@  ->  scheme://***@   (userinfo: anything up to the first '@' of the
# authority, which cannot hold '/', whitespace or quotes)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"<>]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", text)


class UserError(ValueError):
    """Bad input; the message says what is wrong and where (credentials in URLs redacted)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))
