"""Gang safety without Kueue: a multi-node stage runs only when all its pods run, and
pods scheduled while the others cannot be hold GPUs that nobody trains on (and that
another gang may be waiting for: two half-scheduled gangs can block each other for
ever). So a Job outside a Kueue queue whose pods are not all scheduled within
``gangScheduleTimeoutSeconds`` of its creation (or of the disruption that broke its
gang) is released: deleted, its GPUs freed, and created again after a backoff that
grows with each release in a row. A release is not a failure (``restarts`` is
unchanged), and the GPU time of a gang that never ran whole is not billed
(``progress.gang_start``).

Jobs in a Kueue queue are left to Kueue, which admits all pods of a Job or none.
"""

from __future__ import annotations

from datetime import timedelta

from kubetrain.core.api import StageStatus
from kubetrain.core.conditions import Reason
from kubetrain.operator.plan.attempts import backoff_seconds, ledger_of, with_counted
from kubetrain.operator.plan.context import (
    Restart,
    StageAt,
    StageDecision,
    WalkContext,
    running_if_should_run,
)
from kubetrain.operator.plan.observed import ObservedJob, pod_terminal
from kubetrain.operator.plan.result import WARNING, Delete, Event
from kubetrain.operator.progress import format_time, parse_time


def scheduled_pods(ctx: WalkContext, job: ObservedJob) -> int:
    """The Job's pods bound to a node that have not stopped."""
    return sum(
        1
        for p in ctx.observed.pods_of(job)
        if (p.get("spec") or {}).get("nodeName") and not pod_terminal(p)
    )


def gang_timed_out(
    at: StageAt, ctx: WalkContext, job: ObservedJob, st: StageStatus
) -> StageDecision | None:
    """The release of the Job when its gang has waited too long to be scheduled; None
    while it may wait on (or it is not a gang the operator schedules)."""
    timeout = ctx.config.gang_schedule_timeout_seconds
    if (
        timeout <= 0
        or job.nodes <= 1
        or job.queue
        or job.suspended
        or ctx.observed.workload_of(job) is not None
    ):
        return None
    scheduled = scheduled_pods(ctx, job)
    if scheduled >= job.nodes:
        return None
    ledger = ledger_of(st)
    broken = ledger.disrupted_at if ledger.disrupted_job == job.uid else None
    since = parse_time(max(job.created, broken or ""))
    now = ctx.observed.now
    if since is None or (now - since).total_seconds() <= timeout:
        return None
    waited = (now - since).total_seconds()
    releases = ledger.gang_releases + 1
    delay = backoff_seconds(releases, ctx.config)
    due = format_time(now + timedelta(seconds=delay))
    why = (
        f"only {scheduled} of {job.nodes} pods were scheduled in {waited:.0f}s "
        f"(gangScheduleTimeoutSeconds={timeout:g})"
    )
    message = (
        f"gang released: {why}; its Job was deleted to free the GPUs, attempt at {due} "
        f"(release {releases} in a row, not counted as a failure)"
    )
    ledger = with_counted(ledger, job.uid).model_copy(
        update={"gang_releases": releases, "disrupted_job": None}
    )
    return StageDecision(
        st.model_copy(update={"next_attempt_time": due, "message": message, "ledger": ledger}),
        phase=running_if_should_run(ctx),
        delete=[Delete("Job", job.name)],
        events=[
            Event(
                WARNING,
                Reason.GANG_RELEASED,
                f"stage {at.stage.name!r}: {why}; Job deleted, next attempt in {delay:.0f}s",
            )
        ],
        restarting=Restart(Reason.GANG_TIMEOUT, f"stage {at.stage.name!r}: {message}"),
        requeue_after=delay,
    )
