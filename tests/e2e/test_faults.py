"""The operator under faults, on the real control plane (etcd, API server,
controller-manager, scheduler, KWOK GPU nodes) with SeaweedFS as the store:

- the operator SIGKILLed while 50 runs are under way, stages finishing while it is
  down: restarted, it creates no Job twice, writes no status that goes back, and every
  run completes;
- the API server restarted mid-stage: the operator's watches recover on their own (no
  restart of the operator), the run completes, no restart is counted;
- the store down for two minutes while a stage finishes: no restart consumed,
  ``StorageReachable`` False with the error then True, the stage is not run again, the
  run completes.

Trainer pods are stand-ins (tests/support/standin.py) on KWOK nodes that nothing
executes: they write what a trainer writes (``progress.json``, ``FINAL``) from the pod's
own environment and end with exit code 0, so that fifty runs go through the operator's
real path (Jobs, pods, the store, status) on two CPU cores.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from kubetrain.core import api
from kubetrain.operator import resources
from tests.cluster.controlplane import EXIT_CODE_ANNOTATION
from tests.e2e.scenario_harness import Scenario, condition, stage_status, tiny_curriculum
from tests.e2e.test_scenarios import E2E, e2e, scenario  # noqa: F401  (the fixtures)
from tests.support.services import SeaweedS3
from tests.support.standin import (
    Object,
    StandIn,
    Watcher,
    exit_pod,
    run_stage,
    write_done,
    write_progress,
)
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

# KWOK nodes for stand-in pods only: their taint and label keep every other test's pods
# off them and these pods on them.
STANDIN_KEY = "kubetrain.dev/e2e-standin"
STANDIN_NODES = ("e2e-standin-0", "e2e-standin-1")
STANDIN_GPUS = 32
STAGES = ("pretrain", "sft")
# The order a stage's phase moves in when nothing fails.
PHASE_RANK = {"Pending": 0, "Running": 1, "Succeeded": 2}


@pytest.fixture(scope="module")
def standin_nodes(e2e: E2E) -> None:  # noqa: F811
    core = client.CoreV1Api(e2e.admin)
    present = {n.metadata.name for n in core.list_node().items}
    for node in STANDIN_NODES:
        if node not in present:
            e2e.control_plane.add_gpu_node(
                node,
                gpus=STANDIN_GPUS,
                labels={STANDIN_KEY: "true"},
                taints=[client.V1Taint(key=STANDIN_KEY, value="true", effect="NoSchedule")],
            )


def standin_run(name: str) -> dict[str, Any]:
    """pretrain -> sft, 20 steps each, one GPU per stage on the stand-in nodes."""
    manifest = tiny_curriculum(name, steps=20, stages=STAGES)
    for stage in manifest["spec"]["stages"]:
        stage["resources"] = {
            "gpusPerNode": 1,
            "nodeSelector": {STANDIN_KEY: "true"},
            "tolerations": [{"key": STANDIN_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        }
    return manifest


def _wait(sc: Scenario, cond: Callable[[], Any], what: str, timeout: float = 180) -> Any:
    return wait_for(cond, timeout=timeout, what=what, interval=0.3, detail=sc.detail)


# --------------------------------------------------------------------------- observer


def regressions(run: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What a user would see go back between two successive stored statuses of a run in
    which nothing fails: a finished run unfinished, a stage lost, its step, restarts or
    phase going back, its start time rewritten."""
    out = []
    if old.get("phase") == "Succeeded" and new.get("phase") != "Succeeded":
        out.append(f"{run}: phase Succeeded -> {new.get('phase')}")
    for before in old.get("stages") or []:
        name = before.get("name")
        after = stage_status(new, name)
        if not after:
            out.append(f"{run}: stage {name} lost from the status")
            continue
        for field in ("step", "restarts"):
            if int(after.get(field, 0)) < int(before.get(field, 0)):
                out.append(f"{run}/{name}: {field} {before.get(field)} -> {after.get(field)}")
        was, now = before.get("phase", "Pending"), after.get("phase", "Pending")
        if now not in PHASE_RANK:
            out.append(f"{run}/{name}: phase {now} ({after.get('message')})")
        elif was in PHASE_RANK and PHASE_RANK[now] < PHASE_RANK[was]:
            out.append(f"{run}/{name}: phase {was} -> {now} ({after.get('message')})")
        if before.get("startTime") and after.get("startTime") != before.get("startTime"):
            out.append(f"{run}/{name}: startTime {before['startTime']} -> {after.get('startTime')}")
    return out


