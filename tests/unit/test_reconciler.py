"""The reconcile of one run against an in-memory cluster with the API server's rules:
what it writes and when (a status only when a user would see a change, the time-driven
numbers on a slow cadence but never lost), writes that never overwrite a newer copy,
deletes of exactly the Job observed, when it asks to be woken, and the Kopf leftovers
it removes so that deleting a run never hangs."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pytest

from kubetrain.core.hf_config import ModelConfig, parse_config
from kubetrain.core.records import ProgressRecord
from kubetrain.operator import plan as planner
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.handlers import LEGACY_FINALIZER, Reconciler
from kubetrain.operator.kube import Conflict
from kubetrain.operator.metrics import OperatorMetrics
from kubetrain.operator.progress import StageRecords, StoreAnswer, format_time
from tests.support.fakecluster import FakeCluster
from tests.unit.planworld import T0, manifest

GPUS = 16  # pretrain: 2 nodes x 8 GPUs


class Records:
    """The progress records the test says the trainer wrote."""

    def __init__(self) -> None:
        self.by_stage: dict[str, StageRecords] = {}

    def read(self, run: dict[str, Any], jobs: list[dict[str, Any]]) -> dict[str, StageRecords]:
        return dict(self.by_stage)

    def forget(self, key: tuple[str, str]) -> None:
        pass


class Models:
    """The config.json of the run's model.from as the test says it can be read: an
    error to raise, or the config."""

    def __init__(self) -> None:
        self.found: ModelConfig | Exception = OSError("connection refused")

    def read(self, run: dict[str, Any], jobs: list[dict[str, Any]]) -> ModelConfig | None:
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


class Harness:
    def __init__(
        self, run: dict[str, Any] | None = None, models: Models | None = None, **config: Any
    ):
        self.cluster = FakeCluster(run if run is not None else manifest())
        self.records = Records()
        self.metrics = OperatorMetrics()
        self.now = T0
        self.mono = 0.0
        self.rec = Reconciler(
            self.cluster,
            self.cluster,
            OperatorConfig(**config),
            self.metrics,
            self.records,  # type: ignore[arg-type]
            clock=lambda: self.now,
            monotonic=lambda: self.mono,
            jitter=lambda: 1.0,  # the top of the ±10% spread
            architectures=models,  # type: ignore[arg-type]
        )

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds

    def reconcile(self) -> Any:
        return self.rec.reconcile("ml", "demo")

    def at(self, seconds: float = 0) -> str:
        return format_time(T0 + timedelta(seconds=seconds))

    def stage(self, name: str = "pretrain") -> dict[str, Any]:
        return next(s for s in self.cluster.status["stages"] if s["name"] == name)

    def running(self) -> None:
        """The run created its Job; its pods run since T0."""
        self.reconcile()
        self.cluster.pods_running("pretrain", since=self.at())
        self.reconcile()
        assert self.cluster.status["phase"] == "Running"


def test_first_reconcile_creates_the_stage_then_waits_for_its_job() -> None:
    h = Harness()
    result = h.reconcile()
    # A look at each name before creating by it: a child's name may be taken by an
    # object the informers do not show.
    requests = [r for r, _ in h.cluster.requests]
    assert requests == ["get", "get", "status", "create", "create"]
    assert result.wake_after is None  # the Job's own event wakes it
    result = h.reconcile()  # the Job's event: its stage waits for pods
    assert h.stage()["message"] == "waiting for pods to be scheduled"
    assert result.wake_after == pytest.approx(15 * 1.1)  # polled while the Job runs
    statuses = len(h.cluster.writes("status"))
    h.reconcile()  # the echo of its own write
    assert len(h.cluster.writes("status")) == statuses  # nothing new to say


def test_a_child_created_is_not_created_again_before_the_informer_shows_it() -> None:
    """The status write's watch event can overtake the new Job's: the reconcile it
    triggers waits for the Job rather than create it again and report a resume."""
    h = Harness()
    h.cluster.informers_lag = True
    h.reconcile()
    assert h.stage()["message"] == "Job created"
    creates = len(h.cluster.writes("create"))
    result = h.reconcile()  # the status write's event; the Job's is still on its way
    assert len(h.cluster.writes("create")) == creates
    assert result.wake_after is not None and result.wake_after <= 2.0
    assert h.stage()["message"] == "Job created"
    h.cluster.catch_up()
    h.reconcile()
    assert h.stage()["message"] == "waiting for pods to be scheduled"
    assert [reason for _, reason, _ in h.cluster.events].count("StageResumed") == 0
    assert len(h.cluster.writes("create")) == creates


def test_a_created_child_never_seen_is_planned_for_again_after_a_while() -> None:
    """A Job deleted before its informer ever showed it does not block the run."""
    h = Harness()
    h.cluster.informers_lag = True
    h.reconcile()
    h.cluster.jobs_by_name.clear()
    h.cluster.services_by_name.clear()
    h.tick(31)
    h.reconcile()
    assert len(h.cluster.writes("create")) == 4  # Service and Job, again


def test_time_alone_is_written_on_a_slow_cadence_but_exported_at_once() -> None:
    h = Harness(status_accrual_seconds=60)
    h.running()
    writes = len(h.cluster.writes("status"))
    for _ in range(5):
        h.tick(10)
        h.reconcile()
    assert len(h.cluster.writes("status")) == writes  # GPU-seconds alone: not yet
    snapshot = h.metrics.snapshots()[("ml", "demo")]
    assert snapshot.gpu_seconds == pytest.approx(50 * GPUS)  # Prometheus sees it now
    h.tick(10)
    h.reconcile()
    assert len(h.cluster.writes("status")) == writes + 1
    assert h.stage()["gpuSeconds"] == pytest.approx(60 * GPUS)


def test_progress_a_user_sees_is_written_at_once() -> None:
    h = Harness(status_accrual_seconds=60)
    h.running()
    writes = len(h.cluster.writes("status"))
    h.tick(5)
    h.records.by_stage["pretrain"] = StageRecords(
        ProgressRecord(step=10, total_steps=100, updated_at=h.at(5)), final=None
    )
    h.reconcile()
    assert len(h.cluster.writes("status")) == writes + 1
    assert h.stage()["step"] == 10


def test_gpu_time_not_yet_written_is_not_lost_when_the_job_goes() -> None:
    """Suspend: the Job is deleted, its pods checkpoint for 20 s more (time alone, not
    written yet), then the Job is gone and its GPU-seconds are banked: from memory."""
    h = Harness(status_accrual_seconds=60)
    h.running()
    h.tick(100)
    h.cluster.edit_spec(suspend=True)
    h.reconcile()  # phase Suspended: written at once
    h.reconcile()  # the Job is deleting: its message, written at once
    assert h.cluster.status["phase"] == "Suspended"
    assert h.stage()["gpuSeconds"] == pytest.approx(100 * GPUS)
    h.tick(10)
    h.reconcile()
    h.tick(10)
    h.cluster.pods_finished("pretrain", at=h.at(120))
    h.reconcile()
    assert h.stage()["gpuSeconds"] == pytest.approx(100 * GPUS)  # not written yet
    h.tick(5)
    h.cluster.job_gone("pretrain")
    h.reconcile()
    assert h.stage()["phase"] == "Suspended"
    assert h.stage()["gpuSeconds"] == pytest.approx(120 * GPUS)


def test_a_write_planned_from_an_old_copy_never_overwrites_the_newer() -> None:
    """Another replica recorded a restart; this one still sees the copy before it."""
    h = Harness()
    h.running()
    old = h.cluster.run("ml", "demo")
    stored = h.cluster.stored
    assert old is not None and stored is not None
    stored["status"]["stages"][0]["restarts"] = 1
    h.cluster.put_run(stored)
    h.cluster.stale = old  # the watch has not delivered that write yet
    h.tick(5)
    h.records.by_stage["pretrain"] = StageRecords(
        ProgressRecord(step=10, total_steps=100, updated_at=h.at(5)), final=None
    )
    with pytest.raises(Conflict):
        h.reconcile()
    assert h.stage()["restarts"] == 1 and h.stage()["step"] == 0
    h.cluster.stale = None
    h.reconcile()  # planned again from the newer copy
    assert h.stage()["restarts"] == 1 and h.stage()["step"] == 10


def test_a_copy_older_than_its_own_write_waits_for_the_watch() -> None:
    """Right after a write the informer may still show the copy before it: planning
    from that would only conflict, so the reconcile waits for the write's event."""
    h = Harness()
    before = h.cluster.run("ml", "demo")
    h.reconcile()
    sent = len(h.cluster.requests)
    h.cluster.stale = before
    result = h.reconcile()
    assert result.plan is None and result.wake_after == 2.0
    assert len(h.cluster.requests) == sent
    h.cluster.stale = None
    assert h.reconcile().plan is not None


