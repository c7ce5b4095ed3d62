"""The Helm chart as tests see it: rendered by the pinned Helm client (`make cluster-bin`)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetrain"
HELM = REPO / ".cache" / "bin" / "helm"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
# The Kubernetes version of the test control plane (tests/cluster/k8s/go.mod): the
# pinned Helm client is built with it as its default (tests/cluster/build.sh), which is
# what `helm template` and `helm lint` use without a server; kubernetes-validate checks
# against its schemas.
KUBE_VERSION = "1.36.0"

# What the operator calls (kubetrain.operator.kube.KubeApi: its informers' lists and
# watches, a look at a child's name before creating by it, its writes, Secrets,
# events), per namespace: no more, no less.
OPERATOR_NAMESPACED = {
    *(("kubetrain.dev", "trainingruns", v) for v in ("list", "watch", "patch")),
    ("kubetrain.dev", "trainingruns/status", "patch"),
    *(("batch", "jobs", v) for v in ("get", "list", "watch", "create", "delete")),
    *(("", "pods", v) for v in ("list", "watch")),
    *(("", "services", v) for v in ("get", "list", "watch", "create", "delete")),
    ("", "events", "create"),
}
# The runs' credentials Secrets: in namespaced mode in each watched namespace; else
# through the <release>-secret-reader ClusterRole, bound per namespace.
OPERATOR_SECRETS = {("", "secrets", "get")}
# Kueue's Workloads, with kueue.watchWorkloads (auto: when Kueue's API is served).
OPERATOR_WORKLOADS = {("kueue.x-k8s.io", "workloads", v) for v in ("list", "watch")}
# Leader election, in the release's namespace only.
OPERATOR_LEASES = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}

# An administrator's runtime policy (values `policy.*`) with every rule set, and the
# trainer image it allows (config.image must be allowed too).
POLICY_IMAGE = "registry.example.com/ml/trainer:1.0"
ADMIN_POLICY: dict[str, Any] = {
    "config": {"image": POLICY_IMAGE},
    "policy": {
        "allowedImages": ["registry.example.com/", "ghcr.io/kubetrain/trainer"],
        "forbidKeylessTolerations": True,
        "allowedTolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "team", "operator": "Equal", "value": "ml"},
        ],
        "allowedNodeSelectors": {"topology.kubernetes.io/zone": ["zone-a", "zone-b"], "pool": []},
        "allowedPriorityClasses": ["research", "production"],
    },
}


def helm() -> Path:
    if not HELM.exists():
        pytest.fail(f"{HELM.relative_to(REPO)} is missing: run `make cluster-bin`")
    return HELM


def run_helm(
    *args: str, values: dict[str, Any] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``helm ARGS [-f values.yaml]``; the values go through a file, as users pass them."""
    with tempfile.TemporaryDirectory() as tmp:
        extra: list[str] = []
        if values is not None:
            path = Path(tmp) / "values.yaml"
            path.write_text(yaml.safe_dump(values))
            extra = ["-f", str(path)]
        proc = subprocess.run(
            [str(helm()), *args, *extra], capture_output=True, text=True, timeout=timeout
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    return proc


def render(
    values: dict[str, Any] | None = None, release: str = "kubetrain", namespace: str = "kubetrain"
) -> list[dict[str, Any]]:
    """The objects ``helm template`` renders (CRDs included), in order."""
    out = run_helm(
        "template", release, str(CHART), "-n", namespace, "--include-crds", values=values
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, variables included."""
    out = []
    for panel in dashboard()["panels"]:
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["query"]["query"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def concrete(expr: str, namespace: str, run: str) -> str:
    """A dashboard query with Grafana's variables replaced as Grafana does for one selected
    namespace and run (Kubernetes names need no regex escaping); ``label_values(m, l)``
    becomes the series query ``m``."""
    expr = (
        expr.replace("$namespace", namespace)
        .replace("$run", run)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
    )
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
    return m.group(1) if m else expr


def helm_install(
    kubeconfig: Path,
    release: str = "kubetrain",
    namespace: str = "kubetrain",
    values: dict[str, Any] | None = None,
) -> str:
    """``helm install RELEASE charts/kubetrain -n NAMESPACE --create-namespace`` onto the
    cluster of ``kubeconfig``, as the README says; returns Helm's output (with NOTES).

    The chart's ServiceAccount is ``NAMESPACE/RELEASE`` (``kubetrain/kubetrain`` by
    default): a test can run the operator as it by impersonating
    ``system:serviceaccount:NAMESPACE/RELEASE``."""
    return run_helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--create-namespace",
        "--kubeconfig",
        str(kubeconfig),
        values=values,
        timeout=300,
    ).stdout


def helm_uninstall(
    kubeconfig: Path, release: str = "kubetrain", namespace: str = "kubetrain"
) -> None:
    run_helm(
        "uninstall",
        release,
        "-n",
        namespace,
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        timeout=300,
    )
