"""Pure builders of the Kubernetes objects a TrainingRun owns: per stage one Indexed Job
(one pod per node) and one headless Service (stable DNS names for the rendezvous).

Nothing here talks to the API; every function returns plain dicts, so the objects are
tested by comparing them with golden files (tests/unit/golden/).
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubetrain.core import api, contract
from kubetrain.core.api import TrainingRunSpec
from kubetrain.operator.config import OperatorConfig

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "kubetrain.dev/run"
LABEL_STAGE = "kubetrain.dev/stage"
LABEL_GPU_TYPE = "kubetrain.dev/gpu-type"
# The stage's failure count (status restarts) when this Job was created: a failed Job
# whose attempt is N means N + 1 failures, however often the operator observes it (see
# kubetrain.operator.plan).
ANNOTATION_ATTEMPT = "kubetrain.dev/attempt"
ANNOTATION_STAGE_INDEX = "kubetrain.dev/stage-index"
# Kueue's labels: the LocalQueue that admits a Job, and its WorkloadPriorityClass.
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
GPU_RESOURCE = "nvidia.com/gpu"
CONTAINER_NAME = "trainer"
TRAINER_COMMAND = ["python", "-m", "kubetrain_trainer"]
NONROOT_UID = 1000

# Pods of an Indexed Job are named `<job>-<index>-<5 random>` and get the host name
# `<job>-<index>`, a DNS label of at most 63 characters. With up to 1024 nodes the suffix
# is at most `-1023-xxxxx` (11 characters), so the Job name may use 52.
MAX_CHILD_NAME = 52


def child_name(run: str, stage: str) -> str:
    """``<run>-<stage>``: the deterministic name of a stage's Job and Service.

    Too long a name is cut and made unique again with a hash of the full one; a name
    starting with a digit gets a ``kt-`` prefix, because Service names must start with
    a letter (DNS-1035).
    """
    full = f"{run}-{stage}"
    name = full if full[0].isalpha() else f"kt-{full}"
    if len(name) <= MAX_CHILD_NAME:
        return name
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{name[: MAX_CHILD_NAME - 9].rstrip('-')}-{digest}"


def labels(run: str, stage: str) -> dict[str, str]:
    """Labels of every child of a run (and of its pods)."""
    return {
        LABEL_NAME: "kubetrain",
        LABEL_INSTANCE: run,
        LABEL_COMPONENT: "trainer",
        LABEL_MANAGED_BY: "kubetrain",
        LABEL_RUN: run,
        LABEL_STAGE: stage,
    }


def owner_reference(run: str, uid: str) -> dict[str, Any]:
    """Makes the TrainingRun the controller of a child, so that deleting the run
    garbage-collects the child (no finalizer needed)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": run,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, namespace: str, run: str, stage: str, uid: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(run, stage),
        "ownerReferences": [owner_reference(run, uid)],
    }


