"""Thin Kopf handlers: every event about a TrainingRun, its Jobs or its Pods, and a
timer per run, ends in ``Reconciler.reconcile(namespace, name)``, which gathers what
exists, asks ``kubetrain.operator.plan`` what to do, and applies it.

No state lives in this process that is not also in the cluster or the store (status,
annotations, children, progress records), so the operator can restart at any moment.
Children are owned through ownerReferences, so deletion needs no finalizer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf

from kubetrain.core import api
from kubetrain.core.contract import ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY
from kubetrain.core.store import ObjectStore, StoreError, open_store
from kubetrain.operator import plan as planner
from kubetrain.operator import resources
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.metrics import OperatorMetrics
from kubetrain.operator.progress import StageRecords, read_stage_records, unknown_records

log = logging.getLogger("kubetrain.operator")

# At DEBUG these libraries log request headers (botocore: the access key id) and
# response bodies (kubernetes: a Secret's data), so they stay at WARNING even when the
# operator runs with --verbose.
CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes.client.rest")


def silence_credential_loggers() -> None:
    """Keep libraries that would log credentials at WARNING."""
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class Api(Protocol):
    """What the reconciler needs from the cluster (``kubetrain.operator.kube.KubeApi``; tests
    pass an in-memory fake)."""

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_jobs(self, namespace: str, run: str) -> list[dict[str, Any]]: ...
    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]: ...
    def list_services(self, namespace: str, run: str) -> list[dict[str, Any]]: ...
    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create(self, obj: dict[str, Any]) -> bool: ...
    def delete(self, kind: str, namespace: str, name: str, propagation: str) -> bool: ...
    def patch_run_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None: ...
    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...
    def read_secret(self, namespace: str, name: str) -> dict[str, str]: ...
    def emit_event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


StoreFactory = Callable[[api.S3Storage, dict[str, str] | None], ObjectStore]

# A reconcile holds its run's lock while it reads the store: fail fast and let the next
# timer tick retry, rather than wait out a trainer's patient upload settings.
STORE_RETRIES = 3
STORE_CONNECT_TIMEOUT = 5.0
STORE_READ_TIMEOUT = 20.0


def open_run_store(s3: api.S3Storage, credentials: dict[str, str] | None) -> ObjectStore:
    """The run's store, read with the run's own credentials when it names a Secret
    (held in the boto3 client only, never logged), else the operator's."""
    credentials = credentials or {}
    return open_store(
        s3.uri(),
        endpoint=s3.endpoint,
        region=s3.region,
        access_key_id=credentials.get(ENV_AWS_ACCESS_KEY_ID) or None,
        secret_access_key=credentials.get(ENV_AWS_SECRET_ACCESS_KEY) or None,
        retries=STORE_RETRIES,
        connect_timeout=STORE_CONNECT_TIMEOUT,
        read_timeout=STORE_READ_TIMEOUT,
    )


