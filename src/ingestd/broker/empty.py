"""NO_ENTRIES: the one empty map idle sessions share (issue 14, memory per idle client).

Every session's ``subscriptions`` and ``inflight`` start as this object instead of
a 64-byte empty dict each; the code that writes them first makes the session's own
dict (``SessionRegistry`` for subscriptions, ``Session._send_new`` for inflight).
Writing to it is a bug and raises, so a missed write site cannot leak entries from
one session to all; reading, ``pop(key, default)``, ``clear()`` and ``del`` of a
missing key behave as on ``{}``.
"""

from __future__ import annotations

from typing import Any, NoReturn


class _NoEntries(dict[Any, Any]):
    """An empty dict that refuses to be written."""

    __slots__ = ()

    def __setitem__(self, key: Any, value: Any) -> NoReturn:
        raise TypeError("write to the shared empty map: make the session's own first")

    def setdefault(self, key: Any, default: Any = None) -> NoReturn:
        raise TypeError("write to the shared empty map: make the session's own first")

    def update(self, *args: Any, **kw: Any) -> NoReturn:
        raise TypeError("write to the shared empty map: make the session's own first")


NO_ENTRIES: Any = _NoEntries()
