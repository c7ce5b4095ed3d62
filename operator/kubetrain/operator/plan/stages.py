"""Step 5: the stages in order; the first one not Succeeded is in one situation
(``decide_stage``) that says what to do. The situations that end an attempt (a failed
Job, one that completed without FINAL, pods disrupted while the Job runs) are in
``attempts``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain.core.api import RunPhase, StagePhase, StageStatus, TrainingRunStatus
from kubetrain.core.conditions import Reason
from kubetrain.operator import resources
from kubetrain.operator.plan.attempts import (
    disrupted_in_place,
    ledger_of,
    stage_completed_without_final,
    stage_failed,
)
from kubetrain.operator.plan.context import (
    Queued,
    Restart,
    StageAt,
    StageDecision,
    WalkContext,
    running_if_should_run,
)
from kubetrain.operator.plan.gang import gang_timed_out
from kubetrain.operator.plan.observed import pod_name, pod_running
from kubetrain.operator.plan.queueing import kueue_evictions, stage_queued
from kubetrain.operator.plan.result import NORMAL, Delete, Event
from kubetrain.operator.progress import (
    StoreAnswer,
    format_time,
    parse_time,
    record_updated_at,
)


def stage_deleting(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job is being deleted (foreground): wait until the pods, which checkpoint
    after SIGTERM, are gone, before anything else happens to the stage."""
    return StageDecision(
        at.status.model_copy(
            update={
                "message": "waiting for the previous pods to stop (checkpointing after SIGTERM)"
            }
        ),
        phase=running_if_should_run(ctx),
    )


