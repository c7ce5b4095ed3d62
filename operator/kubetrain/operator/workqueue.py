"""A work queue of keys (runs), like controller-runtime's: what the operator's workers
take their next run from.

- A key waiting in the queue is there once, however many events asked for it, so a run
  with a flood of events (a 1,024-pod stage starting) takes one place in the line and
  cannot starve the others: keys are served first come, first served.
- A key is never handed to two workers at once. A key added while a worker has it is
  handed out again once that worker is done, so no event is lost.
- ``add_after`` wakes a key later (the next poll, a TTL); of several wake-ups asked for
  one key the earliest counts. ``add_rate_limited`` retries a failing key with
  exponential backoff, which ``forget`` resets after a success.
- Two lanes: keys added by events (``add``: a Job completed, a run edited) are served
  before keys whose wake-up came due (polls, retries), so that a stage's end is acted
  on at once even while a thousand polls wait; a wake-up waiting in line that an event
  asks for moves to the events' lane. Every ``WAKE_UP_SHARE``-th key handed out is a
  wake-up when one waits, so a flood of events cannot stop the polls.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 300.0
WAKE_UP_SHARE = 8


class WorkQueue(Generic[K]):
    """Thread-safe; ``clock`` is monotonic seconds (tests pass their own)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = BACKOFF_BASE_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
    ):
        self._clock = clock
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._cond = threading.Condition()
        # Ready keys, in order: added by events, and woken up. A key moved to the events'
        # lane stays behind in the wake-ups' lane and is skipped there (``_urgent``).
        self._queue: deque[K] = deque()
        self._woken: deque[K] = deque()
        self._dirty: set[K] = set()  # keys that need processing (queued or to re-queue)
        self._urgent: dict[K, bool] = {}  # dirty key -> whether an event asked for it
        self._served_urgent = 0  # events' keys handed out since the last wake-up
        self._processing: set[K] = set()
        self._due: dict[K, float] = {}  # key -> earliest wake-up asked for
        self._heap: list[tuple[float, int, K]] = []  # (due, tie-break, key); may be stale
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._shutdown = False

    # ---- adding
    def add(self, key: K) -> None:
        """Process ``key`` as soon as a worker is free (once, however often it is added),
        before the keys that only woke up."""
        with self._cond:
            self._add(key, urgent=True)

    def _add(self, key: K, urgent: bool) -> None:
        if self._shutdown:
            return
        if key in self._dirty:
            if urgent and not self._urgent[key]:
                self._urgent[key] = True  # a waiting wake-up: into the events' lane
                if key not in self._processing:
                    self._queue.append(key)
                    self._cond.notify()
            return
        self._dirty.add(key)
        self._urgent[key] = urgent
        if key not in self._processing:
            self._lane(key).append(key)
            self._cond.notify()

    def _lane(self, key: K) -> deque[K]:
        return self._queue if self._urgent[key] else self._woken

    def add_after(self, key: K, delay: float) -> None:
        """Process ``key`` in ``delay`` seconds (or earlier, if something else asks), in
        the wake-ups' lane."""
        if delay <= 0:
            with self._cond:
                self._add(key, urgent=False)
            return
        with self._cond:
            if self._shutdown:
                return
            due = self._clock() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            self._cond.notify()

    def add_rate_limited(self, key: K) -> float:
        """Retry ``key`` after a backoff that doubles with each failure in a row; returns
        the delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self._backoff_max, self._backoff_base * 2.0**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure starts the backoff afresh."""
        with self._cond:
            self._failures.pop(key, None)

    def discard(self, key: K) -> None:
        """Drop the wake-ups and backoff of ``key`` (its run is gone); a key already in
        line stays, and is a no-op to process."""
        with self._cond:
            self._failures.pop(key, None)
            self._due.pop(key, None)

    # ---- taking
    def get(self, timeout: float | None = None) -> K | None:
        """The next key to process, marked as being processed until ``done``; None once
        ``timeout`` seconds passed without one, or when the queue is shut down."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                wait = self._promote_due()
                key = self._next()
                if key is not None:
                    self._processing.add(key)
                    self._dirty.discard(key)
                    del self._urgent[key]
                    return key
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def _next(self) -> K | None:
        """The next ready key: the events' lane first, but a wake-up every
        ``WAKE_UP_SHARE``-th time; entries left behind by a move between lanes are
        dropped on the way."""
        lanes = (self._queue, self._woken)
        if self._served_urgent >= WAKE_UP_SHARE - 1:
            lanes = (self._woken, self._queue)
        for lane in lanes:
            urgent = lane is self._queue
            while lane:
                key = lane.popleft()
                live = key in self._dirty and key not in self._processing
                if live and self._urgent[key] == urgent:
                    self._served_urgent = self._served_urgent + 1 if urgent else 0
                    return key
        return None

    def _promote_due(self) -> float | None:
        """Move the keys whose time has come into the line; seconds until the next one."""
        now = self._clock()
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) != due:
                heapq.heappop(self._heap)  # superseded by an earlier wake-up, or discarded
                continue
            if due > now:
                return due - now
            heapq.heappop(self._heap)
            del self._due[key]
            self._add(key, urgent=False)
        return None

    def done(self, key: K) -> None:
        """A worker finished ``key``; if it was added meanwhile, it goes back in line."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shutdown:
                self._lane(key).append(key)
                self._cond.notify()

    # ---- state
    def depth(self) -> int:
        """Keys waiting for a worker now (not the ones scheduled for later)."""
        with self._cond:
            return len(self._dirty - self._processing)

    def scheduled(self) -> int:
        """Keys with a wake-up in the future."""
        with self._cond:
            return len(self._due)

    def shutdown(self) -> None:
        """Wake every waiting ``get`` with None; nothing is handed out any more."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
