"""What a reconcile observes: the run's Jobs (the parts decisions depend on), its
Pods and Services, the progress records read from the store, and the time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetrain.operator import resources
from kubetrain.operator.progress import StageRecords


@dataclass(frozen=True)
class ObservedJob:
    """The parts of a stage's Job that decisions depend on."""

    name: str
    stage: str
    uid: str
    attempt: int
    active: int
    failed: int
    complete: bool
    failed_condition: bool
    failure_message: str
    deleting: bool
    completion_time: str | None

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> ObservedJob:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        conds = {
            c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
        }
        # FailureTarget comes first (pods still terminating), Failed when they are gone;
        # either means this attempt is over.
        failure = conds.get("Failed") or conds.get("FailureTarget")
        try:
            attempt = int((meta.get("annotations") or {}).get(resources.ANNOTATION_ATTEMPT, 0))
        except ValueError:
            attempt = 0
        return cls(
            name=meta.get("name", ""),
            stage=(meta.get("labels") or {}).get(resources.LABEL_STAGE, ""),
            uid=meta.get("uid", ""),
            attempt=attempt,
            active=int(status.get("active") or 0),
            failed=int(status.get("failed") or 0),
            complete="Complete" in conds or "SuccessCriteriaMet" in conds,
            failed_condition=failure is not None,
            failure_message=(failure or {}).get("message") or (failure or {}).get("reason", ""),
            deleting=bool(meta.get("deletionTimestamp")),
            completion_time=status.get("completionTime"),
        )


def pods_of(pods: list[dict[str, Any]], job_uid: str) -> list[dict[str, Any]]:
    """The pods the Job ``job_uid`` owns."""
    return [
        p
        for p in pods
        if any(
            ref.get("uid") == job_uid
            for ref in (p.get("metadata") or {}).get("ownerReferences") or []
        )
    ]


@dataclass(frozen=True)
class Observed:
    """What exists for a run, as one reconcile sees it."""

    jobs: dict[str, ObservedJob]  # by stage
    pods: list[dict[str, Any]]
    services: list[str]  # names of the run's Services
    records: Mapping[str, StageRecords]  # by stage: only the stages that were read
    now: datetime

    @classmethod
    def of(
        cls,
        jobs: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        records: Mapping[str, StageRecords],
        services: list[str] | None,
        now: datetime,
    ) -> Observed:
        return cls(
            jobs={j.stage: j for j in map(ObservedJob.from_k8s, jobs)},
            pods=pods,
            services=sorted(services or []),
            records=records,
            now=now,
        )

    def pods_of(self, job: ObservedJob) -> list[dict[str, Any]]:
        """The pods ``job`` owns."""
        return pods_of(self.pods, job.uid)


@dataclass(frozen=True)
class RunRef:
    """Which run: what its children are named after and owned by."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> RunRef:
        return cls(meta["name"], meta.get("namespace", "default"), meta.get("uid", ""))
