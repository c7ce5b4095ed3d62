"""progress.json, metrics.jsonl and the Prometheus endpoint."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord, read_metrics, read_progress
from kubetrain.core.store import open_store
from kubetrain_trainer.telemetry import Telemetry

BASE = ProgressRecord(
    run="tiny",
    namespace="ml",
    stage="sft",
    total_steps=30,
    attempt=1,
    started_at="2026-01-01T00:00:00Z",
)
FOLDER = StageLayout()


def _record(step: int, **extra: object) -> dict[str, object]:
    return {
        "step": step,
        "tokens": step * 100,
        "tokens_per_second": 50.0,
        "loss": 1.0 / step,
        "eval": {},
        "energy_joules": 2.0 * step,
        "energy_source": "estimate",
        "power_watts": 65.0,
        "mfu": 0.01,
        "checkpoint": None,
        "phase": "running",
        "wall_seconds": float(step),
        **extra,
    }


def test_progress_and_history_are_written_and_trimmed_on_resume(tmp_path: Path) -> None:
    store = open_store((tmp_path / "stage").as_uri())
    t = Telemetry(store, base=BASE, enabled=True)
    for step in (10, 20, 30):
        t.write(**_record(step))
    t.write(**_record(30, phase="completed", eval={"accuracy": 0.5}))
    progress = read_progress(store, FOLDER.progress)
    assert progress is not None and progress.phase == "completed" and progress.step == 30
    assert progress.updated_at.endswith("Z") and progress.started_at == BASE.started_at
    assert [m.step for m in read_metrics(store, FOLDER.metrics)] == [10, 20, 30]  # one per step

    resumed = Telemetry(store, base=BASE.updated(attempt=2), enabled=True)
    resumed.restore_history(step=20)
    resumed.write(**_record(25))
    assert [m.step for m in read_metrics(store, FOLDER.metrics)] == [10, 20, 25]
    assert read_progress(store, FOLDER.progress).attempt == 2


def test_records_on_the_wire_are_camel_case_and_versioned(tmp_path: Path) -> None:
    store = open_store((tmp_path / "stage").as_uri())
    Telemetry(store, base=BASE, enabled=True).write(**_record(10))
    progress = json.loads(store.get_text(FOLDER.progress))
    assert progress["format"] == ProgressRecord.FORMAT == "1.2"
    assert {"totalSteps", "tokensPerSecond", "energyJoules", "wallSeconds", "startedAt"} <= set(
        progress
    )
    (line,) = store.get_text(FOLDER.metrics).splitlines()
    assert json.loads(line) == progress


def test_a_failure_keeps_the_last_numbers(tmp_path: Path) -> None:
    store = open_store((tmp_path / "stage").as_uri())
    t = Telemetry(store, base=BASE, enabled=True)
    t.write(**_record(10))
    t.fail("out of memory")
    progress = read_progress(store, FOLDER.progress)
    assert progress is not None
    assert (progress.phase, progress.message, progress.step) == ("failed", "out of memory", 10)


def test_a_misspelt_field_is_refused(tmp_path: Path) -> None:
    t = Telemetry(open_store(tmp_path.as_uri()), base=BASE, enabled=True)
    with pytest.raises(TypeError, match="no field tokensPerSecond"):
        t.write(**_record(1, tokensPerSecond=3.0))


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    store = open_store((tmp_path / "stage").as_uri())
    Telemetry(store, base=BASE, enabled=False).write(**_record(10))
    assert not store.exists(FOLDER.progress)


def test_unknown_phase_is_refused(tmp_path: Path) -> None:
    t = Telemetry(open_store(tmp_path.as_uri()), base=BASE, enabled=True)
    with pytest.raises(ValueError, match="phase"):
        t.write(**_record(1, phase="done"))


def test_prometheus_endpoint_exposes_the_trainer_metrics(tmp_path: Path) -> None:
    from tests.support.services import free_port

    t = Telemetry(
        open_store(tmp_path.as_uri()),
        base=BASE,
        enabled=True,
        metrics_port=free_port(),
        serve_metrics=True,
    )
    t.write(**_record(10, eval={"accuracy": 0.25}))
    body = urllib.request.urlopen(f"http://127.0.0.1:{t.port}/metrics", timeout=5).read().decode()
    labels = 'namespace="ml",run="tiny",stage="sft"'
    for line in (
        f"kubetrain_trainer_step{{{labels}}} 10.0",
        f"kubetrain_trainer_tokens_total{{{labels}}} 1000.0",
        f"kubetrain_trainer_loss{{{labels}}} 0.1",
        f"kubetrain_trainer_tokens_per_second{{{labels}}} 50.0",
        f"kubetrain_trainer_mfu_ratio{{{labels}}} 0.01",
        'kubetrain_trainer_energy_joules_total{namespace="ml",run="tiny",source="estimate",'
        'stage="sft"} 20.0',
        f"kubetrain_trainer_power_watts{{{labels}}} 65.0",
        f"kubetrain_trainer_eval_accuracy{{{labels}}} 0.25",
    ):
        assert line in body, f"{line!r} missing from\n{body}"


def test_grpo_diagnostics_are_gauges_only_where_a_stage_reports_them() -> None:
    from kubetrain.docgen.metrics import example_trainer_registry

    registry, collector = example_trainer_registry()
    collector.record = ProgressRecord.model_validate({"step": 3, "loss": 0.5})
    assert not any(f.name.startswith("kubetrain_trainer_grpo") for f in registry.collect())
    collector.record = ProgressRecord.model_validate(
        {
            "step": 3,
            "train": {
                "reward": 0.75,
                "reward_std": 0.25,
                "kl": 0.02,
                "clip_ratio": 0.1,
                "completion_length": 3.5,
            },
        }
    )
    values = {f.name: f.samples[0].value for f in registry.collect()}
    assert {k: v for k, v in values.items() if "grpo" in k} == {
        "kubetrain_trainer_grpo_reward": 0.75,
        "kubetrain_trainer_grpo_reward_std": 0.25,
        "kubetrain_trainer_grpo_kl": 0.02,
        "kubetrain_trainer_grpo_clip_ratio": 0.1,
        "kubetrain_trainer_grpo_completion_tokens": 3.5,
    }
