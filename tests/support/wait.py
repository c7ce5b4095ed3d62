"""Wait on a condition with a deadline; the message says what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_for(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value; raise with ``what`` (and the
    output of ``detail``, e.g. the last observed state) when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # keep polling, but remember why it failed
            last_exc = exc
        if time.monotonic() > deadline:
            extra = f"\nlast observed: {detail()}" if detail else ""
            if last_exc is not None:
                extra += f"\nlast error: {last_exc!r}"
            raise WaitTimeout(f"after {timeout:.0f}s: {what} did not happen{extra}")
        time.sleep(interval)
