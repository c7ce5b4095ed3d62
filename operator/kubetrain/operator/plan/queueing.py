"""Kueue: a run that names a LocalQueue (``spec.queueName`` or its
``kueue.x-k8s.io/queue-name`` label) gets each stage's Job created suspended in that
queue, with the run's ``kueue.x-k8s.io/priority-class`` label. Kueue admits the Job as
one gang (quota for all its pods, or none) by unsuspending it, and preempts it by
suspending it again: the Job controller then deletes its pods, whose trainers
checkpoint on SIGTERM, and the Job waits in the queue until Kueue admits it again;
its new pods resume from LATEST.

The operator never unsuspends a Job (it has no right to patch Jobs at all). While a
stage's Job is suspended the stage is queued: it has no pods, so nothing is billed, and
the run shows condition ``Queued`` with the reason and message of Kueue's Workload.
Each eviction of the Workload (Kueue counts them in ``schedulingStats``) is one
preemption of the stage, never a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetrain.core.api import (
    RunPhase,
    StagePhase,
    StageStatus,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator import resources
from kubetrain.operator.plan.attempts import ledger_of
from kubetrain.operator.plan.conditions import Conditions, condition_of
from kubetrain.operator.plan.context import (
    Queued,
    Restart,
    StageAt,
    StageDecision,
    WalkContext,
)
from kubetrain.operator.plan.observed import ObservedJob, pod_created
from kubetrain.operator.plan.result import NORMAL, Event


@dataclass(frozen=True)
class Queueing:
    """Where the run's Jobs wait for admission: a Kueue LocalQueue and a
    WorkloadPriorityClass; ``queue`` None: nowhere, Jobs start at once."""

    queue: str | None = None
    priority_class: str | None = None

    @classmethod
    def of(cls, meta: Mapping[str, Any], spec: TrainingRunSpec) -> Queueing:
        """``spec.queueName``, else the run's queue-name label; the priority class from
        the run's label, only with a queue (Kueue reads it only then)."""
        labels = meta.get("labels") or {}
        queue = spec.queue_name or labels.get(resources.LABEL_QUEUE) or None
        priority = labels.get(resources.LABEL_PRIORITY_CLASS) or None
        return cls(queue, priority if queue else None)


def kueue_evictions(
    at: StageAt, ctx: WalkContext, job: ObservedJob, st: StageStatus
) -> tuple[StageStatus, str | None]:
    """Evictions of the Job's Workload not counted yet, each one preemption of the
    stage. Pods that stopped because of it (the Job's pods when the eviction is seen)
    belong to it, so ``disrupted_in_place`` does not count them again; an eviction whose
    pods it already counted (their exit code seen before the Workload's change) is not
    counted twice. Returns the status and why the stage was preempted (None: no new
    eviction)."""
    workload = ctx.observed.workload_of(job)
    if workload is None:
        return st, None
    ledger = ledger_of(st)
    seen = ledger.evictions if ledger.workload == workload.uid else 0
    new = workload.evictions - seen
    if new <= 0:
        if ledger.workload != workload.uid:
            st = st.model_copy(
                update={"ledger": ledger.model_copy(update={"workload": workload.uid})}
            )
        return st, None
    pods = [pod_created(p) for p in ctx.observed.pods_of(job)]
    since = max([ledger.disrupted_at or "", workload.evicted_at] + (pods if job.suspended else []))
    counted_by_pods = (
        ledger.disrupted_job == job.uid
        and bool(workload.evicted_at)
        and (ledger.disrupted_at or "") >= workload.evicted_at
    )
    preemptions = st.preemptions + new - (1 if counted_by_pods else 0)
    ledger = ledger.model_copy(
        update={
            "workload": workload.uid,
            "evictions": workload.evictions,
            "disrupted_job": job.uid,
            "disrupted_at": since or None,
        }
    )
    st = st.model_copy(
        update={"preemptions": preemptions, "completed_without_final": 0, "ledger": ledger}
    )
    return st, workload.evicted or "evicted by Kueue"


def stage_queued(
    at: StageAt, ctx: WalkContext, job: ObservedJob, st: StageStatus, evicted: str | None
) -> StageDecision:
    """The Job is suspended: it waits for Kueue to admit it (again, after an eviction).
    No pods, nothing billed; the operator leaves the Job alone."""
    workload = ctx.observed.workload_of(job)
    queue = f"LocalQueue {job.queue!r}" if job.queue else "its queue"
    if workload is not None and workload.waiting:
        reason, _, detail = workload.waiting.partition(": ")
        why = detail or reason
    elif workload is not None and workload.admitted:
        reason, why = "Admitted", "admitted; Kueue is about to start its pods"
    else:
        reason, why = Reason.QUEUED, "the Job is suspended until a queue admits it"
    message = f"stage {at.stage.name!r} waits in {queue}: {why}"
    events = []
    restarting = None
    if evicted is not None:
        text = (
            f"preemption {st.preemptions}: {evicted}; the trainer checkpoints, the Job "
            "waits in its queue and resumes from the last checkpoint when readmitted"
        )
        events.append(
            Event(
                NORMAL,
                Reason.STAGE_PREEMPTED,
                f"stage {at.stage.name!r} was preempted by Kueue ({evicted}); it resumes "
                "from the last checkpoint when readmitted (not counted against maxRestarts)",
            )
        )
        restarting = Restart(Reason.PREEMPTED, f"stage {at.stage.name!r}: {text}")
    return StageDecision(
        st.model_copy(update={"phase": StagePhase.Pending, "message": message}),
        phase=RunPhase.Pending,
        events=events,
        restarting=restarting,
        queued=Queued(reason if reason.isalnum() else Reason.QUEUED, message),
    )


def queued_condition(
    queued: Queued | None, phase: RunPhase, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition Queued: True (and an event when it becomes True) while the current
    stage's Job waits for Kueue; False once it is admitted (or the run stops waiting).
    Runs that never queued have no such condition."""
    type_ = ConditionType.QUEUED
    if queued is not None:
        before = condition_of(old.conditions, type_)
        conds.set(type_, True, queued.reason, queued.message)
        if before is None or before.status != "True":
            return [Event(NORMAL, Reason.STAGE_QUEUED, queued.message)]
        return []
    current = conds.get(type_)
    if current is not None and current.status == "True":
        if phase in (RunPhase.Pending, RunPhase.Running):
            conds.set(type_, False, Reason.ADMITTED, "Kueue admitted the stage's Job")
        else:
            conds.set(type_, False, Reason.NOT_QUEUED, f"the run is {phase.value}")
    return []
