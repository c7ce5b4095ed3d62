"""The reconciler with a real S3 endpoint and an in-memory cluster: progress read from
the store with the run's own Secret, stage hand-over, the Secret's values never leaving
memory, a store outage that re-runs nothing, and a child's name held by someone else's
object."""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetrain.core.api import RunPhase, TrainingRunStatus
from kubetrain.core.layout import StageLayout
from kubetrain.core.store import ObjectStore
from kubetrain.operator.caches import (
    ArchitectureReader,
    ProgressReader,
    SecretCache,
    StoreCache,
    open_run_store,
)
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.handlers import Reconciler, silence_credential_loggers
from kubetrain.operator.metrics import OperatorMetrics
from kubetrain.operator.resources import LABEL_RUN
from tests.support.fakecluster import FakeCluster
from tests.support.services import S3Server, free_port

pytestmark = pytest.mark.integration


def reconciler(
    cluster: FakeCluster,
    secrets: dict[str, dict[str, str]],
    metrics: OperatorMetrics,
    clock: Any = None,
    store_factory: Any = open_run_store,
    monotonic: Any = time.monotonic,
) -> Reconciler:
    """The operator's reconciler over ``cluster``, reading the run's Secret from
    ``secrets`` and its store with real S3 clients (``monotonic``: the progress
    reader's clock, which decides when records are read again)."""
    secret_cache = SecretCache(lambda ns, name: dict(secrets[name]), ttl=60)
    stores = StoreCache(store_factory)
    interval = OperatorConfig().poll_interval_seconds
    progress = ProgressReader(secret_cache, stores, interval, clock=monotonic)
    kwargs = {"clock": clock} if clock is not None else {}
    return Reconciler(
        cluster,
        cluster,
        OperatorConfig(),
        metrics,
        progress,
        architectures=ArchitectureReader(secret_cache, stores, interval),
        **kwargs,
    )


def test_reconcile_reads_progress_with_run_secret_and_hands_over(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The operator itself has no AWS credentials: reading the store can only work with
    # the run's Secret.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3_server.create_bucket("ckpt-reconcile")
    secret = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    run = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "run-uid", "generation": 1},
        "spec": {
            "storage": {
                "s3": {
                    "bucket": bucket,
                    "prefix": "runs",
                    "endpoint": s3_server.endpoint,
                    "credentialsSecret": "s3-creds",
                }
            },
            "stages": [
                {
                    "name": "pretrain",
                    "type": "pretrain",
                    "hyperparameters": {"maxSteps": 20},
                    "resources": {"gpusPerNode": 1, "gpuType": "l4"},
                },
                {"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 10}},
            ],
        },
    }
    cluster = FakeCluster(run)
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    metrics = OperatorMetrics()
    rec = reconciler(cluster, {"s3-creds": secret}, metrics, clock=lambda: now[0])
    silence_credential_loggers()  # as `kubetrain operator` does at start-up
    caplog.set_level(logging.DEBUG)

    rec.reconcile("ml", "demo")
    cluster.pods_running("pretrain", since="2025-01-01T00:00:00Z")
    s3 = s3_server.client()
    folder = StageLayout.of("ml", "demo", "pretrain")
    # A record without a format, as trainers wrote them before records were versioned.
    s3.put_object(
        Bucket=bucket,
        Key=f"runs/{folder.progress}",
        Body=json.dumps(
            {
                "step": 10,
                "totalSteps": 20,
                "tokens": 10240,
                "loss": 3.1,
                "tokensPerSecond": 512.0,
                "energyJoules": 36000.0,
                "energySource": "estimate",
                "phase": "running",
                "checkpoint": f"s3://{bucket}/runs/{folder.checkpoint(10)}",
                "updatedAt": "2025-01-01T00:10:00Z",
            }
        ).encode(),
    )
    now[0] += timedelta(minutes=10)
    rec.reconcile("ml", "demo")
    st = cluster.status["stages"][0]
    assert (st["phase"], st["step"], st["progress"]) == ("Running", 10, 0.5)
    assert st["gpuSeconds"] == 600.0 and st["energySource"] == "estimate"
    assert st["checkpoint"].endswith("step-000010")

    s3.put_object(Bucket=bucket, Key=f"runs/{folder.final}", Body=b"checkpoints/step-000020")
    s3.put_object(
        Bucket=bucket,
        Key=f"runs/{folder.progress}",
        Body=json.dumps(
            {"step": 20, "totalSteps": 20, "phase": "completed", "energyJoules": 72000.0}
        ).encode(),
    )
    cluster.job_finished("pretrain", ok=True, at="2025-01-01T00:20:00Z")
    now[0] += timedelta(minutes=10)
    rec.reconcile("ml", "demo")
    assert cluster.status["stages"][0]["phase"] == "Succeeded"
    assert "demo-sft" in cluster.jobs_by_name
    assert [r for _, r, _ in cluster.events] == [
        "Created",
        "StageStarted",
        "StageSucceeded",
        "StageStarted",
    ]

    # Nothing the operator wrote or said contains the Secret's values.
    everything = json.dumps([cluster.requests, cluster.stored, cluster.events], default=str)
    everything += caplog.text
    from prometheus_client import generate_latest

    everything += generate_latest(metrics.registry).decode()
    for value in secret.values():
        assert value not in everything
    assert "s3-creds" in everything  # referenced by name, as it should be


