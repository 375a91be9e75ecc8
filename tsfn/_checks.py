"""Argument checks shared by the public constructors: one message style everywhere."""

from __future__ import annotations

import inspect
import threading

__all__ = [
    "check_callable",
    "check_count",
    "check_name",
    "check_plain_callable",
    "check_timeout",
]


def check_callable(value: object, name: str, *, optional: bool = True) -> None:
    """Raise TypeError naming `name` unless `value` is callable (or None, if optional)."""
    if value is None and optional:
        return
    if not callable(value):
        kind = "a callable or None" if optional else "a callable"
        raise TypeError(f"{name} must be {kind}, got {value!r}")


def check_plain_callable(value: object, name: str, when: str) -> None:
    """`check_callable`, and refuse an `async def`: `when` it runs, nothing awaits it."""
    check_callable(value, name)
    if inspect.iscoroutinefunction(value):
        raise TypeError(
            f"{name} must be a plain function, not async: it runs {when}, where nothing "
            f"would await it; got {value!r}"
        )


def check_name(name: object) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")


def check_count(value: object, name: str, minimum: int) -> None:
    """An int (not a bool) >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_timeout(timeout: object) -> float | None:
    """None or a non-negative real number of seconds; returned as a float, or None
    for a wait longer than the platform can time (`threading.TIMEOUT_MAX`)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not timeout >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be >= 0, got {timeout!r}")
    # Compared before any conversion: an int too large for a float (10**400) must
    # not fail later, in arithmetic that does not name the argument.
    if timeout >= threading.TIMEOUT_MAX:
        return None
    return float(timeout)
