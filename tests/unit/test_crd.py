"""The CRD is generated from the model: committed copies are fresh, the schema is
structural, and it accepts the examples and rejects bad manifests by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetrain.core.crd import crd_object, render_crd
from tests.unit.test_api import BAD, EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
# Rules the API server enforces with CEL (checked against a real API server in e2e), not
# with the OpenAPI keywords a JSON-Schema validator understands.
CEL_ONLY = {
    "duplicate-names",
    "dpo-without-sft",
    "grpo-without-sft",
    "grpo-settings-on-sft",
    "heads-do-not-divide",
    "seq-longer-than-context",
    "steps-and-tokens",
    "long-run-name",
    "keyless-equal-toleration",
    "exists-toleration-with-value",
    "toleration-seconds-without-noexecute",
    "bad-node-selector-key",
}
# The API server prunes unknown fields rather than rejecting them; kubectl warns.
PRUNED = {"unknown-field"}


@pytest.mark.parametrize(
    "path", ["crds/trainingrun.yaml", "charts/kubetrain/crds/trainingrun.yaml"]
)
def test_committed_crd_is_fresh(path: str) -> None:
    committed = (ROOT / path).read_text()
    assert committed == render_crd(), f"{path} is stale: run `make crd`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def schema() -> dict[str, Any]:
    return crd_object()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural() -> None:
    forbidden = {
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "title",
        "const",
        "$defs",
        "definitions",
        "nullable",
    }
    for path, node in _walk(schema()):
        assert not forbidden & node.keys(), f"{path or '.'} carries {forbidden & node.keys()}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), (
            f"{path} has no type (structural schemas need one everywhere)"
        )
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties"
        if "properties" in node:
            assert "additionalProperties" not in node, f"{path}: both kinds of properties"


def test_every_spec_field_is_documented() -> None:
    for path, node in _walk(schema()["properties"]["spec"], "spec"):
        if path.endswith("{}"):  # the values of a map are described by the map
            continue
        assert node.get("description"), f"{path} has no description"


def test_crd_names_and_columns() -> None:
    crd = crd_object()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "trainingruns.kubetrain.dev"
    assert names["shortNames"] == ["ktr"] and names["categories"] == ["kubetrain"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stage",
        "Progress",
        "Cost",
        "Age",
    ]


def test_cel_rules_present() -> None:
    spec = schema()["properties"]["spec"]
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert any("unique" in m for m in messages)
    assert any("dpo" in m for m in messages)
    assert spec["properties"]["stages"]["minItems"] == 1


def _validator() -> jsonschema.Validator:
    # OpenAPI v3.0 schema keywords are JSON Schema draft 4's (boolean exclusiveMinimum).
    return jsonschema.Draft4Validator(schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_schema_accepts_examples(path: Path) -> None:
    errors = list(_validator().iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize(
    ("case", "manifest"),
    [(b[0], b[1]) for b in BAD if b[0] not in CEL_ONLY | PRUNED],
    ids=[b[0] for b in BAD if b[0] not in CEL_ONLY | PRUNED],
)
def test_schema_rejects_bad_manifests(case: str, manifest: dict[str, Any]) -> None:
    assert list(_validator().iter_errors(manifest)), f"the CRD schema accepts {case}"


def test_defaults_match_the_model() -> None:
    hp = schema()["properties"]["spec"]["properties"]["stages"]["items"]["properties"][
        "hyperparameters"
    ]
    assert hp["default"]["beta"] == 0.1 and hp["default"]["batchSize"] == 16
    assert hp["properties"]["beta"]["default"] == 0.1
    assert hp["properties"]["schedule"]["default"] == "cosine"