def test_unreadable_store_keeps_reconciling() -> None:
    run = {
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {
            "storage": {"s3": {"bucket": "nowhere", "endpoint": "http://127.0.0.1:9"}},
            "stages": [{"name": "pretrain", "type": "pretrain"}],
        },
    }
    cluster = FakeCluster(run)

    def broken_store(*_: Any) -> Any:
        raise OSError("connection refused")

    rec = reconciler(cluster, {}, OperatorMetrics(), store_factory=broken_store)
    rec.reconcile("ml", "demo")
    assert "demo-pretrain" in cluster.jobs_by_name
    rec.reconcile("ml", "demo")  # with a Job: the store is read, and fails
    assert cluster.status["phase"] == "Pending"
    reachable = _condition(cluster.status, "StorageReachable")
    assert reachable["status"] == "False" and "connection refused" in reachable["message"]


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    conds = {c["type"]: c for c in status.get("conditions", [])}
    assert type_ in conds, f"no condition {type_}: {sorted(conds)}"
    return conds[type_]


def _run(bucket: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "run-uid", "generation": 1},
        "spec": {
            "storage": {
                "s3": {
                    "bucket": bucket,
                    "prefix": "runs",
                    "endpoint": endpoint,
                    "credentialsSecret": "s3-creds",
                }
            },
            "stages": [
                {"name": "pretrain", "type": "pretrain", "hyperparameters": {"maxSteps": 20}},
                {"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 10}},
            ],
        },
    }


class _Switch:
    """A store that sends every request to ``up`` or, while ``down[0]``, to ``down``
    (the run's store as the operator's cached client reaches it, or not)."""

    def __init__(self, up: ObjectStore, down: ObjectStore, is_down: list[bool]):
        self._up, self._down, self._is_down = up, down, is_down

    def __getattr__(self, name: str) -> Any:
        return getattr(self._down if self._is_down[0] else self._up, name)


def test_store_outage_while_a_stage_completes_reruns_nothing(s3_server: S3Server) -> None:
    """S3 refuses connections while the stage's Job completes with FINAL written: the
    Job is neither deleted nor re-run, StorageReachable says why; once S3 answers the
    stage succeeds and the next one starts."""
    bucket = s3_server.create_bucket("ckpt-outage")
    secret = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    cluster = FakeCluster(_run(bucket, s3_server.endpoint))
    down = [False]
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def store(s3: Any, credentials: dict[str, str] | None) -> Any:
        unreachable = open_run_store(s3.model_copy(update={"endpoint": refused}), credentials)
        return _Switch(open_run_store(s3, credentials), unreachable, down)

    clock = [0.0]
    rec = reconciler(
        cluster,
        {"s3-creds": secret},
        OperatorMetrics(),
        store_factory=store,
        monotonic=lambda: clock[0],
    )
    rec.reconcile("ml", "demo")
    job_uid = cluster.jobs_by_name["demo-pretrain"]["metadata"]["uid"]
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="runs/ml/demo/pretrain/FINAL", Body=b"checkpoints/x")
    cluster.job_finished("pretrain", ok=True, at="2025-01-01T00:20:00Z")
    down[0] = True
    for _ in range(2):
        plan = rec.reconcile("ml", "demo").plan
        assert plan is not None and plan.delete == [] and plan.create == []
        clock[0] += OperatorConfig().poll_interval_seconds  # each reconcile reads again
    assert cluster.jobs_by_name["demo-pretrain"]["metadata"]["uid"] == job_uid
    assert cluster.writes("delete") == []  # nothing deleted
    reachable = _condition(cluster.status, "StorageReachable")
    assert reachable["status"] == "False" and refused in reachable["message"]
    assert secret["AWS_SECRET_ACCESS_KEY"] not in json.dumps(cluster.stored)
    assert cluster.status["stages"][0]["restarts"] == 0
    assert [r for _, r, _ in cluster.events].count("StoreUnreachable") == 1

    down[0] = False
    rec.reconcile("ml", "demo")
    assert cluster.status["stages"][0]["phase"] == "Succeeded"
    assert _condition(cluster.status, "StorageReachable")["status"] == "True"
    assert "demo-sft" in cluster.jobs_by_name