class Observer:
    """Watches a scenario's Jobs, Pods and runs while in a ``with`` block (raw JSON,
    every stored version in order, as a user's ``kubectl get -w`` would): every Job uid
    per (run, stage), the Jobs that completed, each run's last status and any regression
    between two of its statuses, the changes of its condition StorageReachable, and the
    Running trainer pods (handed to ``stand_in`` when there is one)."""

    def __init__(self, sc: Scenario, stand_in: StandIn | None = None):
        self.sc, self.stand_in = sc, stand_in
        self._lock = threading.Lock()
        self.job_uids: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.completed: set[tuple[str, str]] = set()
        self.status: dict[str, dict[str, Any]] = {}
        self.violations: list[str] = []
        self.storage: dict[str, list[tuple[str, str]]] = defaultdict(list)  # (status, message)
        self.running: dict[tuple[str, str], Object] = {}
        self._stop = threading.Event()
        ns = sc.namespace
        # One API client (connection pool) per watch: each holds its connection.
        self.watchers = [
            Watcher(
                "jobs",
                client.BatchV1Api(_client(sc)).list_namespaced_job,
                (ns,),
                self._on_job,
                self._stop,
                resources.LABEL_RUN,
            ),
            Watcher(
                "pods",
                client.CoreV1Api(_client(sc)).list_namespaced_pod,
                (ns,),
                self._on_pod,
                self._stop,
                resources.LABEL_RUN,
            ),
            Watcher(
                "runs",
                client.CustomObjectsApi(_client(sc)).list_namespaced_custom_object,
                (api.GROUP, api.VERSION, ns, api.PLURAL),
                self._on_run,
                self._stop,
            ),
        ]

    def __enter__(self) -> Observer:
        for w in self.watchers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self.watchers:
            w.join(timeout=5)

    # ---- events
    def _on_job(self, _type: str, job: Object, _t: float) -> None:
        key = run_stage(job)
        conditions = (job.get("status") or {}).get("conditions") or []
        with self._lock:
            self.job_uids[key].add(job["metadata"]["uid"])
            if any(c["type"] == "Complete" and c["status"] == "True" for c in conditions):
                self.completed.add(key)

    def _on_pod(self, type_: str, pod: Object, t: float) -> None:
        meta, phase = pod["metadata"], (pod.get("status") or {}).get("phase")
        if self.stand_in is not None:
            self.stand_in.on_pod(type_, pod, t)
        key = run_stage(pod)
        with self._lock:
            if (
                type_ != "DELETED"
                and phase == "Running"
                and EXIT_CODE_ANNOTATION not in (meta.get("annotations") or {})
            ):
                self.running[key] = pod
            elif self.running.get(key, {}).get("metadata", {}).get("uid") == meta["uid"]:
                del self.running[key]

    def _on_run(self, type_: str, run: Object, _t: float) -> None:
        if type_ == "DELETED":
            return
        name, new = run["metadata"]["name"], run.get("status") or {}
        storage = condition(new, "StorageReachable")
        with self._lock:
            old = self.status.get(name)
            self.status[name] = new
            if old is not None:
                self.violations += regressions(name, old, new)
            seen = (storage.get("status", ""), storage.get("message", ""))
            if storage and (not self.storage[name] or self.storage[name][-1][0] != seen[0]):
                self.storage[name].append(seen)

    # ---- questions
    def pod(self, run: str, stage: str) -> Object | None:
        """The Running trainer pod of the stage, not yet told to exit."""
        with self._lock:
            return self.running.get((run, stage))

    def phases(self) -> Counter[str]:
        with self._lock:
            return Counter(s.get("phase", "(none)") for s in self.status.values())

    def jobs_of(self, stage: str) -> int:
        with self._lock:
            return sum(1 for _, s in self.job_uids if s == stage)

    def waiting_for_operator(self) -> list[str]:
        """Runs whose pretrain Job completed and that have no sft Job yet."""
        with self._lock:
            return [
                r
                for r, s in self.completed
                if s == STAGES[0] and (r, STAGES[1]) not in self.job_uids
            ]


