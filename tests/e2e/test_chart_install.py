"""`helm install` of the chart onto a real control plane: the CRD is served, the
operator's objects exist, and the API server's RBAC gives the operator's ServiceAccount
exactly what the operator needs (checked by the API server itself, by access reviews
and by calls made as that ServiceAccount)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from tests.support.chart import OPERATOR_NAMESPACED, REPO, helm_install, helm_uninstall
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
    for group, resource in [
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
    ]:
        assert _allowed(admin, SA_USER, group, resource, "watch", None)
    # Least privilege: no Secret listing, no pod deletion, no CRD changes.
    for group, resource, verb in [
        ("", "secrets", "list"),
        ("", "pods", "delete"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "delete"),
        ("kubetrain.dev", "trainingruns", "delete"),
    ]:
        assert not _allowed(admin, SA_USER, group, resource, verb, "default")

    # The calls kopf and the operator start with, made as the ServiceAccount.
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
        client.ApiextensionsV1Api(operator).list_custom_resource_definition()
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
        for group, resource, verb in sorted(OPERATOR_NAMESPACED):
            assert _allowed(admin, user, group, resource, verb, "team-a"), (resource, verb)
            assert not _allowed(admin, user, group, resource, verb, "default"), (resource, verb)
        assert not _allowed(admin, user, "kubetrain.dev", "trainingruns", "list", None)
        assert _allowed(
            admin, user, "apiextensions.k8s.io", "customresourcedefinitions", "list", None
        )
    finally:
        helm_uninstall(control_plane.kubeconfig, release="kt-ns", namespace="kt-ns")
