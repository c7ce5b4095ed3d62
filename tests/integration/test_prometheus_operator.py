"""The real `kubetrain operator` process, authenticated as the ServiceAccount the chart
creates (so with exactly the chart's RBAC), reconciles a TrainingRun on a real control
plane while a real Prometheus scrapes it; the dashboard's operator queries then return
the run's series and the operator-down alert stays quiet."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.support.chart import (
    ALERTS,
    concrete,
    dashboard_exprs,
    helm_install,
    helm_uninstall,
)
from tests.support.operator import OperatorProcess
from tests.support.prometheus import Prometheus
from tests.support.services import S3Server
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))
from conftest import control_plane  # noqa: E402,F401  (the session fixture)

NAMESPACE, RUN = "promtest", "scraped"
RELEASE = "kt-prom"  # ServiceAccount kt-prom/kt-prom-kubetrain


def service_account_kubeconfig(cp: Any, folder: Path, namespace: str, name: str) -> Path:
    """A kubeconfig that authenticates with a fresh token of ServiceAccount
    ``namespace/name``, as the operator's pod would."""
    core = client.CoreV1Api(cp.api_client())
    token = core.create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    ).status.token
    admin = yaml.safe_load(Path(cp.kubeconfig).read_text())
    admin["users"] = [{"name": name, "user": {"token": token}}]
    for ctx in admin["contexts"]:
        ctx["context"]["user"] = name
    path = folder / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(admin))
    return path


@pytest.fixture
def operator_as_chart_sa(
    control_plane: Any,  # noqa: F811  (the session fixture imported above)
    tmp_path: Path,
    s3_server: S3Server,
) -> Iterator[tuple[int, Path]]:
    control_plane.create_namespace(NAMESPACE)
    helm_install(
        control_plane.kubeconfig,
        release=RELEASE,
        namespace=RELEASE,
        values={"watchNamespaces": [NAMESPACE], "config": {"pollIntervalSeconds": 1}},
    )
    kubeconfig = service_account_kubeconfig(
        control_plane, tmp_path, RELEASE, f"{RELEASE}-kubetrain"
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pollIntervalSeconds": 1}))
    proc = OperatorProcess(
        kubeconfig,
        NAMESPACE,
        tmp_path / "operator.log",
        config=config,
        # As the chart's Deployment sets it: the Lease in the operator's own namespace.
        env={**os.environ, **s3_server.env(), "POD_NAMESPACE": RELEASE},
    ).start()
    try:
        yield proc.metrics_port, proc.log
    finally:
        proc.stop()
        helm_uninstall(control_plane.kubeconfig, release=RELEASE, namespace=RELEASE)


def test_real_operator_metrics_feed_the_dashboard(
    control_plane: Any,  # noqa: F811
    operator_as_chart_sa: tuple[int, Path],
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    port, log_path = operator_as_chart_sa

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    bucket = s3_server.create_bucket("promtest")
    run = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": RUN, "namespace": NAMESPACE},
        "spec": {
            "storage": {"s3": {"bucket": bucket, "endpoint": s3_server.endpoint}},
            "stages": [
                {"name": "pretrain", "type": "pretrain", "hyperparameters": {"maxSteps": 5}}
            ],
        },
    }
    custom = client.CustomObjectsApi(control_plane.api_client())
    custom.create_namespaced_custom_object(
        "kubetrain.dev", "v1alpha1", NAMESPACE, "trainingruns", run
    )
    # The operator, with only the chart's permissions, creates the stage's Job.
    batch = client.BatchV1Api(control_plane.api_client())
    wait_for(
        lambda: batch.read_namespaced_job(f"{RUN}-pretrain", NAMESPACE),
        timeout=90,
        what="the operator (as the chart's ServiceAccount) creating the stage Job",
        detail=log_tail,
    )

    (tmp_path / "prometheus").mkdir()
    prom = Prometheus(
        tmp_path / "prometheus", {"kubetrain-operator": [f"127.0.0.1:{port}"]}, rule_files=[ALERTS]
    )
    try:
        sel = f'{{namespace="{NAMESPACE}", run="{RUN}"}}'
        wait_for(
            lambda: prom.query(
                f"count_over_time(kubetrain_operator_run_progress_ratio{sel}[1m]) >= 3"
            ),
            timeout=60,
            interval=0.5,
            what="Prometheus scraping the operator's run series",
            detail=lambda: prom.log_tail(5) + "\n" + log_tail(),
        )
        at = float(prom.query("time()")[0]["value"][0])
        operator_queries = [
            (t, e)
            for t, e in dashboard_exprs()
            if "kubetrain_operator_" in e
            and "kubetrain_trainer_" not in e
            # These need a run that advances, fails or spends; a Job on
            # a cluster without GPU nodes does neither.
            and t not in {"ETA", "Budget used"}
        ]
        assert len(operator_queries) >= 8
        empty = [
            f"{t}: {concrete(e, NAMESPACE, RUN)}"
            for t, e in operator_queries
            if not prom.query(concrete(e, NAMESPACE, RUN), at)
        ]
        assert not empty, "queries with no series from the real operator:\n" + "\n".join(empty)
        assert prom.query('up{job="kubetrain-operator"} == 1', at)
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        down = next(r for r in rules if r["name"] == "KubetrainOperatorDown")
        assert down["health"] == "ok" and down["state"] == "inactive"
    finally:
        prom.stop()
    assert "403" not in log_path.read_text(errors="replace"), log_tail()
