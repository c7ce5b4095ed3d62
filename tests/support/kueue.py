"""Kueue's objects as tests use them: GPU quotas (ResourceFlavor, ClusterQueue,
LocalQueue), WorkloadPriorityClasses, suspended Jobs submitted to a queue, and the
Workload Kueue makes of each Job (its admission state)."""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetrain.operator.resources import LABEL_GPU_TYPE
from tests.support.wait import wait_for

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
#: The labels by which a Job names its LocalQueue and its WorkloadPriorityClass.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
GPU = "nvidia.com/gpu"
#: The node label of a GPU type, which kubetrain selects nodes by and the test cluster's
#: GPU nodes carry; a flavor selects its nodes by it.
GPU_TYPE_LABEL = LABEL_GPU_TYPE


def _custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _body(
    kind: str, name: str, spec: dict[str, Any], namespace: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": metadata, "spec": spec}


def create_queue(
    api: client.ApiClient,
    name: str,
    namespace: str,
    *,
    gpus: int,
    gpu_type: str = "h100",
    cpu: str = "1000",
    memory: str = "10Ti",
    preemption: dict[str, Any] | None = None,
) -> str:
    """A ClusterQueue ``name`` with a quota of ``gpus`` ``nvidia.com/gpu`` (and ample CPU
    and memory) on the flavor of ``gpu_type`` nodes, open to ``namespace`` only, and the
    LocalQueue ``name`` in ``namespace`` that submits to it; returns the LocalQueue's name
    (the value of a Job's ``kueue.x-k8s.io/queue-name`` label).

    The flavor (``gpu-<gpu_type>``, shared by the queues of that type) carries the node
    label Kueue adds to an admitted Job's pods. ``preemption`` is the ClusterQueue's
    preemption policy, e.g. ``{"withinClusterQueue": "LowerPriority"}``."""
    flavor = f"gpu-{gpu_type}"
    custom = _custom(api)
    try:
        custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "resourceflavors",
            _body("ResourceFlavor", flavor, {"nodeLabels": {GPU_TYPE_LABEL: gpu_type}}),
        )
    except ApiException as exc:
        if exc.status != 409:  # another queue of this GPU type made it
            raise
    quotas = {"cpu": cpu, "memory": memory, GPU: str(gpus)}
    spec: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "resourceGroups": [
            {
                "coveredResources": list(quotas),
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [{"name": r, "nominalQuota": q} for r, q in quotas.items()],
                    }
                ],
            }
        ],
    }
    if preemption:
        spec["preemption"] = preemption
    custom.create_cluster_custom_object(
        GROUP, VERSION, "clusterqueues", _body("ClusterQueue", name, spec)
    )
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "localqueues",
        _body("LocalQueue", name, {"clusterQueue": name}, namespace),
    )

    def active() -> bool:
        cq = custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", name)
        return condition(cq, "Active", "True") is not None

    wait_for(active, timeout=30, what=f"ClusterQueue {name} to become Active")
    return name


def create_priority_class(api: client.ApiClient, name: str, value: int) -> str:
    """A WorkloadPriorityClass (Kueue's, independent of pod priority); its name."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
    }
    _custom(api).create_cluster_custom_object(GROUP, VERSION, "workloadpriorityclasses", body)
    return name


def gpu_job(
    name: str,
    queue: str,
    *,
    gpus: int,
    pods: int = 1,
    priority_class: str | None = None,
) -> client.V1Job:
    """A Job of ``pods`` pods (one Indexed group, as kubetrain's stages) of ``gpus`` GPUs
    each, created suspended in LocalQueue ``queue``: Kueue unsuspends it on admission."""
    labels = {QUEUE_LABEL: queue}
    if priority_class:
        labels[PRIORITY_LABEL] = priority_class
    container = client.V1Container(
        name="trainer",
        image="registry.example/trainer:test",
        resources=client.V1ResourceRequirements(
            requests={"cpu": "1", "memory": "1Gi", GPU: str(gpus)},
            limits={GPU: str(gpus)},
        ),
    )
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1JobSpec(
            suspend=True,
            completions=pods,
            parallelism=pods,
            completion_mode="Indexed",
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(restart_policy="Never", containers=[container])
            ),
        ),
    )


def workload_of(api: client.ApiClient, job: client.V1Job) -> dict[str, Any] | None:
    """The Workload Kueue made for ``job`` (owned by it), or None while there is none."""
    items = _custom(api).list_namespaced_custom_object(
        GROUP, VERSION, job.metadata.namespace, "workloads"
    )["items"]
    for workload in items:
        owners = workload["metadata"].get("ownerReferences") or []
        if any(o["uid"] == job.metadata.uid for o in owners):
            return workload
    return None


def condition(obj: dict[str, Any], type_: str, status: str | None = None) -> dict[str, Any] | None:
    """``obj``'s status condition ``type_`` (with ``status``, when given), or None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_ and (status is None or cond["status"] == status):
            return dict(cond)
    return None


def _job(api: client.ApiClient, job: client.V1Job) -> client.V1Job:
    return client.BatchV1Api(api).read_namespaced_job(job.metadata.name, job.metadata.namespace)


def wait_admitted(api: client.ApiClient, job: client.V1Job, timeout: float = 60) -> dict[str, Any]:
    """Wait until Kueue admitted ``job``'s Workload and unsuspended the Job; the Workload."""

    def admitted() -> dict[str, Any] | None:
        workload = workload_of(api, job)
        if workload and condition(workload, "Admitted", "True") and not _job(api, job).spec.suspend:
            return workload
        return None

    return wait_for(
        admitted,
        timeout=timeout,
        what=f"Kueue admitting Job {job.metadata.name}",
        detail=lambda: str((workload_of(api, job) or {}).get("status")),
    )


def wait_pending(api: client.ApiClient, job: client.V1Job, timeout: float = 60) -> dict[str, Any]:
    """Wait until ``job``'s Workload waits for quota (QuotaReserved False); that condition
    (its reason and message say why)."""

    def pending() -> dict[str, Any] | None:
        workload = workload_of(api, job)
        return condition(workload, "QuotaReserved", "False") if workload else None

    return wait_for(
        pending,
        timeout=timeout,
        what=f"Job {job.metadata.name}'s Workload waiting for quota",
        detail=lambda: str((workload_of(api, job) or {}).get("status")),
    )
