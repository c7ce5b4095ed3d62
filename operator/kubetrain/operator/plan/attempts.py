"""How an attempt of a stage ended, and what each ending counts as.

- A disruption (a pod with the condition DisruptionTarget, or the trainer's exit code
  ``EXIT_CHECKPOINTED_ON_SIGTERM``) is a preemption: counted in ``preemptions``, never
  against ``maxRestarts``, restarted at once. The Job's podFailurePolicy ignores such
  pods, so the Job controller usually replaces them inside the same Job
  (``disrupted_in_place``); a gang whose other ranks then failed with ordinary codes
  ends the Job as failed, and that attempt is a preemption too (``attempt_disruption``).
- Any other failure is counted in ``restarts`` and restarted after an exponential
  backoff (``backoff_seconds``), until ``maxRestarts`` is exceeded.
- A Job whose pods all exited 0 without FINAL is counted in ``completedWithoutFinal``;
  ``maxCompletedWithoutFinal`` of them in a row fail the stage.

Each ending is counted once: the stage's ledger remembers the uids of the Jobs already
counted and when the last disruption's pods stopped (pods created before then belong to
it), so observing them again changes nothing.
"""

from __future__ import annotations

from datetime import timedelta

from kubetrain.core.api import RunPhase, StageLedger, StagePhase, StageStatus
from kubetrain.core.conditions import Reason
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.plan.context import (
    Restart,
    StageAt,
    StageDecision,
    WalkContext,
    running_if_should_run,
)
from kubetrain.operator.plan.observed import (
    ObservedJob,
    disruption,
    pod_created,
    pod_name,
    pod_running,
    pod_terminal,
    stopped_at,
)
from kubetrain.operator.plan.result import NORMAL, WARNING, Delete, Event
from kubetrain.operator.progress import format_time

# The ledger keeps the newest Job uids only: older Jobs are long gone.
MAX_COUNTED = 32


def ledger_of(st: StageStatus) -> StageLedger:
    return st.ledger or StageLedger()


def with_counted(ledger: StageLedger, *uids: str) -> StageLedger:
    """``ledger`` with ``uids`` remembered as counted."""
    counted = [u for u in ledger.counted if u not in uids] + list(uids)
    return ledger.model_copy(update={"counted": counted[-MAX_COUNTED:]})


def backoff_seconds(failures: int, config: OperatorConfig) -> float:
    """The wait before the attempt after the ``failures``-th failure: the base, doubled
    for every further failure, at most the cap."""
    delay = config.restart_backoff_seconds * 2.0 ** max(0, failures - 1)
    return min(config.restart_backoff_max_seconds, delay)


def attempt_disruption(at: StageAt, ctx: WalkContext) -> str | None:
    """Why the Job's attempt ended by a disruption, or None: one of its pods was
    disrupted (still observable), or a disruption was counted in this Job and the stage
    has not trained past it since (the other ranks' failures are its aftermath)."""
    assert at.job is not None
    for pod in ctx.observed.pods_of(at.job):
        why = disruption(pod)
        if why is not None:
            return f"pod {pod_name(pod)}: {why}"
    if ledger_of(at.status).disrupted_job == at.job.uid:
        return "one of its pods was disrupted before the others ended"
    return None


def _preempted_event(at: StageAt, why: str, what: str) -> Event:
    return Event(
        NORMAL,
        Reason.STAGE_PREEMPTED,
        f"stage {at.stage.name!r} was disrupted ({why}); {what}, resuming from the last "
        "checkpoint (not counted against maxRestarts)",
    )


