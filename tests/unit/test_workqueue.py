"""The work queue the operator's workers take runs from: a run waits in line once
however many events it gets, is never handed to two workers, is not starved by a busy
neighbour, backs off when it fails, and wakes up when a delay asked for has passed; what
an event asks for goes before what only woke up, without starving the wake-ups."""

from __future__ import annotations

import threading

from kubetrain.operator.workqueue import WAKE_UP_SHARE, WorkQueue
from tests.support.wait import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(q: WorkQueue[str]) -> list[str]:
    """Every key ready now, each marked done at once."""
    out = []
    while (key := q.get(timeout=0)) is not None:
        out.append(key)
        q.done(key)
    return out


def test_a_key_added_many_times_waits_once() -> None:
    q: WorkQueue[str] = WorkQueue(clock=Clock())
    for _ in range(100):
        q.add("a")
    q.add("b")
    assert q.depth() == 2
    assert drain(q) == ["a", "b"]


def test_a_key_is_never_handed_out_twice_at_once_and_comes_back_after() -> None:
    q: WorkQueue[str] = WorkQueue(clock=Clock())
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")  # an event while a worker has it
    assert q.get(timeout=0) is None  # not handed to a second worker
    q.done("a")
    assert q.get(timeout=0) == "a"  # ... but not lost either
    q.done("a")
    assert q.get(timeout=0) is None


def test_a_flood_of_events_for_one_run_does_not_starve_the_others() -> None:
    q: WorkQueue[str] = WorkQueue(clock=Clock())
    q.add("busy")
    served = []
    for _ in range(4):
        key = q.get(timeout=0)
        assert key is not None
        served.append(key)
        if key == "busy":
            for _ in range(1000):  # a 1,000-pod stage changing while it is reconciled
                q.add("busy")
            q.add("quiet")
        q.done(key)
    # Each run in its turn: the busy one takes one place in line, not a thousand.
    assert served == ["busy", "quiet", "busy", "quiet"]


def test_failures_back_off_exponentially_and_success_resets() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock, backoff_base=1.0, backoff_max=5.0)
    assert [q.add_rate_limited("a") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    q.forget("a")
    assert q.add_rate_limited("a") == 1.0
    assert q.get(timeout=0) is None
    clock.now += 1.0
    assert drain(q) == ["a"]


def test_delayed_keys_wake_up_in_order_and_the_earliest_request_wins() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("poll", 15)
    q.add_after("ttl", 5)
    q.add_after("poll", 30)  # later than the one asked for: no change
    q.add_after("ttl", 2)  # earlier: wins
    assert q.scheduled() == 2 and drain(q) == []
    clock.now += 2
    assert drain(q) == ["ttl"]
    clock.now += 13
    assert drain(q) == ["poll"]
    assert q.scheduled() == 0 and drain(q) == []


def test_discard_drops_wake_ups_of_a_deleted_run() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("gone", 1)
    q.add_rate_limited("gone")
    q.discard("gone")
    clock.now += 100
    assert drain(q) == []


def test_a_waiting_worker_wakes_for_a_new_key_and_for_shutdown() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []

    def worker() -> None:
        got.append(q.get())
        got.append(q.get())

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    q.add_after("soon", 0.05)
    wait_for(lambda: got == ["soon"], timeout=5, what="the delayed key handed out")
    q.shutdown()
    thread.join(timeout=5)
    assert got == ["soon", None] and not thread.is_alive()
    q.add("late")
    assert q.get(timeout=0) is None  # nothing is handed out after shutdown


def test_an_event_goes_before_a_thousand_polls() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    for i in range(1000):
        q.add_after(f"poll-{i}", 15)
    clock.now += 15
    q.add("job-completed")
    assert q.get(timeout=0) == "job-completed"
    assert q.depth() == 1000  # the polls, still waiting


def test_an_event_for_a_run_waiting_to_be_polled_moves_it_ahead_once() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    for name in ("a", "b", "c"):
        q.add_after(name, 1)
    clock.now += 1
    q.add("c")
    assert drain(q) == ["c", "a", "b"]  # c once, not again from the polls' lane


def test_a_flood_of_events_leaves_the_polls_a_share() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("poll", 1)
    clock.now += 1
    for i in range(3 * WAKE_UP_SHARE):
        q.add(f"event-{i}")
    served = drain(q)
    assert served.index("poll") == WAKE_UP_SHARE - 1, served
    assert len(served) == 3 * WAKE_UP_SHARE + 1
