"""From the trainer's progress record (and the pods) to status numbers."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubetrain.core.api import Pricing, StageLedger, StageStatus, parse_spec
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord, write_progress
from kubetrain.core.store import FileStore, StoreError, open_store
from kubetrain.local.runner import record_cost
from kubetrain.operator.progress import (
    StoreAnswer,
    apply_costs,
    apply_record,
    banked_gpu_seconds,
    pod_gpu_seconds,
    read_stage_records,
)

SPEC = parse_spec(
    {
        "stages": [
            {
                "name": "pretrain",
                "type": "pretrain",
                "hyperparameters": {"maxSteps": 100, "batchSize": 4},
                "resources": {"nodes": 2, "gpusPerNode": 4, "gpuType": "a100"},
            }
        ]
    }
)
STAGE = SPEC.stages[0]
NOW = datetime(2025, 1, 1, 1, 0, 0, tzinfo=UTC)


def test_record_applied() -> None:
    st = apply_record(
        STAGE,
        SPEC.model,
        StageStatus(name="pretrain"),
        ProgressRecord.from_json(
            """{"step": 25, "totalSteps": 100, "tokens": 51200, "loss": 2.0,
            "eval": {"accuracy": 0.5, "bad": "x", "loss": NaN}, "tokensPerSecond": 2048.0,
            "energyJoules": 1e6, "energySource": "rapl",
            "checkpoint": "s3://b/p/ml/r/pretrain/checkpoints/step-000025"}""",
            "progress.json",
        ),
    )
    assert (st.step, st.total_steps, st.progress, st.tokens) == (25, 100, 0.25, 51200)
    assert st.eval == {"accuracy": 0.5} and st.energy_source == "rapl"
    # 75 steps × (4 seq × 8 processes × 64 tokens) / 2048 tokens/s
    assert st.eta_seconds == pytest.approx(75 * 4 * 8 * 64 / 2048)
    assert st.checkpoint.endswith("step-000025")


def test_the_hugging_face_export_reaches_the_stage_status() -> None:
    uri = "s3://b/p/ml/r/pretrain/hf"
    record = ProgressRecord(step=100, total_steps=100, phase="completed", hf_model=uri)
    st = apply_record(STAGE, SPEC.model, StageStatus(name="pretrain"), record)
    assert st.hf_model == uri
    assert StageStatus.model_validate(st.model_dump(by_alias=True)).hf_model == uri
    assert "hfModel" in st.model_dump(by_alias=True)


def test_a_grpo_stage_reports_its_reward_and_kl_in_the_status() -> None:
    record = ProgressRecord.model_validate(
        {"step": 4, "train": {"reward": 0.8125, "kl": 0.0123456789, "clip_ratio": 0.0}}
    )
    st = apply_record(STAGE, SPEC.model, StageStatus(name="pretrain"), record)
    assert st.train == {"reward": 0.8125, "kl": 0.012346, "clip_ratio": 0.0}


def test_numbers_never_go_backwards() -> None:
    before = StageStatus(name="pretrain", step=50, tokens=1000, energy_joules=5.0)
    older = ProgressRecord(step=10, tokens=10, energy_joules=1)
    st = apply_record(STAGE, SPEC.model, before, older)
    assert (st.step, st.tokens, st.energy_joules) == (50, 1000, 5.0)


def test_missing_or_torn_record_keeps_status(caplog: pytest.LogCaptureFixture) -> None:
    before = StageStatus(name="pretrain", step=5)
    assert apply_record(STAGE, SPEC.model, before, None).step == 5
    torn = ProgressRecord.from_json('{"step": 7, "tok', "progress.json")
    with caplog.at_level(logging.WARNING):
        invalid = ProgressRecord.from_json('{"step": "NaN"}', "s3://b/ml/r/pretrain/progress.json")
    assert torn is None and invalid is None
    assert "s3://b/ml/r/pretrain/progress.json" in caplog.text


def test_gpu_seconds_from_pods() -> None:
    pods = [
        {"status": {"phase": "Running", "startTime": "2025-01-01T00:00:00Z"}},
        {
            "status": {
                "phase": "Failed",
                "startTime": "2025-01-01T00:00:00Z",
                "containerStatuses": [
                    {"state": {"terminated": {"finishedAt": "2025-01-01T00:30:00Z"}}}
                ],
            }
        },
        {"status": {"phase": "Pending"}},  # not scheduled: no GPUs held
    ]
    assert pod_gpu_seconds(pods, 4, NOW) == 4 * (3600 + 1800)
    assert pod_gpu_seconds(pods, 0, NOW) == 0.0


def test_bank_moves_to_next_attempt_once() -> None:
    prev = StageStatus(name="pretrain", gpu_seconds=700.0)
    banked, entry = banked_gpu_seconds(StageLedger(job="a", banked=100.0), prev, "a")
    assert banked == 100.0 and entry == StageLedger(job="a", banked=100.0)
    banked, entry = banked_gpu_seconds(StageLedger(job="a", banked=100.0), prev, "b")
    assert banked == 700.0 and entry.job == "b"
    assert banked_gpu_seconds(entry, prev, "b")[0] == 700.0
    assert banked_gpu_seconds(None, prev, "a") == (0.0, StageLedger(job="a"))


def test_costs_priced_by_gpu_type_and_table() -> None:
    st = StageStatus(name="pretrain", energy_joules=3.6e6)
    out = apply_costs(STAGE, st, 3600.0, Pricing(pue=1.5, carbon_grams_per_kwh=100), {"a100": 2.0})
    assert out.cost_usd == pytest.approx(2.0)
    assert out.co2_grams == pytest.approx(150.0)
    pinned = apply_costs(STAGE, st, 3600.0, Pricing(gpu_hour_usd=5.0), {"a100": 2.0})
    assert pinned.cost_usd == pytest.approx(5.0)


@pytest.mark.parametrize(
    "pricing", [Pricing(), Pricing(pue=1.3, energy_usd_per_kwh=0.2, carbon_grams_per_kwh=400)]
)
def test_operator_and_local_run_price_the_same_spending_alike(pricing: Pricing) -> None:
    # 2 nodes × 4 GPUs for 450 s of trainer wall time: 3600 GPU-seconds, as the
    # operator would count them from pods held for those 450 s.
    spec = SPEC.model_copy(update={"pricing": pricing})
    energy = 5.4e6
    operator = apply_costs(
        STAGE, StageStatus(name="pretrain", energy_joules=energy), 3600.0, pricing, {}
    )
    local = record_cost(spec, STAGE, ProgressRecord(wall_seconds=450.0, energy_joules=energy))
    assert operator.gpu_seconds == 3600.0
    assert local.usd == pytest.approx(operator.cost_usd, abs=1e-6)
    assert local.co2_grams == pytest.approx(operator.co2_grams, abs=1e-3)
    assert local.usd > 0 and local.co2_grams > 0


def test_read_records_from_store(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    folder = StageLayout.of("ml", "demo", "pretrain")
    write_progress(store, folder.progress, ProgressRecord(step=3))
    store.put_bytes(folder.final, b"checkpoints/step-000003")
    records = read_stage_records(store, "ml", "demo", ["pretrain", "sft"])
    written = ProgressRecord(step=3).updated(format=ProgressRecord.FORMAT)
    assert records["pretrain"].progress == written
    assert records["pretrain"].final == StoreAnswer.PRESENT
    assert records["sft"].progress is None and records["sft"].final == StoreAnswer.ABSENT


def test_final_is_not_asked_for_stages_left_out(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put_bytes(StageLayout.of("ml", "demo", "pretrain").final, b"checkpoints/step-000003")
    records = read_stage_records(store, "ml", "demo", ["pretrain"], final_for=())
    assert records["pretrain"].final is None  # not asked: neither present nor absent


def test_a_record_of_an_unknown_major_is_logged_but_final_still_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(f"file://{tmp_path}")
    folder = StageLayout.of("ml", "demo", "pretrain")
    store.put_bytes(folder.progress, b'{"format": "2.0", "step": 3}')
    store.put_bytes(folder.final, b"checkpoints/step-000003")
    with caplog.at_level(logging.WARNING):
        records = read_stage_records(store, "ml", "demo", ["pretrain"])
    assert records["pretrain"].progress is None
    assert records["pretrain"].final == StoreAnswer.PRESENT
    assert "progress.json format '2.0'" in caplog.text


class _Unreachable(FileStore):
    """A store whose every request fails the way S3Store reports an outage."""

    def get_bytes(self, key: str) -> bytes:
        raise StoreError("cannot reach the S3 endpoint http://s3:9000 (check the network)")

    def exists(self, key: str) -> bool:
        raise StoreError("cannot reach the S3 endpoint http://s3:9000 (check the network)")


def test_unreachable_store_is_unknown_never_absent(tmp_path: Path) -> None:
    records = read_stage_records(_Unreachable(str(tmp_path)), "ml", "demo", ["pretrain"])
    rec = records["pretrain"]
    assert rec.final == StoreAnswer.UNKNOWN and rec.progress is None
    assert rec.error is not None and "cannot reach the S3 endpoint" in rec.error
