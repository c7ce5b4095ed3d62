"""The operator's decisions, as one pure function.

``plan(run, jobs, pods, records, now, config)`` looks at a TrainingRun and what exists
(its Jobs and Pods, the trainer's progress records and FINAL pointers) and returns what
to do: children to create and delete, the status to write, annotations to keep, events
to emit. It is level-based: it never depends on which event woke the operator up, so a
timer, a Job event, a restart of the operator or a retry after a conflict all lead to
the same result. Handlers (``kubetrain.operator.handlers``) only gather the inputs and apply it.

Decisions, in words:

- Stages run strictly in order. A stage has succeeded when its Job completed *and* its
  FINAL pointer exists; a Job that completed without FINAL was interrupted (the trainer
  exits 0 after checkpointing on SIGTERM), so it is recreated and resumes from LATEST.
- Restarts are the operator's: Jobs have ``backoffLimit: 0`` so that one failed rank
  stops the whole gang. A failed Job created at attempt N means N + 1 restarts; while
  that is at most ``maxRestarts`` the Job is deleted and recreated at attempt N + 1,
  otherwise the run fails with reason ``ReachedMaxRestarts``.
- Stopping (``spec.suspend``, a budget hit, a failed run) deletes the active Job in the
  foreground: its pods get SIGTERM and ``terminationGracePeriodSeconds`` to checkpoint,
  and no new Job of the same name is created until they are gone. Resuming creates the
  Job again; the trainer continues from LATEST.
- Stages that have started are frozen: a spec change to one of them (or to ``model``)
  is refused (condition ``SpecChangeRefused``, a Warning event) and the operator goes on
  with the spec those stages started with (kept in the annotation
  ``kubetrain.dev/applied-spec``); changes to stages that have not started apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetrain.core import accounting, api
from kubetrain.core.api import (
    BudgetAction,
    Condition,
    Estimate,
    ManifestError,
    RunPhase,
    StagePhase,
    StageStatus,
    Totals,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.operator import resources
from kubetrain.operator.config import OperatorConfig, effective_pricing
from kubetrain.operator.progress import (
    StageRecords,
    apply_costs,
    apply_record,
    banked_gpu_seconds,
    format_time,
    parse_time,
    pod_gpu_seconds,
    record_updated_at,
)

ANNOTATION_APPLIED_SPEC = "kubetrain.dev/applied-spec"
ANNOTATION_LEDGER = "kubetrain.dev/ledger"

# Condition types, in the order they are listed in status.
COND_CREATED = "Created"
COND_STORAGE = "StorageConfigured"
COND_RUNNING = "Running"
COND_SUSPENDED = "Suspended"
COND_BUDGET = "BudgetExceeded"
COND_SPEC_REFUSED = "SpecChangeRefused"
COND_STALLED = "Stalled"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
CONDITION_ORDER = [
    COND_CREATED,
    COND_STORAGE,
    COND_RUNNING,
    COND_SUSPENDED,
    COND_BUDGET,
    COND_SPEC_REFUSED,
    COND_STALLED,
    COND_SUCCEEDED,
    COND_FAILED,
]

FOREGROUND = "Foreground"


# --------------------------------------------------------------------------- observed


@dataclass(frozen=True)
class ObservedJob:
    """The parts of a stage's Job that decisions depend on."""

    name: str
    stage: str
    uid: str
    attempt: int
    active: int
    failed: int
    complete: bool
    failed_condition: bool
    failure_message: str
    deleting: bool
    completion_time: str | None

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> ObservedJob:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        conds = {
            c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
        }
        # FailureTarget comes first (pods still terminating), Failed when they are gone;
        # either means this attempt is over.
        failure = conds.get("Failed") or conds.get("FailureTarget")
        try:
            attempt = int((meta.get("annotations") or {}).get(resources.ANNOTATION_ATTEMPT, 0))
        except ValueError:
            attempt = 0
        return cls(
            name=meta.get("name", ""),
            stage=(meta.get("labels") or {}).get(resources.LABEL_STAGE, ""),
            uid=meta.get("uid", ""),
            attempt=attempt,
            active=int(status.get("active") or 0),
            failed=int(status.get("failed") or 0),
            complete="Complete" in conds or "SuccessCriteriaMet" in conds,
            failed_condition=failure is not None,
            failure_message=(failure or {}).get("message") or (failure or {}).get("reason", ""),
            deleting=bool(meta.get("deletionTimestamp")),
            completion_time=status.get("completionTime"),
        )


