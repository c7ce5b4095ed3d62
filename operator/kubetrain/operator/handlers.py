"""The reconcile of one run: gather what exists (from the informers' copies, not the
API), ask ``kubetrain.operator.plan`` what to do, apply it, and say when to look again.

No state lives in this process that is not also in the cluster or the store (status,
children, progress records), except the accrued numbers between two status writes
(below), so the operator can restart at any moment. Children are owned through
ownerReferences, so deletion needs no finalizer; an object that holds a child's name but
is not the run's is reported, never adopted (``Reconciler.taken_names``).

Status writes. A status is written when something a user reads in it changed. The
fields that grow with time alone (``ACCRUAL``: GPU-seconds, cost, CO2, energy, ETA) are
written at most every ``statusAccrualSeconds`` when nothing else changed; meanwhile the
reconciler keeps them in memory and lays them over the stored status before planning,
so the plan (budgets, the GPU-seconds ledger) sees them as if they had been written, and
the metrics export them at every reconcile. Every write carries the resourceVersion of
the copy it was planned from: a write based on an old copy fails with ``Conflict`` and
the run is planned again from the newer copy, never overwritten.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from kubetrain.core import api
from kubetrain.core.api import RunPhase, TrainingRunSpec, TrainingRunStatus
from kubetrain.core.conditions import ConditionType
from kubetrain.core.hf_config import ModelConfig
from kubetrain.core.store import StoreError
from kubetrain.operator import plan as planner
from kubetrain.operator.caches import ArchitectureReader, ProgressReader
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.kube import Conflict
from kubetrain.operator.metrics import OperatorMetrics
from kubetrain.operator.progress import parse_time

log = logging.getLogger("kubetrain.operator")

# At DEBUG these libraries log request headers (botocore: the access key id) and
# response bodies (kubernetes: a Secret's data), so they stay at WARNING even when the
# operator runs with --verbose.
CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes.client.rest")

# Status fields that change with the passing of time alone (per stage and in totals).
ACCRUAL = ("gpu_seconds", "energy_joules", "cost_usd", "co2_grams", "eta_seconds")
POLL_JITTER = 0.1  # polls are spread by ±10% so that runs created together drift apart
STALE_COPY_RETRY_SECONDS = 2.0
# A child this process created is expected in the informers' cache within this long; a
# reconcile meanwhile waits for it (its watch event queues the run) rather than plan
# from a cache that does not show it yet and create it again. Past it, the child is
# taken as gone (deleted before the informer saw it) and the run planned as usual.
CREATED_CHILD_WAIT_SECONDS = 30.0

# What the Kopf-based operator of kubetrain 0.1 left on runs: its finalizer (which would
# block deletion for ever now that nothing removes it) and its bookkeeping annotations.
LEGACY_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"
LEGACY_ANNOTATIONS = (
    "kubetrain.dev/last-handled-configuration",
    "kubetrain.dev/reconcile",
    "kubetrain.dev/poll",
    "kubetrain.dev/touch-dummy",
)


def silence_credential_loggers() -> None:
    """Keep libraries that would log credentials at WARNING."""
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class Cache(Protocol):
    """What exists, as the informers last saw it (``kubetrain.operator.controller``)."""

    def run(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def jobs(self, namespace: str, run: str) -> list[dict[str, Any]]: ...
    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]: ...
    def services(self, namespace: str, run: str) -> list[dict[str, Any]]: ...
    def workloads(self, namespace: str, run: str) -> list[dict[str, Any]]: ...


class Writer(Protocol):
    """The requests a reconcile makes (``kubetrain.operator.kube.KubeApi``): its writes,
    and a look at a name before creating a child by it."""

    def patch_run_metadata(
        self, namespace: str, name: str, metadata: dict[str, Any], resource_version: str
    ) -> dict[str, Any]: ...
    def patch_run_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str
    ) -> dict[str, Any]: ...
    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create(self, obj: dict[str, Any]) -> bool: ...
    def delete(
        self, kind: str, namespace: str, name: str, propagation: str, uid: str | None = None
    ) -> bool: ...
    def emit_event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class Result:
    """A reconcile's outcome: the plan applied (None: the run is gone or being deleted)
    and in how many seconds to reconcile again (None: only when something changes)."""

    plan: planner.Plan | None
    wake_after: float | None


# --------------------------------------------------------------------------- status


def _accrual_wire() -> tuple[list[str], list[str]]:
    stage = [api.StageStatus.model_fields[f].alias or f for f in ACCRUAL]
    totals = [
        api.Totals.model_fields[f].alias or f for f in ACCRUAL if f in api.Totals.model_fields
    ]
    return stage, totals


STAGE_ACCRUAL, TOTALS_ACCRUAL = _accrual_wire()


def visible(status: TrainingRunStatus) -> dict[str, Any]:
    """The status in wire form without the accrual fields: what, when it changes, is
    worth a write at once."""
    out = api.dump(status)
    for st in out.get("stages") or []:
        for name in STAGE_ACCRUAL:
            st.pop(name, None)
    for name in TOTALS_ACCRUAL:
        (out.get("totals") or {}).pop(name, None)
    return out


def with_accrual(stored: dict[str, Any], accrued: TrainingRunStatus) -> dict[str, Any]:
    """``stored`` (wire form) with the accrual fields of ``accrued`` laid over it, stage
    by stage (by name) and in totals."""
    out = dict(stored)
    by_name = {s.name: api.dump(s) for s in accrued.stages}
    stages = []
    for st in stored.get("stages") or []:
        fresh = by_name.get(st.get("name"))
        if fresh is not None:
            st = {**st, **{k: fresh[k] for k in STAGE_ACCRUAL if k in fresh}}
        stages.append(st)
    if stages:
        out["stages"] = stages
    totals = api.dump(accrued.totals)
    out["totals"] = {**(stored.get("totals") or {}), **{k: totals[k] for k in TOTALS_ACCRUAL}}
    return out


def ttl_due(
    spec: TrainingRunSpec | None, status: TrainingRunStatus | None, now: datetime
) -> float | None:
    """Seconds until ``ttlSecondsAfterFinished`` expires for a finished run (the time
    ``plan.expired_children`` reads: the Succeeded or Failed condition's transition);
    None when there is nothing to wait for."""
    if spec is None or status is None or spec.ttl_seconds_after_finished is None:
        return None
    if status.phase not in planner.FINISHED:
        return None
    kind = ConditionType.SUCCEEDED if status.phase == RunPhase.Succeeded else ConditionType.FAILED
    cond = next((c for c in status.conditions if c.type == kind), None)
    at = parse_time(cond.last_transition_time) if cond else None
    if at is None:
        return None
    left = spec.ttl_seconds_after_finished - (now - at).total_seconds()
    return left + 1.0 if left > 0 else None


def name_taken(status: TrainingRunStatus | None) -> bool:
    """Whether the run waits for a child's name that an object not its own holds."""
    cond = planner.condition_of(status.conditions, ConditionType.CHILD_CONFLICT) if status else None
    return cond is not None and cond.status == "True"


def legacy_cleanup(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata patch that removes what the Kopf-based operator left (None: none)."""
    patch: dict[str, Any] = {}
    finalizers = meta.get("finalizers") or []
    if LEGACY_FINALIZER in finalizers:
        patch["finalizers"] = [f for f in finalizers if f != LEGACY_FINALIZER]
    stale = [k for k in LEGACY_ANNOTATIONS if k in (meta.get("annotations") or {})]
    if stale:
        patch["annotations"] = dict.fromkeys(stale)
    return patch or None


# --------------------------------------------------------------------------- reconcile


class Reconciler:
    """Plans and applies one run at a time; the caller (``controller.Controller``)
    makes sure no run is reconciled by two threads at once."""

    def __init__(
        self,
        cache: Cache,
        kube: Writer,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        progress: ProgressReader,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        architectures: ArchitectureReader | None = None,
    ):
        self.cache = cache
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.progress = progress
        self.architectures = architectures  # None: estimates count the manifest's model
        self.clock = clock
        self.monotonic = monotonic
        self.jitter = jitter
        self._lock = threading.Lock()
        self._accrued: dict[tuple[str, str], TrainingRunStatus] = {}  # not yet written
        self._written: dict[tuple[str, str], float] = {}  # monotonic time of last write
        # The run's resourceVersions this process has written over: while the informer
        # still shows one of them, the copy predates our own write.
        self._superseded: dict[tuple[str, str], set[str]] = {}
        # Children created by this process and not yet in the cache: (kind, name) ->
        # monotonic deadline (CREATED_CHILD_WAIT_SECONDS).
        self._created: dict[tuple[str, str], dict[tuple[str, str], float]] = {}

    def forget(self, namespace: str, name: str) -> None:
        """The run is gone: drop its metric series and what is remembered of it."""
        key = (namespace, name)
        self.metrics.forget_run(namespace, name)
        self.progress.forget(key)
        with self._lock:
            self._accrued.pop(key, None)
            self._written.pop(key, None)
            self._superseded.pop(key, None)
            self._created.pop(key, None)

    def reconcile(self, namespace: str, name: str) -> Result:
        """Close the gap between the run's spec and what exists."""
        started = time.monotonic()
        try:
            return self._reconcile(namespace, name)
        except Conflict:
            raise  # another writer was first: not an error, the run is planned again
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - started)

    def taken_names(
        self, run: dict[str, Any], objects: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The objects (Jobs, Services) that already hold the names of ``objects`` (the
        children a plan creates) but are not the run's. The informers hold only objects
        labelled with the run, and a 409 on create says nothing about the owner; so look
        before creating: one GET per child created, once per stage attempt."""
        uid = str(run["metadata"].get("uid") or "")
        jobs: list[dict[str, Any]] = []
        services: list[dict[str, Any]] = []
        for obj in objects:
            meta = obj["metadata"]
            existing = self.kube.get_child(obj["kind"], meta["namespace"], meta["name"])
            if existing is not None and not planner.owned_by(existing, uid):
                (jobs if obj["kind"] == "Job" else services).append(existing)
        return jobs, services

    def model_architecture(
        self, run: dict[str, Any], jobs: list[dict[str, Any]]
    ) -> ModelConfig | None:
        """The config.json of the run's Hugging Face ``model.from``, so that the estimate
        counts its real parameters; None when there is none, or while it cannot be read
        (logged; the reader tries again after its interval)."""
        if self.architectures is None:
            return None
        meta = run["metadata"]
        try:
            return self.architectures.read(run, jobs)
        except (StoreError, OSError, ValueError) as exc:
            reason = f"model.from: {exc}"
        except Exception as exc:  # the Secret: missing, forbidden, unreachable
            reason = f"the credentials Secret: {type(exc).__name__}"
        log.warning(
            "%s/%s: estimate counts the manifest's model fields: cannot read %s",
            meta["namespace"],
            meta["name"],
            reason,
        )
        return None

    def _reconcile(self, namespace: str, name: str) -> Result:
        key = (namespace, name)
        run = self.cache.run(namespace, name)
        if run is None:
            self.forget(namespace, name)
            return Result(None, None)
        if self._behind_own_write(key, run):
            # Planning from it would only conflict: the watch event of the write is on
            # its way and queues the run again (the wake-up is the fallback).
            return Result(None, STALE_COPY_RETRY_SECONDS)
        cleanup = legacy_cleanup(run["metadata"])
        if cleanup is not None:
            base = run["metadata"]["resourceVersion"]
            written = self.kube.patch_run_metadata(namespace, name, cleanup, base)
            self._wrote(run, base, written)
            run = written
        if run["metadata"].get("deletionTimestamp"):
            return Result(None, None)
        jobs = self.cache.jobs(namespace, name)
        pods = self.cache.pods(namespace, name)
        services = self.cache.services(namespace, name)
        workloads = self.cache.workloads(namespace, name)
        if self._awaiting_created(key, jobs, services):
            # The status just written says the stage started; a plan from a cache
            # without its Job would create it again and report a resume.
            return Result(None, STALE_COPY_RETRY_SECONDS)
        records = self.progress.read(run, jobs)
        with self._lock:
            accrued = self._accrued.get(key)
        planned_from = run
        if accrued is not None:
            planned_from = {**run, "status": with_accrual(run.get("status") or {}, accrued)}
        now = self.clock()
        architecture = self.model_architecture(run, jobs)
        p = planner.plan(
            planned_from,
            jobs,
            pods,
            records,
            now,
            self.config,
            observed_services=services,
            architecture=architecture,
            observed_workloads=workloads,
        )
        taken_jobs, taken_services = self.taken_names(run, p.create)
        if taken_jobs or taken_services:
            # Plan again with what holds the names in view: it is reported, not adopted.
            p = planner.plan(
                planned_from,
                jobs + taken_jobs,
                pods,
                records,
                now,
                self.config,
                observed_services=services + taken_services,
                architecture=architecture,
                observed_workloads=workloads,
            )
        self.apply(run, p, jobs, services)
        if p.previous_status is not None and p.run_status is not None:
            stage_types = {s.name: s.type.value for s in p.spec.stages} if p.spec else {}
            self.metrics.observe_run(
                namespace, name, p.previous_status, p.run_status, p.budget_used, stage_types
            )
        return Result(p, self.wake_after(p, jobs, now))

    def apply(
        self,
        run: dict[str, Any],
        p: planner.Plan,
        jobs: list[dict[str, Any]],
        services: list[dict[str, Any]],
    ) -> None:
        """Apply ``p`` to ``run`` in the plan's order: annotations and status first, so
        that what a delete is about to make unobservable (a failed Job's attempt) is
        already recorded."""
        meta = run["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        version = meta["resourceVersion"]
        if p.annotations:
            written = self.kube.patch_run_metadata(
                namespace, name, {"annotations": p.annotations}, version
            )
            version = self._wrote(run, version, written)
        if p.run_status is not None:
            self.write_status(run, p.run_status, version)
        uids = {
            **{("Job", j["metadata"]["name"]): j["metadata"].get("uid") for j in jobs},
            **{("Service", s["metadata"]["name"]): s["metadata"].get("uid") for s in services},
        }
        for d in p.delete:
            self.kube.delete(d.kind, namespace, d.name, d.propagation, uids.get((d.kind, d.name)))
        for obj in p.create:
            if self.kube.create(obj):
                with self._lock:
                    self._created.setdefault((namespace, name), {})[
                        (obj["kind"], obj["metadata"]["name"])
                    ] = self.monotonic() + CREATED_CHILD_WAIT_SECONDS
        for ev in p.events:
            try:
                self.kube.emit_event(run, ev.type, ev.reason, ev.message)
            except Exception as exc:  # an event lost is not worth a failed reconcile
                log.warning(
                    "%s/%s: event %s not posted: %s", namespace, name, ev.reason, type(exc).__name__
                )
            log.info("%s/%s: %s: %s", namespace, name, ev.reason, ev.message)

    def write_status(self, run: dict[str, Any], new: TrainingRunStatus, version: str) -> None:
        """Write ``new`` if a user would see a difference from the stored status, or if
        only accrual fields differ and the last write is ``statusAccrualSeconds`` old;
        otherwise keep the accrual in memory."""
        meta = run["metadata"]
        key = (meta["namespace"], meta["name"])
        stored = planner.previous_status(run)
        now = self.monotonic()
        with self._lock:
            # A run first seen by this process was written by the previous one.
            last = self._written.setdefault(key, now)
        changed = api.dump(new) != api.dump(stored)
        if (
            changed
            and visible(new) == visible(stored)
            and now - last < self.config.status_accrual_seconds
        ):
            with self._lock:
                self._accrued[key] = new
            return
        if changed:
            written = self.kube.patch_run_status(key[0], key[1], api.dump(new), version)
            self._wrote(run, version, written)
            with self._lock:
                self._written[key] = now
        with self._lock:
            self._accrued.pop(key, None)

    def _wrote(self, run: dict[str, Any], base: str, written: dict[str, Any]) -> str:
        """Remember that ``base`` is superseded by our write; the version written."""
        key = (run["metadata"]["namespace"], run["metadata"]["name"])
        with self._lock:
            self._superseded.setdefault(key, set()).add(base)
        return str(written["metadata"]["resourceVersion"])

    def _awaiting_created(
        self,
        key: tuple[str, str],
        jobs: list[dict[str, Any]],
        services: list[dict[str, Any]],
    ) -> bool:
        """Whether a child this process created is not in the cache yet (and its wait
        is not over); forgets those that arrived or waited long enough."""
        with self._lock:
            created = self._created.get(key)
            if not created:
                return False
            seen = {("Job", j["metadata"]["name"]) for j in jobs}
            seen |= {("Service", s["metadata"]["name"]) for s in services}
            now = self.monotonic()
            for child, deadline in list(created.items()):
                if child in seen or now >= deadline:
                    del created[child]
            if not created:
                del self._created[key]
                return False
            return True

    def _behind_own_write(self, key: tuple[str, str], run: dict[str, Any]) -> bool:
        version = run["metadata"].get("resourceVersion")
        with self._lock:
            superseded = self._superseded.get(key, set())
            if version in superseded:
                return True
            # The informer caught up (or someone else wrote): nothing older matters now.
            self._superseded.pop(key, None)
            return False

    def wake_after(
        self, p: planner.Plan, jobs: list[dict[str, Any]], now: datetime
    ) -> float | None:
        """When to reconcile again without an event: what the plan asks for, the poll
        interval (jittered) while the run is Pending or Running with a Job, or waits for
        a name that an object not the run's holds (the informers do not show it going
        away), the end of its TTL once finished; None for a run that only waits for
        changes (suspended, finished, no Job yet)."""
        wakes = []
        if p.requeue_after is not None:
            wakes.append(p.requeue_after)
        status = p.run_status
        active = status is not None and status.phase in (RunPhase.Pending, RunPhase.Running)
        if active and (jobs or name_taken(status)):
            spread = 1.0 + POLL_JITTER * (2 * self.jitter() - 1)
            wakes.append(self.config.poll_interval_seconds * spread)
        ttl = ttl_due(p.spec, status, now)
        if ttl is not None:
            wakes.append(ttl)
        return min(wakes) if wakes else None
