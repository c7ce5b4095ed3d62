"""``plan``: the steps in order, one function."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubetrain.core import api
from kubetrain.core.api import RunPhase, StagePhase, TrainingRunSpec, TrainingRunStatus
from kubetrain.core.architecture import Architecture
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.plan.budget import Course, budget_condition, check_budget
from kubetrain.operator.plan.conditions import Conditions
from kubetrain.operator.plan.context import WalkContext
from kubetrain.operator.plan.costs import account, estimate_summary, price, stage_statuses, totals
from kubetrain.operator.plan.observed import Observed, RunRef
from kubetrain.operator.plan.outcome import FINISHED, outcome_conditions, run_outcome
from kubetrain.operator.plan.queueing import Queueing
from kubetrain.operator.plan.result import Plan
from kubetrain.operator.plan.spec import (
    applied_spec_json,
    choose_spec,
    created_condition,
    legacy_annotations_to_remove,
    legacy_ledger,
    previous_status,
    spec_conditions,
    stages_to_read,
    storage_condition,
    storage_reachable_condition,
)
from kubetrain.operator.plan.stages import walk_stages
from kubetrain.operator.plan.ttl import expired_children
from kubetrain.operator.progress import StageRecords


class _Draft:
    """The plan being built: the new status, its conditions, what to do."""

    def __init__(self, old: TrainingRunStatus, now: datetime, generation: int | None):
        self.old = old
        self.status = old.model_copy(deep=True)
        self.status.observed_generation = generation
        self.conditions = Conditions(self.status.conditions, now, generation)
        self.out = Plan()

    def finish(self, spec: TrainingRunSpec | None) -> Plan:
        self.status.conditions = self.conditions.items
        new = api.dump(self.status)
        if new != api.dump(self.old):
            self.out.status = new
        self.out.spec = spec
        self.out.previous_status = self.old
        self.out.run_status = self.status
        self.out.read_next = stages_to_read(spec, self.status.stages)
        return self.out


def plan(
    run: dict[str, Any],
    observed_jobs: list[dict[str, Any]],
    observed_pods: list[dict[str, Any]],
    records: Mapping[str, StageRecords],
    now: datetime,
    config: OperatorConfig,
    observed_services: list[dict[str, Any]] | None = None,
    architecture: Architecture | None = None,
    observed_workloads: list[dict[str, Any]] | None = None,
) -> Plan:
    """Decide what to do for ``run`` given what exists (``architecture``: the config.json
    of a Hugging Face ``model.from`` once it could be read); see the package docstring
    for the steps."""
    meta = run.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Plan()  # ownerReferences: the garbage collector removes the children
    observed = Observed.of(
        observed_jobs,
        observed_pods,
        records,
        observed_services,
        now,
        meta.get("uid", ""),
        observed_workloads,
    )
    old = previous_status(run)
    draft = _Draft(old, now, meta.get("generation"))
    out, conds, status = draft.out, draft.conditions, draft.status

    choice = choose_spec(run, observed.jobs)
    spec = choice.spec
    if spec is None:
        status.phase = RunPhase.Failed
        conds.set(ConditionType.FAILED, True, Reason.INVALID_SPEC, "; ".join(choice.errors))
        return draft.finish(None)
    out.events += spec_conditions(choice, old, conds)
    status.applied_spec = applied_spec_json(spec)
    out.annotations.update(legacy_annotations_to_remove(run))
    costing = price(spec, config, architecture)
    # Once the model's config.json is read, the estimate counts its real parameters.
    if status.estimate is None or (
        architecture is not None and status.estimate.parameters != costing.estimate.parameters
    ):
        status.estimate = estimate_summary(costing.estimate)
    out.events += created_condition(spec, status.estimate, conds)
    stages = stage_statuses(spec, old.stages)
    if not storage_condition(spec, conds, config):
        status.stages, status.phase = stages, RunPhase.Pending
        return draft.finish(spec)
    out.events += storage_reachable_condition(observed.records, old, conds)

    stages = account(spec, stages, observed, costing.pricing, config.gpu_prices, legacy_ledger(run))
    budget = check_budget(spec, stages, totals(stages), costing)
    out.events += budget_condition(budget, spec, old, conds)
    course = Course(old.phase in FINISHED, spec.suspend, budget, spec.budget.action)

    queueing = Queueing.of(meta, spec)
    ctx = WalkContext(
        RunRef.of(meta),
        spec,
        course,
        observed,
        config,
        queue=queueing.queue,
        priority_class=queueing.priority_class,
    )
    walk = walk_stages(ctx, stages, old)
    out.create, out.delete, out.events = walk.create, walk.delete, out.events + walk.events
    outcome = run_outcome(walk, course)
    out.events += outcome_conditions(outcome, walk, course, old, conds)
    expired = expired_children(spec, outcome.phase, conds, observed)
    if expired is not None:
        out.create, out.delete = [], expired
    if outcome.phase not in FINISHED:
        out.requeue_after = walk.requeue_after

    status.phase, status.current_stage, status.stages = outcome.phase, walk.current, walk.stages
    status.totals = totals(walk.stages)
    succeeded = sum(1 for s in walk.stages if s.phase == StagePhase.Succeeded)
    done = succeeded if outcome.phase != RunPhase.Succeeded else len(walk.stages)
    status.progress = f"{done}/{len(walk.stages)} {status.totals.progress * 100:.0f}%"
    out.budget_used = budget.used
    return draft.finish(spec)
