"""Informers: one thread per resource kind (and watched namespace) that lists, then
watches, and keeps an in-memory copy of every object, like client-go's reflector.

The reconciler reads these copies instead of asking the API server, so a steady run
costs no API request at all. A watch that ends (the server's timeout, a dropped
connection, an error) continues from the last resourceVersion seen; when that version
is too old (410 Gone) the informer lists again and reports, as deletions, the objects
that disappeared meanwhile, which a plain re-watch would never tell.

Objects are kept in a trimmed form (``transform``): only what the operator reads, so that
memory stays small with thousands of pods, and so that changes to anything else (a
pod's IP, a Job's ``ready`` count) do not wake the operator up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("kubetrain.operator.informer")

Object = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)
# Called with (old, new): old None for an object that appeared, new None for one that
# went away. Runs on the informer's thread; must be quick.
Handler = Callable[[Object | None, Object | None], None]

PAGE_SIZE = 500
# A watch is renewed when the server ends it; if nothing at all arrives for this much
# longer than the server-side timeout, the connection counts as lost.
WATCH_SLACK_SECONDS = 30.0
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


class WatchError(Exception):
    """The API server answered a list or watch with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class ListWatchApi(Protocol):
    """What an informer needs from the API (``kubetrain.operator.kube.KubeApi``)."""

    def list_objects(self, path: str, params: Mapping[str, str]) -> Object:
        """One page of a list (``items``, ``metadata.resourceVersion``/``continue``)."""
        ...

    def watch_objects(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> Iterator[Object]:
        """The watch events of one watch request, until the server ends it."""
        ...


@dataclass(frozen=True)
class Resource:
    """A kind of object: its API path and what the logs call it."""

    name: str  # e.g. "jobs"
    prefix: str  # "/api/v1", "/apis/batch/v1"
    plural: str

    def path(self, namespace: str | None) -> str:
        if namespace:
            return f"{self.prefix}/namespaces/{namespace}/{self.plural}"
        return f"{self.prefix}/{self.plural}"


def object_key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


class Informer:
    """Lists and watches ``resource`` in ``namespace`` (None: all namespaces), keeps
    the objects (after ``transform``) and tells ``handler`` about every change."""

    def __init__(
        self,
        api: ListWatchApi,
        resource: Resource,
        namespace: str | None,
        handler: Handler,
        *,
        transform: Callable[[Object], Object] = lambda obj: obj,
        label_selector: str | None = None,
        server_timeout: int = 60,
        page_size: int = PAGE_SIZE,
        sleep: Callable[[float], bool] | None = None,
    ):
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.handler = handler
        self.transform = transform
        self.label_selector = label_selector
        self.server_timeout = server_timeout
        self.page_size = page_size
        self.synced = threading.Event()  # the first full list is in
        self.stopped = threading.Event()
        self._sleep = sleep or (lambda seconds: self.stopped.wait(seconds))
        self._objects: dict[Key, Object] = {}
        self._lock = threading.Lock()
        self._version: str | None = None
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        where = f"in {namespace}" if namespace else "in all namespaces"
        self.description = f"{resource.name} {where}"

    # ---- reading
    def get(self, namespace: str, name: str) -> Object | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def list(self) -> list[Object]:
        with self._lock:
            return list(self._objects.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    # ---- running
    def start(self) -> Informer:
        self._thread = threading.Thread(
            target=self.run, name=f"informer {self.description}", daemon=True
        )
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop after the current request (a blocked watch read ends with its timeout;
        the thread is a daemon and never holds up the process' exit)."""
        self.stopped.set()

    def run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                if self._version is None:
                    self.relist()
                started = time.monotonic()
                if self.watch() == 0 and time.monotonic() - started < 1.0:
                    # A server that ends every watch at once must not make this spin.
                    self._sleep(RETRY_BASE_SECONDS)
                failures = 0
            except Exception as exc:  # every failure is retried: an informer never dies
                if isinstance(exc, WatchError) and exc.status == 410:
                    self._version = None  # too old: list again
                    continue
                failures += 1
                delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (failures - 1))
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error or failures == 1:
                    log.warning("watching %s: %s; retrying", self.description, message)
                self.last_error = message
                self._sleep(delay)

    def _params(self) -> dict[str, str]:
        params = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    def relist(self) -> None:
        """List everything, page by page, and replace the copy: objects no longer there
        are reported deleted."""
        fresh: dict[Key, Object] = {}
        token = ""
        version = ""
        while True:
            params = {**self._params(), "limit": str(self.page_size)}
            if token:
                params["continue"] = token
            page = self.api.list_objects(self.resource.path(self.namespace), params)
            for item in page.get("items") or []:
                obj = self.transform(item)
                fresh[object_key(obj)] = obj
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            version = meta.get("resourceVersion") or version
            if not token:
                break
        with self._lock:
            old = self._objects
            self._objects = fresh
        for key, obj in fresh.items():
            if old.get(key) != obj:
                self._notify(old.get(key), obj)
        for key, gone in old.items():
            if key not in fresh:
                self._notify(gone, None)
        self._version = version or None
        self.last_error = None
        self.synced.set()

    def watch(self) -> int:
        """One watch request from the last version seen, applied event by event; the
        number of events it brought."""
        params = {
            **self._params(),
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.server_timeout),
        }
        if self._version:
            params["resourceVersion"] = self._version
        events = self.api.watch_objects(
            self.resource.path(self.namespace),
            params,
            read_timeout=self.server_timeout + WATCH_SLACK_SECONDS,
        )
        count = 0
        for event in events:
            if self.stopped.is_set():
                break
            self.apply(event)
            count += 1
        return count

    def apply(self, event: Mapping[str, Any]) -> None:
        """One watch event: the copy updated, the handler told."""
        kind = event.get("type")
        raw = event.get("object") or {}
        if kind == "ERROR":
            raise WatchError(int(raw.get("code") or 500), str(raw.get("message") or raw))
        version = (raw.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self._version = version or self._version
            return
        obj = self.transform(raw)
        key = object_key(obj)
        with self._lock:
            old = self._objects.get(key)
            if kind == "DELETED":
                self._objects.pop(key, None)
            else:
                self._objects[key] = obj
        self._version = version or self._version
        if kind == "DELETED":
            if old is not None:
                self._notify(old, None)
        elif old != obj:
            self._notify(old, obj)

    def _notify(self, old: Object | None, new: Object | None) -> None:
        try:
            self.handler(old, new)
        except Exception:  # a bug in a handler must not stop the watch
            log.exception("%s: handler failed", self.description)


def wait_synced(informers: list[Informer], timeout: float, stop: threading.Event) -> bool:
    """Block until every informer has listed once (or ``stop``, or ``timeout``)."""
    deadline = time.monotonic() + timeout
    for inf in informers:
        while not inf.synced.wait(0.2):
            if stop.is_set() or time.monotonic() > deadline:
                return False
    return True


# --------------------------------------------------------------------------- trimming


def _meta(obj: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in keys if meta.get(k) is not None}


def _conditions(status: Mapping[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{k: c[k] for k in keys if c.get(k) is not None} for c in status.get("conditions") or []]


POD_META = (
    "name",
    "namespace",
    "uid",
    "labels",
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
)
POD_CONDITION = ("type", "status", "reason", "message", "lastTransitionTime")
TERMINATED = ("exitCode", "signal", "reason", "message", "startedAt", "finishedAt")


def trim_pod(pod: Mapping[str, Any]) -> Object:
    """The parts of a pod the plan reads (phase, creation and start, the start of its
    deletion, termination, exit codes, conditions such as DisruptionTarget with their
    transition times, node, owner); a pod's other changes (IPs, readiness, probes) are
    not kept and wake nobody."""
    status = pod.get("status") or {}
    out_status: dict[str, Any] = {
        k: status[k] for k in ("phase", "reason", "message", "startTime") if status.get(k)
    }
    conditions = _conditions(status, POD_CONDITION)
    if conditions:
        out_status["conditions"] = conditions
    containers = []
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        entry: dict[str, Any] = {"name": cs.get("name"), "restartCount": cs.get("restartCount", 0)}
        if "terminated" in state:
            entry["state"] = {
                "terminated": {
                    k: state["terminated"][k] for k in TERMINATED if k in state["terminated"]
                }
            }
        elif "waiting" in state:
            entry["state"] = {"waiting": {"reason": (state["waiting"] or {}).get("reason")}}
        elif "running" in state:
            entry["state"] = {"running": {}}
        containers.append(entry)
    if containers:
        out_status["containerStatuses"] = containers
    out: Object = {"metadata": _meta(pod, POD_META), "status": out_status}
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        out["spec"] = {"nodeName": node}
    return out


JOB_META = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
    "generation",
)


def trim_job(job: Mapping[str, Any]) -> Object:
    """A Job without its pod template (the operator built it; the plan reads the
    Job's identity, attempt and status) and without its resourceVersion."""
    spec = {k: v for k, v in (job.get("spec") or {}).items() if k not in ("template", "selector")}
    return {"metadata": _meta(job, JOB_META), "spec": spec, "status": job.get("status") or {}}


SERVICE_META = ("name", "namespace", "uid", "labels", "ownerReferences", "deletionTimestamp")


def trim_service(svc: Mapping[str, Any]) -> Object:
    """A Service's identity and owner: the plan needs to know only that it exists and
    whether it is the run's."""
    return {"metadata": _meta(svc, SERVICE_META)}


def trim_run(run: Mapping[str, Any]) -> Object:
    """A TrainingRun without managedFields (written by every client; big and unread)."""
    out = dict(run)
    meta = dict(run.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


WORKLOAD_META = ("name", "namespace", "uid", "ownerReferences")


def trim_workload(workload: Mapping[str, Any]) -> Object:
    """A Kueue Workload's owner (the Job it admits), its conditions (QuotaReserved,
    Admitted, Evicted with their reasons and messages), the ClusterQueue that admitted it
    and its eviction counts; the rest (pod sets, resource usage) is not kept."""
    status = workload.get("status") or {}
    out_status: dict[str, Any] = {}
    conditions = _conditions(status, POD_CONDITION)
    if conditions:
        out_status["conditions"] = conditions
    cluster_queue = (status.get("admission") or {}).get("clusterQueue")
    if cluster_queue:
        out_status["admission"] = {"clusterQueue": cluster_queue}
    evictions = (status.get("schedulingStats") or {}).get("evictions")
    if evictions:
        out_status["schedulingStats"] = {"evictions": evictions}
    return {"metadata": _meta(workload, WORKLOAD_META), "status": out_status}