def _client(sc: Scenario) -> client.ApiClient:
    return client.ApiClient(sc.admin.configuration)


def _retrying(sc: Scenario, what: str, action: Callable[[], object]) -> None:
    """``action`` until it goes through (the API server or the store may be coming
    back; every action here is idempotent)."""

    def attempt() -> bool:
        action()
        return True

    _wait(sc, attempt, what, timeout=60)


# --------------------------------------------------------------------------- a


RUNS = 50


def test_operator_killed_under_fifty_runs_loses_nothing(
    e2e: E2E,  # noqa: F811
    scenario: Scenario,  # noqa: F811
    standin_nodes: None,
) -> None:
    """Fifty two-stage runs; the operator is SIGKILLed once ten of them are on to sft and
    stays down until five more pretrain Jobs have completed without it. Restarted, it
    takes every run to Succeeded: one Job per stage (none recreated), and no stored
    status in which a step, a restart count or a stage's phase goes back."""
    # Polled every 5 s: 50 runs at 1 s would be 50 store reads a second on two cores.
    op = scenario.start_operator(settings={"pollIntervalSeconds": 5})
    stand_in = StandIn(
        client.CoreV1Api(_client(scenario)),
        e2e.s3.client(),
        hold=3,
        spread=25,
        workers=4,
        seed=12,
        midway=True,
    )
    with Observer(scenario, stand_in) as seen:
        stand_in.start().release()
        for i in range(RUNS):
            scenario.create_run(standin_run(f"r{i:02d}"))
        _wait(scenario, lambda: seen.jobs_of("sft") >= 10, "ten runs on to sft")
        op.kill()
        _wait(
            scenario,
            lambda: len(seen.waiting_for_operator()) >= 5,
            "five pretrain Jobs completing while the operator is down",
        )
        assert seen.phases().get("Succeeded", 0) < RUNS  # work is left for the restart
        op.start()
        _wait(
            scenario,
            lambda: seen.phases().get("Succeeded", 0) == RUNS,
            f"all {RUNS} runs Succeeded after the restart",
            timeout=300,
        )
    stand_in.stop()

    assert not seen.violations, seen.violations[:20]
    per_stage = Counter(len(uids) for uids in seen.job_uids.values())
    assert per_stage == {1: RUNS * len(STAGES)}, seen.job_uids
    for run, status in seen.status.items():
        for stage in STAGES:
            st = stage_status(status, stage)
            assert st["phase"] == "Succeeded" and st["restarts"] == 0, (run, st)
            assert st["step"] == st["totalSteps"] == 20, (run, st)
    assert not stand_in.errors, stand_in.errors[:10]
    assert op.tail(10**7).count("reconciling: ") == 2  # the first start, and the restart


# --------------------------------------------------------------------------- b


def test_api_server_restart_mid_stage_is_ridden_out(
    e2e: E2E,  # noqa: F811
    scenario: Scenario,  # noqa: F811
    standin_nodes: None,
) -> None:
    """The API server goes down and comes back while pretrain runs (etcd keeps the
    state). The same operator process, its watches renewed on their own, sees pretrain's
    Job complete, starts sft, and a run created after the restart; nothing is restarted."""
    op = scenario.start_operator()
    s3 = e2e.s3.client()
    core = client.CoreV1Api(_client(scenario))
    with Observer(scenario) as seen:
        scenario.create_run(standin_run("api"))
        pod = _wait(scenario, lambda: seen.pod("api", "pretrain"), "pretrain's pod Running")
        write_progress(s3, pod, 10)
        _wait(
            scenario,
            lambda: stage_status(scenario.status("api"), "pretrain").get("step") == 10,
            "the operator reporting step 10 of pretrain",
        )
        assert op.proc is not None
        pid = op.proc.pid

        e2e.control_plane.restart_apiserver()

        # Only watches that work again show the operator pretrain's Job complete.
        write_done(s3, pod)
        _retrying(scenario, "pretrain's pod told to exit", lambda: exit_pod(core, pod))
        sft = _wait(scenario, lambda: seen.pod("api", "sft"), "sft's pod Running", timeout=120)
        write_done(s3, sft)
        _retrying(scenario, "sft's pod told to exit", lambda: exit_pod(core, sft))
        status = scenario.wait_phase("api", "Succeeded", timeout=120)
        scenario.create_run(standin_run("after"))
        _wait(scenario, lambda: seen.pod("after", "pretrain"), "a run created after it started")

    assert op.alive() and op.proc is not None and op.proc.pid == pid and op.starts == 1
    log = op.tail(10**7)
    assert "retrying" in log, "the operator's watches never saw the API server go away"
    assert "Traceback" not in log, log[-3000:]
    for stage in STAGES:
        assert stage_status(status, stage)["restarts"] == 0, status
        assert len(seen.job_uids[("api", stage)]) == 1, seen.job_uids
    assert not seen.violations, seen.violations