def pods_of(pods: list[dict[str, Any]], job_uid: str) -> list[dict[str, Any]]:
    """The pods the Job ``job_uid`` owns."""
    return [
        p
        for p in pods
        if any(
            ref.get("uid") == job_uid
            for ref in (p.get("metadata") or {}).get("ownerReferences") or []
        )
    ]


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
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
    annotations: dict[str, str] = field(default_factory=dict)  # to set on the run
    events: list[Event] = field(default_factory=list)
    budget_used: dict[str, float] = field(default_factory=dict)  # kind -> used / limit


# --------------------------------------------------------------------------- helpers


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Conditions with ``type_`` set; lastTransitionTime changes only with the status."""
    previous = next((c for c in conditions if c.type == type_), None)
    when = (
        previous.last_transition_time
        if previous is not None and previous.status == status
        else format_time(now)
    )
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=when,
        observed_generation=generation,
    )
    rest = [c for c in conditions if c.type != type_]
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted([*rest, new], key=lambda c: order.get(c.type, len(order)))


def _condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def _changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def effective_spec(
    new: TrainingRunSpec | None,
    new_errors: list[str],
    applied: TrainingRunSpec | None,
    started: int,
) -> tuple[TrainingRunSpec | None, list[str]]:
    """The spec to act on, and why parts of ``new`` were refused (empty: all applied).

    The first ``started`` stages (and the model) are frozen to ``applied``; the rest and
    every run-level field (budget, pricing, suspend, ttl, image) come from ``new``.
    """
    if applied is None or started == 0:
        return (new, []) if new is not None else (applied, new_errors)
    if new is None:
        return applied, [f"the new spec is invalid: {'; '.join(new_errors)}"]
    refused: list[str] = []
    if new.model != applied.model:
        fields = _changed_fields(api.dump(applied.model), api.dump(new.model))
        refused.append(
            f"spec.model ({', '.join(fields)}) cannot change after stage "
            f"{applied.stages[0].name!r} started"
        )
    for i, old_stage in enumerate(applied.stages[:started]):
        if i >= len(new.stages):
            refused.append(f"spec.stages[{i}] ({old_stage.name!r}) was removed after it started")
        elif new.stages[i] != old_stage:
            fields = _changed_fields(api.dump(old_stage), api.dump(new.stages[i]))
            refused.append(
                f"spec.stages[{i}] ({old_stage.name!r}) changed after it started "
                f"({', '.join(fields)})"
            )
    if not refused:
        return new, []
    merged = api.dump(new)
    merged["model"] = api.dump(applied.model)
    merged["stages"] = [api.dump(s) for s in applied.stages[:started]] + [
        api.dump(s) for s in new.stages[started:]
    ]
    try:
        return TrainingRunSpec.model_validate(merged), refused
    except ValidationError:
        # The future stages only make sense with the refused change: keep the stages
        # that applied before, take the run-level fields of the new spec.
        keep = api.dump(applied)
        for key in ("budget", "pricing", "suspend", "ttlSecondsAfterFinished", "image"):
            keep.pop(key, None)
            if key in merged:
                keep[key] = merged[key]
        return TrainingRunSpec.model_validate(keep), refused


def _parse_applied(annotations: dict[str, str]) -> TrainingRunSpec | None:
    raw = annotations.get(ANNOTATION_APPLIED_SPEC)
    if not raw:
        return None
    try:
        return TrainingRunSpec.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


def _parse_ledger(annotations: dict[str, str]) -> dict[str, Any]:
    try:
        ledger = json.loads(annotations.get(ANNOTATION_LEDGER) or "{}")
    except ValueError:
        return {}
    return ledger if isinstance(ledger, dict) else {}


def _estimate(spec: TrainingRunSpec, config: OperatorConfig) -> Estimate:
    pricing = effective_pricing(spec.pricing, config)
    est = accounting.estimate_run(
        spec.model_copy(update={"pricing": pricing}), config.mfu, config.gpu_prices
    )
    return Estimate(
        parameters=est.parameters,
        flops=est.flops,
        gpu_hours=round(est.gpu_hours, 6),
        cost_usd=round(est.cost_usd, 6),
        energy_kwh=round(est.energy_kwh, 6),
        co2_grams=round(est.co2_grams, 3),
    )


@dataclass(frozen=True)
class BudgetCheck:
    exceeded: list[str]  # one message per limit hit
    used: dict[str, float]  # kind -> used / limit (accrued), for the metrics


def check_budget(
    spec: TrainingRunSpec, stages: list[StageStatus], totals: Totals, config: OperatorConfig
) -> BudgetCheck:
    """Which limits of ``spec.budget`` the run has reached (or, with ``projected``, will
    reach). Energy is facility energy (IT energy × PUE), as in the estimate."""
    budget = spec.budget
    pricing = effective_pricing(spec.pricing, config)
    est = accounting.estimate_run(
        spec.model_copy(update={"pricing": pricing}), config.mfu, config.gpu_prices
    )
    pue = pricing.pue
    used = {
        "cost": totals.cost_usd,
        "gpuHours": totals.gpu_seconds / 3600.0,
        "energy": totals.energy_joules / accounting.JOULES_PER_KWH * pue,
    }
    # Projection: a stage under way extrapolates what it spent by its progress; a stage
    # not started yet counts its up-front estimate.
    projected = {"cost": 0.0, "gpuHours": 0.0, "energy": 0.0}
    for st, stage_est in zip(stages, est.stages, strict=False):
        if st.phase == StagePhase.Succeeded or st.progress >= 1.0:
            scale = 1.0
        elif st.progress > 0:
            scale = 1.0 / st.progress
        else:
            scale = 0.0
        if scale:
            projected["cost"] += st.cost_usd * scale
            projected["gpuHours"] += st.gpu_seconds / 3600.0 * scale
            projected["energy"] += st.energy_joules / accounting.JOULES_PER_KWH * pue * scale
        else:
            projected["cost"] += st.cost_usd + stage_est.cost_usd
            projected["gpuHours"] += st.gpu_seconds / 3600.0 + (
                stage_est.gpu_hours if stage_est.gpus else 0.0
            )
            projected["energy"] += stage_est.energy_kwh
    limits = {
        "cost": (budget.max_cost_usd, "costUSD", "budget.maxCostUSD", "USD"),
        "gpuHours": (budget.max_gpu_hours, "GPU-hours", "budget.maxGPUHours", "h"),
        "energy": (budget.max_energy_kwh, "energy", "budget.maxEnergyKWh", "kWh"),
    }
    exceeded: list[str] = []
    ratios: dict[str, float] = {}
    for kind, (limit, what, fieldname, unit) in limits.items():
        if limit is None:
            continue
        ratios[kind] = used[kind] / limit
        if used[kind] >= limit:
            exceeded.append(f"{what} {used[kind]:.4g} {unit} reached {fieldname}={limit:g}")
        elif budget.projected and projected[kind] > limit:
            exceeded.append(
                f"projected {what} {projected[kind]:.4g} {unit} exceeds {fieldname}={limit:g}"
            )
    return BudgetCheck(exceeded, ratios)


# --------------------------------------------------------------------------- plan


def plan(
    run: dict[str, Any],
    observed_jobs: list[dict[str, Any]],
    observed_pods: list[dict[str, Any]],
    records: dict[str, StageRecords],
    now: datetime,
    config: OperatorConfig,
    observed_services: list[str] | None = None,
) -> Plan:
    """Decide what to do for ``run`` given what exists (``observed_services``: names of
    its Services); see the module docstring."""
    meta = run.get("metadata") or {}
    name, namespace, uid = meta["name"], meta.get("namespace", "default"), meta.get("uid", "")
    generation = meta.get("generation")
    annotations = meta.get("annotations") or {}
    old = TrainingRunStatus.model_validate(run.get("status") or {})
    out = Plan()
    if meta.get("deletionTimestamp"):
        return out  # ownerReferences: the garbage collector removes the children

    status = old.model_copy(deep=True)
    status.observed_generation = generation
    conds = list(status.conditions)

    def cond(type_: str, value: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(
            conds, type_, "True" if value else "False", reason, message, now, generation
        )

    def finish() -> Plan:
        status.conditions = conds
        new = api.dump(status)
        if new != api.dump(old):
            out.status = new
        return out

    # ---- which spec to act on
    try:
        new_spec: TrainingRunSpec | None = api.parse_spec(run.get("spec") or {})
        errors: list[str] = []
    except ManifestError as exc:
        new_spec, errors = None, exc.errors
    applied = _parse_applied(annotations)
    jobs = {j.stage: j for j in map(ObservedJob.from_k8s, observed_jobs)}
    started = sum(1 for s in old.stages if s.phase != StagePhase.Pending)
    if applied is not None:
        started = max([started] + [i + 1 for i, s in enumerate(applied.stages) if s.name in jobs])
    spec, refused = effective_spec(new_spec, errors, applied, started)
    if spec is None:
        status.phase = RunPhase.Failed
        cond(COND_FAILED, True, "InvalidSpec", "; ".join(errors))
        return finish()
    refused_before = _condition(old.conditions, COND_SPEC_REFUSED)
    if refused:
        message = "; ".join(refused) + " — not applied (create a new TrainingRun instead)"
        if refused_before is None or refused_before.message != message:
            out.events.append(Event("Warning", COND_SPEC_REFUSED, message))
        cond(COND_SPEC_REFUSED, True, COND_SPEC_REFUSED, message)
    elif refused_before is not None and refused_before.status == "True":
        cond(COND_SPEC_REFUSED, False, "SpecApplied", "the current spec is applied")
    applied_json = json.dumps(api.dump(spec), sort_keys=True, separators=(",", ":"))
    if annotations.get(ANNOTATION_APPLIED_SPEC) != applied_json:
        out.annotations[ANNOTATION_APPLIED_SPEC] = applied_json

    # ---- created: estimate once
    if status.estimate is None:
        status.estimate = _estimate(spec, config)
    if _condition(conds, COND_CREATED) is None:
        est = status.estimate
        cond(
            COND_CREATED,
            True,
            "Created",
            f"{len(spec.stages)} stages; estimate {est.gpu_hours:.3g} GPU-hours, "
            f"${est.cost_usd:.2f}, {est.energy_kwh:.3g} kWh",
        )
        out.events.append(
            Event(
                "Normal",
                "Created",
                f"TrainingRun accepted: {' -> '.join(s.name for s in spec.stages)}",
            )
        )

    # ---- stage list follows the (effective) spec
    by_name = {s.name: s for s in old.stages}
    stages = [by_name.get(s.name, StageStatus(name=s.name)) for s in spec.stages]

    if spec.storage.s3 is None:
        status.stages = stages
        status.phase = RunPhase.Pending
        cond(
            COND_STORAGE,
            False,
            "MissingS3Storage",
            "spec.storage.s3 is required on a cluster: set storage.s3.bucket (and "
            "endpoint and credentialsSecret for an S3-compatible store)",
        )
        return finish()
    if _condition(conds, COND_STORAGE) is not None:
        cond(COND_STORAGE, True, "S3Configured", f"checkpoints in {spec.storage.s3.uri()}")

    # ---- progress, GPU time, cost of every stage we have news of
    pricing = effective_pricing(spec.pricing, config)
    ledger = _parse_ledger(annotations)
    new_ledger = dict(ledger)
    for i, stage in enumerate(spec.stages):
        st = stages[i]
        rec = records.get(stage.name)
        job = jobs.get(stage.name)
        if rec is None and job is None and stage.name not in ledger:
            continue
        st = apply_record(stage, spec.model, st, rec.progress if rec else None)
        banked, entry = banked_gpu_seconds(ledger.get(stage.name, {}), st, job.uid if job else None)
        current = (
            pod_gpu_seconds(pods_of(observed_pods, job.uid), stage.resources.gpus_per_node, now)
            if job
            else 0.0
        )
        new_ledger[stage.name] = entry
        stages[i] = apply_costs(stage, st, banked + current, pricing, config.gpu_prices)
    if new_ledger != ledger:
        out.annotations[ANNOTATION_LEDGER] = json.dumps(
            new_ledger, sort_keys=True, separators=(",", ":")
        )

    def totals() -> Totals:
        steps = sum(s.total_steps or 0 for s in stages)
        return Totals(
            progress=round(
                sum(
                    s.step if s.phase != StagePhase.Succeeded else (s.total_steps or 0)
                    for s in stages
                )
                / steps,
                4,
            )
            if steps
            else 0.0,
            tokens=sum(s.tokens for s in stages),
            gpu_seconds=round(sum(s.gpu_seconds for s in stages), 3),
            energy_joules=round(sum(s.energy_joules for s in stages), 3),
            cost_usd=round(sum(s.cost_usd for s in stages), 6),
            co2_grams=round(sum(s.co2_grams for s in stages), 3),
        )

    # ---- budget
    budget = check_budget(spec, stages, totals(), config)
    budget_before = _condition(old.conditions, COND_BUDGET)
    if budget.exceeded:
        message = "; ".join(budget.exceeded)
        if budget_before is None or budget_before.status != "True":
            out.events.append(
                Event("Warning", "BudgetExceeded", f"{message}: {spec.budget.action.value} the run")
            )
        cond(COND_BUDGET, True, "BudgetExceeded", message)
    elif budget_before is not None:
        cond(COND_BUDGET, False, "WithinBudget", "all budget limits respected")

    terminal = old.phase in (RunPhase.Succeeded, RunPhase.Failed)
    fail_on_budget = bool(budget.exceeded) and spec.budget.action == BudgetAction.Fail
    suspend_on_budget = bool(budget.exceeded) and spec.budget.action == BudgetAction.Suspend
    should_run = not (terminal or spec.suspend or budget.exceeded)

    # ---- walk the stages in order
    phase = old.phase if terminal else RunPhase.Pending
    current: str | None = old.current_stage
    failed_message: str | None = None
    stalled: str | None = None
    for i, stage in enumerate(spec.stages):
        st = stages[i]
        if st.phase == StagePhase.Succeeded:
            continue
        current = stage.name
        job = jobs.get(stage.name)
        rec = records.get(stage.name)
        job_name = resources.child_name(name, stage.name)
        if job is not None and job.deleting:
            stages[i] = st.model_copy(
                update={
                    "message": "waiting for the previous pods to stop (checkpointing after SIGTERM)"
                }
            )
            phase = RunPhase.Running if should_run else phase
            break
        if job is not None and job.complete and rec is not None and rec.final:
            completed = job.completion_time or format_time(now)
            stages[i] = st.model_copy(
                update={
                    "phase": StagePhase.Succeeded,
                    "progress": 1.0,
                    "eta_seconds": 0.0,
                    "completion_time": completed,
                    "message": None,
                    "step": max(st.step, st.total_steps or 0),
                }
            )
            out.events.append(
                Event(
                    "Normal",
                    "StageSucceeded",
                    f"stage {stage.name!r} ({i + 1}/{len(spec.stages)}) succeeded",
                )
            )
            continue
        if job is not None and job.failed_condition:
            restarts = max(st.restarts, job.attempt + 1)
            if restarts > stage.max_restarts:
                failed_message = (
                    f"stage {stage.name!r} failed {restarts} times, more than "
                    f"maxRestarts={stage.max_restarts}: {job.failure_message}"
                )
                stages[i] = st.model_copy(
                    update={
                        "phase": StagePhase.Failed,
                        "restarts": restarts,
                        "completion_time": format_time(now),
                        "message": job.failure_message or None,
                    }
                )
                phase = RunPhase.Failed
                break
            stages[i] = st = st.model_copy(
                update={
                    "restarts": restarts,
                    "message": f"restart {restarts}/{stage.max_restarts}: {job.failure_message}",
                }
            )
            out.delete.append(Delete("Job", job_name))
            out.events.append(
                Event(
                    "Warning",
                    "StageRestarting",
                    f"stage {stage.name!r} failed ({job.failure_message}); "
                    f"restart {restarts} of {stage.max_restarts}, resuming "
                    "from the last checkpoint",
                )
            )
            phase = RunPhase.Running if should_run else phase
            break
        if job is not None and job.complete:
            out.delete.append(Delete("Job", job_name))
            out.events.append(
                Event(
                    "Normal",
                    "StageInterrupted",
                    f"stage {stage.name!r} stopped without finishing (no "
                    "FINAL); recreating it to resume from the last "
                    "checkpoint",
                )
            )
            phase = RunPhase.Running if should_run else phase
            break
        if job is not None:
            if not should_run:
                out.delete.append(Delete("Job", job_name))
                why = (
                    "budget exceeded"
                    if budget.exceeded
                    else "spec.suspend is true"
                    if spec.suspend
                    else "the run has finished"
                )
                out.events.append(
                    Event(
                        "Normal",
                        "Suspending",
                        f"stopping stage {stage.name!r}: {why}; the trainer "
                        "checkpoints before it exits",
                    )
                )
                break
            running = any(
                (p.get("status") or {}).get("phase") == "Running"
                for p in pods_of(observed_pods, job.uid)
            )
            stages[i] = st.model_copy(
                update={
                    "phase": StagePhase.Running if running else StagePhase.Pending,
                    "message": None if running else "waiting for pods to be scheduled",
                }
            )
            phase = RunPhase.Running if running else RunPhase.Pending
            updated = record_updated_at(rec.progress if rec else None)
            if (
                running
                and updated is not None
                and config.stall_timeout_seconds > 0
                and (now - updated).total_seconds() > config.stall_timeout_seconds
            ):
                stalled = (
                    f"stage {stage.name!r}: no progress for {(now - updated).total_seconds():.0f}s"
                )
            break
        # No Job for the active stage.
        if should_run:
            out.create.append(
                resources.build_service(run=name, namespace=namespace, uid=uid, stage=stage.name)
            )
            out.create.append(
                resources.build_job(
                    spec,
                    i,
                    run=name,
                    namespace=namespace,
                    uid=uid,
                    config=config,
                    attempt=st.restarts,
                )
            )
            first = st.start_time is None
            stages[i] = st.model_copy(
                update={
                    "phase": StagePhase.Pending,
                    "start_time": st.start_time or format_time(now),
                    "message": "Job created" if first else "Job recreated, resuming from LATEST",
                }
            )
            out.events.append(
                Event(
                    "Normal",
                    "StageStarted" if first else "StageResumed",
                    f"stage {stage.name!r} ({i + 1}/{len(spec.stages)}): created Job {job_name}",
                )
            )
            phase = RunPhase.Pending
        elif (
            not terminal
            and st.phase in (StagePhase.Running, StagePhase.Pending)
            and st.start_time is not None
        ):
            stages[i] = st.model_copy(
                update={"phase": StagePhase.Suspended, "message": "stopped after a checkpoint"}
            )
        break
    else:
        if not terminal:
            phase = RunPhase.Succeeded
            current = spec.stages[-1].name

    # ---- run phase and conditions
    if fail_on_budget and not terminal:
        phase = RunPhase.Failed
        failed_message = "budget exceeded: " + "; ".join(budget.exceeded)
    elif phase not in (RunPhase.Succeeded, RunPhase.Failed) and not should_run:
        phase = RunPhase.Suspended
    if failed_message and not terminal:
        reason = "BudgetExceeded" if fail_on_budget else "ReachedMaxRestarts"
        cond(COND_FAILED, True, reason, failed_message)
        out.events.append(Event("Warning", reason, failed_message))
    succeeded = sum(1 for s in stages if s.phase == StagePhase.Succeeded)
    if phase == RunPhase.Succeeded and old.phase != RunPhase.Succeeded:
        cond(COND_SUCCEEDED, True, "AllStagesSucceeded", f"all {len(stages)} stages succeeded")
        out.events.append(
            Event("Normal", "AllStagesSucceeded", f"all {len(stages)} stages succeeded")
        )
    elif succeeded and phase != RunPhase.Succeeded:
        cond(COND_SUCCEEDED, False, "StageSucceeded", f"{succeeded}/{len(stages)} stages succeeded")
    if phase == RunPhase.Running:
        cond(COND_RUNNING, True, "Running", f"stage {current!r} is training")
    elif phase == RunPhase.Pending:
        cond(COND_RUNNING, False, "Pending", f"stage {current!r} is waiting for its pods")
    elif phase == RunPhase.Succeeded:
        cond(COND_RUNNING, False, "AllStagesSucceeded", "nothing left to train")
    elif phase == RunPhase.Failed:
        failed = _condition(conds, COND_FAILED)
        cond(COND_RUNNING, False, failed.reason if failed else "Failed", "the run failed")
    else:
        cond(COND_RUNNING, False, "BudgetExceeded" if suspend_on_budget else "Suspended", "stopped")
    if phase == RunPhase.Suspended:
        reason = "BudgetExceeded" if suspend_on_budget else "Suspended"
        message = (
            "; ".join(budget.exceeded) + " (raise the budget to continue)"
            if suspend_on_budget
            else "spec.suspend is true"
        )
        if old.phase != RunPhase.Suspended:
            out.events.append(Event("Normal", "Suspended", f"run suspended: {message}"))
        cond(COND_SUSPENDED, True, reason, message)
    elif _condition(conds, COND_SUSPENDED) is not None:
        cond(COND_SUSPENDED, False, "Resumed", "the run is not suspended")
    if stalled:
        before = _condition(old.conditions, COND_STALLED)
        if before is None or before.status != "True":
            out.events.append(Event("Warning", "ProgressStalled", stalled))
        cond(COND_STALLED, True, "ProgressStalled", stalled)
    elif _condition(conds, COND_STALLED) is not None:
        cond(COND_STALLED, False, "Progressing", "the trainer reports progress")

    # ---- ttlSecondsAfterFinished: delete the children (the run and the store stay)
    if (
        phase in (RunPhase.Succeeded, RunPhase.Failed)
        and spec.ttl_seconds_after_finished is not None
    ):
        finished = _condition(conds, COND_SUCCEEDED if phase == RunPhase.Succeeded else COND_FAILED)
        at = parse_time(finished.last_transition_time) if finished else None
        if at is not None and (now - at).total_seconds() >= spec.ttl_seconds_after_finished:
            out.create = []
            out.delete = [Delete("Job", j.name) for j in jobs.values() if not j.deleting]
            out.delete += [Delete("Service", n) for n in sorted(observed_services or [])]

    status.phase = phase
    status.current_stage = current
    status.stages = stages
    status.totals = totals()
    done = succeeded if phase != RunPhase.Succeeded else len(stages)
    status.progress = f"{done}/{len(stages)} {status.totals.progress * 100:.0f}%"
    out.budget_used = budget.used
    return finish()
