"""The Helm chart, rendered by the real Helm client: lint, Kubernetes schemas, the
operator's hardening and RBAC, the operator config, and values the schema rejects."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetrain.operator.config import OperatorConfig, load_config
from tests.support.chart import (
    CHART,
    DASHBOARD,
    KUBE_VERSION,
    OPERATOR_LEASES,
    OPERATOR_NAMESPACED,
    OPERATOR_SECRETS,
    OPERATOR_WORKLOADS,
    REPO,
    alert_rules,
    by_kind,
    one,
    render,
    run_helm,
)
from tests.support.dockerfile import instruction

MONITORS_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True},
    },
    "prometheusRule": {"enabled": True, "additionalAlertLabels": {"team": "ml-platform"}},
}
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
CUSTOM_PRICES = {
    "config": {
        "gpuPrices": {"h100": 2.1, "a100": 1.2},
        "energyUSDPerKWh": 0.12,
        "pue": 1.3,
        "carbonGramsPerKWh": 350,
        "pollIntervalSeconds": 5,
        "stallTimeoutSeconds": 600,
        "image": "registry.example/trainer:1.2",
    }
}
VARIANTS = {
    "default": None,
    "namespaced": NAMESPACED,
    "monitors": MONITORS_ON,
    "custom-prices": CUSTOM_PRICES,
    "everything": {
        **NAMESPACED,
        **MONITORS_ON,
        **CUSTOM_PRICES,
        "serviceAccount": {"name": "trainer-operator"},
        "grafanaDashboard": {"namespace": "monitoring"},
    },
}

# Structural checks of the Prometheus Operator's kinds, which kubernetes-validate has no
# schemas for: the fields the Prometheus Operator needs to act on the object.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "labels": _LABELS},
}
_SELECTOR = {
    "type": "object",
    "required": ["matchLabels"],
    "properties": {"matchLabels": {**_LABELS, "minProperties": 1}},
}
_NS_SELECTOR = {
    "type": "object",
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}},
    },
}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
    },
}
_RULE = {
    "type": "object",
    "required": ["alert", "expr", "labels", "annotations"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "expr": {"type": "string"},
        "for": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    kind: {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": spec,
        },
    }
    for kind, spec in {
        "ServiceMonitor": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        },
        "PodMonitor": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        },
        "PrometheusRule": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                    },
                }
            },
        },
    }.items()
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VARIANTS.items()}


def _rules(obj: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a Role or ClusterRole grants."""
    return {
        (g, r, v)
        for rule in obj["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_pinned_helm_defaults_to_the_test_clusters_kubernetes(tmp_path: Path) -> None:
    """Without a server, Helm renders for the Kubernetes version linked into it; the
    pinned client is built with the control plane's (tests/cluster/build.sh), so the
    chart's kubeVersion constraint and API checks see the cluster the tests run."""
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "version.yaml").write_text(
        "kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    out = run_helm("template", str(chart)).stdout
    assert yaml.safe_load(out) == {"kubeVersion": f"v{KUBE_VERSION}"}, (
        "the Helm client in .cache/bin predates this default: run `make cluster-bin`"
    )


def test_helm_lint_passes_with_default_and_non_default_values() -> None:
    for values in (None, VARIANTS["everything"]):
        proc = run_helm("lint", str(CHART), "--strict", values=values)
        assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objects = rendered[variant]
    assert objects
    for obj in objects:
        kind = obj["kind"]
        if kind in MONITORING_SCHEMAS:
            jsonschema.validate(obj, MONITORING_SCHEMAS[kind])
        else:
            # strict: unknown fields are errors, as the API server's field validation
            # would report them.
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_chart_crd_is_the_generated_one() -> None:
    chart_crd = CHART / "crds" / "trainingrun.yaml"
    assert chart_crd.read_text() == (REPO / "crds" / "trainingrun.yaml").read_text(), (
        "charts/kubetrain/crds/trainingrun.yaml differs from crds/: run `make crd`"
    )


def test_default_install_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["default"]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ConfigMap",
            "ConfigMap",
            "ClusterRole",
            "ClusterRole",  # the secret reader, bound in no namespace by default
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            # policy.forbidKeylessTolerations is on by default (tests/unit/test_chart_policy.py).
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    # The monitoring kinds need the Prometheus Operator's CRDs: off unless asked for.
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & set(kinds)
    sa = one(objects, "ServiceAccount")
    assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) == ("kubetrain", "kubetrain")


def test_operator_deployment_is_hardened(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dep = one(rendered["default"], "Deployment")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kubetrain"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"requests", "limits"} <= set(c["resources"])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/kubetrain"]]["configMap"]["name"] == "kubetrain-config"
    assert c["image"] == "ghcr.io/kubetrain/operator:0.1.0"
    argv = c["command"] + c["args"]
    assert argv[:4] == ["kubetrain", "operator", "--config", "/etc/kubetrain/config.yaml"]
    liveness_port = argv[argv.index("--liveness-port") + 1]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(ports["liveness"]) == liveness_port
    assert str(ports["metrics"]) == argv[argv.index("--metrics-port") + 1]
    probe = c["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "liveness"}
    assert "--namespace" not in argv


def test_two_replicas_elect_a_leader_and_survive_a_drain(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["default"]
    dep = one(objects, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    # A rolling update starts a new replica before it stops an old one.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == spec["selector"]["matchLabels"]
    )
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": spec["selector"]}

    single = render({"replicas": 1})
    assert not by_kind(single, "PodDisruptionBudget")
    assert "affinity" not in one(single, "Deployment")["spec"]["template"]["spec"]


def test_dockerfile_matches_the_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The Dockerfile's operator target runs what the Deployment's container says, as the
    user its securityContext names."""
    pod = one(rendered["default"], "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (entrypoint,) = instruction("operator", "ENTRYPOINT")
    assert json.loads(entrypoint) == c["command"]
    (user,) = instruction("operator", "USER")
    assert re.fullmatch(r"\d+:\d+", user), "a numeric user, so runAsNonRoot can be verified"
    assert int(user.split(":")[0]) == pod["securityContext"]["runAsUser"] != 0
    (install,) = [r for r in instruction("operator-build", "RUN") if "pip-install.sh" in r]
    assert install.endswith("images/pip-install.sh operator")


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["default"]
    role = one(objects, "ClusterRole", "kubetrain")
    assert _rules(role) == OPERATOR_NAMESPACED
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetrain", "namespace": "kubetrain"}
    ]
    # No Secret of the cluster is readable until a namespace grants it.
    reader = one(objects, "ClusterRole", "kubetrain-secret-reader")
    assert _rules(reader) == OPERATOR_SECRETS
    assert not [b for b in by_kind(objects, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"]
    _assert_lease_role(objects)


def test_secrets_are_granted_per_namespace_or_cluster_wide_only_when_asked() -> None:
    per_namespace = render({"rbac": {"secretNamespaces": ["team-a", "team-b"]}})
    bindings = [
        b for b in by_kind(per_namespace, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"
    ]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    assert {b["roleRef"]["name"] for b in bindings} == {"kubetrain-secret-reader"}
    assert len(by_kind(per_namespace, "ClusterRoleBinding")) == 1
    everywhere = render({"rbac": {"clusterWideSecretRead": True}})
    binding = one(everywhere, "ClusterRoleBinding", "kubetrain-secret-reader")
    assert binding["subjects"][0]["name"] == "kubetrain"


def test_kueue_workloads_are_read_only_and_only_when_wanted() -> None:
    role = one(render({"kueue": {"watchWorkloads": True}}), "ClusterRole", "kubetrain")
    assert _rules(role) == OPERATOR_NAMESPACED | OPERATOR_WORKLOADS
    # auto: helm template has no cluster to ask, so Kueue's API is not there.
    assert _rules(one(render(), "ClusterRole", "kubetrain")) == OPERATOR_NAMESPACED


def _assert_lease_role(objects: list[dict[str, Any]]) -> None:
    """The Lease rights: in the release's namespace, and nowhere else."""
    (lease_role,) = [r for r in by_kind(objects, "Role") if _rules(r) == OPERATOR_LEASES]
    assert lease_role["metadata"]["namespace"] == "kubetrain"
    binding = one(objects, "RoleBinding", lease_role["metadata"]["name"])
    assert binding["metadata"]["namespace"] == "kubetrain"
    assert binding["roleRef"]["name"] == lease_role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == "kubetrain"


def test_namespaced_mode_grants_only_the_watched_namespaces(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["namespaced"]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    _assert_lease_role(objects)
    roles = {
        r["metadata"]["namespace"]: r
        for r in by_kind(objects, "Role")
        if _rules(r) != OPERATOR_LEASES
    }
    bindings = {
        b["metadata"]["namespace"]: b
        for b in by_kind(objects, "RoleBinding")
        if b["roleRef"]["name"] in {r["metadata"]["name"] for r in roles.values()}
    }
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, role in roles.items():
        assert _rules(role) == OPERATOR_NAMESPACED | OPERATOR_SECRETS, ns
        assert bindings[ns]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert bindings[ns]["subjects"][0]["namespace"] == "kubetrain"
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]


def _operator_config(objects: list[dict[str, Any]], tmp_path: Path) -> OperatorConfig:
    cm = one(objects, "ConfigMap", "kubetrain-config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_config(str(path))  # what the operator does at start


def test_rendered_config_is_read_by_the_operator(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    default = _operator_config(rendered["default"], tmp_path)
    assert default == OperatorConfig()  # the chart's defaults are the operator's
    custom = _operator_config(rendered["custom-prices"], tmp_path)
    assert custom.gpu_prices == {"h100": 2.1, "a100": 1.2}
    assert (custom.energy_usd_per_kwh, custom.pue, custom.carbon_grams_per_kwh) == (0.12, 1.3, 350)
    assert (custom.poll_interval_seconds, custom.stall_timeout_seconds) == (5, 600)
    assert custom.image == "registry.example/trainer:1.2"


def test_config_change_restarts_the_operator(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def checksum(variant: str) -> str:
        dep = one(rendered[variant], "Deployment")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum("default") != checksum("custom-prices")


def test_values_schema_knows_every_operator_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    chart_keys = set(schema["properties"]["config"]["properties"])
    operator_keys = {f.alias for f in OperatorConfig.model_fields.values()}
    assert chart_keys == operator_keys
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["config"]) <= operator_keys


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"pue": 9}}, "/config/pue"),
        ({"config": {"gpuPrices": {"h100": -1}}}, "/config/gpuPrices/h100"),
        ({"config": {"gpuPrice": {"h100": 2}}}, "'gpuPrice' not allowed"),
        ({"config": {"pollIntervalSeconds": "often"}}, "/config/pollIntervalSeconds"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
        ({"metrics": {"podMonitor": {"interval": "soon"}}}, "/metrics/podMonitor/interval"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    proc = run_helm("template", "kubetrain", str(CHART), values=values, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_monitors_select_the_operator_and_the_trainers(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["monitors"]
    sm = one(objects, "ServiceMonitor")
    svc = one(objects, "Service", "kubetrain-metrics")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    dep = one(objects, "Deployment")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()

    pm = one(objects, "PodMonitor")
    # The labels and port name the operator gives trainer pods (kubetrain.operator.resources).
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/component": "trainer"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    namespaced = one(rendered["everything"], "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_trainer_pods_carry_what_the_pod_monitor_selects() -> None:
    from kubetrain.core import contract
    from kubetrain.operator import resources

    assert resources.LABEL_COMPONENT == "app.kubernetes.io/component"
    source = Path(resources.__file__).read_text()
    assert '"trainer"' in source
    assert contract.METRICS_PORT == 9400


def test_prometheus_rule_ships_the_tested_rules_file(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    rule = one(rendered["monitors"], "PrometheusRule")
    shipped = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    expected = alert_rules()
    assert [r["alert"] for r in shipped] == [r["alert"] for r in expected]
    for got, want in zip(shipped, expected, strict=True):
        assert got["expr"] == want["expr"]
        assert got["annotations"] == want["annotations"]  # {{ $labels }} kept for Prometheus
        assert got["labels"] == {**want["labels"], "team": "ml-platform"}


def test_dashboard_configmap_holds_the_dashboard(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cm = one(rendered["default"], "ConfigMap", "kubetrain-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubetrain.json"]) == json.loads(DASHBOARD.read_text())
    moved = one(rendered["everything"], "ConfigMap", "kubetrain-dashboard")
    assert moved["metadata"]["namespace"] == "monitoring"
