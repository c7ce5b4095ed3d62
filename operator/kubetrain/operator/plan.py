"""The operator's decisions, as one pure function.

``plan(run, jobs, pods, records, now, config)`` looks at a TrainingRun and what exists
(its Jobs and Pods, the trainer's progress records and FINAL pointers) and returns what
to do: children to create and delete, the status to write, annotations to keep, events
to emit. It is level-based: it never depends on which event woke the operator up, so a
timer, a Job event, a restart of the operator or a retry after a conflict all lead to
the same result. Handlers (``kubetrain.operator.handlers``) only gather the inputs and
apply it.

``plan`` is a pipeline of named steps, each a function of its own:

1. ``choose_spec``: which spec applies (stages that started are frozen). The handlers
   use it too, through ``records_to_read``, so they read the records of the stages
   this spec names.
2. ``spec_conditions``, ``applied_annotation``, ``created_condition``,
   ``storage_condition``: what the spec choice means for the status.
3. ``price`` (once per reconcile: pricing and the estimate), ``account`` (records, the
   GPU-seconds ledger, costs -> stage statuses) and ``totals``.
4. ``check_budget`` and ``budget_condition``.
5. ``walk_stages``: the stages in order; the first one not Succeeded is in one
   situation (``decide_stage``) that says what to do.
6. ``run_outcome`` and ``outcome_conditions``: the run's phase and conditions.
7. ``expired_children``: ``ttlSecondsAfterFinished``.

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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetrain.core import accounting, api
from kubetrain.core.api import (
    BudgetAction,
    Condition,
    ConditionStatus,
    Estimate,
    ManifestError,
    Pricing,
    RunPhase,
    S3Storage,
    Stage,
    StagePhase,
    StageStatus,
    Totals,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.core.architecture import Architecture
from kubetrain.core.conditions import CONDITION_ORDER, ConditionType, Reason
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

FOREGROUND = "Foreground"
NORMAL, WARNING = "Normal", "Warning"
FINISHED = (RunPhase.Succeeded, RunPhase.Failed)


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


@dataclass(frozen=True)
class Observed:
    """What exists for a run, as one reconcile sees it."""

    jobs: dict[str, ObservedJob]  # by stage
    pods: list[dict[str, Any]]
    services: list[str]  # names of the run's Services
    records: Mapping[str, StageRecords]  # by stage: only the stages that were read
    now: datetime

    @classmethod
    def of(
        cls,
        jobs: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        records: Mapping[str, StageRecords],
        services: list[str] | None,
        now: datetime,
    ) -> Observed:
        return cls(
            jobs={j.stage: j for j in map(ObservedJob.from_k8s, jobs)},
            pods=pods,
            services=sorted(services or []),
            records=records,
            now=now,
        )

    def pods_of(self, job: ObservedJob) -> list[dict[str, Any]]:
        """The pods ``job`` owns."""
        return pods_of(self.pods, job.uid)


@dataclass(frozen=True)
class RunRef:
    """Which run: what its children are named after and owned by."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> RunRef:
        return cls(meta["name"], meta.get("namespace", "default"), meta.get("uid", ""))


# --------------------------------------------------------------------------- result


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
    annotations: dict[str, str] = field(default_factory=dict)  # to set on the run
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
    requeue_after: float | None = None  # seconds: wake this run then


# --------------------------------------------------------------------------- conditions


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
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


class Conditions:
    """A run's conditions as one reconcile rewrites them (see ``set_condition``)."""

    def __init__(self, current: list[Condition], now: datetime, generation: int | None):
        self.items = list(current)
        self.now = now
        self.generation = generation

    def get(self, type_: str) -> Condition | None:
        return _condition(self.items, type_)

    def set(self, type_: str, value: bool, reason: str, message: str) -> None:
        self.items = set_condition(
            self.items,
            type_,
            "True" if value else "False",
            reason,
            message,
            self.now,
            self.generation,
        )


# --------------------------------------------------------------------------- 1, 2. the spec


@dataclass(frozen=True)
class SpecChoice:
    """Which spec a reconcile acts on."""

    spec: TrainingRunSpec | None  # None: the new spec is invalid and none applied before
    refused: list[str]  # why parts of the new spec were not applied (empty: all were)
    errors: list[str]  # the new spec's validation errors


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


def _parse_applied(annotations: Mapping[str, str]) -> TrainingRunSpec | None:
    raw = annotations.get(ANNOTATION_APPLIED_SPEC)
    if not raw:
        return None
    try:
        return TrainingRunSpec.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


