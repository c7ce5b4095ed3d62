"""The reconciler (handlers' core) with a real S3 endpoint and an in-memory API:
progress read from the store with the run's own Secret, stage hand-over, and the
Secret's values never leaving memory."""

from __future__ import annotations

import copy
import itertools
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetrain.core.api import RunPhase, TrainingRunStatus
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.handlers import Reconciler, open_run_store, silence_credential_loggers
from kubetrain.operator.metrics import OperatorMetrics
from kubetrain.operator.resources import LABEL_RUN
from tests.support.services import S3Server, free_port

pytestmark = pytest.mark.integration
_uids = itertools.count(1)


class FakeApi:
    """The API calls the reconciler makes, against dicts; records what it was asked."""

    def __init__(self, run: dict[str, Any], secrets: dict[str, dict[str, str]]):
        self.run = run
        self.secrets = secrets
        self.jobs: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.requests: list[Any] = []

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.run) if self.run else None

    @staticmethod
    def _labelled(objects: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
        """What a label selector ``kubetrain.dev/run=<run>`` returns."""
        return copy.deepcopy(
            [o for o in objects if (o["metadata"].get("labels") or {}).get(LABEL_RUN) == run]
        )

    def list_jobs(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._labelled(list(self.jobs.values()), run)

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods)

    def list_services(self, namespace: str, run: str) -> list[dict[str, Any]]:
        return self._labelled(list(self.services.values()), run)

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = (self.jobs if kind == "Job" else self.services).get(name)
        return copy.deepcopy(found) if found else None

    def create(self, obj: dict[str, Any]) -> bool:
        self.requests.append(obj)
        name = obj["metadata"]["name"]
        if obj["kind"] == "Service":
            if name in self.services:
                return False
            self.services[name] = copy.deepcopy(obj)
            return True
        if name in self.jobs:
            return False
        job = copy.deepcopy(obj)
        job["metadata"]["uid"] = f"job-{next(_uids)}"
        self.jobs[name] = job
        return True

    def delete(self, kind: str, namespace: str, name: str, propagation: str) -> bool:
        self.requests.append((kind, name, propagation))
        return (self.jobs if kind == "Job" else self.services).pop(name, None) is not None

    def patch_run_annotations(self, namespace: str, name: str, annotations: dict) -> None:
        self.requests.append(annotations)
        mine = self.run["metadata"].setdefault("annotations", {})
        for key, value in annotations.items():  # merge patch: None removes
            if value is None:
                mine.pop(key, None)
            else:
                mine[key] = value

    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.requests.append(status)
        self.run["status"] = status

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.secrets[name])

    def emit_event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


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
    fake = FakeApi(run, {"s3-creds": secret})
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    metrics = OperatorMetrics()
    rec = Reconciler(fake, OperatorConfig(), metrics, clock=lambda: now[0])
    silence_credential_loggers()  # as `kubetrain operator` does at start-up
    caplog.set_level(logging.DEBUG)

    rec.reconcile("ml", "demo")
    job = fake.jobs["demo-pretrain"]
    uid = job["metadata"]["uid"]
    fake.pods = [
        {
            "metadata": {"name": "demo-pretrain-0-abcde", "ownerReferences": [{"uid": uid}]},
            "status": {"phase": "Running", "startTime": "2025-01-01T00:00:00Z"},
        }
    ]
    s3 = s3_server.client()
    key = "runs/ml/demo/pretrain"
    s3.put_object(
        Bucket=bucket,
        Key=f"{key}/progress.json",
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
                "checkpoint": f"s3://{bucket}/{key}/checkpoints/step-000010",
                "updatedAt": "2025-01-01T00:10:00Z",
            }
        ).encode(),
    )
    now[0] += timedelta(minutes=10)
    rec.reconcile("ml", "demo")
    st = fake.run["status"]["stages"][0]
    assert (st["phase"], st["step"], st["progress"]) == ("Running", 10, 0.5)
    assert st["gpuSeconds"] == 600.0 and st["energySource"] == "estimate"
    assert st["checkpoint"].endswith("step-000010")

    s3.put_object(Bucket=bucket, Key=f"{key}/FINAL", Body=b"checkpoints/step-000020")
    s3.put_object(
        Bucket=bucket,
        Key=f"{key}/progress.json",
        Body=json.dumps(
            {"step": 20, "totalSteps": 20, "phase": "completed", "energyJoules": 72000.0}
        ).encode(),
    )
    fake.jobs["demo-pretrain"]["status"] = {
        "succeeded": 1,
        "completionTime": "2025-01-01T00:20:00Z",
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    now[0] += timedelta(minutes=10)
    rec.reconcile("ml", "demo")
    assert fake.run["status"]["stages"][0]["phase"] == "Succeeded"
    assert "demo-sft" in fake.jobs
    assert [r for _, r, _ in fake.events] == [
        "Created",
        "StageStarted",
        "StageSucceeded",
        "StageStarted",
    ]

    # Nothing the operator wrote or said contains the Secret's values.
    everything = json.dumps([fake.requests, fake.run, fake.events], default=str)
    everything += caplog.text
    from prometheus_client import generate_latest

    everything += generate_latest(metrics.registry).decode()
    for value in secret.values():
        assert value not in everything
    assert "s3-creds" in everything  # referenced by name, as it should be


def test_unreadable_store_keeps_reconciling(monkeypatch: pytest.MonkeyPatch) -> None:
    run = {
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {
            "storage": {"s3": {"bucket": "nowhere", "endpoint": "http://127.0.0.1:9"}},
            "stages": [{"name": "pretrain", "type": "pretrain"}],
        },
    }
    fake = FakeApi(run, {})

    def broken_store(*_: Any) -> Any:
        raise OSError("connection refused")

    rec = Reconciler(fake, OperatorConfig(), OperatorMetrics(), store_factory=broken_store)
    rec.reconcile("ml", "demo")
    assert "demo-pretrain" in fake.jobs
    assert fake.run["status"]["phase"] == "Pending"
    reachable = _condition(fake.run, "StorageReachable")
    assert reachable["status"] == "False" and "connection refused" in reachable["message"]


def _condition(run: dict[str, Any], type_: str) -> dict[str, Any]:
    conds = {c["type"]: c for c in run["status"].get("conditions", [])}
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


def test_store_outage_while_a_stage_completes_reruns_nothing(s3_server: S3Server) -> None:
    """S3 refuses connections while the stage's Job completes with FINAL written: the
    Job is neither deleted nor re-run, StorageReachable says why; once S3 answers the
    stage succeeds and the next one starts."""
    bucket = s3_server.create_bucket("ckpt-outage")
    secret = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    fake = FakeApi(_run(bucket, s3_server.endpoint), {"s3-creds": secret})
    down = [False]
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def store(s3: Any, credentials: dict[str, str] | None) -> Any:
        if down[0]:
            s3 = s3.model_copy(update={"endpoint": refused})
        return open_run_store(s3, credentials)

    rec = Reconciler(fake, OperatorConfig(), OperatorMetrics(), store_factory=store)
    rec.reconcile("ml", "demo")
    job_uid = fake.jobs["demo-pretrain"]["metadata"]["uid"]
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="runs/ml/demo/pretrain/FINAL", Body=b"checkpoints/x")
    fake.jobs["demo-pretrain"]["status"] = {
        "succeeded": 1,
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    down[0] = True
    for _ in range(2):
        plan = rec.reconcile("ml", "demo")
        assert plan is not None and plan.delete == [] and plan.create == []
    assert fake.jobs["demo-pretrain"]["metadata"]["uid"] == job_uid
    assert [r for r in fake.requests if isinstance(r, tuple)] == []  # nothing deleted
    reachable = _condition(fake.run, "StorageReachable")
    assert reachable["status"] == "False" and refused in reachable["message"]
    assert secret["AWS_SECRET_ACCESS_KEY"] not in json.dumps(fake.run)
    assert fake.run["status"]["stages"][0]["restarts"] == 0
    assert [r for _, r, _ in fake.events].count("StoreUnreachable") == 1

    down[0] = False
    rec.reconcile("ml", "demo")
    assert fake.run["status"]["stages"][0]["phase"] == "Succeeded"
    assert _condition(fake.run, "StorageReachable")["status"] == "True"
    assert "demo-sft" in fake.jobs


def test_a_foreign_job_with_the_stages_name_is_reported_not_adopted() -> None:
    """A Job named demo-pretrain that another run owns (and labels): the create gets a
    409, the reconciler looks, and the run reports it instead of taking it for its own."""
    run = _run("ckpt", "http://127.0.0.1:9")
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
    fake = FakeApi(run, {"s3-creds": {}})
    fake.jobs["demo-pretrain"] = copy.deepcopy(theirs)
    rec = Reconciler(
        fake, OperatorConfig(), OperatorMetrics(), store_factory=lambda *_: _no_store()
    )
    rec.reconcile("ml", "demo")
    conflict = _condition(fake.run, "ChildConflict")
    assert conflict["status"] == "True" and conflict["reason"] == "NotOwned"
    assert "Job ml/demo-pretrain" in conflict["message"] and "demo-pre" in conflict["message"]
    assert ("Warning", "NotOwned") in [(t, r) for t, r, _ in fake.events]
    assert fake.jobs["demo-pretrain"] == theirs  # untouched
    rec.reconcile("ml", "demo")
    assert [(t, r) for t, r, _ in fake.events].count(("Warning", "NotOwned")) == 1
    assert fake.run["status"]["stages"][0]["message"].startswith("waiting: Job ml/demo-pretrain")


def _no_store() -> Any:
    raise OSError("no store in this test")


def test_deleted_run_forgotten() -> None:
    fake = FakeApi({}, {})
    metrics = OperatorMetrics()
    metrics.observe_run(
        "ml", "demo", TrainingRunStatus(), TrainingRunStatus(phase=RunPhase.Running), {}, {}
    )
    rec = Reconciler(fake, OperatorConfig(), metrics)
    assert rec.reconcile("ml", "demo") is None
    assert metrics.snapshots() == {}
