"""Steps 1 and 2: which spec applies (stages that started are frozen), what the
handlers read for it, and what the choice means for the status."""

from __future__ import annotations

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
    StagePhase,
    StageStatus,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator.plan.conditions import Conditions, condition_of
from kubetrain.operator.plan.observed import ObservedJob
from kubetrain.operator.plan.result import NORMAL, WARNING, Event

ANNOTATION_APPLIED_SPEC = "kubetrain.dev/applied-spec"
ANNOTATION_LEDGER = "kubetrain.dev/ledger"


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


def parse_ledger(annotations: Mapping[str, str]) -> dict[str, Any]:
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