def _parse_ledger(annotations: Mapping[str, str]) -> dict[str, Any]:
    try:
        ledger = json.loads(annotations.get(ANNOTATION_LEDGER) or "{}")
    except ValueError:
        return {}
    return ledger if isinstance(ledger, dict) else {}


def previous_status(run: Mapping[str, Any]) -> TrainingRunStatus:
    """The run's status as stored (typed)."""
    return TrainingRunStatus.model_validate(run.get("status") or {})


def choose_spec(run: Mapping[str, Any], job_stages: Collection[str]) -> SpecChoice:
    """Step 1, which spec applies: the new spec, except that the stages that have
    started (a phase other than Pending in status, or a Job in ``job_stages``) and the
    model stay as the applied-spec annotation has them (``effective_spec``)."""
    try:
        new: TrainingRunSpec | None = api.parse_spec(run.get("spec") or {})
        errors: list[str] = []
    except ManifestError as exc:
        new, errors = None, exc.errors
    applied = _parse_applied((run.get("metadata") or {}).get("annotations") or {})
    started = sum(1 for s in previous_status(run).stages if s.phase != StagePhase.Pending)
    if applied is not None:
        started = max(
            [started] + [i + 1 for i, s in enumerate(applied.stages) if s.name in job_stages]
        )
    spec, refused = effective_spec(new, errors, applied, started)
    return SpecChoice(spec, refused, errors)


def stages_to_read(spec: TrainingRunSpec | None, stages: list[StageStatus]) -> list[str]:
    """The stages whose records matter now: the first one of ``spec`` not Succeeded in
    ``stages`` (its progress record and FINAL decide what happens next); none without a
    store to read them from."""
    if spec is None or spec.storage.s3 is None:
        return []
    done = {s.name for s in stages if s.phase == StagePhase.Succeeded}
    return [s.name for s in spec.stages if s.name not in done][:1]


@dataclass(frozen=True)
class RecordsToRead:
    """Where a reconcile reads progress records from, and for which stages."""

    s3: S3Storage | None
    stages: list[str]


def records_to_read(run: Mapping[str, Any], observed_jobs: list[dict[str, Any]]) -> RecordsToRead:
    """What the handlers read before ``plan`` runs: the store and stages of the spec
    ``choose_spec`` picks, the same choice ``plan`` then makes."""
    jobs = {ObservedJob.from_k8s(j).stage for j in observed_jobs}
    spec = choose_spec(run, jobs).spec
    return RecordsToRead(
        s3=spec.storage.s3 if spec is not None else None,
        stages=stages_to_read(spec, previous_status(run).stages),
    )


def spec_conditions(choice: SpecChoice, old: TrainingRunStatus, conds: Conditions) -> list[Event]:
    """Condition SpecChangeRefused (and its Warning, once per distinct refusal) while
    part of the new spec is refused; cleared once the spec applies again."""
    before = _condition(old.conditions, ConditionType.SPEC_CHANGE_REFUSED)
    if choice.refused:
        message = "; ".join(choice.refused) + " — not applied (create a new TrainingRun instead)"
        conds.set(ConditionType.SPEC_CHANGE_REFUSED, True, Reason.SPEC_CHANGE_REFUSED, message)
        if before is None or before.message != message:
            return [Event(WARNING, Reason.SPEC_CHANGE_REFUSED, message)]
    elif before is not None and before.status == "True":
        conds.set(
            ConditionType.SPEC_CHANGE_REFUSED,
            False,
            Reason.SPEC_APPLIED,
            "the current spec is applied",
        )
    return []


def applied_annotation(spec: TrainingRunSpec, annotations: Mapping[str, str]) -> dict[str, str]:
    """The applied-spec annotation to set (empty when it already holds ``spec``)."""
    applied_json = json.dumps(api.dump(spec), sort_keys=True, separators=(",", ":"))
    if annotations.get(ANNOTATION_APPLIED_SPEC) == applied_json:
        return {}
    return {ANNOTATION_APPLIED_SPEC: applied_json}