def test_a_failed_job_is_deleted_by_the_uid_that_was_seen() -> None:
    h = Harness()
    h.running()
    uid = h.cluster.job("pretrain")["metadata"]["uid"]
    h.tick(30)
    h.cluster.job_finished("pretrain", ok=False, at=h.at(30), message="exit 1")
    h.reconcile()
    assert h.cluster.writes("delete") == [("Job", "demo-pretrain", uid)]
    assert h.stage()["restarts"] == 1


def test_wake_ups_follow_the_runs_state() -> None:
    h = Harness()
    assert h.rec.wake_after(planner.Plan(requeue_after=3.0), [], h.now) == 3.0
    h.running()
    assert h.reconcile().wake_after == pytest.approx(15 * 1.1)  # Running: polled
    h.cluster.edit_spec(suspend=True)
    # Suspended: only changes wake it (its pods stopping, the Job going, a spec edit).
    assert h.reconcile().wake_after is None
    h.cluster.job_gone("pretrain")
    assert h.reconcile().wake_after is None


def test_a_finished_run_wakes_only_for_its_ttl() -> None:
    run = manifest(ttlSecondsAfterFinished=600)
    run["spec"]["stages"] = run["spec"]["stages"][:1]
    h = Harness(run)
    h.running()
    h.tick(60)
    h.cluster.job_finished("pretrain", ok=True, at=h.at(60))
    h.records.by_stage["pretrain"] = StageRecords(
        ProgressRecord(step=100, total_steps=100), final=StoreAnswer.PRESENT
    )
    result = h.reconcile()
    assert h.cluster.status["phase"] == "Succeeded"
    assert result.wake_after == pytest.approx(601)
    h.tick(601)
    result = h.reconcile()
    assert ("delete", ("Job", "demo-pretrain", h.cluster.job("pretrain")["metadata"]["uid"])) in (
        h.cluster.requests
    )
    assert result.wake_after is None