def build_service(*, run: str, namespace: str, uid: str, stage: str) -> dict[str, Any]:
    """The headless Service that gives the stage's pods the DNS names
    ``<job>-<index>.<service>`` (rank 0 is the torchrun master)."""
    name = child_name(run, stage)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, run, stage, uid),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before they are Ready (the rendezvous is what
            # makes them ready).
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: run, LABEL_STAGE: stage},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": contract.MASTER_PORT,
                    "targetPort": contract.MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _container_resources(res: api.Resources) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus_per_node > 0:
        amounts[GPU_RESOURCE] = str(res.gpus_per_node)
    # requests == limits: Guaranteed QoS for the stage's pods, and GPUs require it.
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_failure_policy() -> dict[str, Any]:
    """Pod failures that are not the trainer's fault do not fail the Job: a pod with the
    condition DisruptionTarget (eviction through the API, a node drain, preemption by
    the scheduler, taint-based eviction) or whose trainer exited with
    ``EXIT_CHECKPOINTED_ON_SIGTERM`` (it checkpointed on SIGTERM) is ignored, and the
    Job controller replaces it; the replacement resumes from LATEST. With a pod failure
    policy the Job controller replaces a pod only once it is fully terminated
    (podReplacementPolicy Failed), so two pods of one index never run at once."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [contract.EXIT_CHECKPOINTED_ON_SIGTERM],
                },
            },
        ]
    }


def _placement(res: api.Resources, config: OperatorConfig) -> dict[str, Any]:
    """nodeSelector and tolerations of a stage's pods: the operator's defaults (an
    administrator's GPU pool), then the stage's own (which win on the same label key)."""
    out: dict[str, Any] = {}
    node_selector = {**config.default_node_selector, **res.node_selector}
    if res.gpu_type:
        node_selector[LABEL_GPU_TYPE] = res.gpu_type
    if node_selector:
        out["nodeSelector"] = node_selector
    tolerations = [api.dump(t) for t in config.default_tolerations]
    tolerations += [t for t in map(api.dump, res.tolerations) if t not in tolerations]
    if tolerations:
        out["tolerations"] = tolerations
    return out


def build_job(
    spec: TrainingRunSpec,
    index: int,
    *,
    run: str,
    namespace: str,
    uid: str,
    config: OperatorConfig,
    attempt: int = 0,
    suspend: bool = False,
    queue: str | None = None,
    priority_class: str | None = None,
) -> dict[str, Any]:
    """The Indexed Job of stage ``index``: ``nodes`` pods started together.

    With a Kueue ``queue`` (and ``priority_class``) the Job is created suspended and
    labelled for that LocalQueue: Kueue admits it (all its pods or none) by unsuspending
    it, and suspends it again to preempt it. The operator never unsuspends it itself.

    ``backoffLimit`` is 0 on purpose: with several ranks, one failed pod leaves the
    others hanging in collectives, so the whole gang must restart. The Job fails at the
    first pod failure that ``pod_failure_policy`` does not ignore, and the operator
    deletes and recreates it (up to the stage's ``maxRestarts``, with backoff), the
    trainer resuming from LATEST. ``attempt`` is the failure count before this Job.
    """
    if spec.storage.s3 is None:
        raise ValueError("spec.storage.s3 is required to build a Job (the pods need a store)")
    stage = spec.stages[index]
    res = stage.resources
    name = child_name(run, stage.name)
    env = contract.stage_environment(
        spec,
        index,
        run=run,
        namespace=namespace,
        store_root=spec.storage.s3.uri(),
        master_addr=contract.master_address(name, name),
    )
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(TRAINER_COMMAND),
        "env": [e.to_k8s() for e in env],
        "ports": [
            {"name": "metrics", "containerPort": contract.METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": contract.MASTER_PORT, "protocol": "TCP"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    container_resources = _container_resources(res)
    if container_resources:
        container["resources"] = container_resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NONROOT_UID,
            "runAsGroup": NONROOT_UID,
            "fsGroup": NONROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        # NCCL and DataLoader workers share tensors through /dev/shm; the container
        # default of 64 MiB is far too small.
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}}
        ],
    }
    pod_spec.update(_placement(res, config))
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    # The trainer never calls the Kubernetes API: no token in its pods unless asked.
    pod_spec["automountServiceAccountToken"] = spec.automount_service_account_token
    meta = _metadata(name, namespace, run, stage.name, uid)
    meta["annotations"] = {ANNOTATION_ATTEMPT: str(attempt), ANNOTATION_STAGE_INDEX: str(index)}
    if queue:
        meta["labels"][LABEL_QUEUE] = queue
        if priority_class:
            meta["labels"][LABEL_PRIORITY_CLASS] = priority_class
        suspend = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": res.nodes,
            "parallelism": res.nodes,
            "backoffLimit": 0,
            "podFailurePolicy": pod_failure_policy(),
            "podReplacementPolicy": "Failed",
            "suspend": suspend,
            "template": {
                "metadata": {
                    "labels": labels(run, stage.name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(contract.METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                        ANNOTATION_ATTEMPT: str(attempt),
                    },
                },
                "spec": pod_spec,
            },
        },
    }
