"""The operator's machinery around ``handlers.Reconciler``:

- informers (``kubetrain.operator.informer``) list and watch TrainingRuns and, by the
  label ``kubetrain.dev/run``, their Jobs, Pods and Services, into a ``ClusterCache``
  indexed by run; a change to anything a plan reads puts the run in the work queue;
- ``workers`` threads take runs from the queue (``kubetrain.operator.workqueue``: one
  worker per run at a time, fair across runs) and reconcile them; a reconcile that
  fails is retried with backoff, one that asks for it is woken later (the poll interval,
  a TTL);
- with leader election, workers act only while this replica holds the Lease
  (``kubetrain.operator.leader``); a follower's informers keep its cache warm, and when
  it takes over it reconciles every run once;
- ``health`` tells /healthz whether every thread is alive and no reconcile is stuck.

Workers start once every informer has listed, so a plan never sees a run without the
Jobs it already has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from kubetrain.operator import resources
from kubetrain.operator.caches import ArchitectureReader, ProgressReader, SecretCache, StoreCache
from kubetrain.operator.config import OperatorConfig, endpoint_allowed
from kubetrain.operator.handlers import Reconciler
from kubetrain.operator.informer import (
    Informer,
    Object,
    Resource,
    object_key,
    trim_job,
    trim_pod,
    trim_run,
    trim_service,
    trim_workload,
    wait_synced,
)
from kubetrain.operator.kube import Conflict, KubeApi
from kubetrain.operator.leader import LeaderElector
from kubetrain.operator.metrics import OperatorMetrics
from kubetrain.operator.workqueue import WorkQueue

log = logging.getLogger("kubetrain.operator")

Key = tuple[str, str]  # (namespace, run)

RUNS = Resource(api.PLURAL, f"/apis/{api.GROUP}/{api.VERSION}", api.PLURAL)
JOBS = Resource("jobs", "/apis/batch/v1", "jobs")
PODS = Resource("pods", "/api/v1", "pods")
SERVICES = Resource("services", "/api/v1", "services")
CHILDREN = {JOBS.name: trim_job, PODS.name: trim_pod, SERVICES.name: trim_service}
KUEUE_GROUP = "kueue.x-k8s.io"
# The Workload versions whose fields the plan reads (conditions, admission,
# schedulingStats), newest first.
KUEUE_VERSIONS = ("v1beta2", "v1beta1")


def workloads_resource(version: str) -> Resource:
    return Resource("workloads", f"/apis/{KUEUE_GROUP}/{version}", "workloads")


def workload_job_uid(obj: Object) -> str | None:
    """The uid of the Job a Kueue Workload admits (its owner), or None."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("uid"):
            return str(ref["uid"])
    return None


# The run changed since the copy a write was planned from: its watch event is on the
# way and re-queues it; this is the fallback should that event be missed.
CONFLICT_RETRY_SECONDS = 1.0


def run_of(obj: Object) -> Key | None:
    """The run a child belongs to (its kubetrain.dev/run label)."""
    meta = obj.get("metadata") or {}
    run = (meta.get("labels") or {}).get(resources.LABEL_RUN)
    return (meta.get("namespace") or "", run) if run else None


