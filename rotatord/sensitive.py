"""A wrapper that keeps secret material out of reprs, logs and exceptions.

Every piece of key material rotatord generates or reads is held as a :class:`Sensitive`.  Its
``repr``/``str`` are masked, equality is constant-time, and each value is registered with the
process-wide redaction registry that the log formatter consults as a last line of defence.
"""

from __future__ import annotations

import hmac
import threading
from collections import OrderedDict
from typing import NoReturn

__all__ = ["MASK", "Sensitive", "redact", "registered_count"]

MASK = "**********"
# Bounded so a long-running daemon does not grow without limit; old values are the least likely
# to appear in a new log line, and the pattern-based redaction in logs.py still catches them.
_REGISTRY_LIMIT = 8192
_registry: OrderedDict[str, None] = OrderedDict()
_registry_lock = threading.Lock()


def _register(value: str) -> None:
    if len(value) < 8:  # too short to redact without mangling ordinary text
        return
    with _registry_lock:
        _registry[value] = None
        _registry.move_to_end(value)
        while len(_registry) > _REGISTRY_LIMIT:
            _registry.popitem(last=False)


def redact(text: str) -> str:
    """Replace every registered secret value occurring in ``text`` by the mask."""
    with _registry_lock:
        values = list(_registry)
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def registered_count() -> int:
    with _registry_lock:
        return len(_registry)


class Sensitive:
    """Secret text with a masked repr.  Call :meth:`reveal` at the one place that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Sensitive wraps str")
        self._value = value
        _register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Sensitive({MASK!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sensitive):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Sensitive", len(self._value)))

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> NoReturn:
        raise TypeError("Sensitive values are not picklable")
