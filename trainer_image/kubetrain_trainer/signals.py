"""Stop signals that arrive before the training loop exists.

A pod can be preempted or suspended at any moment, including the seconds in which the
trainer is still importing torch and loading checkpoints. ``install_early`` runs first
thing in ``python -m kubetrain_trainer`` and only records such signals; the loop's
``StopRequest`` (or, under torchrun, the launcher's forwarder) takes them over, so the
stage still stops at its first step boundary with a checkpoint and the exit code
``EXIT_CHECKPOINTED_ON_SIGTERM``, instead of dying from the default handler.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
pending: list[int] = []


def _record(signum: int, _frame: Any) -> None:
    pending.append(signum)


def install_early() -> None:
    """Record SIGTERM/SIGINT until the training loop installs its own handler."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
