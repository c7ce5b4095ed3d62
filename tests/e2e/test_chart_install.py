"""`helm install` of the chart onto a real control plane: the CRD is served, the
operator's objects exist, and the API server's RBAC gives the operator's ServiceAccount
exactly what the operator needs (checked by the API server itself, by access reviews
and by calls made as that ServiceAccount)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from tests.support.chart import (
    ADMIN_POLICY,
    OPERATOR_LEASES,
    OPERATOR_NAMESPACED,
    OPERATOR_SECRETS,
    POLICY_IMAGE,
    REPO,
    helm_install,
    helm_uninstall,
)
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

SA_USER = "system:serviceaccount:kubetrain:kubetrain"


@pytest.fixture
def installed(control_plane: Any) -> Iterator[str]:
    notes = helm_install(control_plane.kubeconfig)
    try:
        yield notes
    finally:
        helm_uninstall(control_plane.kubeconfig)


def _allowed(
    admin: client.ApiClient, user: str, group: str, resource: str, verb: str, namespace: str | None
) -> bool:
    sub, _, subresource = resource.partition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            resource_attributes=client.V1ResourceAttributes(
                group=group,
                resource=sub,
                subresource=subresource or None,
                verb=verb,
                namespace=namespace,
            ),
        )
    )
    return bool(
        client.AuthorizationV1Api(admin).create_subject_access_review(review).status.allowed
    )


def _as_operator(control_plane: Any, user: str = SA_USER) -> client.ApiClient:
    impersonating = control_plane.api_client()
    impersonating.set_default_header("Impersonate-User", user)
    return impersonating


def test_install_serves_the_crd_and_creates_the_operator(
    control_plane: Any, installed: str
) -> None:
    admin = control_plane.api_client()
    ext = client.ApiextensionsV1Api(admin)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"{api.PLURAL}.{api.GROUP}")
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for(established, timeout=60, what="the TrainingRun CRD becoming Established")

    apps, core = client.AppsV1Api(admin), client.CoreV1Api(admin)
    rbac = client.RbacAuthorizationV1Api(admin)
    dep = apps.read_namespaced_deployment("kubetrain", "kubetrain")
    assert dep.spec.template.spec.service_account_name == "kubetrain"
    assert core.read_namespaced_service_account("kubetrain", "kubetrain")
    assert core.read_namespaced_config_map("kubetrain-config", "kubetrain")
    assert core.read_namespaced_service("kubetrain-metrics", "kubetrain")
    assert rbac.read_cluster_role("kubetrain")
    binding = rbac.read_cluster_role_binding("kubetrain")
    assert [(s.kind, s.namespace, s.name) for s in binding.subjects] == [
        ("ServiceAccount", "kubetrain", "kubetrain")
    ]
    for command in ("kubectl apply -f examples/", "kubectl get ktr", "kubetrain status"):
        assert command in installed


def test_operator_service_account_may_do_what_the_operator_does(
    control_plane: Any, installed: str
) -> None:
    admin = control_plane.api_client()
    denied = [
        (g, r, v)
        for g, r, v in sorted(OPERATOR_NAMESPACED)
        if not _allowed(admin, SA_USER, g, r, v, "default")
    ]
    assert not denied
    for group, resource, verb in sorted(OPERATOR_LEASES):
        assert _allowed(admin, SA_USER, group, resource, verb, "kubetrain"), verb
        assert not _allowed(admin, SA_USER, group, resource, verb, "default"), verb
    # Least privilege: no Secret read until a namespace grants it (rbac.secretNamespaces
    # or a team's RoleBinding), no pod deletion, nothing cluster-scoped.
    for group, resource, verb, namespace in [
        ("", "secrets", "get", "default"),
        ("", "secrets", "list", "default"),
        ("", "pods", "delete", "default"),
        ("kubetrain.dev", "trainingruns", "delete", "default"),
        ("kubetrain.dev", "trainingruns", "update", "default"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", None),
        ("", "namespaces", "list", None),
    ]:
        assert not _allowed(admin, SA_USER, group, resource, verb, namespace), (resource, verb)

    # The calls the operator starts with, made as the ServiceAccount.
    run = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    run["metadata"] = {"name": "rbac-check", "namespace": "default"}
    custom_admin = client.CustomObjectsApi(admin)
    try:
        custom_admin.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "default", api.PLURAL, run
        )
    except ApiException as exc:
        pytest.fail(f"the served CRD rejected examples/tiny-run.yaml: {exc.body}")
    try:
        operator = _as_operator(control_plane)
        custom = client.CustomObjectsApi(operator)
        listed = custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)
        assert "rbac-check" in {i["metadata"]["name"] for i in listed["items"]}
        custom.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            "default",
            api.PLURAL,
            "rbac-check",
            {"status": {"phase": "Pending"}},
        )
        lease = client.CoordinationV1Api(operator).create_namespaced_lease(
            "kubetrain",
            client.V1Lease(
                metadata=client.V1ObjectMeta(name="kubetrain-operator"),
                spec=client.V1LeaseSpec(holder_identity="rbac-check", lease_duration_seconds=1),
            ),
        )
        client.CoordinationV1Api(operator).replace_namespaced_lease(
            "kubetrain-operator", "kubetrain", lease
        )
        client.CoordinationV1Api(admin).delete_namespaced_lease("kubetrain-operator", "kubetrain")
        with pytest.raises(ApiException) as exc:
            client.CoreV1Api(operator).list_namespaced_secret("default")
        assert exc.value.status == 403
    finally:
        custom_admin.delete_namespaced_custom_object(
            api.GROUP, api.VERSION, "default", api.PLURAL, "rbac-check"
        )


def test_namespaced_install_grants_only_the_watched_namespaces(control_plane: Any) -> None:
    control_plane.create_namespace("team-a")
    helm_install(
        control_plane.kubeconfig,
        release="kt-ns",
        namespace="kt-ns",
        values={"watchNamespaces": ["team-a"], "grafanaDashboard": {"enabled": False}},
    )
    try:
        admin = control_plane.api_client()
        user = "system:serviceaccount:kt-ns:kt-ns-kubetrain"
        for group, resource, verb in sorted(OPERATOR_NAMESPACED | OPERATOR_SECRETS):
            assert _allowed(admin, user, group, resource, verb, "team-a"), (resource, verb)
            assert not _allowed(admin, user, group, resource, verb, "default"), (resource, verb)
        assert not _allowed(admin, user, "kubetrain.dev", "trainingruns", "list", None)
        for group, resource, verb in sorted(OPERATOR_LEASES):
            assert _allowed(admin, user, group, resource, verb, "kt-ns"), verb
            assert not _allowed(admin, user, group, resource, verb, "team-a"), verb
    finally:
        helm_uninstall(control_plane.kubeconfig, release="kt-ns", namespace="kt-ns")


def test_uninstall_leaves_runs_that_delete_at_once(control_plane: Any) -> None:
    """The operator puts no finalizer on runs: after `helm uninstall`, with no operator
    left, deleting a run (or its namespace) completes at once."""
    control_plane.create_namespace("after-uninstall")
    helm_install(
        control_plane.kubeconfig,
        release="kt-gone",
        namespace="kt-gone",
        values={"grafanaDashboard": {"enabled": False}},
    )
    admin = control_plane.api_client()
    custom = client.CustomObjectsApi(admin)
    run = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    run["metadata"] = {"name": "orphan", "namespace": "after-uninstall"}
    custom.create_namespaced_custom_object(
        api.GROUP, api.VERSION, "after-uninstall", api.PLURAL, run
    )
    helm_uninstall(control_plane.kubeconfig, release="kt-gone", namespace="kt-gone")
    # The CRD stays (Helm never deletes what crds/ installed), and so does the run.
    body = custom.get_namespaced_custom_object(
        api.GROUP, api.VERSION, "after-uninstall", api.PLURAL, "orphan"
    )
    assert not body["metadata"].get("finalizers")
    custom.delete_namespaced_custom_object(
        api.GROUP, api.VERSION, "after-uninstall", api.PLURAL, "orphan"
    )

    def gone() -> bool:
        try:
            custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, "after-uninstall", api.PLURAL, "orphan"
            )
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=30, what="the run deleted without an operator")
    client.CoreV1Api(admin).delete_namespace("after-uninstall")


def _run(name: str, namespace: str, **stage_resources: Any) -> dict[str, Any]:
    """examples/tiny-run.yaml as run ``name``, its first stage given ``stage_resources``
    (e.g. tolerations=[...]); spec.image and labels are set by the caller."""
    run = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    run["metadata"] = {"name": name, "namespace": namespace}
    run["spec"]["stages"][0]["resources"] = stage_resources
    return run


def _refused(custom: client.CustomObjectsApi, run: dict[str, Any]) -> str | None:
    """The API server's message refusing ``run`` (a dry-run create), None if accepted."""
    namespace = run["metadata"]["namespace"]
    try:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, run, dry_run="All"
        )
    except ApiException as exc:
        assert exc.status == 403, exc.body
        return str(json.loads(exc.body)["message"])
    return None


