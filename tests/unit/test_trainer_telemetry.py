"""progress.json, metrics.jsonl and the Prometheus endpoint."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from kubetrain.core import contract
from kubetrain.core.store import open_store
from kubetrain_trainer.telemetry import Telemetry

BASE = {
    "run": "tiny",
    "namespace": "ml",
    "stage": "sft",
    "totalSteps": 30,
    "attempt": 1,
    "startedAt": "2026-01-01T00:00:00Z",
}


def _record(step: int, **extra: object) -> dict[str, object]:
    return {
        "step": step,
        "tokens": step * 100,
        "tokensPerSecond": 50.0,
        "loss": 1.0 / step,
        "eval": {},
        "energyJoules": 2.0 * step,
        "energySource": "estimate",
        "powerWatts": 65.0,
        "mfu": 0.01,
        "checkpoint": None,
        "phase": "running",
        "wallSeconds": float(step),
        **extra,
    }


def test_progress_and_history_are_written_and_trimmed_on_resume(tmp_path: Path) -> None:
    store = open_store((tmp_path / "stage").as_uri())
    t = Telemetry(store, base=BASE, enabled=True)
    for step in (10, 20, 30):
        t.write(**_record(step))
    t.write(**_record(30, phase="completed", eval={"accuracy": 0.5}))
    progress = store.get_json(contract.PROGRESS)
    assert progress["phase"] == "completed" and progress["step"] == 30
    assert progress["updatedAt"].endswith("Z") and progress["startedAt"] == BASE["startedAt"]
    lines = store.get_text("metrics.jsonl").splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20, 30]  # one point per step

    resumed = Telemetry(store, base={**BASE, "attempt": 2}, enabled=True)
    resumed.restore_history(step=20)
    resumed.write(**_record(25))
    steps = [json.loads(x)["step"] for x in store.get_text("metrics.jsonl").splitlines()]
    assert steps == [10, 20, 25]
    assert store.get_json(contract.PROGRESS)["attempt"] == 2


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    store = open_store((tmp_path / "stage").as_uri())
    Telemetry(store, base=BASE, enabled=False).write(**_record(10))
    assert not store.exists(contract.PROGRESS)


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
