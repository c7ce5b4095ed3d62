"""An in-memory cluster for the reconciler: it serves the informers' view (objects
labelled with the run, trimmed as the informers trim them), answers a GET by name
whatever the labels, and takes the reconciler's writes with the API
server's rules (resourceVersions, 409 on a stale write, 409 on a create of what exists,
uid preconditions on deletes, merge patches). The Job controller's, kubelet's and
user's parts are played by the test through the helpers."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from kubetrain.operator.informer import (
    trim_job,
    trim_pod,
    trim_run,
    trim_service,
    trim_workload,
)
from kubetrain.operator.kube import Conflict
from kubetrain.operator.resources import LABEL_RUN

_uids = itertools.count(1)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 merge patch: None deletes, dicts merge, everything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeCluster:
    def __init__(self, run: dict[str, Any] | None = None):
        self._versions = itertools.count(1)
        self.stored: dict[str, Any] | None = None
        self.jobs_by_name: dict[str, dict[str, Any]] = {}
        self.pod_list: list[dict[str, Any]] = []
        self.services_by_name: dict[str, dict[str, Any]] = {}
        self.workload_list: list[dict[str, Any]] = []  # Kueue's, when a test plays it
        self.requests: list[tuple[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.stale: dict[str, Any] | None = None  # what the informer shows, if behind
        # While True, children created are not shown by the informers until catch_up().
        self.informers_lag = False
        self.unseen: set[str] = set()
        if run is not None:
            self.put_run(run)

    # ---- the informers' view (Cache)
    def run(self, namespace: str, name: str) -> dict[str, Any] | None:
        shown = self.stale if self.stale is not None else self.stored
        return trim_run(copy.deepcopy(shown)) if shown is not None else None

    @staticmethod
    def _of(run: str, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What the informers index under ``run``: objects with its label."""
        return [o for o in objects if (o["metadata"].get("labels") or {}).get(LABEL_RUN) == run]

    def jobs(self, namespace: str, run: str) -> list[dict[str, Any]]:
        jobs = [j for n, j in self.jobs_by_name.items() if n not in self.unseen]
        return [trim_job(j) for j in self._of(run, jobs)]

    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return [trim_pod(p) for p in self._of(run, self.pod_list)]

    def services(self, namespace: str, run: str) -> list[dict[str, Any]]:
        services = [s for n, s in self.services_by_name.items() if n not in self.unseen]
        return [trim_service(s) for s in self._of(run, services)]

    def catch_up(self) -> None:
        """The informers' watches deliver the children created meanwhile."""
        self.unseen.clear()

    def workloads(self, namespace: str, run: str) -> list[dict[str, Any]]:
        uids = {j["metadata"].get("uid") for j in self.jobs(namespace, run)}
        return [
            trim_workload(w)
            for w in self.workload_list
            if any(o.get("uid") in uids for o in w["metadata"].get("ownerReferences") or [])
        ]

    # ---- the API (Writer)
    def _check(self, resource_version: str) -> dict[str, Any]:
        assert self.stored is not None
        if self.stored["metadata"]["resourceVersion"] != resource_version:
            raise Conflict("the object has been modified; please apply your changes again")
        return self.stored

    def _bump(self) -> dict[str, Any]:
        assert self.stored is not None
        self.stored["metadata"]["resourceVersion"] = str(next(self._versions))
        self.stale = None  # the watch delivers the write
        return copy.deepcopy(self.stored)

    def patch_run_metadata(
        self, namespace: str, name: str, metadata: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        run = self._check(resource_version)
        self.requests.append(("metadata", copy.deepcopy(metadata)))
        _merge(run["metadata"], metadata)
        return self._bump()

    def patch_run_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        run = self._check(resource_version)
        self.requests.append(("status", copy.deepcopy(status)))
        run["status"] = copy.deepcopy(status)
        return self._bump()

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests.append(("get", (kind, name)))
        found = (self.jobs_by_name if kind == "Job" else self.services_by_name).get(name)
        return copy.deepcopy(found) if found is not None else None

    def create(self, obj: dict[str, Any]) -> bool:
        self.requests.append(("create", obj["metadata"]["name"]))
        name = obj["metadata"]["name"]
        made = copy.deepcopy(obj)
        made["metadata"]["uid"] = f"{obj['kind'].lower()}-{next(_uids)}"
        made["metadata"]["resourceVersion"] = str(next(self._versions))
        if self.informers_lag:
            self.unseen.add(name)
        if obj["kind"] == "Service":
            if name in self.services_by_name:
                return False
            self.services_by_name[name] = made
            return True
        if name in self.jobs_by_name:
            return False
        made["status"] = {}
        self.jobs_by_name[name] = made
        return True

    def delete(
        self, kind: str, namespace: str, name: str, propagation: str, uid: str | None = None
    ) -> bool:
        self.requests.append(("delete", (kind, name, uid)))
        found = (self.jobs_by_name if kind == "Job" else self.services_by_name).get(name)
        if found is None or (uid and found["metadata"]["uid"] != uid):
            return False
        if kind == "Job":
            # Foreground: the Job stays until the test lets its pods go.
            found["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        else:
            del self.services_by_name[name]
        return True

    def emit_event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    # ---- the user's, the Job controller's and the kubelet's parts
    def put_run(self, run: dict[str, Any]) -> None:
        self.stored = copy.deepcopy(run)
        self._bump()

    def edit_spec(self, **changes: Any) -> None:
        assert self.stored is not None
        self.stored["spec"].update(copy.deepcopy(changes))
        self.stored["metadata"]["generation"] = self.stored["metadata"].get("generation", 1) + 1
        self._bump()

    def job(self, stage: str) -> dict[str, Any]:
        return next(
            j
            for j in self.jobs_by_name.values()
            if j["metadata"]["labels"]["kubetrain.dev/stage"] == stage
        )

    def pods_running(self, stage: str, since: str) -> None:
        job = self.job(stage)
        uid = job["metadata"]["uid"]
        for i in range(job["spec"]["parallelism"]):
            self.pod_list.append(
                {
                    "metadata": {
                        "name": f"{job['metadata']['name']}-{i}-x",
                        "namespace": job["metadata"]["namespace"],
                        "uid": f"pod-{next(_uids)}",
                        "creationTimestamp": since,
                        "labels": dict(job["metadata"]["labels"]),
                        "ownerReferences": [{"uid": uid, "kind": "Job"}],
                    },
                    "status": {"phase": "Running", "startTime": since, "podIP": "10.0.0.9"},
                }
            )
        job["status"] = {"active": job["spec"]["parallelism"]}

    def pods_finished(self, stage: str, at: str, exit_code: int = 0) -> None:
        uid = self.job(stage)["metadata"]["uid"]
        for pod in self.pod_list:
            if pod["metadata"]["ownerReferences"][0]["uid"] == uid:
                pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
                pod["status"]["containerStatuses"] = [
                    {
                        "name": "trainer",
                        "state": {"terminated": {"exitCode": exit_code, "finishedAt": at}},
                    }
                ]

    def job_finished(self, stage: str, *, ok: bool, at: str, message: str = "") -> None:
        self.pods_finished(stage, at, 0 if ok else 1)
        kind = "Complete" if ok else "Failed"
        self.job(stage)["status"] = {
            "active": 0,
            "succeeded" if ok else "failed": 1,
            "completionTime": at,
            "conditions": [{"type": kind, "status": "True", "message": message}],
        }

    def job_gone(self, stage: str) -> None:
        job = self.job(stage)
        uid = job["metadata"]["uid"]
        del self.jobs_by_name[job["metadata"]["name"]]
        self.pod_list = [
            p for p in self.pod_list if p["metadata"]["ownerReferences"][0]["uid"] != uid
        ]

    @property
    def status(self) -> dict[str, Any]:
        assert self.stored is not None
        return self.stored.get("status") or {}

    def writes(self, kind: str) -> list[Any]:
        return [body for k, body in self.requests if k == kind]
