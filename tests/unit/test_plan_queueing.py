"""Shared clusters in the plan: Kueue queues (suspended Jobs, condition Queued, Kueue's
preemptions counted as preemptions), gang release without Kueue, the S3 endpoint
allowlist, the administrator's placement defaults and the trainer pods' token."""

from __future__ import annotations

import pytest

from kubetrain.core.api import TrainingRunSpec
from kubetrain.core.conditions import Reason
from kubetrain.operator import resources
from kubetrain.operator.config import ConfigError, OperatorConfig, load_config
from kubetrain.operator.progress import pod_gpu_seconds
from tests.unit.planworld import T0, World, manifest


def queued_world(**labels: str) -> World:
    run = manifest(queueName="gpus")
    run["metadata"]["labels"] = labels
    return World(run)


def test_a_queued_run_creates_suspended_jobs_in_its_queue_with_its_priority() -> None:
    w = queued_world(**{resources.LABEL_PRIORITY_CLASS: "research"})
    w.reconcile()
    job = w.job("pretrain")
    assert job["spec"]["suspend"] is True
    labels = job["metadata"]["labels"]
    assert labels[resources.LABEL_QUEUE] == "gpus"
    assert labels[resources.LABEL_PRIORITY_CLASS] == "research"


def test_the_queue_label_on_the_run_names_the_queue_too() -> None:
    run = manifest()
    run["metadata"]["labels"] = {resources.LABEL_QUEUE: "team-a"}
    w = World(run)
    w.reconcile()
    assert w.job("pretrain")["metadata"]["labels"][resources.LABEL_QUEUE] == "team-a"


def test_a_run_without_a_queue_is_not_suspended_and_has_no_queue_labels() -> None:
    run = manifest()
    run["metadata"]["labels"] = {resources.LABEL_PRIORITY_CLASS: "research"}
    w = World(run)
    w.reconcile()
    job = w.job("pretrain")
    assert job["spec"]["suspend"] is False
    assert not {resources.LABEL_QUEUE, resources.LABEL_PRIORITY_CLASS} & set(
        job["metadata"]["labels"]
    )
    assert w.condition("Queued") is None


def test_a_waiting_stage_is_queued_with_kueues_reason_and_is_not_billed() -> None:
    w = queued_world()
    w.reconcile()
    w.kueue_waits("pretrain", "insufficient unused quota for nvidia.com/gpu, 8 more needed")
    w.tick(600)
    w.reconcile()
    queued = w.condition("Queued")
    assert queued is not None and queued["status"] == "True"
    assert queued["reason"] == "Pending"
    assert "LocalQueue 'gpus'" in queued["message"]
    assert "8 more needed" in queued["message"]
    assert w.status["phase"] == "Pending"
    running = w.condition("Running")
    assert running is not None and running["reason"] == Reason.QUEUED
    assert w.stage_status("pretrain")["gpuSeconds"] == 0
    assert [e.reason for e in w.events].count(Reason.STAGE_QUEUED) == 1
    # Never released as a gang that did not schedule: Kueue decides, not a timeout.
    assert not w.deleted

    w.kueue_admits("pretrain")
    w.tick(10)
    w.reconcile()
    admitted = w.condition("Queued")
    assert admitted is not None and admitted["status"] == "False"
    assert admitted["reason"] == Reason.ADMITTED
    assert w.status["phase"] == "Running"
    # Billed from admission on: 2 pods × 8 GPUs × 10 s.
    assert w.stage_status("pretrain")["gpuSeconds"] == pytest.approx(160)


def test_kueue_preemption_is_a_preemption_not_a_failure_and_the_job_is_left_to_kueue() -> None:
    w = queued_world()
    w.reconcile()
    w.kueue_admits("pretrain")
    w.reconcile()
    uid = w.job("pretrain")["metadata"]["uid"]
    w.tick(30)
    w.kueue_preempts("pretrain")
    w.reconcile()
    st = w.stage_status("pretrain")
    assert (st["preemptions"], st["restarts"]) == (1, 0)
    assert w.condition("Queued")["status"] == "True"
    restarting = w.condition("Restarting")
    assert restarting["status"] == "True" and restarting["reason"] == Reason.PREEMPTED
    assert Reason.STAGE_PREEMPTED in [e.reason for e in w.events]
    # The Job stays: Kueue readmits it; the operator neither deletes nor recreates it.
    assert not w.deleted and len(w.created) == 2
    billed = st["gpuSeconds"]
    assert billed == pytest.approx(2 * 8 * 30)

    # Observed again while it waits: nothing counted twice, nothing billed.
    w.tick(120)
    w.reconcile()
    st = w.stage_status("pretrain")
    assert st["preemptions"] == 1 and st["gpuSeconds"] == pytest.approx(billed)

    w.kueue_admits("pretrain")
    w.tick(5)
    w.reconcile()
    st = w.stage_status("pretrain")
    assert (st["preemptions"], st["restarts"]) == (1, 0)
    assert w.job("pretrain")["metadata"]["uid"] == uid
    assert w.status["phase"] == "Running"
    assert w.condition("Restarting")["reason"] == Reason.RESTARTED

    w.tick(30)
    w.kueue_preempts("pretrain")
    w.reconcile()
    assert w.stage_status("pretrain")["preemptions"] == 2


