"""Leader election against an in-memory Lease API with the API server's optimistic
concurrency: one replica acquires, renews, and keeps it; the other takes over only once
the holder stopped renewing for a lease duration (by its own clock); a leader that
cannot renew steps down before anyone may take over; a clean stop hands the Lease on."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetrain.operator.kube import Conflict
from kubetrain.operator.leader import LeaderElector


class FakeLeases:
    """Leases by (namespace, name); writes with a stale resourceVersion conflict, as
    the API server's do. ``down`` makes every call fail like a lost connection."""

    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions = itertools.count(1)
        self.down = False
        self.calls: list[str] = []

    def _check(self, verb: str) -> None:
        self.calls.append(verb)
        if self.down:
            raise OSError("connection timed out")

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get")
        lease = self.leases.get((namespace, name))
        return copy.deepcopy(lease) if lease else None

    def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        self._check("create")
        key = (namespace, lease["metadata"]["name"])
        if key in self.leases:
            raise Conflict("already exists")
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(next(self.versions))
        self.leases[key] = stored
        return copy.deepcopy(stored)

    def replace_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        self._check("update")
        key = (namespace, lease["metadata"]["name"])
        current = self.leases[key]
        if lease["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise Conflict("the object has been modified")
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(next(self.versions))
        self.leases[key] = stored
        return copy.deepcopy(stored)

    def holder(self) -> str | None:
        lease = self.leases.get(("ops", "kubetrain-operator"))
        return (lease or {}).get("spec", {}).get("holderIdentity")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api() -> FakeLeases:
    return FakeLeases()


def elector(api: FakeLeases, name: str, clock: Clock, changes: list[str]) -> LeaderElector:
    return LeaderElector(
        api,
        "ops",
        "kubetrain-operator",
        name,
        lease_duration=15,
        renew_period=5,
        clock=clock,
        wall=lambda: datetime(2025, 1, 1, tzinfo=UTC),
        on_change=lambda leading: changes.append(f"{name}:{'leads' if leading else 'stops'}"),
    )


def test_one_replica_leads_and_the_other_waits(api: FakeLeases) -> None:
    clock, changes = Clock(), []
    a, b = elector(api, "a", clock, changes), elector(api, "b", clock, changes)
    a.step()
    b.step()
    assert a.leading.is_set() and not b.leading.is_set()
    assert api.holder() == "a" and changes == ["a:leads"]
    spec = api.leases[("ops", "kubetrain-operator")]["spec"]
    assert spec["leaseDurationSeconds"] == 15 and spec["leaseTransitions"] == 0
    for _ in range(10):  # renewing for a minute: b never gets in
        clock.now += 5
        a.step()
        b.step()
    assert api.holder() == "a" and changes == ["a:leads"]
    assert not b.leading.is_set()


def test_a_renewing_leader_writes_once_per_round(api: FakeLeases) -> None:
    clock = Clock()
    a = elector(api, "a", clock, [])
    a.step()
    api.calls.clear()
    for _ in range(3):
        clock.now += 5
        a.step()
    assert api.calls == ["update"] * 3  # no read before each renewal


def test_the_follower_takes_over_once_the_leader_stops_renewing(api: FakeLeases) -> None:
    clock, changes = Clock(), []
    a, b = elector(api, "a", clock, changes), elector(api, "b", clock, changes)
    a.step()
    b.step()  # b sees a's lease now
    # a is killed: no more renewals. b's own clock decides when a's lease has expired.
    clock.now += 14
    b.step()
    assert not b.leading.is_set()
    clock.now += 2
    b.step()
    assert b.leading.is_set() and api.holder() == "b"
    assert api.leases[("ops", "kubetrain-operator")]["spec"]["leaseTransitions"] == 1
    assert changes == ["a:leads", "b:leads"]


def test_a_leader_that_cannot_renew_steps_down_before_the_lease_expires(
    api: FakeLeases,
) -> None:
    clock, changes = Clock(), []
    a = elector(api, "a", clock, changes)
    a.step()
    api.down = True
    clock.now += 5
    a.step()
    assert a.leading.is_set()  # one failed renewal: still within the deadline
    clock.now += 6
    a.step()
    assert not a.leading.is_set()  # 11 s > 2/3 of 15 s: stopped before anyone can take over
    assert changes == ["a:leads", "a:stops"]
    api.down = False
    clock.now += 5
    a.step()  # the lease is still its own: it leads again
    assert a.leading.is_set()


def test_a_leader_whose_lease_was_taken_stops_at_once(api: FakeLeases) -> None:
    clock, changes = Clock(), []
    a, b = elector(api, "a", clock, changes), elector(api, "b", clock, changes)
    a.step()
    b.step()
    # a is paused (a long GC, a frozen node) past the lease; b takes over.
    clock.now += 16
    b.step()
    assert b.leading.is_set()
    a.step()  # its renewal conflicts; it reads the Lease again next round
    a.step()
    assert not a.leading.is_set()
    assert changes == ["a:leads", "b:leads", "a:stops"]


def test_stop_hands_the_lease_on_at_once(api: FakeLeases) -> None:
    clock, changes = Clock(), []
    a, b = elector(api, "a", clock, changes), elector(api, "b", clock, changes)
    a.step()
    b.step()
    a.stop()
    assert api.holder() is None and not a.leading.is_set()
    b.step()  # no need to wait out the duration
    assert b.leading.is_set()
    assert changes == ["a:leads", "a:stops", "b:leads"]