class Reconciler:
    """Gathers the observed state of a run, plans, applies. One lock per run: Kopf runs
    sync handlers in threads, and a Job event may arrive while the timer reconciles."""

    def __init__(
        self,
        kube: Api,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        store_factory: StoreFactory = open_run_store,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.store_factory = store_factory
        self.clock = clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """The run is gone: drop its metric series and its lock."""
        self.metrics.forget_run(namespace, name)
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def read_records(
        self, run: dict[str, Any], jobs: list[dict[str, Any]]
    ) -> dict[str, StageRecords]:
        """The progress records the plan needs (``plan.records_to_read``); "unknown" when
        the store or the Secret cannot be read (the run still reconciles; nothing that
        depends on the store is decided)."""
        meta = run["metadata"]
        wanted = planner.records_to_read(run, jobs)
        s3 = wanted.s3
        if s3 is None or not wanted.stages:
            return {}
        credentials = None
        if s3.credentials_secret:
            try:
                credentials = self.kube.read_secret(meta["namespace"], s3.credentials_secret)
            except Exception as exc:  # the run still reconciles; progress waits
                log.warning(
                    "%s/%s: cannot read Secret %s: %s",
                    meta["namespace"],
                    meta["name"],
                    s3.credentials_secret,
                    type(exc).__name__,
                )
                status = getattr(exc, "status", None)
                why = (
                    f"HTTP {status} {getattr(exc, 'reason', '')}" if status else type(exc).__name__
                )
                return unknown_records(
                    wanted.stages, f"cannot read Secret {s3.credentials_secret} ({why.strip()})"
                )
        try:
            store = self.store_factory(s3, credentials)
        except (StoreError, OSError, ValueError) as exc:
            log.warning("%s/%s: cannot open the store: %s", meta["namespace"], meta["name"], exc)
            return unknown_records(wanted.stages, str(exc) or type(exc).__name__)
        return read_stage_records(store, meta["namespace"], meta["name"], wanted.stages)

    def taken_names(
        self, run: dict[str, Any], objects: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The objects (Jobs, Services) that already hold the names of ``objects`` but
        are not the run's. The listings show only what carries the run's labels, and a
        409 on create says nothing about the owner; so look before creating (a stage
        creates its Job and Service once per attempt)."""
        uid = str(run["metadata"].get("uid") or "")
        jobs: list[dict[str, Any]] = []
        services: list[dict[str, Any]] = []
        for obj in objects:
            meta = obj["metadata"]
            existing = self.kube.get_child(obj["kind"], meta["namespace"], meta["name"])
            if existing is not None and not planner.owned_by(existing, uid):
                (jobs if obj["kind"] == "Job" else services).append(existing)
        return jobs, services

    def reconcile(self, namespace: str, name: str) -> planner.Plan | None:
        """Close the gap between the run's spec and what exists; None when the run is
        gone."""
        started = time.monotonic()
        try:
            with self._lock(namespace, name):
                return self._reconcile(namespace, name)
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - started)

    def _reconcile(self, namespace: str, name: str) -> planner.Plan | None:
        run = self.kube.get_run(namespace, name)
        if run is None:
            self.forget(namespace, name)
            return None
        if run["metadata"].get("deletionTimestamp"):
            return None
        jobs = self.kube.list_jobs(namespace, name)
        pods = self.kube.list_pods(namespace, name)
        services = self.kube.list_services(namespace, name)
        records = self.read_records(run, jobs)
        now = self.clock()
        p = planner.plan(run, jobs, pods, records, now, self.config, observed_services=services)
        taken_jobs, taken_services = self.taken_names(run, p.create)
        if taken_jobs or taken_services:
            # Plan again with what holds the names in view: it is reported, not adopted.
            p = planner.plan(
                run,
                jobs + taken_jobs,
                pods,
                records,
                now,
                self.config,
                observed_services=services + taken_services,
            )
        # Order matters: annotations and status first, so that what a delete is about
        # to make unobservable (a failed Job's attempt) is already recorded.
        if p.annotations:
            self.kube.patch_run_annotations(namespace, name, p.annotations)
        if p.status is not None:
            self.kube.patch_run_status(namespace, name, p.status)
        for d in p.delete:
            self.kube.delete(d.kind, namespace, d.name, d.propagation)
        for obj in p.create:
            self.kube.create(obj)
        for ev in p.events:
            try:
                self.kube.emit_event(run, ev.type, ev.reason, ev.message)
            except Exception as exc:  # an event lost is not worth a failed reconcile
                log.warning(
                    "%s/%s: event %s not posted: %s", namespace, name, ev.reason, type(exc).__name__
                )
            log.info("%s/%s: %s: %s", namespace, name, ev.reason, ev.message)
        if p.previous_status is not None and p.run_status is not None:
            stage_types = {s.name: s.type.value for s in p.spec.stages} if p.spec else {}
            self.metrics.observe_run(
                namespace, name, p.previous_status, p.run_status, p.budget_used, stage_types
            )
        return p


def register(
    registry: kopf.OperatorRegistry, reconciler: Reconciler, config: OperatorConfig
) -> None:
    """Attach the handlers to ``registry``."""
    runs = (api.GROUP, api.VERSION, api.PLURAL)
    owned = {resources.LABEL_RUN: kopf.PRESENT}

    # TrainingRuns, Jobs and Pods are namespaced: kopf always passes a namespace.
    def on_run(namespace: str | None, name: str, **_: Any) -> None:
        reconciler.reconcile(namespace or "default", name)

    kopf.on.resume(*runs, registry=registry, id="reconcile")(on_run)
    kopf.on.create(*runs, registry=registry, id="reconcile")(on_run)
    # Only spec changes: the operator's own annotation and status patches must not
    # wake it up again.
    kopf.on.update(*runs, registry=registry, id="reconcile", field="spec")(on_run)
    kopf.timer(
        *runs,
        registry=registry,
        id="poll",
        interval=config.poll_interval_seconds,
        initial_delay=config.poll_interval_seconds,
    )(on_run)

    def on_run_event(type: str, namespace: str | None, name: str, **_: Any) -> None:
        if type == "DELETED":
            reconciler.forget(namespace or "default", name)

    kopf.on.event(*runs, registry=registry, id="forget")(on_run_event)

    def on_child(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        run = labels.get(resources.LABEL_RUN)
        if run:
            reconciler.reconcile(namespace or "default", run)

    kopf.on.event("batch", "v1", "jobs", registry=registry, labels=owned, id="job")(on_child)

    seen: dict[str, str] = {}  # pod uid -> last phase that triggered a reconcile
    seen_guard = threading.Lock()

    def on_pod(
        namespace: str | None,
        labels: Mapping[str, str],
        type: str,
        status: kopf.Status,
        meta: kopf.Meta,
        uid: str,
        **_: Any,
    ) -> None:
        # Pods change often (conditions, IPs); only phase changes and deletions matter,
        # the start of one too: an evicted pod is seen while it checkpoints, with its
        # DisruptionTarget condition (a preemption, not a failure).
        phase = "Deleted" if type == "DELETED" else str(status.get("phase"))
        if meta.get("deletionTimestamp") and phase != "Deleted":
            phase += "/terminating"
        with seen_guard:
            if seen.get(uid) == phase:
                return
            if phase == "Deleted":
                seen.pop(uid, None)
            else:
                seen[uid] = phase
        on_child(namespace=namespace, labels=labels)

    kopf.on.event("", "v1", "pods", registry=registry, labels=owned, id="pod")(on_pod)
