"""Step 6: the run's phase after the walk, and the conditions that follow from it."""

from __future__ import annotations

from dataclasses import dataclass

from kubetrain.core.api import RunPhase, StagePhase, StageStatus, TrainingRunStatus
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator.plan.budget import Course
from kubetrain.operator.plan.conditions import Conditions, condition_of
from kubetrain.operator.plan.context import Queued, Restart
from kubetrain.operator.plan.queueing import queued_condition
from kubetrain.operator.plan.result import NORMAL, WARNING, Event
from kubetrain.operator.plan.stages import Walk

FINISHED = (RunPhase.Succeeded, RunPhase.Failed)


@dataclass(frozen=True)
class Outcome:
    """The run's phase after this reconcile, and why it fails (when it just did)."""

    phase: RunPhase
    failed: str | None
    reason: str | None = None  # the Failed condition's reason (ReachedMaxRestarts if None)


def run_outcome(walk: Walk, course: Course) -> Outcome:
    """Step 6, the run's phase: the walk's, except that a budget with action Fail fails
    the run and a run that must not train is Suspended (unless it has finished)."""
    if course.fail_on_budget and not course.terminal:
        return Outcome(RunPhase.Failed, "budget exceeded: " + "; ".join(course.budget.exceeded))
    if walk.phase not in FINISHED and not course.should_run:
        return Outcome(RunPhase.Suspended, walk.failed, walk.failed_reason)
    return Outcome(walk.phase, walk.failed, walk.failed_reason)


def failed_condition(outcome: Outcome, course: Course, conds: Conditions) -> list[Event]:
    """Condition Failed (and a Warning) when the run fails in this reconcile."""
    if not outcome.failed or course.terminal:
        return []
    reason = outcome.reason or Reason.REACHED_MAX_RESTARTS
    if course.fail_on_budget:
        reason = Reason.BUDGET_EXCEEDED
    conds.set(ConditionType.FAILED, True, reason, outcome.failed)
    return [Event(WARNING, reason, outcome.failed)]