def test_an_eviction_seen_before_the_jobs_suspension_shows_the_stage_requeued() -> None:
    w = queued_world()
    w.reconcile()
    w.kueue_admits("pretrain")
    w.reconcile()
    w.tick(30)
    w.kueue_preempts("pretrain")
    w.job("pretrain")["spec"]["suspend"] = False  # the Job's watch event is late
    w.reconcile()
    assert w.stage_status("pretrain")["preemptions"] == 1
    assert w.condition("Restarting")["reason"] == Reason.PREEMPTED
    assert w.condition("Queued")["status"] == "True"


def test_an_eviction_whose_pods_were_counted_first_is_counted_once() -> None:
    """The pods' exit code (75) can reach the operator before the Workload's eviction."""
    w = queued_world()
    w.reconcile()
    w.kueue_admits("pretrain")
    w.reconcile()
    w.tick(30)
    w.kueue_preempts("pretrain")
    workloads, w.workloads = w.workloads, []  # the Workload's watch event is late
    w.reconcile()
    assert w.stage_status("pretrain")["preemptions"] == 1
    w.workloads = workloads
    w.tick(1)
    w.reconcile()
    assert w.stage_status("pretrain")["preemptions"] == 1


def test_a_multi_node_gang_not_scheduled_in_time_is_released_without_a_failure() -> None:
    w = World(manifest(), config=OperatorConfig(gang_schedule_timeout_seconds=300))
    w.reconcile()
    job = w.job("pretrain")
    # One of the two pods found a node, the other did not.
    w.pods_running("pretrain")
    w.pods[0]["spec"] = {"nodeName": "gpu-1"}
    w.pods[1]["status"] = {"phase": "Pending"}
    w.tick(200)
    w.reconcile()
    assert not w.deleted
    w.tick(101)
    w.reconcile()
    assert [d.name for d in w.deleted] == [job["metadata"]["name"]]
    st = w.stage_status("pretrain")
    assert st["restarts"] == 0 and st["preemptions"] == 0
    assert "only 1 of 2 pods were scheduled" in st["message"]
    assert st["gpuSeconds"] == 0  # the gang never ran whole
    restarting = w.condition("Restarting")
    assert restarting["reason"] == Reason.GANG_TIMEOUT
    assert Reason.GANG_RELEASED in [e.reason for e in w.events]

    # Retried after the backoff, not before.
    w.job_gone("pretrain")
    w.reconcile()
    assert "pretrain" not in {
        j["metadata"]["labels"][resources.LABEL_STAGE] for j in w.jobs.values()
    }
    assert w.condition("Restarting")["reason"] == Reason.GANG_TIMEOUT
    w.tick(w.config.restart_backoff_seconds + 1)
    w.reconcile()
    assert w.job("pretrain")["metadata"]["uid"] != job["metadata"]["uid"]
    assert w.stage_status("pretrain")["restarts"] == 0


def test_single_node_stages_and_a_zero_timeout_never_release() -> None:
    w = World(manifest(), config=OperatorConfig(gang_schedule_timeout_seconds=0))
    w.reconcile()
    w.tick(86400)
    w.reconcile()
    assert not w.deleted


def test_a_gang_is_billed_from_when_all_its_pods_run() -> None:
    from datetime import timedelta

    from kubetrain.operator.progress import format_time

    def pod(start_offset: float) -> dict[str, object]:
        started = format_time(T0 + timedelta(seconds=start_offset))
        return {"metadata": {}, "status": {"phase": "Running", "startTime": started}}

    now = T0 + timedelta(seconds=100)
    assert pod_gpu_seconds([pod(0)], 8, now, gang=2) == 0
    # The second pod started at 60 s: both billed from then, 2 × 8 × 40.
    assert pod_gpu_seconds([pod(0), pod(60)], 8, now, gang=2) == pytest.approx(640)
    assert pod_gpu_seconds([pod(0)], 8, now) == pytest.approx(800)


