"""What a stage's decision looks at (``WalkContext``, ``StageAt``) and what it says
(``StageDecision``), shared by the situations of ``stages`` and ``attempts``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain.core.api import RunPhase, Stage, StageStatus, TrainingRunSpec
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.plan.budget import Course
from kubetrain.operator.plan.observed import Observed, ObservedJob, RunRef
from kubetrain.operator.plan.result import Delete, Event
from kubetrain.operator.progress import StageRecords, StoreAnswer


@dataclass(frozen=True)
class WalkContext:
    """What every stage's decision may look at."""

    run: RunRef
    spec: TrainingRunSpec
    course: Course
    observed: Observed
    config: OperatorConfig
    queue: str | None = None  # the Kueue LocalQueue of the run's Jobs (None: none)
    priority_class: str | None = None  # its WorkloadPriorityClass


@dataclass(frozen=True)
class StageAt:
    """The first stage not Succeeded, as the walk finds it."""

    index: int
    stage: Stage
    status: StageStatus
    job: ObservedJob | None
    record: StageRecords | None

    @property
    def final(self) -> StoreAnswer:
        """Whether the stage's FINAL pointer exists; UNKNOWN when its records were not
        read or FINAL was not asked for (never taken for "absent")."""
        if self.record is None or self.record.final is None:
            return StoreAnswer.UNKNOWN
        return self.record.final


@dataclass(frozen=True)
class Restart:
    """A restart under way: condition Restarting True with this reason and message."""

    reason: str  # Reason.FAILURE_BACKOFF, PREEMPTED or COMPLETED_WITHOUT_FINAL
    message: str


@dataclass(frozen=True)
class Queued:
    """A stage waits for admission: condition Queued True with this reason and message."""

    reason: str
    message: str


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
    failed_reason: str | None = None  # the Failed condition's reason (with ``failed``)
    stalled: str | None = None  # why the stage counts as stalled
    trains: bool = False  # every pod of the stage's gang runs
    restarting: Restart | None = None
    requeue_after: float | None = None  # seconds until something is due (a backoff)
    conflict: str | None = None  # a child's name is taken by an object not the run's
    queued: Queued | None = None  # the stage's Job waits for admission by Kueue


def running_if_should_run(ctx: WalkContext) -> RunPhase | None:
    return RunPhase.Running if ctx.course.should_run else None