def test_kopf_leftovers_are_removed_so_that_deletion_never_hangs() -> None:
    run = manifest()
    run["metadata"]["finalizers"] = [LEGACY_FINALIZER, "example.com/keep"]
    run["metadata"]["annotations"] = {
        "kubetrain.dev/last-handled-configuration": "{}",
        "team": "a",
    }
    run["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    h = Harness(run)
    assert h.reconcile().plan is None
    meta = h.cluster.stored["metadata"] if h.cluster.stored else {}
    assert meta["finalizers"] == ["example.com/keep"]
    assert meta["annotations"] == {"team": "a"}
    assert h.cluster.writes("status") == []


def test_a_run_that_is_gone_is_forgotten() -> None:
    h = Harness()
    h.running()
    assert ("ml", "demo") in h.metrics.snapshots()
    h.cluster.stored = None
    assert h.reconcile().plan is None
    assert h.metrics.snapshots() == {}


def test_an_unreadable_model_from_neither_blocks_nor_fails_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Until the config.json of model.from can be read, the estimate counts the
    manifest's model and the stage starts anyway; once read, the estimate counts the
    model's real parameters."""
    models = Models()
    h = Harness(manifest(model={"from": "s3://models/qwen"}), models)
    caplog.set_level(logging.WARNING, "kubetrain.operator")
    h.reconcile()
    assert "demo-pretrain" in h.cluster.jobs_by_name
    manifests = h.cluster.status["estimate"]["parameters"]
    assert "cannot read model.from: connection refused" in caplog.text
    qwen = {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    }
    models.found = parse_config(json.dumps(qwen), where="s3://models/qwen/config.json")
    h.reconcile()
    assert h.cluster.status["estimate"]["parameters"] == 494_032_768 != manifests