def created_condition(spec: TrainingRunSpec, estimate: Estimate, conds: Conditions) -> list[Event]:
    """Condition Created with the up-front estimate, and its event, the first time."""
    if conds.get(ConditionType.CREATED) is not None:
        return []
    conds.set(
        ConditionType.CREATED,
        True,
        Reason.CREATED,
        f"{len(spec.stages)} stages; estimate {estimate.gpu_hours:.3g} GPU-hours, "
        f"${estimate.cost_usd:.2f}, {estimate.energy_kwh:.3g} kWh",
    )
    stages = " -> ".join(s.name for s in spec.stages)
    return [Event(NORMAL, Reason.CREATED, f"TrainingRun accepted: {stages}")]


def storage_condition(spec: TrainingRunSpec, conds: Conditions) -> bool:
    """Whether the run has a store; condition StorageConfigured False when it has none
    (set True again only once it had been False)."""
    if spec.storage.s3 is None:
        conds.set(
            ConditionType.STORAGE_CONFIGURED,
            False,
            Reason.MISSING_S3_STORAGE,
            "spec.storage.s3 is required on a cluster: set storage.s3.bucket (and "
            "endpoint and credentialsSecret for an S3-compatible store)",
        )
        return False
    if conds.get(ConditionType.STORAGE_CONFIGURED) is not None:
        conds.set(
            ConditionType.STORAGE_CONFIGURED,
            True,
            Reason.S3_CONFIGURED,
            f"checkpoints in {spec.storage.s3.uri()}",
        )
    return True


# --------------------------------------------------------------------------- 3. accounting


@dataclass(frozen=True)
class Costing:
    """The run's pricing (its own, completed with the operator's defaults) and the
    up-front estimate of its spec at that pricing: computed once per reconcile."""

    pricing: Pricing
    estimate: accounting.RunEstimate


def price(
    spec: TrainingRunSpec, config: OperatorConfig, architecture: Architecture | None = None
) -> Costing:
    """Pricing and estimate of ``spec`` (``architecture``: the config.json of a Hugging
    Face ``model.from``, None for the model the manifest describes)."""
    pricing = effective_pricing(spec.pricing, config)
    estimate = accounting.estimate_run(
        spec.model_copy(update={"pricing": pricing}),
        config.mfu,
        config.gpu_prices,
        architecture=architecture,
    )
    return Costing(pricing, estimate)


def estimate_summary(est: accounting.RunEstimate) -> Estimate:
    """The estimate as status shows it."""
    return Estimate(
        parameters=est.parameters,
        flops=est.flops,
        gpu_hours=round(est.gpu_hours, 6),
        cost_usd=round(est.cost_usd, 6),
        energy_kwh=round(est.energy_kwh, 6),
        co2_grams=round(est.co2_grams, 3),
        parallelism={s.name: str(s.parallelism) for s in est.stages if s.parallelism},
    )


def stage_statuses(spec: TrainingRunSpec, previous: list[StageStatus]) -> list[StageStatus]:
    """One status per stage of ``spec``, in its order: the previous one of that name, or
    a new one."""
    by_name = {s.name: s for s in previous}
    return [by_name.get(s.name, StageStatus(name=s.name)) for s in spec.stages]


@dataclass(frozen=True)
class Accounts:
    stages: list[StageStatus]
    ledger: dict[str, Any]  # the GPU-seconds ledger after this reconcile


def account(
    spec: TrainingRunSpec,
    stages: list[StageStatus],
    ledger: dict[str, Any],
    observed: Observed,
    pricing: Pricing,
    price_table: dict[str, float],
) -> Accounts:
    """Progress, GPU time and cost of every stage there is news of (a record, a Job or
    a ledger entry): the trainer's record applied, GPU-seconds of earlier attempts
    banked in the ledger plus those of the current Job's pods, priced."""
    stages = list(stages)
    new_ledger = dict(ledger)
    for i, stage in enumerate(spec.stages):
        rec = observed.records.get(stage.name)
        job = observed.jobs.get(stage.name)
        if rec is None and job is None and stage.name not in ledger:
            continue
        st = apply_record(stage, spec.model, stages[i], rec.progress if rec else None)
        banked, entry = banked_gpu_seconds(ledger.get(stage.name, {}), st, job.uid if job else None)
        current = (
            pod_gpu_seconds(observed.pods_of(job), stage.resources.gpus_per_node, observed.now)
            if job
            else 0.0
        )
        new_ledger[stage.name] = entry
        stages[i] = apply_costs(stage, st, banked + current, pricing, price_table)
    return Accounts(stages, new_ledger)


