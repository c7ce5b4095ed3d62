"""What a stage has done so far: the trainer's progress record (read from the store)
turned into status numbers, plus GPU time, cost and CO2.

``read_stage_records`` does the I/O; everything else is pure and called by
``kubetrain.operator.plan``.

GPU-seconds count what the cluster allocated, not what the trainer used: for every pod
of the stage, GPUs per pod × seconds since the pod started (until its container
finished). A stage's earlier attempts (restarts, suspensions) are banked in a small
ledger kept in the stage's status (``status.stages[].ledger``), because their pods are
gone by the time the next attempt runs. (A local run has no pods and counts its
GPU-seconds from the trainer's wall time; both are priced by
``kubetrain.core.accounting.stage_cost``.)

The store has three answers: a FINAL pointer is present, absent, or unknown (the store
could not be read). Only "absent" may be acted on as "the stage did not finish".
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kubetrain.core import accounting
from kubetrain.core.api import ModelSpec, Pricing, Stage, StageLedger, StageStatus
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord, RecordFormatError, read_progress
from kubetrain.core.store import ObjectStore, StoreError

# A store error goes into a condition message: enough to act on, never a whole response.
MAX_ERROR_CHARS = 300

log = logging.getLogger("kubetrain.operator.progress")


def parse_time(value: str | None) -> datetime | None:
    """RFC 3339 as the API server and the trainer write it, or None."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def format_time(t: datetime) -> str:
    """The API server's timestamp format (seconds, UTC, trailing Z)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StoreAnswer(StrEnum):
    """Whether an object exists, as the store answered: unknown when it could not."""

    PRESENT = "present"
    ABSENT = "absent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class StageRecords:
    """What the store says about one stage: its progress record and whether FINAL
    exists (written only when the stage completed; None: not asked, as while the
    stage's Job has not completed); ``error`` says why the store could not answer
    (``final`` UNKNOWN)."""

    progress: ProgressRecord | None
    final: StoreAnswer | None
    error: str | None = None

    @classmethod
    def unknown(cls, error: str) -> StageRecords:
        """The store could not be read: nothing is known about the stage."""
        return cls(progress=None, final=StoreAnswer.UNKNOWN, error=error[:MAX_ERROR_CHARS])


def unknown_records(stages: Iterable[str], error: str) -> dict[str, StageRecords]:
    """The answer for ``stages`` when the store cannot be opened at all."""
    return {stage: StageRecords.unknown(error) for stage in stages}


def read_stage_records(
    store: ObjectStore,
    namespace: str,
    run: str,
    stages: list[str],
    final_for: Collection[str] | None = None,
) -> dict[str, StageRecords]:
    """Read progress.json of each named stage, and test for FINAL for those in
    ``final_for`` (None: all; the others report ``final`` None, not asked, without a
    request); ``store`` is rooted at the run's store root (``spec.storage.s3.uri()``).

    A stage whose objects cannot be read (unreachable endpoint, refused request,
    timeout) is UNKNOWN, never "absent"; this never raises for the store's errors. A
    progress record this operator cannot read (a newer trainer's format) is logged and
    left out, but FINAL is still looked at: the stage's lifecycle must not depend on
    its numbers."""
    out: dict[str, StageRecords] = {}
    for stage in stages:
        folder = StageLayout.of(namespace, run, stage)
        try:
            record = _progress(store, folder.progress, f"{namespace}/{run}: stage {stage}")
            final = None
            if final_for is None or stage in final_for:
                final = StoreAnswer.PRESENT if store.exists(folder.final) else StoreAnswer.ABSENT
        except (StoreError, OSError, ValueError) as exc:
            out[stage] = StageRecords.unknown(str(exc) or type(exc).__name__)
            continue
        out[stage] = StageRecords(progress=record, final=final)
    return out


def _progress(store: ObjectStore, key: str, what: str) -> ProgressRecord | None:
    try:
        return read_progress(store, key)
    except RecordFormatError as exc:
        log.warning("%s: %s", what, exc)
        return None


def gang_start(pods: list[dict[str, Any]], gang: int) -> datetime | None:
    """When the Job's gang of ``gang`` pods first had all its pods started (the
    ``gang``-th ``status.startTime``); None while it never had."""
    starts = sorted(
        t for t in (parse_time((p.get("status") or {}).get("startTime")) for p in pods) if t
    )
    return starts[gang - 1] if len(starts) >= gang else None


def pod_gpu_seconds(
    pods: list[dict[str, Any]], gpus_per_pod: int, now: datetime, gang: int = 1
) -> float:
    """GPUs × seconds each pod has held them: from ``status.startTime`` until its
    container terminated (or now, while it runs). For a gang of several pods, only from
    when all of them had started (``gang_start``): pods waiting for the rest of their
    gang train nothing, and a gang released because it was never scheduled whole
    (``gangScheduleTimeoutSeconds``) costs nothing."""
    if gpus_per_pod <= 0:
        return 0.0
    floor = gang_start(pods, gang) if gang > 1 else None
    if gang > 1 and floor is None:
        return 0.0
    total = 0.0
    for pod in pods:
        status = pod.get("status") or {}
        start = parse_time(status.get("startTime"))
        if start is None:
            continue  # not yet bound to a node: no GPU allocated
        if floor is not None:
            start = max(start, floor)
        end = None
        for cs in status.get("containerStatuses") or []:
            finished = parse_time(
                ((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")
            )
            if finished is not None:
                end = finished if end is None else max(end, finished)
        if end is None and status.get("phase") in ("Succeeded", "Failed"):
            end = start
        total += max(0.0, ((end or now) - start).total_seconds()) * gpus_per_pod
    return total


def banked_gpu_seconds(
    ledger: StageLedger | None,
    previous: StageStatus,
    job_uid: str | None,
) -> tuple[float, StageLedger]:
    """GPU-seconds of the stage's finished attempts, and the updated ledger.

    The ledger remembers which Job's pods the status' last ``gpuSeconds`` included on
    top of the bank. When a different Job (or none) is observed, that attempt is over:
    the last status value becomes the new bank. Observing the same Job twice changes
    nothing, so this is safe to repeat.
    """
    ledger = ledger or StageLedger()
    banked = ledger.banked
    if ledger.job is not None and ledger.job != job_uid:
        banked = max(banked, previous.gpu_seconds)
    return banked, ledger.model_copy(update={"job": job_uid, "banked": round(banked, 3)})


def apply_record(
    stage: Stage, model: ModelSpec, previous: StageStatus, record: ProgressRecord | None
) -> StageStatus:
    """The stage status with the trainer's record applied (training numbers only).

    Numbers that only grow (step, tokens, energy) never go back, so a record read from
    an older attempt cannot make progress jump backwards.
    """
    total = previous.total_steps or accounting.total_steps(stage, model)
    out = previous.model_copy(update={"total_steps": total})
    if record is None:
        return out
    total = record.total_steps or total
    updates: dict[str, Any] = {
        "step": max(previous.step, record.step),
        "total_steps": total,
        "tokens": max(previous.tokens, record.tokens),
        "energy_joules": max(previous.energy_joules, record.energy_joules),
    }
    if record.loss is not None:
        updates["loss"] = round(record.loss, 6)
    if "eval" in record.model_fields_set:
        updates["eval"] = {k: round(v, 6) for k, v in record.eval.items()}
    if "train" in record.model_fields_set:
        updates["train"] = {k: round(v, 6) for k, v in record.train.items()}
    tps = record.tokens_per_second
    if tps is not None:
        updates["tokens_per_second"] = round(tps, 3)
    if record.energy_source is not None:
        updates["energy_source"] = record.energy_source
    if record.checkpoint:
        updates["checkpoint"] = record.checkpoint
    if record.hf_model:
        updates["hf_model"] = record.hf_model
    done = updates["step"]
    updates["progress"] = round(min(1.0, done / total), 4) if total else 0.0
    remaining = max(0, total - done)
    per_step = accounting.tokens_per_step(stage, model)
    wall = record.wall_seconds
    if remaining == 0:
        updates["eta_seconds"] = 0.0
    elif tps:
        updates["eta_seconds"] = round(remaining * per_step / tps, 1)
    elif wall and done:
        updates["eta_seconds"] = round(remaining * wall / done, 1)
    return out.model_copy(update=updates)


def apply_costs(
    stage: Stage,
    status: StageStatus,
    gpu_seconds: float,
    pricing: Pricing,
    price_table: dict[str, float],
) -> StageStatus:
    """GPU-seconds (the pods', see the module docstring), cost and CO2 of the stage."""
    gpu_seconds = max(status.gpu_seconds, gpu_seconds)
    cost, co2 = accounting.stage_cost(
        gpu_seconds, status.energy_joules, stage.resources, pricing, price_table
    )
    return status.model_copy(
        update={
            "gpu_seconds": round(gpu_seconds, 3),
            "cost_usd": round(cost, 6),
            "co2_grams": round(co2, 3),
        }
    )


def record_updated_at(record: ProgressRecord | None) -> datetime | None:
    """When the trainer last wrote the record (for stall detection)."""
    return parse_time(record.updated_at) if record is not None else None
