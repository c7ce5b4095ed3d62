"""Steps 1 and 2: which spec applies (stages that started are frozen), what the
handlers read for it, and what the choice means for the status."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetrain.core import api
from kubetrain.core.api import (
    Estimate,
    ManifestError,
    S3Storage,
    StageLedger,
    StagePhase,
    StageStatus,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator.config import OperatorConfig, endpoint_allowed
from kubetrain.operator.plan.conditions import Conditions, condition_of
from kubetrain.operator.plan.observed import ObservedJob, owned_by
from kubetrain.operator.plan.result import NORMAL, WARNING, Event
from kubetrain.operator.progress import StageRecords, StoreAnswer

# Where earlier operator versions kept the applied spec and the GPU-seconds ledger.
# Annotations can be edited by anyone who can edit the run, so both now live in status
# (written by the operator only): a run that has only these is migrated on its next
# reconcile, and they are removed once its status holds them.
ANNOTATION_APPLIED_SPEC = "kubetrain.dev/applied-spec"
ANNOTATION_LEDGER = "kubetrain.dev/ledger"
LEGACY_ANNOTATIONS = (ANNOTATION_APPLIED_SPEC, ANNOTATION_LEDGER)


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


def _parse_applied(raw: str | None) -> TrainingRunSpec | None:
    if not raw:
        return None
    try:
        return TrainingRunSpec.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


def _annotations(run: Mapping[str, Any]) -> Mapping[str, str]:
    return (run.get("metadata") or {}).get("annotations") or {}


def applied_spec_of(run: Mapping[str, Any]) -> TrainingRunSpec | None:
    """The spec the operator applied last: ``status.appliedSpec``; for a run from an
    earlier operator that has none yet, its applied-spec annotation (once: the status
    holds it from the next reconcile on, and the annotation is ignored after that)."""
    status = previous_status(run)
    if status.applied_spec is not None:
        return _parse_applied(status.applied_spec)
    return _parse_applied(_annotations(run).get(ANNOTATION_APPLIED_SPEC))


def applied_spec_json(spec: TrainingRunSpec) -> str:
    """``status.appliedSpec``: the spec as compact JSON, keys sorted."""
    return json.dumps(api.dump(spec), sort_keys=True, separators=(",", ":"))


def legacy_ledger(run: Mapping[str, Any]) -> dict[str, StageLedger]:
    """The GPU-seconds ledger of a run not migrated yet (no ``status.appliedSpec``), by
    stage, from its annotation; empty once migrated."""
    if previous_status(run).applied_spec is not None:
        return {}
    try:
        raw = json.loads(_annotations(run).get(ANNOTATION_LEDGER) or "{}")
    except ValueError:
        return {}
    out: dict[str, StageLedger] = {}
    for stage, entry in (raw if isinstance(raw, dict) else {}).items():
        with contextlib.suppress(ValidationError):
            out[str(stage)] = StageLedger.model_validate(entry)
    return out


def legacy_annotations_to_remove(run: Mapping[str, Any]) -> dict[str, str | None]:
    """The legacy annotations to delete (value None): once the status holds what they
    held, so that nobody edits them expecting an effect."""
    if previous_status(run).applied_spec is None:
        return {}
    return {key: None for key in LEGACY_ANNOTATIONS if key in _annotations(run)}


def previous_status(run: Mapping[str, Any]) -> TrainingRunStatus:
    """The run's status as stored (typed)."""
    return TrainingRunStatus.model_validate(run.get("status") or {})


def choose_spec(run: Mapping[str, Any], job_stages: Collection[str]) -> SpecChoice:
    """Step 1, which spec applies: the new spec, except that the stages that have
    started (a phase other than Pending in status, or a Job of the run in
    ``job_stages``) and the model stay as ``status.appliedSpec`` has them
    (``effective_spec``)."""
    try:
        new: TrainingRunSpec | None = api.parse_spec(run.get("spec") or {})
        errors: list[str] = []
    except ManifestError as exc:
        new, errors = None, exc.errors
    applied = applied_spec_of(run)
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
    run_uid = str((run.get("metadata") or {}).get("uid") or "")
    jobs = {ObservedJob.from_k8s(j).stage for j in observed_jobs if owned_by(j, run_uid)}
    spec = choose_spec(run, jobs).spec
    return RecordsToRead(
        s3=spec.storage.s3 if spec is not None else None,
        stages=stages_to_read(spec, previous_status(run).stages),
    )


def spec_conditions(choice: SpecChoice, old: TrainingRunStatus, conds: Conditions) -> list[Event]:
    """Condition SpecChangeRefused (and its Warning, once per distinct refusal) while
    part of the new spec is refused; cleared once the spec applies again."""
    before = condition_of(old.conditions, ConditionType.SPEC_CHANGE_REFUSED)
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


def storage_condition(
    spec: TrainingRunSpec, conds: Conditions, config: OperatorConfig | None = None
) -> bool:
    """Whether the run has a store it may use; condition StorageConfigured False when it
    has none, or names an endpoint the operator's ``allowedS3Endpoints`` does not list
    (set True again only once it had been False)."""
    s3 = spec.storage.s3
    if s3 is not None and config is not None and not endpoint_allowed(s3.endpoint, config):
        allowed = ", ".join(config.allowed_s3_endpoints)
        conds.set(
            ConditionType.STORAGE_CONFIGURED,
            False,
            Reason.ENDPOINT_NOT_ALLOWED,
            f"spec.storage.s3.endpoint={s3.endpoint!r} is not allowed on this cluster "
            f"(accepted: no endpoint, for AWS S3, or one of: {allowed}); nothing is "
            "started until it is changed",
        )
        return False
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


def storage_reachable_condition(
    records: Mapping[str, StageRecords], old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition StorageReachable: False (and a Warning when it becomes False) while
    the store cannot be read, with its error; True again once it answers (set only once
    it had been False). While it is False completed stages wait for FINAL to be
    confirmed and nothing is restarted or counted."""
    type_ = ConditionType.STORAGE_REACHABLE
    unknown = sorted(
        (stage, rec.error or "no answer")
        for stage, rec in records.items()
        if rec.final == StoreAnswer.UNKNOWN
    )
    if unknown:
        stage, error = unknown[0]
        message = (
            f"cannot read the progress and FINAL of stage {stage!r} from the store: {error} "
            "(completed stages wait for it; nothing is restarted on its account)"
        )
        conds.set(type_, False, Reason.STORE_UNREACHABLE, message)
        before = condition_of(old.conditions, type_)
        if before is None or before.status != "False":
            return [Event(WARNING, Reason.STORE_UNREACHABLE, message)]
    elif (current := conds.get(type_)) is not None and current.status == "False":
        conds.set(type_, True, Reason.STORE_REACHABLE, "the store answers again")
    return []