def totals(stages: list[StageStatus]) -> Totals:
    """Sums over the stages; progress weighted by steps."""
    steps = sum(s.total_steps or 0 for s in stages)
    done = sum(s.step if s.phase != StagePhase.Succeeded else (s.total_steps or 0) for s in stages)
    return Totals(
        progress=round(done / steps, 4) if steps else 0.0,
        tokens=sum(s.tokens for s in stages),
        gpu_seconds=round(sum(s.gpu_seconds for s in stages), 3),
        energy_joules=round(sum(s.energy_joules for s in stages), 3),
        cost_usd=round(sum(s.cost_usd for s in stages), 6),
        co2_grams=round(sum(s.co2_grams for s in stages), 3),
    )


# --------------------------------------------------------------------------- 4. budget


@dataclass(frozen=True)
class BudgetCheck:
    exceeded: list[str]  # one message per limit hit
    used: dict[str, float]  # kind -> used / limit (accrued), for the metrics


def _projected(
    stages: list[StageStatus], estimate: accounting.RunEstimate, pue: float
) -> dict[str, float]:
    """What the run will have spent: a stage under way extrapolates what it spent by its
    progress; a stage not started yet counts its up-front estimate."""
    projected = {"cost": 0.0, "gpuHours": 0.0, "energy": 0.0}
    for st, stage_est in zip(stages, estimate.stages, strict=False):
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
    return projected


def check_budget(
    spec: TrainingRunSpec, stages: list[StageStatus], spent: Totals, costing: Costing
) -> BudgetCheck:
    """Which limits of ``spec.budget`` the run has reached (or, with ``projected``, will
    reach). Energy is facility energy (IT energy × PUE), as in the estimate."""
    budget = spec.budget
    pue = costing.pricing.pue
    used = {
        "cost": spent.cost_usd,
        "gpuHours": spent.gpu_seconds / 3600.0,
        "energy": spent.energy_joules / accounting.JOULES_PER_KWH * pue,
    }
    projected = _projected(stages, costing.estimate, pue)
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


def budget_condition(
    check: BudgetCheck, spec: TrainingRunSpec, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition BudgetExceeded (and a Warning when it becomes True); WithinBudget once
    a limit hit before is respected again (a raised budget)."""
    before = _condition(old.conditions, ConditionType.BUDGET_EXCEEDED)
    if check.exceeded:
        message = "; ".join(check.exceeded)
        conds.set(ConditionType.BUDGET_EXCEEDED, True, Reason.BUDGET_EXCEEDED, message)
        if before is None or before.status != "True":
            action = spec.budget.action.value
            return [Event(WARNING, Reason.BUDGET_EXCEEDED, f"{message}: {action} the run")]
    elif before is not None:
        conds.set(
            ConditionType.BUDGET_EXCEEDED,
            False,
            Reason.WITHIN_BUDGET,
            "all budget limits respected",
        )
    return []


@dataclass(frozen=True)
class Course:
    """Whether the run may train now, and why not."""

    terminal: bool  # it had Succeeded or Failed before this reconcile
    suspend: bool  # spec.suspend
    budget: BudgetCheck
    action: BudgetAction  # spec.budget.action

    @property
    def should_run(self) -> bool:
        return not (self.terminal or self.suspend or self.budget.exceeded)

    @property
    def fail_on_budget(self) -> bool:
        return bool(self.budget.exceeded) and self.action == BudgetAction.Fail

    @property
    def suspend_on_budget(self) -> bool:
        return bool(self.budget.exceeded) and self.action == BudgetAction.Suspend

    @property
    def stop_reason(self) -> str:
        if self.budget.exceeded:
            return "budget exceeded"
        return "spec.suspend is true" if self.suspend else "the run has finished"


# --------------------------------------------------------------------------- 5. the stages


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


# --------------------------------------------------------------------------- 6. outcome


@dataclass(frozen=True)
class Outcome:
    """The run's phase after this reconcile, and why it fails (when it just did)."""

    phase: RunPhase
    failed: str | None


def run_outcome(walk: Walk, course: Course) -> Outcome:
    """Step 6, the run's phase: the walk's, except that a budget with action Fail fails
    the run and a run that must not train is Suspended (unless it has finished)."""
    if course.fail_on_budget and not course.terminal:
        return Outcome(RunPhase.Failed, "budget exceeded: " + "; ".join(course.budget.exceeded))
    if walk.phase not in FINISHED and not course.should_run:
        return Outcome(RunPhase.Suspended, walk.failed)
    return Outcome(walk.phase, walk.failed)


def failed_condition(outcome: Outcome, course: Course, conds: Conditions) -> list[Event]:
    """Condition Failed (and a Warning) when the run fails in this reconcile."""
    if not outcome.failed or course.terminal:
        return []
    reason = Reason.BUDGET_EXCEEDED if course.fail_on_budget else Reason.REACHED_MAX_RESTARTS
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
    phase: RunPhase, current: str | None, course: Course, conds: Conditions
) -> None:
    """Condition Running: True while a stage trains, else False with the reason why
    not (after condition Failed is set, whose reason it repeats)."""
    type_ = ConditionType.RUNNING
    if phase == RunPhase.Running:
        conds.set(type_, True, Reason.RUNNING, f"stage {current!r} is training")
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
        before = _condition(old.conditions, ConditionType.STALLED)
        conds.set(ConditionType.STALLED, True, Reason.PROGRESS_STALLED, stalled)
        if before is None or before.status != "True":
            return [Event(WARNING, Reason.PROGRESS_STALLED, stalled)]
    elif conds.get(ConditionType.STALLED) is not None:
        conds.set(ConditionType.STALLED, False, Reason.PROGRESSING, "the trainer reports progress")
    return []


