"""The reconciler with a real S3 endpoint and an in-memory cluster: progress read from
the store with the run's own Secret, stage hand-over, and the Secret's values never
leaving memory."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetrain.core.api import RunPhase, TrainingRunStatus
from kubetrain.core.layout import StageLayout
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
from tests.support.fakecluster import FakeCluster
from tests.support.services import S3Server

pytestmark = pytest.mark.integration


def reconciler(
    cluster: FakeCluster,
    secrets: dict[str, dict[str, str]],
    metrics: OperatorMetrics,
    clock: Any = None,
    store_factory: Any = open_run_store,
) -> Reconciler:
    """The operator's reconciler over ``cluster``, reading the run's Secret from
    ``secrets`` and its store with real S3 clients."""
    secret_cache = SecretCache(lambda ns, name: dict(secrets[name]), ttl=60)
    stores = StoreCache(store_factory)
    interval = OperatorConfig().poll_interval_seconds
    progress = ProgressReader(secret_cache, stores, interval)
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
