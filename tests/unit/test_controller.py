"""The controller's wiring against an in-memory API: nothing is reconciled before every
informer has listed and this replica leads; then each run is, once; children are
indexed by run; /healthz reports a stuck reconcile; stopping hands the Lease back."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.controller import ClusterCache, Controller
from kubetrain.operator.metrics import OperatorMetrics
from tests.support.wait import wait_for
from tests.unit.planworld import manifest
from tests.unit.test_leader import FakeLeases


class FakeApi(FakeLeases):
    """Lists serve ``objects`` by path; watches stay open (silent) until closed; writes
    are recorded. The Lease calls are FakeLeases'."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, list[dict[str, Any]]] = {}
        self.writes: list[tuple[str, str]] = []
        self.closed = threading.Event()
        self.listed: list[str] = []

    def list_objects(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        self.listed.append(path)
        items = copy.deepcopy(self.objects.get(path, []))
        return {"metadata": {"resourceVersion": "1"}, "items": items}

    def watch_objects(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> Iterator[dict[str, Any]]:
        self.closed.wait(1.0)
        yield from ()

    def patch_run_metadata(self, ns: str, name: str, metadata: Any, rv: str) -> dict[str, Any]:
        self.writes.append(("metadata", name))
        return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv + "m"}}

    def patch_run_status(self, ns: str, name: str, status: Any, rv: str) -> dict[str, Any]:
        self.writes.append(("status", name))
        return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv + "s"}}

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def create(self, obj: dict[str, Any]) -> bool:
        self.writes.append(("create", obj["metadata"]["name"]))
        return True

    def delete(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def emit_event(self, *args: Any) -> None:
        pass

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        return {}


RUNS_PATH = "/apis/kubetrain.dev/v1alpha1/namespaces/ml/trainingruns"


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    run = manifest()
    run["metadata"]["resourceVersion"] = "1"
    fake.objects[RUNS_PATH] = [run]
    yield fake
    fake.closed.set()


def controller(api: FakeApi, **config: Any) -> Controller:
    return Controller(
        api,  # type: ignore[arg-type]
        OperatorConfig(workers=2, lease_duration_seconds=2, lease_renew_seconds=0.2, **config),
        OperatorMetrics(),
        namespaces=["ml"],
        identity="replica-a",
        lease_namespace="ml",
    )


def test_a_follower_waits_and_reconciles_every_run_once_it_leads(api: FakeApi) -> None:
    api.create_lease(
        "ml",
        {
            "metadata": {"name": "kubetrain-operator", "namespace": "ml"},
            "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 3600},
        },
    )
    ctl = controller(api).start()
    try:
        wait_for(ctl.synced.is_set, timeout=10, what="every informer listed")
        assert sorted(set(api.listed)) == sorted(
            [
                RUNS_PATH,
                "/apis/batch/v1/namespaces/ml/jobs",
                "/api/v1/namespaces/ml/pods",
                "/api/v1/namespaces/ml/services",
            ]
        )
        wait_for(lambda: api.calls.count("get") >= 2, timeout=10, what="the Lease looked at")
        assert not ctl.active.is_set() and api.writes == []  # replica-b leads
        assert ctl.queue.depth() == 1  # the run waits for this replica's turn

        api.leases[("ml", "kubetrain-operator")]["spec"] = {}  # replica-b handed it back
        wait_for(
            lambda: ("create", "demo-pretrain") in api.writes,
            timeout=10,
            what="the new leader reconciling the run",
        )
        lease = api.leases[("ml", "kubetrain-operator")]
        assert lease["spec"]["holderIdentity"] == "replica-a"
        assert ctl.health() == []
    finally:
        ctl.stop(grace=5)
    assert api.leases[("ml", "kubetrain-operator")]["spec"].get("holderIdentity") is None


def test_health_reports_a_stuck_reconcile(api: FakeApi) -> None:
    ctl = controller(api, leader_election=False, stuck_reconcile_seconds=10)
    ctl.start()
    try:
        wait_for(lambda: api.writes, timeout=10, what="the run reconciled")
        assert ctl.health() == []
        ctl._busy["worker-0"] = (("ml", "demo"), ctl.monotonic() - 11)
        assert ctl.health() == ["worker-0 has been reconciling ml/demo for 11s"]
    finally:
        ctl.stop(grace=5)


def test_children_are_indexed_by_their_run() -> None:
    cache = ClusterCache()

    def pod(name: str, run: str | None) -> dict[str, Any]:
        labels = {"kubetrain.dev/run": run} if run else {}
        return {"metadata": {"name": name, "namespace": "ml", "labels": labels}}

    assert cache.on_child("pods", None, pod("a-0", "a")) == {("ml", "a")}
    assert cache.on_child("pods", None, pod("b-0", "b")) == {("ml", "b")}
    assert cache.on_child("pods", None, pod("stray", None)) == set()
    assert [p["metadata"]["name"] for p in cache.pods("ml", "a")] == ["a-0"]
    assert cache.on_child("pods", pod("a-0", "a"), None) == {("ml", "a")}
    assert cache.pods("ml", "a") == [] and cache.counts()["pods"] == 1