def outcome_conditions(
    outcome: Outcome, walk: Walk, course: Course, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Step 6, the conditions that follow from the run's phase, and their events."""
    events = failed_condition(outcome, course, conds)
    events += succeeded_condition(outcome.phase, walk.stages, old, conds)
    running_condition(outcome.phase, walk.current, course, conds)
    events += suspended_condition(outcome.phase, course, old, conds)
    events += stalled_condition(walk.stalled, old, conds)
    return events


# --------------------------------------------------------------------------- 7. TTL


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


# --------------------------------------------------------------------------- plan


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
    observed_services: list[str] | None = None,
    architecture: Architecture | None = None,
) -> Plan:
    """Decide what to do for ``run`` given what exists (``observed_services``: names of
    its Services; ``architecture``: the config.json of a Hugging Face ``model.from``
    once it could be read); see the module docstring for the steps."""
    meta = run.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Plan()  # ownerReferences: the garbage collector removes the children
    annotations = meta.get("annotations") or {}
    observed = Observed.of(observed_jobs, observed_pods, records, observed_services, now)
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
    out.annotations.update(applied_annotation(spec, annotations))
    costing = price(spec, config, architecture)
    # Once the model's config.json is read, the estimate counts its real parameters.
    if status.estimate is None or (
        architecture is not None and status.estimate.parameters != costing.estimate.parameters
    ):
        status.estimate = estimate_summary(costing.estimate)
    out.events += created_condition(spec, status.estimate, conds)
    stages = stage_statuses(spec, old.stages)
    if not storage_condition(spec, conds):
        status.stages, status.phase = stages, RunPhase.Pending
        return draft.finish(spec)

    ledger = _parse_ledger(annotations)
    accounts = account(spec, stages, ledger, observed, costing.pricing, config.gpu_prices)
    if accounts.ledger != ledger:
        out.annotations[ANNOTATION_LEDGER] = json.dumps(
            accounts.ledger, sort_keys=True, separators=(",", ":")
        )
    budget = check_budget(spec, accounts.stages, totals(accounts.stages), costing)
    out.events += budget_condition(budget, spec, old, conds)
    course = Course(old.phase in FINISHED, spec.suspend, budget, spec.budget.action)

    walk = walk_stages(
        WalkContext(RunRef.of(meta), spec, course, observed, config), accounts.stages, old
    )
    out.create, out.delete, out.events = walk.create, walk.delete, out.events + walk.events
    outcome = run_outcome(walk, course)
    out.events += outcome_conditions(outcome, walk, course, old, conds)
    expired = expired_children(spec, outcome.phase, conds, observed)
    if expired is not None:
        out.create, out.delete = [], expired

    status.phase, status.current_stage, status.stages = outcome.phase, walk.current, walk.stages
    status.totals = totals(walk.stages)
    succeeded = sum(1 for s in walk.stages if s.phase == StagePhase.Succeeded)
    done = succeeded if outcome.phase != RunPhase.Succeeded else len(walk.stages)
    status.progress = f"{done}/{len(walk.stages)} {status.totals.progress * 100:.0f}%"
    out.budget_used = budget.used
    return draft.finish(spec)