class ClusterCache:
    """Runs by (namespace, name) and their children by (namespace, run), as the
    informers last saw them. Thread-safe: informers write, workers read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Key, Object] = {}
        self._children: dict[str, dict[Key, dict[str, Object]]] = {k: {} for k in CHILDREN}
        # Kueue's Workloads by the uid of the Job they admit, and that Job's run.
        self._workloads: dict[str, Object] = {}
        self._job_runs: dict[str, Key] = {}

    def on_run(self, old: Object | None, new: Object | None) -> Key:
        key = object_key(new or old or {})
        with self._lock:
            if new is None:
                self._runs.pop(key, None)
            else:
                self._runs[key] = new
        return key

    def on_child(self, kind: str, old: Object | None, new: Object | None) -> set[Key]:
        """Index a child's change; the runs it concerns."""
        runs: set[Key] = set()
        index = self._children[kind]
        with self._lock:
            if old is not None and (key := run_of(old)) is not None:
                index.get(key, {}).pop(object_key(old)[1], None)
                if not index.get(key, True):
                    del index[key]
                runs.add(key)
                if kind == JOBS.name:
                    self._job_runs.pop(str(old["metadata"].get("uid")), None)
            if new is not None and (key := run_of(new)) is not None:
                index.setdefault(key, {})[object_key(new)[1]] = new
                runs.add(key)
                if kind == JOBS.name:
                    self._job_runs[str(new["metadata"].get("uid"))] = key
        return runs

    def on_workload(self, old: Object | None, new: Object | None) -> set[Key]:
        """Index a Workload's change; the run whose Job it admits (none while that Job
        is not in the cache: its own event queues the run)."""
        runs: set[Key] = set()
        with self._lock:
            if old is not None and (uid := workload_job_uid(old)) is not None:
                self._workloads.pop(uid, None)
                if uid in self._job_runs:
                    runs.add(self._job_runs[uid])
            if new is not None and (uid := workload_job_uid(new)) is not None:
                self._workloads[uid] = new
                if uid in self._job_runs:
                    runs.add(self._job_runs[uid])
        return runs

    def workloads(self, namespace: str, run: str) -> list[dict[str, Any]]:
        """The Workloads of the run's Jobs (none without Kueue)."""
        with self._lock:
            jobs = self._children[JOBS.name].get((namespace, run), {}).values()
            uids = [str(j["metadata"].get("uid")) for j in jobs]
            return [self._workloads[u] for u in uids if u in self._workloads]

    def run(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._runs.get((namespace, name))

    def runs(self) -> list[Key]:
        with self._lock:
            return sorted(self._runs)

    def _of(self, kind: str, namespace: str, run: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._children[kind].get((namespace, run), {}).values())

    def jobs(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._of(JOBS.name, namespace, run)

    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._of(PODS.name, namespace, run)

    def services(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._of(SERVICES.name, namespace, run)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {"runs": len(self._runs)}
            for kind, index in self._children.items():
                out[kind] = sum(len(v) for v in index.values())
            if self._workloads:
                out["workloads"] = len(self._workloads)
            return out


class Controller:
    """Informers, work queue, workers and leader election for ``namespaces`` (empty:
    all namespaces). ``kueue_version``: the served version of Kueue's API, whose
    Workloads are then watched too (None: Kueue is not installed)."""

    def __init__(
        self,
        kube: KubeApi,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        *,
        namespaces: Sequence[str] = (),
        identity: str,
        lease_namespace: str,
        progress: ProgressReader | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        kueue_version: str | None = None,
    ):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.monotonic = monotonic
        self.queue: WorkQueue[Key] = WorkQueue()
        self.cache = ClusterCache()
        self.progress = progress or ProgressReader(
            SecretCache(kube.read_secret, config.secret_cache_seconds),
            StoreCache(),
            config.poll_interval_seconds,
            on_requests=metrics.store_requests.inc,
            endpoint_allowed=lambda endpoint: endpoint_allowed(endpoint, config),
        )
        self.reconciler = Reconciler(
            self.cache,
            kube,
            config,
            metrics,
            self.progress,
            architectures=ArchitectureReader(
                self.progress.secrets,
                self.progress.stores,
                config.poll_interval_seconds,
                endpoint_allowed=self.progress.endpoint_allowed,
            ),
        )
        self.kueue_version = kueue_version
        self.informers = self._informers(list(namespaces) or [None])
        self.elector: LeaderElector | None = None
        if config.leader_election:
            self.elector = LeaderElector(
                kube,
                lease_namespace,
                config.lease_name,
                identity,
                lease_duration=config.lease_duration_seconds,
                renew_period=config.lease_renew_seconds,
                on_change=self._on_leading,
            )
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.active = threading.Event()  # synced, leading and not stopping
        self._leading = self.elector is None
        self._state = threading.Lock()
        self._busy: dict[str, tuple[Key, float]] = {}  # worker -> (run, since)
        self._threads: list[threading.Thread] = []  # the workers
        metrics.queue_depth.set_function(self.queue.depth)
        metrics.workers_busy.set_function(lambda: len(self._busy))
        metrics.leader.set(1 if self._leading else 0)

    def _informers(self, namespaces: list[str | None]) -> list[Informer]:
        out = []
        timeout = self.config.server_timeout_seconds
        for ns in namespaces:
            out.append(
                Informer(
                    self.kube, RUNS, ns, self._on_run, transform=trim_run, server_timeout=timeout
                )
            )
            for kind, resource in ((JOBS.name, JOBS), (PODS.name, PODS), (SERVICES.name, SERVICES)):
                out.append(
                    Informer(
                        self.kube,
                        resource,
                        ns,
                        self._child_handler(kind),
                        transform=CHILDREN[kind],
                        label_selector=resources.LABEL_RUN,
                        server_timeout=timeout,
                    )
                )
            if self.kueue_version is not None:
                # Workloads carry no label of the run: all of the namespace's, kept
                # trimmed (conditions and eviction counts only).
                out.append(
                    Informer(
                        self.kube,
                        workloads_resource(self.kueue_version),
                        ns,
                        self._on_workload,
                        transform=trim_workload,
                        server_timeout=timeout,
                    )
                )
        return out

    # ---- events
    def _on_run(self, old: Object | None, new: Object | None) -> None:
        # Deletions too: the reconcile of a run that is gone forgets it.
        self.queue.add(self.cache.on_run(old, new))

    def _on_workload(self, old: Object | None, new: Object | None) -> None:
        for key in self.cache.on_workload(old, new):
            self.queue.add(key)

    def _child_handler(self, kind: str) -> Callable[[Object | None, Object | None], None]:
        def handler(old: Object | None, new: Object | None) -> None:
            for key in self.cache.on_child(kind, old, new):
                self.queue.add(key)

        return handler

    def _on_leading(self, leading: bool) -> None:
        self.metrics.leader.set(1 if leading else 0)
        with self._state:
            self._leading = leading
        self._update_active()

    def _update_active(self) -> None:
        with self._state:
            should = self._leading and self.synced.is_set() and not self.stopping.is_set()
            if should == self.active.is_set():
                return
            if not should:
                self.active.clear()
                return
            self.active.set()
        runs = self.cache.runs()
        log.info("reconciling: %d runs (%s)", len(runs), self.cache.counts())
        for key in runs:
            self.queue.add(key)

    # ---- running
    def start(self) -> Controller:
        for inf in self.informers:
            inf.start()
        self._spawn("cache sync", self._await_sync)
        if self.elector is not None:
            self.elector.start()
        self._threads = [self._spawn(f"worker-{i}", self._work) for i in range(self.config.workers)]
        return self

    @staticmethod
    def _spawn(name: str, target: Callable[[str], None]) -> threading.Thread:
        thread = threading.Thread(target=target, args=(name,), name=name, daemon=True)
        thread.start()
        return thread

    def _await_sync(self, _: str) -> None:
        started = self.monotonic()
        if wait_synced(self.informers, float("inf"), self.stopping):
            log.info("caches synced in %.1fs: %s", self.monotonic() - started, self.cache.counts())
            self.synced.set()
            self._update_active()

    def _work(self, name: str) -> None:
        while not self.stopping.is_set():
            if not self.active.wait(0.5):
                continue
            key = self.queue.get(timeout=0.5)
            if key is None:
                continue
            try:
                # A replica that lost the Lease meanwhile leaves the run to the new leader
                # (which reconciles every run when it takes over).
                if self.active.is_set():
                    self._process(name, key)
            finally:
                self.queue.done(key)

    def _process(self, worker: str, key: Key) -> None:
        self._busy[worker] = (key, self.monotonic())
        try:
            result = self.reconciler.reconcile(*key)
        except Conflict as exc:
            log.info("%s/%s changed meanwhile, planning again: %s", *key, exc)
            self.queue.add_after(key, CONFLICT_RETRY_SECONDS)
        except Exception as exc:
            delay = self.queue.add_rate_limited(key)
            expected = isinstance(exc, ApiException | OSError)
            log.error(
                "%s/%s: reconcile failed, retrying in %.1fs: %s: %s",
                *key,
                delay,
                type(exc).__name__,
                exc,
                exc_info=not expected,
            )
        else:
            self.queue.forget(key)
            if result.plan is None and self.cache.run(*key) is None:
                self.queue.discard(key)
            elif result.wake_after is not None:
                self.queue.add_after(key, result.wake_after)
        finally:
            self._busy.pop(worker, None)

    def stop(self, grace: float = 30.0) -> None:
        """Finish the reconciles under way (up to ``grace`` seconds), then hand the
        Lease back and stop watching."""
        self.stopping.set()
        self._update_active()
        self.queue.shutdown()
        deadline = self.monotonic() + grace
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - self.monotonic()))
        if self.elector is not None:
            self.elector.stop()
        for inf in self.informers:
            inf.stop()

    def health(self) -> list[str]:
        """What is wrong with this process (empty: healthy): a dead thread, or a
        reconcile running longer than ``stuckReconcileSeconds``."""
        problems = [
            f"informer for {i.description} stopped" for i in self.informers if not i.alive()
        ]
        problems += [f"{t.name} stopped" for t in self._threads if not t.is_alive()]
        if self.elector is not None and not self.elector.alive():
            problems.append("leader election stopped")
        now = self.monotonic()
        for worker, (key, since) in list(self._busy.items()):
            if now - since > self.config.stuck_reconcile_seconds:
                problems.append(
                    f"{worker} has been reconciling {key[0]}/{key[1]} for {now - since:.0f}s"
                )
        if self.stopping.is_set():
            return []  # threads end on purpose while stopping
        return problems
