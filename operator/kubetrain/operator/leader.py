"""Leader election with a coordination.k8s.io/v1 Lease, as client-go does it.

Every replica runs an elector. The one whose identity the Lease holds is the leader and
renews it every ``renew_period``; only the leader's workers reconcile. The others read
the Lease as often, keep their caches warm, and take it over once its holder has not
renewed for ``leaseDurationSeconds``. Expiry is judged by this process' own clock, from
the moment it last saw the Lease change (the holder's clock may be skewed), so a
follower that starts up waits one full lease duration before it may take over.

A leader that could not renew for 2/3 of the duration stops acting on its own, before
anyone else may take over. Every write carries the resourceVersion read, so two
candidates can never both win. On a clean shutdown the leader hands the Lease back
(empty holder), so a successor starts at once instead of after the duration.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from kubetrain.operator.kube import Conflict

log = logging.getLogger("kubetrain.operator.leader")


class LeaseApi(Protocol):
    """The Lease calls (``kubetrain.operator.kube.KubeApi``; tests pass a fake)."""

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]: ...
    def replace_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]: ...


def micro_time(t: datetime) -> str:
    """The API's MicroTime format."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Holds or waits for the Lease ``namespace/name`` as ``identity``; ``leading`` is
    set while this process may act. ``on_change(True/False)`` is called (on the
    elector's thread) when that changes."""

    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_period: float = 5.0,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.api = api
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_period = renew_period
        self.renew_deadline = lease_duration * 2 / 3
        self.on_change = on_change
        self.clock, self.wall = clock, wall
        self.leading = threading.Event()
        self.stopped = threading.Event()
        self._lease: dict[str, Any] | None = None  # as last read or written
        self._observed: tuple[Any, ...] | None = None  # version, holder, renewTime
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    @property
    def holder(self) -> str | None:
        """Who holds the Lease, as last seen."""
        spec = (self._lease or {}).get("spec") or {}
        return spec.get("holderIdentity") or None

    # ---- one round
    def try_acquire_or_renew(self) -> bool:
        """Take the Lease or renew it; True when this process holds it now."""
        now = self.clock()
        lease = self._lease if self.leading.is_set() else None
        if lease is None:
            lease = self.api.get_lease(self.namespace, self.name)
            if lease is None:
                return self._create(now)
            self._observe(lease, now)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another, and renewed recently enough
        transitions = int(spec.get("leaseTransitions") or 0)
        stamp = micro_time(self.wall())
        new_spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.lease_duration),
            "acquireTime": spec.get("acquireTime") if holder == self.identity else stamp,
            "renewTime": stamp,
            "leaseTransitions": transitions if holder == self.identity else transitions + 1,
        }
        try:
            written = self.api.replace_lease(self.namespace, {**lease, "spec": new_spec})
        except Conflict:
            self._lease = None  # read it again next round
            return False
        self._observe(written, now)
        return True

    def _create(self, now: float) -> bool:
        stamp = micro_time(self.wall())
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": math.ceil(self.lease_duration),
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": 0,
            },
        }
        try:
            written = self.api.create_lease(self.namespace, lease)
        except Conflict:
            return False
        self._observe(written, now)
        return True

    def _observe(self, lease: dict[str, Any], now: float) -> None:
        # Any write changes the resourceVersion: a holder that renews is seen as alive
        # whatever its clock writes into renewTime.
        spec = lease.get("spec") or {}
        version = (lease.get("metadata") or {}).get("resourceVersion")
        record = (version, spec.get("holderIdentity"), spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        self._lease = lease

    def step(self) -> None:
        """One round: acquire or renew, and start or stop leading accordingly."""
        try:
            held = self.try_acquire_or_renew()
            self._last_error = None
        except Exception as exc:  # the API is unreachable: retried next round
            held = False
            self._lease = None
            message = f"{type(exc).__name__}: {exc}"
            if message != self._last_error:
                log.warning("Lease %s/%s: %s", self.namespace, self.name, message)
            self._last_error = message
        now = self.clock()
        if held:
            self._last_renew = now
            if not self.leading.is_set():
                log.info("%s leads (Lease %s/%s)", self.identity, self.namespace, self.name)
                self._set(True)
        elif self.leading.is_set() and self.holder not in (None, self.identity):
            log.warning(
                "%s lost Lease %s/%s to %s", self.identity, self.namespace, self.name, self.holder
            )
            self._set(False)
        elif self.leading.is_set() and now - self._last_renew > self.renew_deadline:
            log.warning(
                "%s could not renew Lease %s/%s for %.0fs: no longer leading",
                self.identity,
                self.namespace,
                self.name,
                now - self._last_renew,
            )
            self._set(False)

    def _set(self, leading: bool) -> None:
        if leading:
            self.leading.set()
        else:
            self.leading.clear()
        if self.on_change is not None:
            self.on_change(leading)

    # ---- running
    def run(self) -> None:
        while not self.stopped.is_set():
            self.step()
            self.stopped.wait(self.renew_period)

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self.run, name="leader election", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop electing and, when leading, hand the Lease back."""
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_period + 5)
        if self.leading.is_set():
            self._set(False)
            self.release()

    def release(self) -> None:
        """Empty the Lease's holder, so that a successor need not wait it out."""
        lease = self._lease
        if lease is None or ((lease.get("spec") or {}).get("holderIdentity") != self.identity):
            return
        spec = {**lease.get("spec", {}), "leaseDurationSeconds": 1, "renewTime": None}
        spec.pop("holderIdentity", None)
        spec = {k: v for k, v in spec.items() if v is not None}
        try:
            self.api.replace_lease(self.namespace, {**lease, "spec": spec})
            log.info("%s released Lease %s/%s", self.identity, self.namespace, self.name)
        except Exception as exc:  # it expires on its own
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, exc)