def stage_succeeded(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job completed and FINAL exists: the stage succeeded; on to the next one."""
    assert at.job is not None
    st = at.status
    return StageDecision(
        st.model_copy(
            update={
                "phase": StagePhase.Succeeded,
                "progress": 1.0,
                "eta_seconds": 0.0,
                "completion_time": at.job.completion_time or format_time(ctx.observed.now),
                "message": None,
                "step": max(st.step, st.total_steps or 0),
            }
        ),
        done=True,
        events=[
            Event(
                NORMAL,
                Reason.STAGE_SUCCEEDED,
                f"stage {at.stage.name!r} ({at.index + 1}/{len(ctx.spec.stages)}) succeeded",
            )
        ],
    )


def stage_stopping(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job runs but the run must not (suspended, over budget, finished): delete the
    Job; its pods checkpoint before they exit."""
    assert at.job is not None
    return StageDecision(
        at.status,
        delete=[Delete("Job", at.job.name)],
        events=[
            Event(
                NORMAL,
                Reason.SUSPENDING,
                f"stopping stage {at.stage.name!r}: {ctx.course.stop_reason}; the trainer "
                "checkpoints before it exits",
            )
        ],
    )


def stage_running(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job exists and the run may train: queued while the Job is suspended (waiting
    for Kueue, ``stage_queued``); else Running once every pod of the gang runs (and none
    is on its way out), Pending before, released when its gang is not scheduled in time
    (``gang_timed_out``); stalled when its progress record has not changed for
    stallTimeoutSeconds while it runs. Pods disrupted meanwhile, and Kueue's evictions,
    count a preemption (``disrupted_in_place``, ``kueue_evictions``). Pods that exited 0
    keep the stage Running until the Job controller marks the Job Complete (seconds on a
    busy cluster): the stage is finishing, not waiting for pods."""
    job = at.job
    assert job is not None
    now, timeout = ctx.observed.now, ctx.config.stall_timeout_seconds
    st, evicted = kueue_evictions(at, ctx, job, at.status)
    # A new eviction seen before the Job's suspension: Kueue is about to suspend it.
    if job.suspended or evicted is not None:
        if ctx.observed.workload_of(job) is None:
            # Kueue's Workloads are not watched: the stopped pods tell the preemption.
            st, preempted = disrupted_in_place(at, ctx, job, st)
            if preempted is not None:
                evicted = "its pods were stopped while the Job was suspended"
        return stage_queued(at, ctx, job, st, evicted)
    st, preempted = disrupted_in_place(at, ctx, job, st)
    pods = ctx.observed.pods_of(job)
    running = sum(1 for p in pods if pod_running(p)) >= job.nodes
    finishing = not running and (
        sum(
            1 for p in pods if pod_running(p) or (p.get("status") or {}).get("phase") == "Succeeded"
        )
        >= job.nodes
    )
    if not running and not finishing:
        released = gang_timed_out(at, ctx, job, st)
        if released is not None:
            return released
    elif ledger_of(st).gang_releases:
        st = st.model_copy(update={"ledger": ledger_of(st).model_copy(update={"gang_releases": 0})})
    updated = record_updated_at(at.record.progress if at.record else None)
    stalled = None
    if running and updated is not None and timeout > 0:
        quiet = (now - updated).total_seconds()
        if quiet > timeout:
            stalled = f"stage {at.stage.name!r}: no progress for {quiet:.0f}s"
    waiting = "waiting for pods to be scheduled"
    if preempted is not None:
        waiting = "waiting for the Job controller to replace disrupted pods"
    if finishing:
        waiting = "the trainer exited 0; waiting for the Job to complete"
    return StageDecision(
        st.model_copy(
            update={
                "phase": StagePhase.Running if running or finishing else StagePhase.Pending,
                "message": None if running else waiting,
            }
        ),
        phase=RunPhase.Running if running or finishing else RunPhase.Pending,
        stalled=stalled,
        trains=running,
        events=preempted.events if preempted else [],
        restarting=preempted.restarting if preempted else None,
    )


def stage_unconfirmed(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job completed but the store cannot say whether FINAL exists: wait. Nothing
    is deleted or counted on an unknown answer; the next reconcile asks again."""
    error = at.record.error if at.record is not None and at.record.error else "not read"
    return StageDecision(
        at.status.model_copy(
            update={
                "message": "the Job completed; waiting for the store to confirm FINAL "
                f"(store unreachable: {error})"
            }
        ),
        phase=running_if_should_run(ctx),
    )


def _lingering(at: StageAt, ctx: WalkContext) -> str | None:
    """Why the Job must not be created yet: pods of the stage from an earlier Job (one
    deleted by hand) still run or terminate. A new Job now would mean two rank-0 pods
    behind one Service and two writers to one checkpoint folder."""
    pods = ctx.observed.lingering_pods(at.stage.name)
    if not pods:
        return None

    def state(pod: dict[str, Any]) -> str:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            return "terminating"
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        return f"{phase}, no Job owns it: delete it if its Job was deleted with --cascade=orphan"

    names = ", ".join(f"{pod_name(p)} ({state(p)})" for p in pods[:5])
    more = f" and {len(pods) - 5} more" if len(pods) > 5 else ""
    return f"waiting for pods of an earlier Job to stop before creating the Job: {names}{more}"


def _backoff(at: StageAt, ctx: WalkContext) -> StageDecision | None:
    """While the backoff after a failure lasts: wait, with the condition Restarting."""
    due = parse_time(at.status.next_attempt_time)
    if due is None or due <= ctx.observed.now:
        return None
    left = (due - ctx.observed.now).total_seconds()
    st = at.status
    releases = ledger_of(st).gang_releases
    restart = Restart(
        Reason.FAILURE_BACKOFF,
        f"stage {at.stage.name!r}: attempt {st.restarts + 1} starts at "
        f"{st.next_attempt_time} (in {left:.0f}s), after failure "
        f"{st.restarts}/{at.stage.max_restarts}",
    )
    if releases:
        restart = Restart(
            Reason.GANG_TIMEOUT,
            f"stage {at.stage.name!r}: its pods were not all scheduled in time ({releases} "
            f"in a row); the Job is created again at {st.next_attempt_time} "
            f"(in {left:.0f}s)",
        )
    return StageDecision(
        st.model_copy(update={"phase": StagePhase.Pending}),
        phase=RunPhase.Pending,
        restarting=restart,
        requeue_after=left,
    )


def stage_without_job(at: StageAt, ctx: WalkContext) -> StageDecision:
    """No Job: create it (and its Service) when the run may train, resuming from LATEST
    if the stage had started, once the backoff after a failure is over, no pod of an
    earlier Job is left and the names are not taken by objects not the run's;
    otherwise a stage that was under way is Suspended."""
    st, stage, run = at.status, at.stage, ctx.run
    if not ctx.course.should_run:
        if (
            not ctx.course.terminal
            and st.phase in (StagePhase.Running, StagePhase.Pending)
            and st.start_time is not None
        ):
            st = st.model_copy(
                update={"phase": StagePhase.Suspended, "message": "stopped after a checkpoint"}
            )
        return StageDecision(st)
    job_name = resources.child_name(run.name, stage.name)
    taken = ctx.observed.foreign_named(job_name)
    if taken:
        message = "; ".join(f.describe(run.namespace) for f in taken)
        return StageDecision(
            st.model_copy(update={"message": f"waiting: {message}"}),
            phase=RunPhase.Pending,
            conflict=f"{message}: it is not this TrainingRun's and is left alone (delete or "
            f"rename it; stage {stage.name!r} waits for the name)",
        )
    waiting = _backoff(at, ctx)
    if waiting is not None:
        return waiting
    lingering = _lingering(at, ctx)
    if lingering is not None:
        return StageDecision(
            st.model_copy(update={"message": lingering}), phase=running_if_should_run(ctx)
        )
    first = st.start_time is None
    return StageDecision(
        st.model_copy(
            update={
                "phase": StagePhase.Pending,
                "start_time": st.start_time or format_time(ctx.observed.now),
                "next_attempt_time": None,
                "message": "Job created" if first else "Job recreated, resuming from LATEST",
            }
        ),
        phase=RunPhase.Pending,
        create=[
            resources.build_service(
                run=run.name, namespace=run.namespace, uid=run.uid, stage=stage.name
            ),
            resources.build_job(
                ctx.spec,
                at.index,
                run=run.name,
                namespace=run.namespace,
                uid=run.uid,
                config=ctx.config,
                attempt=st.restarts,
                queue=ctx.queue,
                priority_class=ctx.priority_class,
            ),
        ],
        events=[
            Event(
                NORMAL,
                Reason.STAGE_STARTED if first else Reason.STAGE_RESUMED,
                f"stage {stage.name!r} ({at.index + 1}/{len(ctx.spec.stages)}): "
                f"created Job {job_name}",
            )
        ],
    )


def decide_stage(at: StageAt, ctx: WalkContext) -> StageDecision:
    """The situation of the first stage not Succeeded, and what it calls for."""
    job = at.job
    if job is None:
        return stage_without_job(at, ctx)
    if job.deleting:
        return stage_deleting(at, ctx)
    if job.complete and at.final == StoreAnswer.PRESENT:
        return stage_succeeded(at, ctx)
    if job.failed_condition:
        return stage_failed(at, ctx)
    if job.complete and at.final == StoreAnswer.UNKNOWN:
        return stage_unconfirmed(at, ctx)
    if job.complete:
        return stage_completed_without_final(at, ctx)
    if not ctx.course.should_run:
        return stage_stopping(at, ctx)
    return stage_running(at, ctx)


@dataclass
class Walk:
    """What the walk over the stages decided."""

    phase: RunPhase
    current: str | None
    stages: list[StageStatus]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    failed: str | None = None
    failed_reason: str | None = None
    stalled: str | None = None
    trains: bool = False
    restarting: Restart | None = None
    requeue_after: float | None = None
    conflict: str | None = None
    queued: Queued | None = None

    def take(self, index: int, decision: StageDecision) -> None:
        self.stages[index] = decision.status
        self.phase = decision.phase or self.phase
        self.create += decision.create
        self.delete += decision.delete
        self.events += decision.events
        self.failed = decision.failed or self.failed
        self.failed_reason = decision.failed_reason or self.failed_reason
        self.stalled = decision.stalled or self.stalled
        self.trains = decision.trains
        self.restarting = decision.restarting or self.restarting
        self.conflict = decision.conflict or self.conflict
        self.queued = decision.queued or self.queued
        if decision.requeue_after is not None:
            self.requeue_after = min(decision.requeue_after, self.requeue_after or float("inf"))


def walk_stages(ctx: WalkContext, stages: list[StageStatus], old: TrainingRunStatus) -> Walk:
    """Step 5, the stages in order: Succeeded ones are passed, the first other one
    decides (``decide_stage``); when all have succeeded the run has."""
    walk = Walk(
        phase=old.phase if ctx.course.terminal else RunPhase.Pending,
        current=old.current_stage,
        stages=list(stages),
    )
    for i, stage in enumerate(ctx.spec.stages):
        if walk.stages[i].phase == StagePhase.Succeeded:
            continue
        walk.current = stage.name
        at = StageAt(
            i,
            stage,
            walk.stages[i],
            ctx.observed.jobs.get(stage.name),
            ctx.observed.records.get(stage.name),
        )
        decision = decide_stage(at, ctx)
        walk.take(i, decision)
        if not decision.done:
            return walk
    if not ctx.course.terminal:
        walk.phase = RunPhase.Succeeded
        walk.current = ctx.spec.stages[-1].name
    return walk
