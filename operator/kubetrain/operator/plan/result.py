"""What a plan says to do: children to create and delete, the status to write,
annotations, events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain.core.api import TrainingRunSpec, TrainingRunStatus

FOREGROUND = "Foreground"
NORMAL, WARNING = "Normal", "Warning"


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str  # a kubetrain.core.conditions.Reason
    message: str


@dataclass(frozen=True)
class Delete:
    kind: str  # Job | Service
    name: str
    propagation: str = FOREGROUND


@dataclass
class Plan:
    """What to do; handlers apply it in this order: annotations, status, deletes,
    creates, events (status first, so a crash after a delete cannot lose a restart)."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    status: dict[str, Any] | None = None  # the full new status (wire form), None: unchanged
    annotations: dict[str, str | None] = field(default_factory=dict)  # None: remove it
    events: list[Event] = field(default_factory=list)
    budget_used: dict[str, float] = field(default_factory=dict)  # kind -> used / limit
    # The spec acted on (the new spec with its started stages frozen); None when the
    # run is being deleted or no valid spec was ever applied.
    spec: TrainingRunSpec | None = None
    # The run's status before and after this plan (after == before when ``status`` is
    # None); None when the run is being deleted.
    previous_status: TrainingRunStatus | None = None
    run_status: TrainingRunStatus | None = None
    # The stages whose records the next reconcile reads (``records_to_read`` gives the
    # same once this plan is applied).
    read_next: list[str] = field(default_factory=list)
    # Seconds until something is due that no event announces (the end of a restart's
    # backoff): reconcile the run again by then. None: nothing is due.
    requeue_after: float | None = None