def attempt_preempted(at: StageAt, ctx: WalkContext, why: str) -> StageDecision:
    """The Job ended (failed, or completed without FINAL) because of a disruption: a
    preemption, counted unless it was counted while the Job ran; the Job is deleted and
    recreated at once."""
    job, st = at.job, at.status
    assert job is not None
    ledger = ledger_of(st)
    preemptions = st.preemptions + (0 if ledger.disrupted_job == job.uid else 1)
    ledger = with_counted(ledger, job.uid).model_copy(update={"disrupted_job": None})
    message = f"preemption {preemptions}: {why}; restarting from the last checkpoint"
    return StageDecision(
        st.model_copy(
            update={
                "preemptions": preemptions,
                "completed_without_final": 0,
                "next_attempt_time": None,
                "message": message,
                "ledger": ledger,
            }
        ),
        phase=running_if_should_run(ctx),
        delete=[Delete("Job", job.name)],
        events=[_preempted_event(at, why, "its Job is recreated")],
        restarting=Restart(Reason.PREEMPTED, f"stage {at.stage.name!r}: {message}"),
    )


def attempt_failed(at: StageAt, ctx: WalkContext) -> StageDecision:
    """The Job failed and no disruption explains it: a failure. The Job is deleted and
    recreated after the backoff while the failures stay within maxRestarts; else the
    stage and the run fail."""
    job, stage, st, now = at.job, at.stage, at.status, ctx.observed.now
    assert job is not None
    restarts = max(st.restarts, job.attempt + 1)
    counted = {
        "restarts": restarts,
        "completed_without_final": 0,
        "ledger": with_counted(ledger_of(st), job.uid).model_copy(update={"gang_releases": 0}),
    }
    if restarts > stage.max_restarts:
        return StageDecision(
            st.model_copy(
                update={
                    **counted,
                    "phase": StagePhase.Failed,
                    "next_attempt_time": None,
                    "completion_time": format_time(now),
                    "message": job.failure_message or None,
                }
            ),
            phase=RunPhase.Failed,
            failed=(
                f"stage {stage.name!r} failed {restarts} times, more than "
                f"maxRestarts={stage.max_restarts}: {job.failure_message}"
            ),
            failed_reason=Reason.REACHED_MAX_RESTARTS,
        )
    delay = backoff_seconds(restarts, ctx.config)
    due = format_time(now + timedelta(seconds=delay))
    message = (
        f"failure {restarts}/{stage.max_restarts}: {job.failure_message}; "
        f"attempt {restarts + 1} starts at {due}"
    )
    return StageDecision(
        st.model_copy(update={**counted, "next_attempt_time": due, "message": message}),
        phase=running_if_should_run(ctx),
        delete=[Delete("Job", job.name)],
        events=[
            Event(
                WARNING,
                Reason.STAGE_RESTARTING,
                f"stage {stage.name!r} failed ({job.failure_message}); restart {restarts} of "
                f"{stage.max_restarts} in {delay:.0f}s, resuming from the last checkpoint",
            )
        ],
        restarting=Restart(
            Reason.FAILURE_BACKOFF, f"stage {stage.name!r}: {message} (in {delay:.0f}s)"
        ),
        requeue_after=delay,
    )


def already_counted(at: StageAt, ctx: WalkContext) -> StageDecision:
    """The Job's end was counted by an earlier reconcile whose delete did not happen
    (or is not visible yet): delete it again, count nothing."""
    assert at.job is not None
    return StageDecision(
        at.status, phase=running_if_should_run(ctx), delete=[Delete("Job", at.job.name)]
    )


