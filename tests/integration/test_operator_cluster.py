"""`kubetrain operator` as users start it, against a real control plane (kwok nodes):
a TrainingRun gets its first stage's Job and Service, a status, and an estimate."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.support.operator import OperatorProcess
from tests.support.services import S3Server
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))
from conftest import control_plane  # noqa: E402,F401  (the session fixture)


@pytest.fixture
def operator(control_plane, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:  # noqa: F811
    from kubetrain.core.crd import render_crd

    api = control_plane.api_client()
    ext = client.ApiextensionsV1Api(api)
    crd = yaml.safe_load(render_crd())
    try:
        ext.create_custom_resource_definition(crd)
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions
            or []
        ),
        timeout=30,
        what="CRD established",
    )
    proc = OperatorProcess(
        control_plane.kubeconfig, "optest", tmp_path / "operator.log", env=dict(os.environ)
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_run_gets_job_service_and_status(
    control_plane,  # noqa: F811  (the session fixture imported above)
    operator,
    s3_server: S3Server,
) -> None:
    api = control_plane.api_client()
    control_plane.create_namespace("optest")
    bucket = s3_server.create_bucket("optest")
    run = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "demo", "namespace": "optest"},
        "spec": {
            "storage": {"s3": {"bucket": bucket, "endpoint": s3_server.endpoint}},
            "stages": [
                {"name": "pretrain", "type": "pretrain", "hyperparameters": {"maxSteps": 5}}
            ],
        },
    }
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(
        "kubetrain.dev", "v1alpha1", "optest", "trainingruns", run
    )
    log = operator.log
    batch = client.BatchV1Api(api)
    job = wait_for(
        lambda: batch.read_namespaced_job("demo-pretrain", "optest"),
        timeout=60,
        what="the operator created Job demo-pretrain",
        detail=lambda: log.read_text()[-3000:],
    )
    assert job.spec.completion_mode == "Indexed"
    assert job.metadata.owner_references[0].kind == "TrainingRun"
    client.CoreV1Api(api).read_namespaced_service("demo-pretrain", "optest")
    status = wait_for(
        lambda: custom.get_namespaced_custom_object(
            "kubetrain.dev", "v1alpha1", "optest", "trainingruns", "demo"
        ).get("status"),
        timeout=30,
        what="status written",
        detail=lambda: log.read_text()[-3000:],
    )
    assert status["estimate"]["flops"] > 0
    assert status["stages"][0]["name"] == "pretrain"
    assert operator.alive(), operator.tail()
