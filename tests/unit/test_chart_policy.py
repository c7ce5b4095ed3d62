"""The administrators' runtime policy in the chart (values `policy.*`): the
ValidatingAdmissionPolicy and binding it renders, which rules, where, and the values it
refuses before anything is installed. The API server's enforcement is tested in
tests/e2e/test_chart_install.py."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.support.chart import (
    ADMIN_POLICY,
    CHART,
    KUBE_VERSION,
    by_kind,
    one,
    render,
    run_helm,
)

NO_POLICY = {"policy": {"forbidKeylessTolerations": False}}


def _policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "ValidatingAdmissionPolicy")


def _rules(policy: dict[str, Any]) -> list[str]:
    """The values key each validation enforces, from its message."""
    return [
        v["messageExpression"].split(":", 1)[0].strip("'") for v in policy["spec"]["validations"]
    ]


@pytest.fixture(scope="module")
def full() -> list[dict[str, Any]]:
    return render(ADMIN_POLICY)


def test_every_rule_is_rendered_valid_and_named_in_its_message(full: list[dict[str, Any]]) -> None:
    policy = _policy(full)
    binding = one(full, "ValidatingAdmissionPolicyBinding")
    for obj in (policy, binding):
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert _rules(policy) == [
        "policy.allowedImages",
        "policy.forbidKeylessTolerations",
        "policy.allowedTolerations",
        "policy.allowedNodeSelectors",
        "policy.allowedPriorityClasses",
    ]
    for validation in policy["spec"]["validations"]:
        assert validation["reason"] == "Forbidden"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] == "kubetrain-policy"
    assert binding["spec"]["validationActions"] == ["Deny"]
    # Cluster-wide install: every namespace.
    assert "matchResources" not in binding["spec"]
    # Fails closed, and only spec changes are checked (the operator's own updates of a
    # run, finalizers and annotations, never are).
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {
            "apiGroups": ["kubetrain.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["trainingruns"],
        }
    ]
    assert [c["expression"] for c in spec["matchConditions"]] == [
        "request.operation == 'CREATE' || object.spec != oldObject.spec"
    ]


def test_the_allowed_values_are_literals_in_the_policy(full: list[dict[str, Any]]) -> None:
    variables = {v["name"]: v["expression"] for v in _policy(full)["spec"]["variables"]}
    assert variables["allowedImages"] == '["registry.example.com/","ghcr.io/kubetrain/trainer"]'
    assert variables["allowedPriorityClasses"] == '["research","production"]'
    assert variables["allowedNodeSelectors"] == (
        '{"pool":[],"topology.kubernetes.io/zone":["zone-a","zone-b"]}'
    )
    assert "paramKind" not in _policy(full)["spec"]


def test_by_default_only_keyless_tolerations_are_refused() -> None:
    policy = _policy(render())
    assert _rules(policy) == ["policy.forbidKeylessTolerations"]


def test_without_rules_nothing_is_rendered() -> None:
    objects = render(NO_POLICY)
    assert not by_kind(objects, "ValidatingAdmissionPolicy")
    assert not by_kind(objects, "ValidatingAdmissionPolicyBinding")


def test_a_namespaced_install_polices_its_namespaces_only() -> None:
    objects = render({**ADMIN_POLICY, "watchNamespaces": ["team-a", "team-b"]}, release="kt")
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["metadata"]["name"] == "kt-kubetrain-policy"
    assert binding["spec"]["matchResources"] == {
        "namespaceSelector": {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "In",
                    "values": ["team-a", "team-b"],
                }
            ]
        }
    }


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example.com/ml/trainer:1.0", True),  # under an allowed registry
        ("ghcr.io/kubetrain/trainer:0.1.0", True),  # a tag of an allowed repository
        ("ghcr.io/kubetrain/trainer@sha256:" + "0" * 64, True),  # a digest of it
        ("ghcr.io/kubetrain/trainer-dev:1", False),  # a repository that only starts alike
        ("registry.example.com.evil.io/trainer:1", False),  # a host that only starts alike
        ("docker.io/library/python:3.11", False),
    ],
)
def test_the_default_image_must_itself_be_allowed(image: str, allowed: bool) -> None:
    """Runs without spec.image get config.image, so the chart refuses a policy that would
    refuse them, by the rule the API server applies to spec.image."""
    values = copy.deepcopy(ADMIN_POLICY)
    values["config"]["image"] = image
    proc = run_helm("template", "kubetrain", str(CHART), values=values, check=False)
    if allowed:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0
        assert f'config.image "{image}" is not allowed by policy.allowedImages' in proc.stderr


def test_clusters_without_admission_policies_are_told_what_to_turn_off() -> None:
    old = ("template", "kubetrain", str(CHART), "--kube-version", "1.29.0")
    proc = run_helm(*old, check=False)
    assert proc.returncode != 0
    assert "needs ValidatingAdmissionPolicy" in proc.stderr
    assert "policy.forbidKeylessTolerations=false" in proc.stderr
    assert run_helm(*old, values=NO_POLICY).returncode == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"allowedImages": ["registry.example.com/ bad"]}, "/policy/allowedImages/0"),
        ({"allowedImages": "registry.example.com/"}, "/policy/allowedImages"),
        ({"forbidKeylessTolerations": "yes"}, "/policy/forbidKeylessTolerations"),
        ({"allowedTolerations": [{"key": "a", "operator": "In"}]}, "/policy/allowedTolerations/0"),
        ({"allowedTolerations": [{"keys": "a"}]}, "'keys' not allowed"),
        ({"allowedTolerations": [{}]}, "/policy/allowedTolerations/0"),
        ({"allowedNodeSelectors": {"zone": "a"}}, "/policy/allowedNodeSelectors/zone"),
        ({"allowedPriorityClasses": ["High Priority"]}, "/policy/allowedPriorityClasses/0"),
        ({"allowImages": []}, "'allowImages' not allowed"),
    ],
)
def test_values_schema_rejects_bad_policies(values: dict[str, Any], message: str) -> None:
    proc = run_helm("template", "kubetrain", str(CHART), values={"policy": values}, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
