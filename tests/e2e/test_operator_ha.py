"""The operator at scale and under faults, on the real control plane (etcd, API server,
controller-manager, scheduler, KWOK GPU nodes; trainers on CPU):

- two replicas: the leader is SIGKILLed mid-stage, the other takes the Lease over and
  the run completes, no Job duplicated, no restart count lost;
- a run deleted while the operator is down is gone at once (no finalizer), and the
  operator, back, leaves it gone;
- runs that train steadily cost the API server only a handful of requests per poll
  interval, counted in the API server's audit log.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from kubetrain.operator.kube import USER_AGENT
from tests.e2e.scenario_harness import (
    JobWatcher,
    Scenario,
    StatusSampler,
    stage_status,
    tiny_curriculum,
)
from tests.e2e.test_scenarios import E2E, e2e, scenario  # noqa: F401  (the fixtures)
from tests.support.operator import OperatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

LEASE = "kubetrain-operator"
# Runs for the request count: pods on a fake node that nothing executes, so they stay
# Running for as long as the test wants, at no CPU cost.
IDLE_NODE = "e2e-idle-0"
IDLE_KEY = "kubetrain.dev/e2e-idle"


def _wait(sc: Scenario, cond: Any, what: str, timeout: float = 180) -> Any:
    return wait_for(cond, timeout=timeout, what=what, interval=0.2, detail=sc.detail)


def _lease_holder(sc: Scenario) -> str | None:
    try:
        lease = client.CoordinationV1Api(sc.admin).read_namespaced_lease(LEASE, sc.namespace)
    except ApiException:
        return None
    return lease.spec.holder_identity


def _leader(sc: Scenario, operators: list[OperatorProcess]) -> OperatorProcess | None:
    holder = _lease_holder(sc)
    return next((op for op in operators if op.alive() and op.identity() == holder), None)


# --------------------------------------------------------------------------- 1


def test_killed_leader_is_replaced_and_the_run_completes(scenario: Scenario) -> None:  # noqa: F811
    """Two replicas; a trainer crash makes restarts 1; then the leader is SIGKILLed
    while pretrain trains. The follower takes the Lease once it expires, finishes
    pretrain, starts sft: no Job is duplicated or recreated, restarts never go back."""
    operators = [scenario.start_operator(), scenario.start_operator()]
    scenario.create_run(
        tiny_curriculum(
            "ha",
            steps={"pretrain": 400, "sft": 40},
            checkpoint_every=20,
            stages=("pretrain", "sft"),
        )
    )
    with JobWatcher(scenario, "ha") as jobs, StatusSampler(scenario, "ha", "pretrain") as sampler:
        first = _wait(scenario, lambda: _leader(scenario, operators), "one replica leading")
        follower = next(op for op in operators if op is not first)
        _wait(scenario, lambda: f"{first.identity()} leads" in first.tail(), "the leader's log")
        assert " leads " not in follower.tail()

        _wait(scenario, lambda: scenario.latest_step("ha", "pretrain"), "a first checkpoint")
        pod = _wait(
            scenario, lambda: scenario.running_trainer("ha", "pretrain"), "the trainer running"
        )
        assert scenario.runner.kill(scenario.namespace, pod)
        _wait(
            scenario,
            lambda: (
                stage_status(scenario.status("ha"), "pretrain").get("restarts") == 1
                and scenario.running_trainer("ha", "pretrain")
            ),
            "restart 1 recorded and the stage running again",
        )

        first.kill()
        assert scenario.progress("ha", "pretrain").phase != "completed", (
            "pretrain finished before the leader was killed: not a mid-stage takeover"
        )
        _wait(
            scenario,
            lambda: _lease_holder(scenario) == follower.identity(),
            "the follower taking the Lease over",
            timeout=60,
        )
        status = scenario.wait_phase("ha", "Succeeded", timeout=360)

    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Succeeded"]
    assert stage_status(status, "pretrain")["restarts"] == 1
    assert stage_status(status, "sft")["restarts"] == 0
    assert jobs.order == ["pretrain", "sft"], jobs.order
    assert dict(jobs.max_at_once) == {"pretrain": 1, "sft": 1}, jobs.max_at_once
    # pretrain: the crashed attempt and its retry; nothing recreated by the takeover.
    assert {k: len(v) for k, v in jobs.uids.items()} == {"pretrain": 2, "sft": 1}, jobs.uids
    restarts = [r for r, _ in sampler.samples]
    reached = restarts.index(1)
    assert set(restarts[reached:]) == {1}, restarts  # never written back to 0
    assert f"{follower.identity()} leads" in follower.tail(200000)


# --------------------------------------------------------------------------- 2


def test_run_deleted_while_the_operator_is_down_is_gone_at_once(
    scenario: Scenario,  # noqa: F811
) -> None:
    """No finalizer: with the operator stopped, deleting a run completes at once and the
    garbage collector removes its children; the operator, back, creates nothing."""
    op = scenario.start_operator()
    scenario.create_run(
        tiny_curriculum("orphan", steps=100000, checkpoint_every=50, stages=("pretrain",))
    )
    _wait(scenario, lambda: scenario.phase_is("orphan", "Running"), "the run Running")
    assert not scenario.get_run("orphan")["metadata"].get("finalizers")
    op.stop()

    scenario.custom.delete_namespaced_custom_object(
        api.GROUP, api.VERSION, scenario.namespace, api.PLURAL, "orphan"
    )

    def gone() -> bool:
        try:
            scenario.get_run("orphan")
        except ApiException as exc:
            return exc.status == 404
        return False

    _wait(scenario, gone, "the run deleted with no operator running", timeout=30)
    _wait(
        scenario,
        lambda: not (scenario.jobs("orphan") or scenario.services("orphan")),
        "its Job and Service garbage-collected",
        timeout=120,
    )
    op.start()
    _wait(
        scenario,
        lambda: op.tail(200000).count("reconciling: ") >= 2,
        "the operator back, leading, its caches synced",
    )
    assert not scenario.jobs("orphan") and not scenario.services("orphan")
    assert "Traceback" not in op.tail(200000), op.tail()


# --------------------------------------------------------------------------- 3


def _add_idle_node(env: E2E) -> None:
    core = client.CoreV1Api(env.admin)
    try:
        core.read_node(IDLE_NODE)
        return
    except ApiException as exc:
        if exc.status != 404:
            raise
    env.control_plane.add_gpu_node(
        IDLE_NODE,
        gpus=8,
        labels={IDLE_KEY: "true"},
        taints=[client.V1Taint(key=IDLE_KEY, value="true", effect="NoSchedule")],
    )


def _idle_run(name: str) -> dict[str, Any]:
    manifest = tiny_curriculum(name, steps=100, stages=("pretrain",))
    manifest["spec"]["stages"][0]["resources"] = {
        "gpusPerNode": 1,
        "nodeSelector": {IDLE_KEY: "true"},
        "tolerations": [{"key": IDLE_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }
    return manifest


def _request_kind(event: dict[str, Any]) -> str:
    """``verb resource[/subresource]``, e.g. ``patch trainingruns/status``."""
    ref = event.get("objectRef") or {}
    sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
    return f"{event['verb']} {ref.get('resource', '?')}{sub}"


def _received(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["requestReceivedTimestamp"]).replace("Z", "+00:00"))


RUNS = 5
POLL_SECONDS = 1.0  # tests' operator config (scenario_harness.write_operator_config)
WINDOW_SECONDS = 10.0


def test_steady_runs_cost_a_handful_of_requests_per_poll(
    e2e: E2E,  # noqa: F811
    scenario: Scenario,  # noqa: F811
) -> None:
    """Five runs Running, polled every second: over ten polls the operator sends the API
    server a few requests in all (the Lease renewals, maybe a watch renewal or a Secret
    read), where the operator before it sent six per run per poll (GET run, LIST Jobs,
    Pods and Services, GET Secret, PATCH status): 300. Counted in the audit log."""
    _add_idle_node(e2e)
    op = scenario.start_operator()
    for i in range(RUNS):
        scenario.create_run(_idle_run(f"steady-{i}"))
    for i in range(RUNS):
        scenario.wait_phase(f"steady-{i}", "Running", timeout=120)
    mine = f"{USER_AGENT}/"
    identity = f"({op.identity()})"

    def requests_between(start: datetime, end: datetime) -> list[dict[str, Any]]:
        return [
            e
            for e in e2e.control_plane.audit_events()
            if str(e.get("userAgent", "")).startswith(mine)
            and identity in str(e.get("userAgent"))
            and e.get("stage") in ("ResponseComplete", "ResponseStarted")
            and start <= _received(e) < end
        ]

    start = datetime.now(UTC)
    wait_for(  # the measurement window, not a synchronisation
        lambda: (datetime.now(UTC) - start).total_seconds() >= WINDOW_SECONDS,
        timeout=WINDOW_SECONDS + 5,
        what="the measurement window passing",
    )
    end = datetime.now(UTC)
    seen = {e["auditID"]: e for e in requests_between(start, end)}
    kinds = Counter(_request_kind(e) for e in seen.values())
    polls = WINDOW_SECONDS / POLL_SECONDS
    detail = f"{len(seen)} requests over {polls:.0f} polls of {RUNS} runs: {dict(kinds)}"
    # The operator's requests are in the log at all (its start-up lists, its writes).
    assert requests_between(datetime.min.replace(tzinfo=UTC), end), "no audit events"
    assert len(seen) <= 8, detail
    per_poll = {"get trainingruns", "list jobs", "list pods", "list services"}
    assert not per_poll & set(kinds), detail
    for i in range(RUNS):  # and they are still polled: progress read, status current
        assert scenario.status(f"steady-{i}")["phase"] == "Running"
    print(json.dumps({"requests": len(seen), "by_kind": dict(kinds)}))
