"""Step 7: ``ttlSecondsAfterFinished``."""

from __future__ import annotations

from kubetrain.core.api import RunPhase, TrainingRunSpec
from kubetrain.core.conditions import ConditionType
from kubetrain.operator.plan.conditions import Conditions
from kubetrain.operator.plan.observed import Observed
from kubetrain.operator.plan.outcome import FINISHED
from kubetrain.operator.plan.result import Delete
from kubetrain.operator.progress import parse_time


def expired_children(
    spec: TrainingRunSpec, phase: RunPhase, conds: Conditions, observed: Observed
) -> list[Delete] | None:
    """Step 7, ``ttlSecondsAfterFinished``: once that long has passed since the run
    finished, every child is deleted (the run and the store stay); None before."""
    ttl = spec.ttl_seconds_after_finished
    if phase not in FINISHED or ttl is None:
        return None
    finished = conds.get(
        ConditionType.SUCCEEDED if phase == RunPhase.Succeeded else ConditionType.FAILED
    )
    at = parse_time(finished.last_transition_time) if finished else None
    if at is None or (observed.now - at).total_seconds() < ttl:
        return None
    jobs = [Delete("Job", j.name) for j in observed.jobs.values() if not j.deleting]
    return jobs + [Delete("Service", n) for n in observed.services]