def _refusal(custom: client.CustomObjectsApi, run: dict[str, Any]) -> str:
    message = _refused(custom, run)
    assert message is not None, f"the API server accepted {run['metadata']['name']}"
    return message


def test_admin_policy_is_enforced_by_the_api_server(control_plane: Any) -> None:
    """A chart installed with an administrator's policy: the API server itself refuses
    runs that break it, naming the rule and the offending value, and accepts the rest."""
    admin = control_plane.api_client()
    custom = client.CustomObjectsApi(admin)
    control_plane.create_namespace("policed")
    # A run made before the policy, which breaks it: it keeps being handled.
    ext = client.ApiextensionsV1Api(admin)
    try:
        ext.create_custom_resource_definition(
            yaml.safe_load((REPO / "crds" / "trainingrun.yaml").read_text())
        )
    except ApiException as exc:
        assert exc.status == 409, exc.body  # installed by an earlier test
    legacy = _run("legacy", "policed", tolerations=[{"operator": "Exists"}])
    wait_for(
        lambda: custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "policed", api.PLURAL, legacy
        ),
        timeout=30,
        what="the TrainingRun CRD being served",
    )
    values = {
        **ADMIN_POLICY,
        "watchNamespaces": ["policed"],
        "grafanaDashboard": {"enabled": False},
    }
    helm_install(
        control_plane.kubeconfig, release="kt-policy", namespace="kt-policy", values=values
    )
    try:
        bad_image = _run("bad-image", "policed")
        bad_image["spec"]["image"] = "docker.io/library/python:3.11"
        # The API server loads new policies asynchronously: wait until it enforces this one.
        message = wait_for(
            lambda: _refused(custom, bad_image),
            timeout=30,
            what="the API server enforcing the chart's ValidatingAdmissionPolicy",
        )
        assert "ValidatingAdmissionPolicy 'kt-policy-kubetrain-policy'" in message
        assert (
            'policy.allowedImages: spec.image "docker.io/library/python:3.11" is not from an '
            "allowed registry or repository (allowed: registry.example.com/, "
            "ghcr.io/kubetrain/trainer)" in message
        )

        blanket = _run("blanket", "policed", tolerations=[{"operator": "Exists"}])
        message = _refusal(custom, blanket)
        assert (
            'policy.forbidKeylessTolerations: stage "pretrain" has a toleration without a key'
            in (message)
        )

        other_team = _run(
            "other-team",
            "policed",
            tolerations=[
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "dedicated", "value": "other-team", "effect": "NoSchedule"},
            ],
        )
        message = _refusal(custom, other_team)
        assert (
            'policy.allowedTolerations: tolerations not allowed: stage "pretrain": '
            "dedicated=other-team:NoSchedule (Equal)" in message
        )

        zone = _run(
            "zone",
            "policed",
            nodeSelector={"pool": "spot", "topology.kubernetes.io/zone": "zone-c"},
        )
        message = _refusal(custom, zone)
        assert 'policy.allowedNodeSelectors: node selectors not allowed: stage "pretrain": ' in (
            message
        )
        assert "topology.kubernetes.io/zone=zone-c" in message and "pool=" not in message

        urgent = _run("urgent", "policed")
        urgent["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": "critical"}
        message = _refusal(custom, urgent)
        assert 'policy.allowedPriorityClasses: priority class "critical"' in message

        allowed = _run(
            "allowed",
            "policed",
            tolerations=[
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
            ],
            nodeSelector={"pool": "spot", "topology.kubernetes.io/zone": "zone-a"},
        )
        allowed["spec"]["image"] = "ghcr.io/kubetrain/trainer:0.2.0"
        allowed["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": "research"}
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "policed", api.PLURAL, allowed
        )
        # Without spec.image a run gets config.image, which the chart made sure is allowed.
        default_image = _run("default-image", "policed")
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "policed", api.PLURAL, default_image, dry_run="All"
        )
        assert values["config"]["image"] == POLICY_IMAGE

        # Changing an accepted run's spec is checked too ...
        with pytest.raises(ApiException) as exc:
            custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, "policed", api.PLURAL, "allowed",
                {"spec": {"image": "docker.io/library/python:3.11"}},
            )  # fmt: skip
        assert "policy.allowedImages" in json.loads(exc.value.body)["message"]
        # ... but not what the operator changes on a run made before the policy.
        custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, "policed", api.PLURAL, "legacy",
            {"metadata": {"finalizers": ["kopf.zalando.org/KopfFinalizerMarker"]}},
        )  # fmt: skip
        # The namespaced install polices its namespaces only.
        elsewhere = copy.deepcopy(bad_image)
        elsewhere["metadata"]["namespace"] = "default"
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "default", api.PLURAL, elsewhere, dry_run="All"
        )
    finally:
        for name in ("legacy", "allowed"):
            try:
                custom.patch_namespaced_custom_object(
                    api.GROUP, api.VERSION, "policed", api.PLURAL, name,
                    {"metadata": {"finalizers": None}},
                )  # fmt: skip
                custom.delete_namespaced_custom_object(
                    api.GROUP, api.VERSION, "policed", api.PLURAL, name
                )
            except ApiException as exc:
                if exc.status != 404:  # the test failed before making it
                    raise
        helm_uninstall(control_plane.kubeconfig, release="kt-policy", namespace="kt-policy")