# --------------------------------------------------------------------------- c


OUTAGE_SECONDS = 120.0


def test_store_outage_while_a_stage_finishes_costs_no_restart(
    e2e: E2E,  # noqa: F811
    scenario: Scenario,  # noqa: F811
    standin_nodes: None,
) -> None:
    """pretrain writes FINAL, then the store dies and the pod exits 0. For two minutes
    the operator cannot confirm FINAL: StorageReachable is False with the error, the
    stage waits (neither restarted nor failed, sft not started). The store comes back
    on the same ports with the same data: StorageReachable True, pretrain Succeeded
    from its one Job, sft runs, the run completes."""
    store = e2e.s3
    assert isinstance(store, SeaweedS3)
    op = scenario.start_operator()
    core = client.CoreV1Api(_client(scenario))
    with Observer(scenario) as seen:
        scenario.create_run(standin_run("s3"))
        pod = _wait(scenario, lambda: seen.pod("s3", "pretrain"), "pretrain's pod Running")
        write_done(store.client(), pod)
        _wait(
            scenario,
            lambda: stage_status(scenario.status("s3"), "pretrain").get("step") == 20,
            "the operator reporting pretrain's last step",
        )

        store.kill()
        down = time.monotonic()
        exit_pod(core, pod)
        _wait(scenario, lambda: ("s3", "pretrain") in seen.completed, "pretrain's Job Complete")
        unreachable = _wait(
            scenario,
            lambda: (
                (c := condition(scenario.status("s3"), "StorageReachable")).get("status") == "False"
                and c
            ),
            "StorageReachable False",
            timeout=60,
        )
        wait_for(  # the outage itself: nothing is to happen meanwhile
            lambda: time.monotonic() - down >= OUTAGE_SECONDS,
            timeout=OUTAGE_SECONDS + 5,
            what="two minutes of outage",
            interval=1.0,
        )
        during = scenario.status("s3")
        assert stage_status(during, "pretrain")["phase"] != "Succeeded", during
        assert ("s3", "sft") not in seen.job_uids, "sft started before FINAL was confirmed"
        store.start()

        _wait(
            scenario,
            lambda: condition(scenario.status("s3"), "StorageReachable").get("status") == "True",
            "StorageReachable True again",
            timeout=120,
        )
        sft = _wait(scenario, lambda: seen.pod("s3", "sft"), "sft's pod Running", timeout=120)
        write_done(store.client(), sft)
        exit_pod(core, sft)
        status = scenario.wait_phase("s3", "Succeeded", timeout=120)

    assert op.alive() and op.starts == 1
    print({"StorageReachable False": unreachable["message"]})
    assert "cannot read the progress and FINAL of stage 'pretrain'" in unreachable["message"]
    assert unreachable["reason"] == "StoreUnreachable", unreachable
    assert [s for s, _ in seen.storage["s3"]] == ["False", "True"], seen.storage
    for stage in STAGES:
        st = stage_status(status, stage)
        assert st["phase"] == "Succeeded" and st["restarts"] == 0, st
        assert len(seen.job_uids[("s3", stage)]) == 1, seen.job_uids
    assert not seen.violations, seen.violations
