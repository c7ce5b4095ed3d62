"""The local control plane behaves like a real cluster where the operator needs it.

Covers: the pinned server version, fake GPU nodes, scheduling onto them, real
pod phases driving the Job controller, and garbage collection.
"""

from __future__ import annotations

import os
import uuid

import pytest
from controlplane import (
    EXIT_CODE_ANNOTATION,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GPU_TYPE_LABEL,
    ControlPlane,
    pinned_version,
    wait_for,
)
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0


def _name(prefix: str) -> str:
    # Tests share one cluster; unique names keep them independent.
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _gpu_container() -> client.V1Container:
    return client.V1Container(
        name="trainer",
        # Never pulled: kwok only simulates the container.
        image="registry.invalid/kubetrain/trainer:test",
        resources=client.V1ResourceRequirements(limits={GPU_RESOURCE: "1"}),
    )


def _wait_pod_phase(
    cp: ControlPlane, core: client.CoreV1Api, ns: str, name: str, phase: str
) -> client.V1Pod:
    def probe() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase == phase else None

    return wait_for(
        f"pod {ns}/{name} to reach phase {phase}",
        probe,
        TIMEOUT,
        detail=lambda: f"{_describe_pod(core, ns, name)}\n{cp.logs('kwok')}",
    )


def _describe_pod(core: client.CoreV1Api, ns: str, name: str) -> str:
    try:
        pod = core.read_namespaced_pod(name, ns)
    except ApiException as exc:
        return f"pod {ns}/{name} unreadable: {exc.status} {exc.reason}"
    return (
        f"pod {ns}/{name}: phase={pod.status.phase} node={pod.spec.node_name} "
        f"conditions={[(c.type, c.status, c.reason) for c in pod.status.conditions or []]}"
    )


def test_server_reports_pinned_version(control_plane: ControlPlane) -> None:
    version = control_plane.server_version()
    expected = (
        control_plane.apiserver_binary_version()
        if control_plane.external_assets
        else pinned_version("k8s")
    )
    assert version["git_version"] == expected
    major, minor = expected.lstrip("v").split(".")[:2]
    assert (version["major"], version["minor"]) == (major, minor)


def test_gpu_node_is_ready_with_gpus(control_plane: ControlPlane) -> None:
    core = client.CoreV1Api(control_plane.api_client())
    name = _name("gpu-node")
    control_plane.add_gpu_node(name, gpus=4, gpu_type="a100")

    node = core.read_node(name)
    conditions = {c.type: c.status for c in node.status.conditions}
    assert conditions["Ready"] == "True"
    assert node.status.allocatable[GPU_RESOURCE] == "4"
    assert node.status.capacity[GPU_RESOURCE] == "4"
    assert node.metadata.labels[GPU_TYPE_LABEL] == "a100"
    assert node.metadata.labels[GPU_PRODUCT_LABEL].startswith("NVIDIA-A100")

    ns = _name("ns")
    control_plane.create_namespace(ns)
    assert core.read_namespace(ns).status.phase == "Active"


def test_indexed_job_completes_from_real_pod_phases(control_plane: ControlPlane) -> None:
    api = control_plane.api_client()
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    node, ns, job_name = _name("gpu-job-node"), _name("jobs"), "train"
    control_plane.add_gpu_node(node, gpus=8)
    control_plane.create_namespace(ns)

    job = client.V1Job(
        metadata=client.V1ObjectMeta(name=job_name),
        spec=client.V1JobSpec(
            completion_mode="Indexed",
            completions=2,
            parallelism=2,
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    node_selector={"kubernetes.io/hostname": node},
                    containers=[_gpu_container()],
                )
            ),
        ),
    )
    batch.create_namespaced_job(ns, job)

    def pods_running() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(ns, label_selector=f"job-name={job_name}").items
        if len(pods) == 2 and all(
            p.spec.node_name == node and p.status.phase == "Running" for p in pods
        ):
            return pods
        return None

    pods = wait_for(
        f"both pods of job {ns}/{job_name} to run on node {node}",
        pods_running,
        TIMEOUT,
        detail=lambda: "\n".join(
            [
                *(
                    _describe_pod(core, ns, p.metadata.name)
                    for p in core.list_namespaced_pod(ns).items
                ),
                control_plane.logs("kube-scheduler"),
            ]
        ),
    )
    indexes = sorted(
        p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"]

    # Nothing completes the pods but the exit code we report for them.
    assert batch.read_namespaced_job(job_name, ns).status.succeeded in (None, 0)
    for pod in pods:
        control_plane.finish_pod(ns, pod.metadata.name, 0)

    def complete() -> client.V1Job | None:
        current = batch.read_namespaced_job(job_name, ns)
        conditions = {c.type: c.status for c in current.status.conditions or []}
        return current if conditions.get("Complete") == "True" else None

    done = wait_for(
        f"job {ns}/{job_name} to get condition Complete=True",
        complete,
        TIMEOUT,
        detail=lambda: control_plane.logs("kube-controller-manager"),
    )
    assert done.status.succeeded == 2
    assert not done.status.failed


@pytest.mark.parametrize(("exit_code", "phase"), [(0, "Succeeded"), (1, "Failed")])
def test_pod_exit_code_sets_phase(control_plane: ControlPlane, exit_code: int, phase: str) -> None:
    core = client.CoreV1Api(control_plane.api_client())
    node, ns, name = _name("gpu-pod-node"), _name("pods"), "worker"
    control_plane.add_gpu_node(node, gpus=1)
    control_plane.create_namespace(ns)
    core.create_namespaced_pod(
        ns,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PodSpec(
                restart_policy="Never",
                node_selector={"kubernetes.io/hostname": node},
                containers=[_gpu_container()],
            ),
        ),
    )
    _wait_pod_phase(control_plane, core, ns, name, "Running")

    control_plane.finish_pod(ns, name, exit_code)
    pod = _wait_pod_phase(control_plane, core, ns, name, phase)
    assert pod.metadata.annotations[EXIT_CODE_ANNOTATION] == str(exit_code)
    (status,) = pod.status.container_statuses
    assert status.state.terminated is not None
    assert status.state.terminated.exit_code == exit_code


def test_deleting_owner_garbage_collects_owned(control_plane: ControlPlane) -> None:
    core = client.CoreV1Api(control_plane.api_client())
    ns = _name("gc")
    control_plane.create_namespace(ns)
    owner = core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owned", owner_references=[ref]))
    )

    core.delete_namespaced_config_map("owner", ns)

    def owned_gone() -> bool:
        try:
            core.read_namespaced_config_map("owned", ns)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_for(
        f"garbage collector to delete configmap {ns}/owned after its owner",
        owned_gone,
        TIMEOUT,
        detail=lambda: control_plane.logs("kube-controller-manager"),
    )


def test_teardown_leaves_no_processes() -> None:
    # A second, short-lived control plane: the session one is torn down after
    # the last test, where nothing could assert on it.
    with ControlPlane() as cp:
        pids = cp.pids()
        workdir = cp.workdir
        assert len(pids) == 5
    survivors = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        survivors.append(pid)
    assert not survivors, f"processes left after teardown: {survivors}"
    assert not workdir.exists()