def stage_failed(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job failed: a preemption when a disruption explains it, else a failure."""
    assert at.job is not None
    if at.job.uid in ledger_of(at.status).counted:
        return already_counted(at, ctx)
    why = attempt_disruption(at, ctx)
    if why is not None:
        return attempt_preempted(at, ctx, why)
    return attempt_failed(at, ctx)


def stage_completed_without_final(at: StageAt, ctx: WalkContext) -> StageDecision:
    """Its Job completed and the store says FINAL is absent: a disruption, if one
    explains it (a trainer that exits 0 on SIGTERM); else the trainer ended without
    finishing, counted, and after ``maxCompletedWithoutFinal`` in a row the stage fails
    instead of looping."""
    job, stage, st = at.job, at.stage, at.status
    assert job is not None
    if job.uid in ledger_of(st).counted:
        return already_counted(at, ctx)
    why = attempt_disruption(at, ctx)
    if why is not None:
        return attempt_preempted(at, ctx, why)
    n, cap = st.completed_without_final + 1, ctx.config.max_completed_without_final
    counted = {"completed_without_final": n, "ledger": with_counted(ledger_of(st), job.uid)}
    what = f"its pods all exited 0 but FINAL is missing ({n} in a row, at most {cap})"
    if n >= cap:
        return StageDecision(
            st.model_copy(
                update={
                    **counted,
                    "phase": StagePhase.Failed,
                    "completion_time": format_time(ctx.observed.now),
                    "message": what,
                }
            ),
            phase=RunPhase.Failed,
            failed=(
                f"stage {stage.name!r}: {what}; the trainer image may not match the "
                "operator (a current trainer exits 0 only after writing FINAL)"
            ),
            failed_reason=Reason.COMPLETED_WITHOUT_FINAL,
        )
    message = f"{what}; recreating its Job to resume from the last checkpoint"
    return StageDecision(
        st.model_copy(update={**counted, "message": message}),
        phase=running_if_should_run(ctx),
        delete=[Delete("Job", job.name)],
        events=[Event(WARNING, Reason.STAGE_INTERRUPTED, f"stage {stage.name!r}: {message}")],
        restarting=Restart(Reason.COMPLETED_WITHOUT_FINAL, f"stage {stage.name!r}: {message}"),
    )


def _recovered(ledger: StageLedger, ctx: WalkContext, job: ObservedJob) -> bool:
    """Whether the Job's gang runs again after its disruption: as many running pods as
    it has nodes, all created after the disrupted pods stopped (so not a rank of the old
    gang, hung in a collective)."""
    live = [p for p in ctx.observed.pods_of(job) if not pod_terminal(p)]
    since = ledger.disrupted_at or ""
    return len(live) >= job.nodes and all(pod_running(p) and pod_created(p) > since for p in live)


def disrupted_in_place(
    at: StageAt, ctx: WalkContext, job: ObservedJob, st: StageStatus
) -> tuple[StageStatus, StageDecision | None]:
    """While the Job lives: its pods that were disrupted, which the Job controller
    replaces (and keeps, terminated, until the Job goes). A disruption counts one
    preemption, however many ranks of the gang it stopped: a disrupted pod is news only
    when it was created after the pods of the last counted disruption stopped
    (``disruptedAt``). Until a new gang runs (``_recovered``) the Job's end is the
    disruption's doing. Returns the status to go on with, and a decision with the
    preemption's event and condition when one was counted now (None otherwise)."""
    ledger = ledger_of(st)
    if ledger.disrupted_job is not None and (
        ledger.disrupted_job != job.uid or _recovered(ledger, ctx, job)
    ):
        ledger = ledger.model_copy(update={"disrupted_job": None})
    since = ledger.disrupted_at or ""
    fresh = [
        (pod, why)
        for pod in ctx.observed.pods_of(job)
        if (why := disruption(pod)) is not None and pod_created(pod) > since
    ]
    if not fresh:
        return st.model_copy(update={"ledger": ledger}) if ledger != st.ledger else st, None
    now = format_time(ctx.observed.now)
    until = max(stopped_at(pod, now) for pod, _ in fresh)
    pod, why = fresh[0]
    st = st.model_copy(
        update={
            "preemptions": st.preemptions + 1,
            "completed_without_final": 0,
            "ledger": ledger.model_copy(update={"disrupted_job": job.uid, "disrupted_at": until}),
        }
    )
    why = f"pod {pod_name(pod)}: {why}"
    message = (
        f"preemption {st.preemptions}: {why}; the Job controller replaces the pod, "
        "resuming from the last checkpoint"
    )
    return st, StageDecision(
        st,
        events=[_preempted_event(at, why, "the Job controller replaces the pod")],
        restarting=Restart(Reason.PREEMPTED, f"stage {at.stage.name!r}: {message}"),
    )
