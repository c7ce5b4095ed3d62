"""Kueue on the test control plane, with plain batch/v1 Jobs on the KWOK GPU nodes: what
kubetrain's queueing builds on (its stages are such Jobs). A Job waits while its
ClusterQueue's GPU quota is used and runs when it frees up; a Job of a higher
WorkloadPriorityClass preempts a lower one, whose Job is suspended again and requeued."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from controlplane import pinned_version
from kubernetes import client

from tests.support.kueue import (
    GPU_TYPE_LABEL,
    condition,
    create_priority_class,
    create_queue,
    gpu_job,
    wait_admitted,
    wait_pending,
    workload_of,
)
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gpu_nodes(control_plane: Any) -> Iterator[list[str]]:
    """Two 8-GPU h100 nodes: room for more than any queue's quota here, so that what
    holds a Job back is Kueue, never the scheduler. Removed after the module."""
    names = [f"kueue-h100-{i}" for i in range(2)]
    for name in names:
        control_plane.add_gpu_node(name, gpus=8, gpu_type="h100")
    yield names
    core = client.CoreV1Api(control_plane.api_client())
    for name in names:
        core.delete_node(name)


@pytest.fixture
def namespace(control_plane: Any, kueue: Any, gpu_nodes: list[str]) -> Iterator[str]:
    """A fresh namespace (also the name of its ClusterQueue); its Jobs and their pods are
    deleted afterwards, giving the nodes' GPUs back."""
    name = f"kq-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    yield name
    client.BatchV1Api(control_plane.api_client()).delete_collection_namespaced_job(
        name, propagation_policy="Background"
    )


def _running_pod(api: client.ApiClient, job: client.V1Job) -> client.V1Pod:
    core = client.CoreV1Api(api)

    def running() -> client.V1Pod | None:
        pods = core.list_namespaced_pod(
            job.metadata.namespace, label_selector=f"job-name={job.metadata.name}"
        ).items
        return next((p for p in pods if p.status.phase == "Running"), None)

    return wait_for(running, timeout=60, what=f"a Running pod of Job {job.metadata.name}")


def _pods(api: client.ApiClient, job: client.V1Job) -> list[client.V1Pod]:
    return (
        client.CoreV1Api(api)
        .list_namespaced_pod(job.metadata.namespace, label_selector=f"job-name={job.metadata.name}")
        .items
    )


def test_a_job_waits_for_gpu_quota_and_runs_when_it_frees_up(
    control_plane: Any, namespace: str
) -> None:
    api = control_plane.api_client()
    batch = client.BatchV1Api(api)
    queue = create_queue(api, namespace, namespace, gpus=8)

    first = batch.create_namespaced_job(namespace, gpu_job("first", queue, gpus=8))
    workload = wait_admitted(api, first)
    assert workload["status"]["admission"]["clusterQueue"] == namespace
    pod = _running_pod(api, first)
    # Admission put the pods on the flavor's nodes.
    assert pod.spec.node_selector == {GPU_TYPE_LABEL: "h100"}

    # Submitted unsuspended: Kueue's webhook suspends it, as it does any Job of a queue.
    job = gpu_job("second", queue, gpus=8)
    job.spec.suspend = False
    second = batch.create_namespaced_job(namespace, job)
    assert second.spec.suspend is True
    waiting = wait_pending(api, second)
    assert waiting["reason"] == "Pending"
    assert "insufficient unused quota for nvidia.com/gpu" in waiting["message"], waiting
    assert batch.read_namespaced_job("second", namespace).spec.suspend is True
    assert not _pods(api, second)

    control_plane.finish_pod(namespace, pod.metadata.name, 0)
    wait_admitted(api, second)
    _running_pod(api, second)
    finished = workload_of(api, first)
    assert finished is not None and condition(finished, "Finished", "True")


def test_a_higher_priority_job_preempts_a_lower_one(control_plane: Any, namespace: str) -> None:
    api = control_plane.api_client()
    batch = client.BatchV1Api(api)
    low = create_priority_class(api, f"{namespace}-low", 100)
    high = create_priority_class(api, f"{namespace}-high", 1000)
    queue = create_queue(
        api, namespace, namespace, gpus=8, preemption={"withinClusterQueue": "LowerPriority"}
    )

    background = batch.create_namespaced_job(
        namespace, gpu_job("background", queue, gpus=8, priority_class=low)
    )
    wait_admitted(api, background)
    _running_pod(api, background)

    urgent = batch.create_namespaced_job(
        namespace, gpu_job("urgent", queue, gpus=8, priority_class=high)
    )

    def preempted() -> dict[str, Any] | None:
        workload = workload_of(api, background)
        evicted = workload and condition(workload, "Evicted", "True")
        job = batch.read_namespaced_job("background", namespace)
        return evicted if evicted and job.spec.suspend else None

    evicted = wait_for(
        preempted,
        timeout=60,
        what="Kueue preempting the low-priority Job (Evicted, Job suspended)",
        detail=lambda: str((workload_of(api, background) or {}).get("status")),
    )
    assert evicted["reason"] == "Preempted", evicted
    wait_admitted(api, urgent)
    _running_pod(api, urgent)
    # The preempted Job is requeued: it waits for quota again, its pods gone.
    wait_pending(api, background)
    wait_for(
        lambda: not _pods(api, background),
        timeout=30,
        what="the preempted Job's pods being deleted",
    )


def test_a_multi_pod_job_is_admitted_whole_or_not_at_all(
    control_plane: Any, namespace: str
) -> None:
    """Kueue reserves quota for all of a Job's pods at once (a multi-node stage is one
    such Job): one that does not fit starts none of its pods."""
    api = control_plane.api_client()
    batch = client.BatchV1Api(api)
    queue = create_queue(api, namespace, namespace, gpus=12)

    too_big = batch.create_namespaced_job(namespace, gpu_job("too-big", queue, gpus=8, pods=2))
    waiting = wait_pending(api, too_big)
    assert "nvidia.com/gpu" in waiting["message"], waiting
    assert not _pods(api, too_big)

    fits = batch.create_namespaced_job(namespace, gpu_job("fits", queue, gpus=4, pods=2))
    workload = wait_admitted(api, fits)
    assert workload["spec"]["podSets"][0]["count"] == 2
    wait_for(
        lambda: len([p for p in _pods(api, fits) if p.status.phase == "Running"]) == 2,
        timeout=60,
        what="both pods of the admitted Job running",
    )
    assert batch.read_namespaced_job("too-big", namespace).spec.suspend is True


def test_kueue_is_the_pinned_version(kueue: Any) -> None:
    log = kueue.log_path.read_text()
    assert f'"gitVersion":"{pinned_version("kueue")}"' in log
