"""The operator's decisions, as one pure function.

``plan(run, jobs, pods, records, now, config)`` looks at a TrainingRun and what exists
(its Jobs, Pods and Services, the trainer's progress records and FINAL pointers) and
returns what to do: children to create and delete, the status to write, annotations to
remove, events to emit, and when to look again (``requeue_after``). It is level-based:
it never depends on which event woke the operator up, so a timer, a Job event, a
restart of the operator or a retry after a conflict all lead to the same result.
Handlers (``kubetrain.operator.handlers``) only gather the inputs and apply it.

``plan`` is a pipeline of named steps, each a function of its own, one module per
concern (``spec``, ``costs``, ``budget``, ``stages`` and ``attempts``, ``outcome``,
``ttl``; ``pipeline`` runs them in order; ``observed``, ``context`` and ``result`` are
what they look at and what they say):

1. ``choose_spec``: which spec applies (stages that started are frozen). The handlers
   use it too, through ``records_to_read``, so they read the records of the stages
   this spec names.
2. ``spec_conditions``, ``created_condition``, ``storage_condition``,
   ``storage_reachable_condition``: what the spec choice and the store mean for the
   status.
3. ``price`` (once per reconcile: pricing and the estimate), ``account`` (records, the
   GPU-seconds ledger, costs -> stage statuses) and ``totals``.
4. ``check_budget`` and ``budget_condition``.
5. ``walk_stages``: the stages in order; the first one not Succeeded is in one
   situation (``decide_stage``) that says what to do.
6. ``run_outcome`` and ``outcome_conditions``: the run's phase and conditions.
7. ``expired_children``: ``ttlSecondsAfterFinished``.

Decisions, in words:

- Stages run strictly in order. A stage has succeeded when its Job completed *and* the
  store says its FINAL pointer exists. The store has three answers: present, absent,
  unknown (unreachable); unknown never deletes, re-runs or counts anything.
- How an attempt ended decides what it counts as (``attempts``): a disruption (the pod
  condition DisruptionTarget, the trainer's exit code 75 after checkpointing on SIGTERM)
  is a preemption, restarted at once and never counted against ``maxRestarts``; any
  other failure is a restart, after an exponential backoff, and beyond ``maxRestarts``
  the run fails with ``ReachedMaxRestarts``; pods that all exited 0 without FINAL count
  towards ``maxCompletedWithoutFinal``.
- Restarts are the operator's: Jobs have ``backoffLimit: 0`` so that one failed rank
  stops the whole gang, and a podFailurePolicy that ignores disruptions, whose pods the
  Job controller replaces. A failed Job created at attempt N means N + 1 failures.
- Stopping (``spec.suspend``, a budget hit, a failed run) deletes the active Job in the
  foreground: its pods get SIGTERM and ``terminationGracePeriodSeconds`` to checkpoint,
  and no new Job of the same name is created until they are gone, nor while pods of an
  earlier Job (one deleted by hand) still run. Resuming creates the Job again; the
  trainer continues from LATEST.
- Children are the run's when the run controls them (ownerReferences); an object with a
  child's name that is not is reported (condition ``ChildConflict``), never adopted.
- Stages that have started are frozen: a spec change to one of them (or to ``model``)
  is refused (condition ``SpecChangeRefused``, a Warning event) and the operator goes on
  with the spec those stages started with (``status.appliedSpec``, which only the
  operator writes); changes to stages that have not started apply.
"""

from __future__ import annotations

from kubetrain.operator.plan.attempts import backoff_seconds
from kubetrain.operator.plan.budget import BudgetCheck, Course, budget_condition, check_budget
from kubetrain.operator.plan.conditions import Conditions, condition_of, set_condition
from kubetrain.operator.plan.context import Restart, StageAt, StageDecision, WalkContext
from kubetrain.operator.plan.costs import (
    Costing,
    account,
    estimate_summary,
    price,
    stage_statuses,
    totals,
)
from kubetrain.operator.plan.observed import (
    Foreign,
    Observed,
    ObservedJob,
    RunRef,
    disruption,
    owned_by,
    pods_of,
)
from kubetrain.operator.plan.outcome import (
    FINISHED,
    Outcome,
    conflict_condition,
    failed_condition,
    outcome_conditions,
    restarting_condition,
    run_outcome,
    running_condition,
    stalled_condition,
    succeeded_condition,
    suspended_condition,
)
from kubetrain.operator.plan.pipeline import plan
from kubetrain.operator.plan.result import FOREGROUND, NORMAL, WARNING, Delete, Event, Plan
from kubetrain.operator.plan.spec import (
    ANNOTATION_APPLIED_SPEC,
    ANNOTATION_LEDGER,
    RecordsToRead,
    SpecChoice,
    applied_spec_json,
    applied_spec_of,
    choose_spec,
    created_condition,
    effective_spec,
    previous_status,
    records_to_read,
    spec_conditions,
    stages_to_read,
    storage_condition,
    storage_reachable_condition,
)
from kubetrain.operator.plan.stages import Walk, decide_stage, walk_stages
from kubetrain.operator.plan.ttl import expired_children

__all__ = [
    "ANNOTATION_APPLIED_SPEC",
    "ANNOTATION_LEDGER",
    "FINISHED",
    "FOREGROUND",
    "NORMAL",
    "WARNING",
    "BudgetCheck",
    "Conditions",
    "Costing",
    "Course",
    "Delete",
    "Event",
    "Foreign",
    "Observed",
    "ObservedJob",
    "Outcome",
    "Plan",
    "RecordsToRead",
    "Restart",
    "RunRef",
    "SpecChoice",
    "StageAt",
    "StageDecision",
    "Walk",
    "WalkContext",
    "account",
    "applied_spec_json",
    "applied_spec_of",
    "backoff_seconds",
    "budget_condition",
    "check_budget",
    "choose_spec",
    "condition_of",
    "conflict_condition",
    "created_condition",
    "decide_stage",
    "disruption",
    "effective_spec",
    "estimate_summary",
    "expired_children",
    "failed_condition",
    "outcome_conditions",
    "owned_by",
    "plan",
    "pods_of",
    "previous_status",
    "price",
    "records_to_read",
    "restarting_condition",
    "run_outcome",
    "running_condition",
    "set_condition",
    "spec_conditions",
    "stage_statuses",
    "stages_to_read",
    "stalled_condition",
    "storage_condition",
    "storage_reachable_condition",
    "succeeded_condition",
    "suspended_condition",
    "totals",
    "walk_stages",
]
