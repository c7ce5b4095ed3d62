"""The Job and Service a stage gets: golden files for the full objects (regenerate with
``UPDATE_GOLDEN=1``) and parametrized cases for the parts that vary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetrain.core.api import parse_spec
from kubetrain.operator import resources
from kubetrain.operator.config import OperatorConfig

GOLDEN = Path(__file__).parent / "golden"
SECRET_VALUES = ("AKIAEXAMPLESECRETID", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def spec_dict(**stage_resources: Any) -> dict[str, Any]:
    return {
        "image": "registry.example/trainer:1.2",
        "storage": {
            "s3": {
                "bucket": "ckpt",
                "prefix": "runs",
                "endpoint": "http://minio.storage:9000",
                "credentialsSecret": "s3-creds",
            }
        },
        "stages": [
            {
                "name": "pretrain",
                "type": "pretrain",
                "hyperparameters": {"maxSteps": 100},
                "resources": {
                    "nodes": 2,
                    "gpusPerNode": 8,
                    "gpuType": "h100",
                    "cpu": "32",
                    "memory": "256Gi",
                    **stage_resources,
                },
            },
            {"name": "sft", "type": "sft", "resources": {"cpu": "2", "memory": "4Gi"}},
        ],
    }


def job(spec: dict[str, Any], index: int = 0, run: str = "demo", **kw: Any) -> dict[str, Any]:
    return resources.build_job(
        parse_spec(spec), index, run=run, namespace="ml", uid="uid-1", config=OperatorConfig(), **kw
    )


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def check_golden(name: str, obj: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.yaml"
    text = yaml.safe_dump(obj, sort_keys=True, width=100)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing (UPDATE_GOLDEN=1 writes it)"
    assert text == path.read_text(), f"{path} differs (UPDATE_GOLDEN=1 regenerates it)"


@pytest.mark.parametrize(
    "obj",
    [
        job(spec_dict()),
        job(spec_dict(), index=1),
        resources.build_service(run="demo", namespace="ml", uid="u", stage="sft"),
    ],
    ids=["gpu-job", "cpu-job", "service"],
)
def test_objects_valid_against_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_golden_multinode_gpu_job() -> None:
    check_golden(
        "job-multinode-gpu",
        job(
            spec_dict(
                tolerations=[
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ]
            )
        ),
    )


def test_golden_cpu_job() -> None:
    check_golden("job-cpu-sft", job(spec_dict(), index=1, attempt=2))


def test_golden_service() -> None:
    check_golden(
        "service",
        resources.build_service(run="demo", namespace="ml", uid="uid-1", stage="pretrain"),
    )


@pytest.mark.parametrize("nodes", [1, 2, 64])
def test_indexed_job_one_pod_per_node(nodes: int) -> None:
    obj = job(spec_dict(nodes=nodes))
    assert obj["spec"]["completionMode"] == "Indexed"
    assert obj["spec"]["completions"] == obj["spec"]["parallelism"] == nodes
    env = {e["name"]: e for e in pod(obj)["containers"][0]["env"]}
    assert env["PET_NNODES"]["value"] == str(nodes)
    assert env["PET_MASTER_ADDR"]["value"] == "demo-pretrain-0.demo-pretrain"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


@pytest.mark.parametrize(("gpus", "expected"), [(0, None), (1, "1"), (8, "8")])
def test_gpu_requests_equal_limits(gpus: int, expected: str | None) -> None:
    res = pod(job(spec_dict(gpusPerNode=gpus)))["containers"][0]["resources"]
    assert res["requests"].get("nvidia.com/gpu") == expected
    assert res["limits"] == res["requests"]


def test_cpu_only_stage_has_no_gpu_and_no_gpu_selector() -> None:
    raw = spec_dict()
    raw["stages"][0]["resources"] = {}
    p = pod(job(raw))
    assert "resources" not in p["containers"][0]
    assert "nodeSelector" not in p


def test_gpu_type_selects_nodes_and_keeps_user_selector() -> None:
    p = pod(job(spec_dict(nodeSelector={"pool": "train"})))
    assert p["nodeSelector"] == {"pool": "train", "kubetrain.dev/gpu-type": "h100"}


def test_tolerations_rendered_without_unset_fields() -> None:
    p = pod(job(spec_dict(tolerations=[{"key": "gpu", "operator": "Exists"}])))
    assert p["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


@pytest.mark.parametrize("run", ["r", "a" * 40, "b" * 63, "7-digits-first"])
def test_long_or_odd_names_fit_dns_labels(run: str) -> None:
    obj = job(spec_dict(), run=run)
    name = obj["metadata"]["name"]
    assert len(name) <= resources.MAX_CHILD_NAME
    assert len(f"{name}-1023-abcde") <= 63
    assert name[0].isalpha() and name[-1].isalnum()
    assert pod(obj)["subdomain"] == name
    assert resources.child_name(run, "pretrain") == name  # deterministic
    assert obj["metadata"]["labels"]["kubetrain.dev/run"] == run


def test_truncated_names_stay_distinct() -> None:
    a = resources.child_name("x" * 60, "pretrain")
    b = resources.child_name("x" * 60, "sft")
    assert a != b


def test_no_credentials_secret_means_no_secret_refs() -> None:
    raw = spec_dict()
    del raw["storage"]["s3"]["credentialsSecret"]
    env = pod(job(raw))["containers"][0]["env"]
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in env)
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in env}


def test_credentials_by_reference_only() -> None:
    env = {e["name"]: e for e in pod(job(spec_dict()))["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    text = yaml.safe_dump(job(spec_dict()))
    assert not any(v in text for v in SECRET_VALUES)


def test_pod_security_and_runtime_settings() -> None:
    cfg = OperatorConfig(termination_grace_seconds=900, image="default/trainer:0")
    raw = spec_dict()
    del raw["image"]
    obj = resources.build_job(parse_spec(raw), 0, run="demo", namespace="ml", uid="u", config=cfg)
    p = pod(obj)
    c = p["containers"][0]
    assert c["image"] == "default/trainer:0"
    assert c["command"] == ["python", "-m", "kubetrain_trainer"]
    assert p["terminationGracePeriodSeconds"] == 900
    assert p["restartPolicy"] == "Never"
    assert p["securityContext"]["runAsNonRoot"] and p["securityContext"]["runAsUser"] == 1000
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    assert obj["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    assert p["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert obj["spec"]["backoffLimit"] == 0


def test_children_owned_by_run_and_labelled() -> None:
    for obj in (
        job(spec_dict()),
        resources.build_service(run="demo", namespace="ml", uid="uid-1", stage="pretrain"),
    ):
        ref = obj["metadata"]["ownerReferences"][0]
        assert ref["uid"] == "uid-1" and ref["controller"] is True
        assert ref["kind"] == "TrainingRun" and ref["apiVersion"] == "kubetrain.dev/v1alpha1"
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "kubetrain"
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["kubetrain.dev/stage"] == "pretrain"


def test_service_is_headless_and_selects_the_stage() -> None:
    svc = resources.build_service(run="demo", namespace="ml", uid="u", stage="sft")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetrain.dev/run": "demo", "kubetrain.dev/stage": "sft"}


def test_job_without_storage_is_refused() -> None:
    raw = spec_dict()
    del raw["storage"]
    with pytest.raises(ValueError, match=r"storage\.s3"):
        job(raw)


def test_disruptions_and_the_checkpoint_code_never_fail_the_job() -> None:
    from kubetrain.core.contract import EXIT_CHECKPOINTED_ON_SIGTERM

    spec = job(spec_dict())["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    by_code = next(r for r in rules if "onExitCodes" in r)
    assert by_code["action"] == "Ignore"
    assert by_code["onExitCodes"] == {
        "containerName": resources.CONTAINER_NAME,
        "operator": "In",
        "values": [EXIT_CHECKPOINTED_ON_SIGTERM],
    }
    # A pod failure policy requires restartPolicy Never, and replaces a pod only once it
    # is fully terminated: never two ranks of one index at once.
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed" and spec["backoffLimit"] == 0
