"""A tiny in-memory stand-in for the cluster and the store, for driving ``plan`` through
several reconciles (the Job controller's and the trainer's part is played by the test)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetrain.core.contract import EXIT_CHECKPOINTED_ON_SIGTERM
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord
from kubetrain.operator import plan as planner
from kubetrain.operator import resources
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.progress import StageRecords, StoreAnswer, format_time

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
_uids = itertools.count(1)


def manifest(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "storage": {
            "s3": {
                "bucket": "ckpt",
                "prefix": "runs",
                "endpoint": "http://s3.local:9000",
                "credentialsSecret": "s3-creds",
            }
        },
        "stages": [
            {
                "name": "pretrain",
                "type": "pretrain",
                "hyperparameters": {"maxSteps": 100},
                "resources": {"nodes": 2, "gpusPerNode": 8, "gpuType": "h100"},
                "maxRestarts": 2,
            },
            {
                "name": "sft",
                "type": "sft",
                "hyperparameters": {"maxSteps": 50},
                "resources": {"gpusPerNode": 8, "gpuType": "h100"},
            },
        ],
    }
    base.update(spec)
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": "demo",
            "namespace": "ml",
            "uid": "run-uid",
            "generation": 1,
            "annotations": {},
        },
        "spec": base,
    }


@dataclass
class World:
    run: dict[str, Any]
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name
    pods: list[dict[str, Any]] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name
    workloads: list[dict[str, Any]] = field(default_factory=list)  # Kueue's
    records: dict[str, StageRecords] = field(default_factory=dict)
    now: datetime = T0
    config: OperatorConfig = field(default_factory=OperatorConfig)
    events: list[planner.Event] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[planner.Delete] = field(default_factory=list)

    # ---- the operator's part
    def reconcile(self) -> planner.Plan:
        p = planner.plan(
            copy.deepcopy(self.run),
            list(self.jobs.values()),
            self.pods,
            self.records,
            self.now,
            self.config,
            observed_services=list(self.services.values()),
            observed_workloads=self.workloads,
        )
        meta = self.run["metadata"]
        annotations = meta.setdefault("annotations", {})
        for key, value in p.annotations.items():  # merge patch: None removes
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        if p.status is not None:
            self.run["status"] = p.status
        for d in p.delete:
            self.deleted.append(d)
            if d.kind == "Job" and d.name in self.jobs:
                # Foreground deletion: the Job stays until the test lets its pods go.
                self.jobs[d.name]["metadata"]["deletionTimestamp"] = format_time(self.now)
            elif d.kind == "Service":
                self.services.pop(d.name, None)
        for obj in p.create:
            self.created.append(obj)
            name = obj["metadata"]["name"]
            if obj["kind"] == "Service":
                self.services.setdefault(name, copy.deepcopy(obj))
            elif name not in self.jobs:  # 409 AlreadyExists is success
                job = copy.deepcopy(obj)
                job["metadata"]["uid"] = f"job-{next(_uids)}"
                job["metadata"]["creationTimestamp"] = format_time(self.now)
                job["status"] = {}
                self.jobs[name] = job
        self.events += p.events
        return p

    # ---- the cluster's and the trainer's part
    def job(self, stage: str) -> dict[str, Any]:
        return next(
            j for j in self.jobs.values() if j["metadata"]["labels"]["kubetrain.dev/stage"] == stage
        )

    def pods_of(self, stage: str) -> list[dict[str, Any]]:
        uid = self.job(stage)["metadata"]["uid"]
        return [p for p in self.pods if p["metadata"]["ownerReferences"][0]["uid"] == uid]

    def pods_running(
        self, stage: str, since: datetime | None = None, *, keep_old: bool = False
    ) -> None:
        """The Job's pods (new ones, replacing any it had) run; ``keep_old``: the old
        ones stay listed, terminated (as the Job controller keeps replaced pods)."""
        job = self.job(stage)
        uid = job["metadata"]["uid"]
        if not keep_old:
            self.pods = [p for p in self.pods if p["metadata"]["ownerReferences"][0]["uid"] != uid]
        for i in range(job["spec"]["parallelism"]):
            self.pods.append(
                {
                    "metadata": {
                        "name": f"{job['metadata']['name']}-{i}-{next(_uids)}",
                        "uid": f"pod-{next(_uids)}",
                        "creationTimestamp": format_time(self.now),
                        "labels": resources.labels(self.run["metadata"]["name"], stage),
                        "ownerReferences": [{"uid": uid}],
                    },
                    "status": {"phase": "Running", "startTime": format_time(since or self.now)},
                }
            )
        job["status"] = {"active": job["spec"]["parallelism"]}

    def live_pods(self, stage: str) -> list[dict[str, Any]]:
        """The stage's pods whose trainer has not exited (terminating ones too)."""
        return [p for p in self.pods_of(stage) if p["status"]["phase"] == "Running"]

    def pod_evicted(self, stage: str, index: int = 0) -> dict[str, Any]:
        """The Eviction API's doing: condition DisruptionTarget, then deletion."""
        pod = self.live_pods(stage)[index]
        pod["metadata"]["deletionTimestamp"] = format_time(self.now)
        pod["status"].setdefault("conditions", []).append(
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
            }
        )
        return pod

    def pod_exited(self, stage: str, index: int, code: int) -> dict[str, Any]:
        """A pod's trainer exits with ``code`` (restartPolicy Never: the pod is done)."""
        pod = self.live_pods(stage)[index]
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["containerStatuses"] = [
            {
                "name": resources.CONTAINER_NAME,
                "state": {"terminated": {"exitCode": code, "finishedAt": format_time(self.now)}},
            }
        ]
        return pod

    def pod_checkpointed(self, stage: str, index: int = 0) -> dict[str, Any]:
        return self.pod_exited(stage, index, EXIT_CHECKPOINTED_ON_SIGTERM)

    def job_finished(self, stage: str, *, ok: bool, message: str = "") -> None:
        job = self.job(stage)
        kind = "Complete" if ok else "Failed"
        job["status"] = {
            "active": 0,
            "succeeded" if ok else "failed": 1,
            "completionTime": format_time(self.now),
            "conditions": [
                {
                    "type": kind,
                    "status": "True",
                    "reason": "BackoffLimitExceeded" if not ok else "",
                    "message": message,
                }
            ],
        }
        uid = job["metadata"]["uid"]
        for p in self.pods:
            if p["metadata"]["ownerReferences"][0]["uid"] == uid:
                p["status"]["phase"] = "Succeeded" if ok else "Failed"
                p["status"]["containerStatuses"] = [
                    {"state": {"terminated": {"finishedAt": format_time(self.now)}}}
                ]

    def job_gone(self, stage: str) -> None:
        job = self.job(stage)
        uid = job["metadata"]["uid"]
        del self.jobs[job["metadata"]["name"]]
        self.pods = [p for p in self.pods if p["metadata"]["ownerReferences"][0]["uid"] != uid]

    def progress(
        self,
        stage: str,
        *,
        step: int,
        total: int,
        final: bool = False,
        energy: float = 0.0,
        **extra: Any,
    ) -> None:
        meta = self.run["metadata"]
        folder = StageLayout.of(meta["namespace"], meta["name"], stage)
        record = ProgressRecord(
            step=step,
            total_steps=total,
            tokens=step * 1000,
            loss=2.5,
            tokens_per_second=1000.0,
            energy_joules=energy,
            energy_source="nvml",
            checkpoint=f"s3://ckpt/runs/{folder.checkpoint(step)}",
            phase="completed" if final else "running",
            updated_at=format_time(self.now),
        ).updated(**extra)
        self.records[stage] = StageRecords(
            progress=record, final=StoreAnswer.PRESENT if final else StoreAnswer.ABSENT
        )

    # ---- Kueue's part
    def workload(self, stage: str) -> dict[str, Any]:
        """The stage Job's Workload (created on first use), as Kueue makes it."""
        uid = self.job(stage)["metadata"]["uid"]
        for w in self.workloads:
            if w["metadata"]["ownerReferences"][0]["uid"] == uid:
                return w
        w = {
            "metadata": {
                "name": f"job-{stage}-{uid}",
                "uid": f"wl-{next(_uids)}",
                "ownerReferences": [{"kind": "Job", "uid": uid}],
            },
            "status": {"conditions": []},
        }
        self.workloads.append(w)
        return w

    def _set(self, w: dict[str, Any], type_: str, status: str, reason: str, msg: str) -> None:
        conds = [c for c in w["status"]["conditions"] if c["type"] != type_]
        conds.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": msg,
                "lastTransitionTime": format_time(self.now),
            }
        )
        w["status"]["conditions"] = conds

    def kueue_waits(self, stage: str, message: str) -> None:
        """No quota: the Job stays suspended."""
        self._set(self.workload(stage), "QuotaReserved", "False", "Pending", message)

    def kueue_admits(self, stage: str) -> None:
        """Quota reserved and admitted: Kueue unsuspends the Job, whose pods run."""
        w = self.workload(stage)
        self._set(w, "QuotaReserved", "True", "QuotaReserved", "reserved")
        self._set(w, "Admitted", "True", "Admitted", "admitted by ClusterQueue gpus")
        self._set(w, "Evicted", "False", "Admitted", "")
        self.job(stage)["spec"]["suspend"] = False
        self.pods_running(stage, keep_old=True)

    def kueue_preempts(self, stage: str) -> None:
        """Eviction: the Workload's Evicted condition and count, the Job suspended; its
        pods get SIGTERM, and their trainers checkpoint and exit 75."""
        w = self.workload(stage)
        self._set(w, "Evicted", "True", "Preempted", "Preempted to accommodate a workload")
        self._set(w, "Admitted", "False", "NoReservation", "")
        self._set(w, "QuotaReserved", "False", "Pending", "insufficient unused quota")
        stats = w["status"].setdefault("schedulingStats", {"evictions": []})["evictions"]
        if not stats:
            stats.append({"reason": "Preempted", "underlyingCause": "", "count": 0})
        stats[0]["count"] += 1
        job = self.job(stage)
        job["spec"]["suspend"] = True
        job["status"] = {"active": 0}
        while self.live_pods(stage):
            self.pod_checkpointed(stage, 0)

    def store_down(self, stage: str, error: str = "cannot reach the S3 endpoint") -> None:
        self.records[stage] = StageRecords.unknown(error)

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @property
    def status(self) -> dict[str, Any]:
        return self.run.get("status") or {}

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == type_), None)

    def stage_status(self, name: str) -> dict[str, Any]:
        return next(s for s in self.status["stages"] if s["name"] == name)