def test_an_endpoint_outside_the_allowlist_is_refused_naming_the_field() -> None:
    config = OperatorConfig(allowed_s3_endpoints=["https://minio.storage:9000/"])
    w = World(manifest(), config=config)
    w.reconcile()
    cond = w.condition("StorageConfigured")
    assert cond["status"] == "False" and cond["reason"] == Reason.ENDPOINT_NOT_ALLOWED
    assert "spec.storage.s3.endpoint='http://s3.local:9000'" in cond["message"]
    assert "https://minio.storage:9000/" in cond["message"]
    assert not w.jobs

    w.run["spec"]["storage"]["s3"]["endpoint"] = "https://minio.storage:9000"
    w.reconcile()
    assert w.condition("StorageConfigured")["status"] == "True"
    assert w.jobs


def test_an_empty_allowlist_allows_any_endpoint() -> None:
    w = World(manifest())
    w.reconcile()
    assert w.jobs


def test_the_allowlist_takes_urls_only(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "config.yaml"
    path.write_text("allowedS3Endpoints: [minio.storage:9000]\n")
    with pytest.raises(ConfigError, match="allowedS3Endpoints"):
        load_config(str(path))


def _pod_spec(spec: dict[str, object], config: OperatorConfig) -> dict[str, object]:
    parsed = TrainingRunSpec.model_validate(spec)
    job = resources.build_job(parsed, 0, run="demo", namespace="ml", uid="u", config=config)
    return job["spec"]["template"]["spec"]


def test_admin_defaults_place_trainer_pods_under_the_stages_own_choices() -> None:
    config = OperatorConfig.model_validate(
        {
            "defaultNodeSelector": {"pool": "gpu", "zone": "a"},
            "defaultTolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "serviceAccount": "trainer",
        }
    )
    spec = manifest()["spec"]
    spec["stages"][0]["resources"]["nodeSelector"] = {"zone": "b"}
    spec["stages"][0]["resources"]["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "team", "operator": "Equal", "value": "ml"},
    ]
    pod = _pod_spec(spec, config)
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "b", resources.LABEL_GPU_TYPE: "h100"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "team"]
    assert pod["serviceAccountName"] == "trainer"


def test_trainer_pods_get_no_token_unless_the_run_asks() -> None:
    spec = manifest()["spec"]
    assert _pod_spec(spec, OperatorConfig())["automountServiceAccountToken"] is False
    spec["automountServiceAccountToken"] = True
    assert _pod_spec(spec, OperatorConfig())["automountServiceAccountToken"] is True


def test_workloads_wake_the_run_whose_job_they_admit() -> None:
    from kubetrain.operator.controller import ClusterCache
    from kubetrain.operator.informer import trim_workload
    from kubetrain.operator.plan.observed import ObservedWorkload

    cache = ClusterCache()
    job = {
        "metadata": {
            "name": "demo-pretrain",
            "namespace": "ml",
            "uid": "job-1",
            "labels": {resources.LABEL_RUN: "demo"},
        }
    }
    workload = {
        "metadata": {
            "name": "job-demo-pretrain-1",
            "namespace": "ml",
            "uid": "wl-1",
            "ownerReferences": [{"kind": "Job", "uid": "job-1", "name": "demo-pretrain"}],
            "managedFields": [{"manager": "kueue"}],
        },
        "spec": {"podSets": [{"name": "main", "count": 2}]},
        "status": {
            "conditions": [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": "Pending",
                    "message": "insufficient unused quota for nvidia.com/gpu",
                    "lastTransitionTime": "2025-01-01T12:00:00Z",
                }
            ],
            "schedulingStats": {
                "evictions": [
                    {"reason": "Preempted", "underlyingCause": "", "count": 2},
                    {"reason": "PodsReadyTimeout", "underlyingCause": "", "count": 1},
                ]
            },
        },
    }
    trimmed = trim_workload(workload)
    assert "spec" not in trimmed and "managedFields" not in trimmed["metadata"]
    # Before its Job is seen, a Workload wakes nobody (the Job's own event will).
    assert cache.on_workload(None, trimmed) == set()
    assert cache.on_child("jobs", None, job) == {("ml", "demo")}
    assert cache.workloads("ml", "demo") == [trimmed]
    assert cache.on_workload(trimmed, trimmed) == {("ml", "demo")}
    seen = ObservedWorkload.from_k8s(trimmed)
    assert seen is not None
    assert (seen.job_uid, seen.evictions, seen.admitted) == ("job-1", 3, False)
    assert seen.waiting == "Pending: insufficient unused quota for nvidia.com/gpu"
    cache.on_child("jobs", job, None)
    assert cache.workloads("ml", "demo") == []