def succeeded_condition(
    phase: RunPhase, stages: list[StageStatus], old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition Succeeded: True (and an event) when the last stage succeeds, False
    with the count of succeeded stages before."""
    n = len(stages)
    if phase == RunPhase.Succeeded and old.phase != RunPhase.Succeeded:
        message = f"all {n} stages succeeded"
        conds.set(ConditionType.SUCCEEDED, True, Reason.ALL_STAGES_SUCCEEDED, message)
        return [Event(NORMAL, Reason.ALL_STAGES_SUCCEEDED, message)]
    succeeded = sum(1 for s in stages if s.phase == StagePhase.Succeeded)
    if succeeded and phase != RunPhase.Succeeded:
        conds.set(
            ConditionType.SUCCEEDED,
            False,
            Reason.STAGE_SUCCEEDED,
            f"{succeeded}/{n} stages succeeded",
        )
    return []


def running_condition(
    phase: RunPhase,
    current: str | None,
    course: Course,
    conds: Conditions,
    restarting: Restart | None = None,
    queued: Queued | None = None,
) -> None:
    """Condition Running: True while a stage trains, else False with the reason why
    not (after condition Failed is set, whose reason it repeats)."""
    type_ = ConditionType.RUNNING
    if phase == RunPhase.Running:
        conds.set(type_, True, Reason.RUNNING, f"stage {current!r} is training")
    elif phase == RunPhase.Pending and restarting is not None:
        conds.set(type_, False, restarting.reason, restarting.message)
    elif phase == RunPhase.Pending and queued is not None:
        conds.set(type_, False, Reason.QUEUED, queued.message)
    elif phase == RunPhase.Pending:
        conds.set(type_, False, Reason.PENDING, f"stage {current!r} is waiting for its pods")
    elif phase == RunPhase.Succeeded:
        conds.set(type_, False, Reason.ALL_STAGES_SUCCEEDED, "nothing left to train")
    elif phase == RunPhase.Failed:
        failed = conds.get(ConditionType.FAILED)
        conds.set(type_, False, failed.reason if failed else Reason.FAILED, "the run failed")
    else:
        reason = Reason.BUDGET_EXCEEDED if course.suspend_on_budget else Reason.SUSPENDED
        conds.set(type_, False, reason, "stopped")


def suspended_condition(
    phase: RunPhase, course: Course, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition Suspended (and an event when the run becomes Suspended), naming the
    budget or spec.suspend; Resumed once it is not suspended any more."""
    if phase == RunPhase.Suspended:
        if course.suspend_on_budget:
            reason = Reason.BUDGET_EXCEEDED
            message = "; ".join(course.budget.exceeded) + " (raise the budget to continue)"
        else:
            reason, message = Reason.SUSPENDED, "spec.suspend is true"
        conds.set(ConditionType.SUSPENDED, True, reason, message)
        if old.phase != RunPhase.Suspended:
            return [Event(NORMAL, Reason.SUSPENDED, f"run suspended: {message}")]
    elif conds.get(ConditionType.SUSPENDED) is not None:
        conds.set(ConditionType.SUSPENDED, False, Reason.RESUMED, "the run is not suspended")
    return []


def stalled_condition(
    stalled: str | None, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition Stalled (and a Warning when it becomes True) while the running stage
    makes no progress; Progressing once it does or stops running."""
    if stalled:
        before = condition_of(old.conditions, ConditionType.STALLED)
        conds.set(ConditionType.STALLED, True, Reason.PROGRESS_STALLED, stalled)
        if before is None or before.status != "True":
            return [Event(WARNING, Reason.PROGRESS_STALLED, stalled)]
    elif conds.get(ConditionType.STALLED) is not None:
        conds.set(ConditionType.STALLED, False, Reason.PROGRESSING, "the trainer reports progress")
    return []


def restarting_condition(phase: RunPhase, walk: Walk, conds: Conditions) -> None:
    """Condition Restarting: True while a stage restarts after a failure (during the
    backoff), a disruption or a completion without FINAL, naming which and when; it
    stays True while the new attempt's pods start, and turns False once the stage
    trains again or the run stops."""
    type_ = ConditionType.RESTARTING
    if walk.restarting is not None:
        conds.set(type_, True, walk.restarting.reason, walk.restarting.message)
        return
    current = conds.get(type_)
    if current is None or current.status != "True":
        return
    if walk.trains:
        conds.set(type_, False, Reason.RESTARTED, f"stage {walk.current!r} trains again")
    elif phase not in (RunPhase.Pending, RunPhase.Running):
        conds.set(type_, False, Reason.NO_RESTART_PENDING, f"the run is {phase.value}")


def conflict_condition(
    conflict: str | None, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition ChildConflict (and a Warning naming the object, once per message)
    while a name the run needs is taken by an object that is not the run's; cleared
    once it is gone."""
    type_ = ConditionType.CHILD_CONFLICT
    if conflict:
        before = condition_of(old.conditions, type_)
        conds.set(type_, True, Reason.NOT_OWNED, conflict)
        if before is None or before.status != "True" or before.message != conflict:
            return [Event(WARNING, Reason.NOT_OWNED, conflict)]
    elif (current := conds.get(type_)) is not None and current.status == "True":
        conds.set(type_, False, Reason.CHILDREN_OWNED, "every child is this run's own")
    return []


def outcome_conditions(
    outcome: Outcome, walk: Walk, course: Course, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Step 6, the conditions that follow from the run's phase, and their events."""
    events = failed_condition(outcome, course, conds)
    events += succeeded_condition(outcome.phase, walk.stages, old, conds)
    running_condition(
        outcome.phase, walk.current, course, conds, walk.restarting, queued=walk.queued
    )
    restarting_condition(outcome.phase, walk, conds)
    events += suspended_condition(outcome.phase, course, old, conds)
    events += queued_condition(walk.queued, outcome.phase, old, conds)
    events += conflict_condition(walk.conflict, old, conds)
    events += stalled_condition(walk.stalled, old, conds)
    return events
