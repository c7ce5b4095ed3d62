"""What a reconcile observes: the run's Jobs (the parts decisions depend on), its
Pods and Services, the progress records read from the store, and the time.

Children are the run's only when their controller ownerReference is the run's uid: an
object with a child's name that is not (left over from a deleted run of the same name,
created by hand, another run whose children happen to share the name) is ``foreign``:
reported, never adopted, changed or deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetrain.core import api, contract
from kubetrain.operator import resources
from kubetrain.operator.progress import StageRecords

TERMINAL_POD_PHASES = ("Succeeded", "Failed")
DISRUPTION_TARGET = "DisruptionTarget"


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the TrainingRun that controls ``obj``, or None."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def owner_text(obj: Mapping[str, Any]) -> str:
    """Who ``obj`` belongs to, in words, for a message."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"controlled by {ref.get('kind')} {ref.get('name')!r} (uid {ref.get('uid')})"
    return "not controlled by any TrainingRun"


def owned_by(obj: Mapping[str, Any], run_uid: str) -> bool:
    """Whether ``obj`` is a child of the run ``run_uid`` (any object when the run's uid is
    unknown, as in a manifest that was never applied)."""
    return not run_uid or controller_uid(obj) == run_uid


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
    nodes: int = 1  # pods of the gang (parallelism)
    suspended: bool = False  # spec.suspend: waiting for (or preempted by) Kueue
    queue: str = ""  # the Kueue LocalQueue it was submitted to ("" : none)
    created: str = ""  # creationTimestamp (the API server's clock)

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
            nodes=int((obj.get("spec") or {}).get("parallelism") or 1),
            suspended=bool((obj.get("spec") or {}).get("suspend")),
            queue=str((meta.get("labels") or {}).get(resources.LABEL_QUEUE) or ""),
            created=str(meta.get("creationTimestamp") or ""),
        )