def test_a_foreign_job_with_the_stages_name_is_reported_not_adopted() -> None:
    """A Job named demo-pretrain that another run owns and labels (so the informers
    file it under that run): the reconciler looks before creating, and the run reports
    it instead of taking it for its own; it looks again each poll until the name is
    free."""
    theirs = {
        "kind": "Job",
        "metadata": {
            "name": "demo-pretrain",
            "namespace": "ml",
            "uid": "their-job",
            "labels": {LABEL_RUN: "demo-pre", "kubetrain.dev/stage": "train"},
            "ownerReferences": [
                {
                    "apiVersion": "kubetrain.dev/v1alpha1",
                    "kind": "TrainingRun",
                    "name": "demo-pre",
                    "uid": "other-run",
                    "controller": True,
                }
            ],
        },
        "status": {"active": 1},
    }
    cluster = FakeCluster(_run("ckpt", "http://127.0.0.1:9"))
    cluster.jobs_by_name["demo-pretrain"] = copy.deepcopy(theirs)
    rec = reconciler(cluster, {"s3-creds": {}}, OperatorMetrics(), store_factory=_no_store)
    result = rec.reconcile("ml", "demo")
    conflict = _condition(cluster.status, "ChildConflict")
    assert conflict["status"] == "True" and conflict["reason"] == "NotOwned"
    assert "Job ml/demo-pretrain" in conflict["message"] and "demo-pre" in conflict["message"]
    assert ("Warning", "NotOwned") in [(t, r) for t, r, _ in cluster.events]
    assert cluster.jobs_by_name["demo-pretrain"] == theirs  # untouched
    assert cluster.writes("create") == []
    assert result.wake_after is not None  # its going away is no event of this run's
    rec.reconcile("ml", "demo")
    assert [(t, r) for t, r, _ in cluster.events].count(("Warning", "NotOwned")) == 1
    stage = cluster.status["stages"][0]
    assert stage["message"].startswith("waiting: Job ml/demo-pretrain")

    del cluster.jobs_by_name["demo-pretrain"]  # its owner is gone
    rec.reconcile("ml", "demo")
    assert cluster.jobs_by_name["demo-pretrain"]["metadata"]["ownerReferences"][0]["uid"] == (
        "run-uid"
    )
    assert _condition(cluster.status, "ChildConflict")["status"] == "False"


def _no_store(*_: Any) -> Any:
    raise OSError("no store in this test")


def test_deleted_run_forgotten() -> None:
    metrics = OperatorMetrics()
    metrics.observe_run(
        "ml", "demo", TrainingRunStatus(), TrainingRunStatus(phase=RunPhase.Running), {}, {}
    )
    rec = reconciler(FakeCluster(), {}, metrics)
    assert rec.reconcile("ml", "demo").plan is None
    assert metrics.snapshots() == {}


def test_the_estimate_counts_a_hugging_face_models_real_parameters(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.from in another bucket, read once with the run's Secret: the estimate in
    the status counts config.json's parameters, not the built-in model's defaults."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3_server.create_bucket("hf-estimate")
    models = s3_server.create_bucket("hf-models")
    config = {
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
    s3_server.client().put_object(
        Bucket=models, Key="qwen/config.json", Body=json.dumps(config).encode()
    )
    secret = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    run = {
        "metadata": {"name": "ft", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {
            "model": {"from": f"s3://{models}/qwen"},
            "storage": {
                "s3": {
                    "bucket": bucket,
                    "endpoint": s3_server.endpoint,
                    "credentialsSecret": "s3-creds",
                }
            },
            "stages": [{"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 10}}],
        },
    }
    cluster = FakeCluster(run)
    rec = reconciler(cluster, {"s3-creds": secret}, OperatorMetrics())
    rec.reconcile("ml", "ft")
    # Qwen2.5-0.5B's published size.
    assert cluster.status["estimate"]["parameters"] == 494_032_768

    # Read once: a config.json changed under a started run is not read again.
    bigger = {**config, "num_hidden_layers": 48}
    s3_server.client().put_object(
        Bucket=models, Key="qwen/config.json", Body=json.dumps(bigger).encode()
    )
    rec.reconcile("ml", "ft")
    assert cluster.status["estimate"]["parameters"] == 494_032_768
