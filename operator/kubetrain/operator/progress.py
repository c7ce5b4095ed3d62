"""What a stage has done so far: the trainer's progress record (read from the store)
turned into status numbers, plus GPU time, cost and CO2.

``read_stage_records`` does the I/O; everything else is pure and called by
``kubetrain.operator.plan``.

GPU-seconds count what the cluster allocated, not what the trainer used: for every pod
of the stage, GPUs per pod × seconds since the pod started (until its container
finished). A stage's earlier attempts (restarts, suspensions) are banked in a small
ledger kept in the stage's status (``status.stages[].ledger``), because their pods are
gone by the time the next attempt runs.

The store has three answers: a FINAL pointer is present, absent, or unknown (the store
could not be read). Only "absent" may be acted on as "the stage did not finish".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kubetrain.core import accounting, contract
from kubetrain.core.api import ModelSpec, Pricing, Stage, StageLedger, StageStatus
from kubetrain.core.store import ObjectStore, StoreError

# A store error goes into a condition message: enough to act on, never a whole response.
MAX_ERROR_CHARS = 300


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
    exists (written only when the stage completed); ``error`` says why the store could
    not answer (``final`` UNKNOWN)."""

    progress: dict[str, Any] | None
    final: StoreAnswer
    error: str | None = None

    @classmethod
    def unknown(cls, error: str) -> StageRecords:
        """The store could not be read: nothing is known about the stage."""
        return cls(progress=None, final=StoreAnswer.UNKNOWN, error=error[:MAX_ERROR_CHARS])


def unknown_records(stages: Iterable[str], error: str) -> dict[str, StageRecords]:
    """The answer for ``stages`` when the store cannot be opened at all."""
    return {stage: StageRecords.unknown(error) for stage in stages}


def read_stage_records(
    store: ObjectStore, namespace: str, run: str, stages: list[str]
) -> dict[str, StageRecords]:
    """Read progress.json and test for FINAL for each named stage; ``store`` is rooted
    at the run's store root (``spec.storage.s3.uri()``). A stage whose objects cannot be
    read (unreachable endpoint, refused request, timeout) is UNKNOWN, never "absent";
    this never raises for the store's errors."""
    out: dict[str, StageRecords] = {}
    for stage in stages:
        folder = f"{namespace}/{run}/{stage}"
        try:
            record = store.get_json(f"{folder}/{contract.PROGRESS}")
            final = store.exists(f"{folder}/{contract.FINAL}")
        except (StoreError, OSError, ValueError) as exc:
            out[stage] = StageRecords.unknown(str(exc) or type(exc).__name__)
            continue
        out[stage] = StageRecords(
            progress=record if isinstance(record, dict) else None,
            final=StoreAnswer.PRESENT if final else StoreAnswer.ABSENT,
        )
    return out


def pod_gpu_seconds(pods: list[dict[str, Any]], gpus_per_pod: int, now: datetime) -> float:
    """GPUs × seconds each pod has held them: from ``status.startTime`` until its
    container terminated (or now, while it runs)."""
    if gpus_per_pod <= 0:
        return 0.0
    total = 0.0
    for pod in pods:
        status = pod.get("status") or {}
        start = parse_time(status.get("startTime"))
        if start is None:
            continue  # not yet bound to a node: no GPU allocated
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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def apply_record(
    stage: Stage, model: ModelSpec, previous: StageStatus, record: dict[str, Any] | None
) -> StageStatus:
    """The stage status with the trainer's record applied (training numbers only).

    Numbers that only grow (step, tokens, energy) never go back, so a record torn by a
    restart or read from an older attempt cannot make progress jump backwards.
    """
    total = previous.total_steps or accounting.total_steps(stage, model)
    out = previous.model_copy(update={"total_steps": total})
    if not record:
        return out
    step = int(_number(record.get("step")) or 0)
    total = int(_number(record.get("totalSteps")) or total)
    updates: dict[str, Any] = {
        "step": max(previous.step, step),
        "total_steps": total,
        "tokens": max(previous.tokens, int(_number(record.get("tokens")) or 0)),
        "energy_joules": max(previous.energy_joules, _number(record.get("energyJoules")) or 0.0),
    }
    if (loss := _number(record.get("loss"))) is not None:
        updates["loss"] = round(loss, 6)
    if isinstance(record.get("eval"), dict):
        evals = {str(k): _number(v) for k, v in record["eval"].items()}
        updates["eval"] = {k: round(v, 6) for k, v in evals.items() if v is not None}
    tps = _number(record.get("tokensPerSecond"))
    if tps is not None:
        updates["tokens_per_second"] = round(tps, 3)
    if isinstance(record.get("energySource"), str):
        updates["energy_source"] = record["energySource"]
    if isinstance(record.get("checkpoint"), str) and record["checkpoint"]:
        updates["checkpoint"] = record["checkpoint"]
    done = updates["step"]
    updates["progress"] = round(min(1.0, done / total), 4) if total else 0.0
    remaining = max(0, total - done)
    per_step = accounting.tokens_per_step(stage, model)
    wall = _number(record.get("wallSeconds"))
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
    """GPU-seconds, cost and CO2 of the stage, priced by its gpuType."""
    res = stage.resources
    acc = accounting.accelerator(res.gpu_type, res.gpus_per_node)
    price = accounting.gpu_hour_price(pricing, acc, price_table)
    gpu_seconds = max(status.gpu_seconds, gpu_seconds)
    cost, co2 = accounting.accrue(gpu_seconds, status.energy_joules, pricing, price)
    return status.model_copy(
        update={
            "gpu_seconds": round(gpu_seconds, 3),
            "cost_usd": round(cost, 6),
            "co2_grams": round(co2, 3),
        }
    )


def record_updated_at(record: dict[str, Any] | None) -> datetime | None:
    """When the trainer last wrote the record (for stall detection)."""
    if not record:
        return None
    return parse_time(record.get("updatedAt") if isinstance(record.get("updatedAt"), str) else None)