def _true(conditions: Mapping[str, Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    cond = conditions.get(type_)
    return cond if cond is not None and cond.get("status") == "True" else None


@dataclass(frozen=True)
class ObservedWorkload:
    """What Kueue says of a stage's Job: its Workload (owned by the Job)."""

    uid: str
    job_uid: str
    admitted: bool  # condition Admitted True: the Job may run
    waiting: str  # why it waits (QuotaReserved False: reason and message), "" when not
    evicted: str  # why it was evicted last (Evicted True), "" when it was not
    evictions: int  # how often it was evicted (schedulingStats), ever
    evicted_at: str = ""  # when condition Evicted last became True ("" : never)
    cluster_queue: str = ""  # the ClusterQueue that admitted it

    @classmethod
    def from_k8s(cls, obj: Mapping[str, Any]) -> ObservedWorkload | None:
        """The Workload, or None when it is not a Job's."""
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        job_uid = next(
            (
                str(ref.get("uid") or "")
                for ref in meta.get("ownerReferences") or []
                if ref.get("kind") == "Job"
            ),
            "",
        )
        if not job_uid:
            return None
        conds = {c.get("type"): c for c in status.get("conditions") or []}
        reserved = conds.get("QuotaReserved") or {}
        waiting = ""
        if reserved.get("status") == "False":
            waiting = f"{reserved.get('reason') or 'Pending'}: {reserved.get('message') or ''}"
        evicted = _true(conds, "Evicted") or {}
        counts = (status.get("schedulingStats") or {}).get("evictions") or []
        return cls(
            uid=str(meta.get("uid") or ""),
            job_uid=job_uid,
            admitted=_true(conds, "Admitted") is not None,
            waiting=waiting.rstrip(": "),
            evicted=(
                f"{evicted.get('reason') or 'Evicted'}: {evicted.get('message') or ''}".rstrip(": ")
                if evicted
                else ""
            ),
            evictions=sum(int(e.get("count") or 0) for e in counts),
            evicted_at=str(evicted.get("lastTransitionTime") or ""),
            cluster_queue=str((status.get("admission") or {}).get("clusterQueue") or ""),
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


def pod_name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("name") or "?")


def pod_terminal(pod: Mapping[str, Any]) -> bool:
    """Its containers have stopped for good (restartPolicy Never)."""
    return (pod.get("status") or {}).get("phase") in TERMINAL_POD_PHASES


def pod_running(pod: Mapping[str, Any]) -> bool:
    """Running and not on its way out (deleted, or disrupted)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and not meta.get("deletionTimestamp")
        and disruption(pod) is None
    )


def trainer_exit_code(pod: Mapping[str, Any]) -> int | None:
    """The trainer container's exit code, once it has terminated."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name", resources.CONTAINER_NAME) != resources.CONTAINER_NAME:
            continue
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if "exitCode" in terminated:
            return int(terminated["exitCode"])
    return None


def pod_created(pod: Mapping[str, Any]) -> str:
    """The pod's creationTimestamp (the API server's clock), '' when unknown."""
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def stopped_at(pod: Mapping[str, Any], now: str) -> str:
    """When a disrupted pod stopped, as well as the API can tell: its deletion, its
    DisruptionTarget condition, its container's end; ``now`` when none is known. Pods
    created later replace it (a Job replaces a pod only once it has stopped)."""
    times = [str((pod.get("metadata") or {}).get("deletionTimestamp") or "")]
    status = pod.get("status") or {}
    times += [
        str(c.get("lastTransitionTime") or "")
        for c in status.get("conditions") or []
        if c.get("type") == DISRUPTION_TARGET
    ]
    times += [
        str(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt") or "")
        for cs in status.get("containerStatuses") or []
    ]
    known = [t for t in times if t]
    return max(known) if known else now


def disruption(pod: Mapping[str, Any]) -> str | None:
    """Why the pod's attempt ended by a disruption (not the trainer's fault), or None:
    the condition DisruptionTarget (eviction, drain, preemption, taint), or the trainer's
    exit code after checkpointing on SIGTERM."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == DISRUPTION_TARGET and cond.get("status") == "True":
            detail = cond.get("message") or cond.get("reason") or ""
            return f"{DISRUPTION_TARGET}: {detail}" if detail else DISRUPTION_TARGET
    if trainer_exit_code(pod) == contract.EXIT_CHECKPOINTED_ON_SIGTERM:
        return (
            f"the trainer checkpointed on SIGTERM (exit code "
            f"{contract.EXIT_CHECKPOINTED_ON_SIGTERM})"
        )
    return None


@dataclass(frozen=True)
class Foreign:
    """An object with the name of one of the run's children that is not the run's."""

    kind: str  # Job | Service
    name: str
    owner: str  # who it belongs to, in words

    def describe(self, namespace: str) -> str:
        return f"{self.kind} {namespace}/{self.name} is {self.owner}"


def _foreign(kind: str, obj: Mapping[str, Any]) -> Foreign:
    return Foreign(kind, str((obj.get("metadata") or {}).get("name") or ""), owner_text(obj))


@dataclass(frozen=True)
class Observed:
    """What exists for a run, as one reconcile sees it."""

    jobs: dict[str, ObservedJob]  # the run's own, by stage
    pods: list[dict[str, Any]]
    services: list[str]  # names of the run's own Services
    records: Mapping[str, StageRecords]  # by stage: only the stages that were read
    now: datetime
    foreign: list[Foreign] = field(default_factory=list)
    workloads: dict[str, ObservedWorkload] = field(default_factory=dict)  # by Job uid

    @classmethod
    def of(
        cls,
        jobs: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        records: Mapping[str, StageRecords],
        services: list[dict[str, Any]] | None,
        now: datetime,
        run_uid: str = "",
        workloads: list[dict[str, Any]] | None = None,
    ) -> Observed:
        services = services or []
        observed_workloads = [w for w in map(ObservedWorkload.from_k8s, workloads or []) if w]
        return cls(
            jobs={
                j.stage: j
                for j in map(ObservedJob.from_k8s, [j for j in jobs if owned_by(j, run_uid)])
            },
            pods=pods,
            services=sorted(str(s["metadata"]["name"]) for s in services if owned_by(s, run_uid)),
            records=records,
            now=now,
            foreign=[_foreign("Job", j) for j in jobs if not owned_by(j, run_uid)]
            + [_foreign("Service", s) for s in services if not owned_by(s, run_uid)],
            workloads={w.job_uid: w for w in observed_workloads},
        )

    def workload_of(self, job: ObservedJob) -> ObservedWorkload | None:
        """Kueue's Workload of ``job``, None while there is none (or no Kueue)."""
        return self.workloads.get(job.uid)

    def pods_of(self, job: ObservedJob) -> list[dict[str, Any]]:
        """The pods ``job`` owns."""
        return pods_of(self.pods, job.uid)

    def foreign_named(self, name: str) -> list[Foreign]:
        """Objects that are not the run's but have the name of one of its children."""
        return [f for f in self.foreign if f.name == name]

    def lingering_pods(self, stage: str) -> list[dict[str, Any]]:
        """Pods of ``stage`` that have not stopped although no Job of the run owns them
        (a Job deleted by hand, its pods still terminating or orphaned)."""
        owners = {j.uid for j in self.jobs.values()}
        return [
            p
            for p in self.pods
            if ((p.get("metadata") or {}).get("labels") or {}).get(resources.LABEL_STAGE) == stage
            and not pod_terminal(p)
            and not any(
                ref.get("uid") in owners
                for ref in (p.get("metadata") or {}).get("ownerReferences") or []
            )
        ]


@dataclass(frozen=True)
class RunRef:
    """Which run: what its children are named after and owned by."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> RunRef:
        return cls(meta["name"], meta.get("namespace", "default"), meta.get("uid", ""))
