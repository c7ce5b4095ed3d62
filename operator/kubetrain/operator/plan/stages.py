"""Step 5: the stages in order; the first one not Succeeded is in one situation
(``decide_stage``) that says what to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain.core.api import (
    RunPhase,
    Stage,
    StagePhase,
    StageStatus,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.core.conditions import Reason
from kubetrain.operator import resources
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.plan.budget import Course
from kubetrain.operator.plan.observed import Observed, ObservedJob, RunRef
from kubetrain.operator.plan.result import NORMAL, WARNING, Delete, Event
from kubetrain.operator.progress import StageRecords, format_time, record_updated_at


@dataclass(frozen=True)
class WalkContext:
    """What every stage's decision may look at."""

    run: RunRef
    spec: TrainingRunSpec
    course: Course
    observed: Observed
    config: OperatorConfig


@dataclass(frozen=True)
class StageAt:
    """The first stage not Succeeded, as the walk finds it."""

    index: int
    stage: Stage
    status: StageStatus
    job: ObservedJob | None
    record: StageRecords | None


@dataclass
class StageDecision:
    """What a stage's situation calls for."""

    status: StageStatus
    phase: RunPhase | None = None  # the run's phase it implies; None: leave it
    done: bool = False  # the stage has succeeded: go on with the next one
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    failed: str | None = None  # why the run fails
    stalled: str | None = None  # why the stage counts as stalled


def _running_if_should_run(ctx: WalkContext) -> RunPhase | None:
    return RunPhase.Running if ctx.course.should_run else None


def stage_deleting(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job is being deleted (foreground): wait until the pods, which checkpoint
    after SIGTERM, are gone, before anything else happens to the stage."""
    return StageDecision(
        at.status.model_copy(
            update={
                "message": "waiting for the previous pods to stop (checkpointing after SIGTERM)"
            }
        ),
        phase=_running_if_should_run(ctx),
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


def stage_failed(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job failed: delete it to be recreated at the next attempt while restarts
    remain within maxRestarts, else the stage and the run fail."""
    job, stage, st = at.job, at.stage, at.status
    assert job is not None
    restarts = max(st.restarts, job.attempt + 1)
    if restarts > stage.max_restarts:
        return StageDecision(
            st.model_copy(
                update={
                    "phase": StagePhase.Failed,
                    "restarts": restarts,
                    "completion_time": format_time(ctx.observed.now),
                    "message": job.failure_message or None,
                }
            ),
            phase=RunPhase.Failed,
            failed=(
                f"stage {stage.name!r} failed {restarts} times, more than "
                f"maxRestarts={stage.max_restarts}: {job.failure_message}"
            ),
        )
    return StageDecision(
        st.model_copy(
            update={
                "restarts": restarts,
                "message": f"restart {restarts}/{stage.max_restarts}: {job.failure_message}",
            }
        ),
        phase=_running_if_should_run(ctx),
        delete=[Delete("Job", job.name)],
        events=[
            Event(
                WARNING,
                Reason.STAGE_RESTARTING,
                f"stage {stage.name!r} failed ({job.failure_message}); restart {restarts} of "
                f"{stage.max_restarts}, resuming from the last checkpoint",
            )
        ],
    )


def stage_interrupted(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job completed without FINAL (the trainer checkpointed and exited after
    SIGTERM): delete it, to be recreated and resume from LATEST."""
    assert at.job is not None
    return StageDecision(
        at.status,
        phase=_running_if_should_run(ctx),
        delete=[Delete("Job", at.job.name)],
        events=[
            Event(
                NORMAL,
                Reason.STAGE_INTERRUPTED,
                f"stage {at.stage.name!r} stopped without finishing (no FINAL); recreating "
                "it to resume from the last checkpoint",
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
    """Its Job runs: Running once a pod runs, else Pending; stalled when its progress
    record has not changed for stallTimeoutSeconds while it runs."""
    assert at.job is not None
    now, timeout = ctx.observed.now, ctx.config.stall_timeout_seconds
    running = any(
        (p.get("status") or {}).get("phase") == "Running" for p in ctx.observed.pods_of(at.job)
    )
    updated = record_updated_at(at.record.progress if at.record else None)
    stalled = None
    if running and updated is not None and timeout > 0:
        quiet = (now - updated).total_seconds()
        if quiet > timeout:
            stalled = f"stage {at.stage.name!r}: no progress for {quiet:.0f}s"
    return StageDecision(
        at.status.model_copy(
            update={
                "phase": StagePhase.Running if running else StagePhase.Pending,
                "message": None if running else "waiting for pods to be scheduled",
            }
        ),
        phase=RunPhase.Running if running else RunPhase.Pending,
        stalled=stalled,
    )


def stage_without_job(at: StageAt, ctx: WalkContext) -> StageDecision:
    """No Job: create it (and its Service) when the run may train, resuming from LATEST
    if the stage had started; otherwise a stage that was under way is Suspended."""
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
    first = st.start_time is None
    job_name = resources.child_name(run.name, stage.name)
    return StageDecision(
        st.model_copy(
            update={
                "phase": StagePhase.Pending,
                "start_time": st.start_time or format_time(ctx.observed.now),
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
    if job.complete and at.record is not None and at.record.final:
        return stage_succeeded(at, ctx)
    if job.failed_condition:
        return stage_failed(at, ctx)
    if job.complete:
        return stage_interrupted(at, ctx)
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
    stalled: str | None = None

    def take(self, index: int, decision: StageDecision) -> None:
        self.stages[index] = decision.status
        self.phase = decision.phase or self.phase
        self.create += decision.create
        self.delete += decision.delete
        self.events += decision.events
        self.failed = decision.failed or self.failed
        self.stalled = decision.stalled or self.stalled


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
