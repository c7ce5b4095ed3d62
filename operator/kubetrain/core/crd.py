"""Generate the CustomResourceDefinition from the pydantic models in ``kubetrain.core.api``.

pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3.0
schema. The conversion here: inline every ``$ref``; turn ``anyOf: [X, null]`` (an
optional field) into X; turn numeric ``exclusiveMinimum: n`` into ``minimum: n,
exclusiveMinimum: true``; turn ``const`` into a one-value ``enum``; drop keywords a
structural schema may not carry (``title``, ``additionalProperties: false``, ...);
keep ``description`` and ``default`` (the API server then defaults fields exactly as
the Python model does); attach each model's ``CEL_RULES`` as
``x-kubernetes-validations``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from kubetrain.core import api

_DROP = {
    "title",
    "$defs",
    "discriminator",
    "examples",
    "readOnly",
    "writeOnly",
    # Not allowed in a structural schema; models check map keys with CEL rules instead.
    "propertyNames",
}
# Free-form maps the model declares as dict[str, ...] keep additionalProperties.


def _factory_defaults() -> dict[str, dict[str, Any]]:
    """Per model class, the defaults of fields whose default is an object built by a
    factory (``default_factory=Hyperparameters``), as wire dicts. JSON Schema cannot
    show those, but the API server must default an omitted ``hyperparameters`` so CEL
    rules can rely on it. The default is written out whole because the API server
    validates a default against the schema and its CEL rules as it stands, without
    defaulting inside it."""
    out: dict[str, dict[str, Any]] = {}
    for obj in vars(api).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            for name, field in obj.model_fields.items():
                if field.default_factory is not None:
                    produced = field.get_default(call_default_factory=True)
                    if isinstance(produced, BaseModel):
                        out.setdefault(obj.__name__, {})[field.alias or name] = api.dump(produced)
    return out


_Rules = dict[str, list[dict[str, str]]]


def _convert(node: Any, defs: dict[str, Any], rules: _Rules) -> Any:
    """Convert any JSON value of a schema: objects are schemas, lists hold values."""
    if isinstance(node, list):
        return [_convert(n, defs, rules) for n in node]
    if isinstance(node, dict):
        return _convert_schema(node, defs, rules)
    return node


def _convert_schema(node: dict[str, Any], defs: dict[str, Any], rules: _Rules) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").split("/")[-1]
        target = copy.deepcopy(defs[name])
        target.setdefault("x-kubetrain-model", name)
        # Sibling keys of a $ref (description, default) override the target's.
        target.update(node)
        return _convert_schema(target, defs, rules)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in schema: {options}")
        merged = dict(options[0])
        merged.update(node)
        if merged.get("default", "unset") is None:
            merged.pop("default")
        return _convert_schema(merged, defs, rules)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(key), int | float) and not isinstance(node.get(key), bool):
            bound = node.pop(key)
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = bound
            node[key] = True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if "patternProperties" in node:
        # A map with constrained keys: a structural schema has no patternProperties, so
        # the values' schema becomes additionalProperties and the model checks the keys
        # with a CEL rule.
        (values,) = node.pop("patternProperties").values()
        node["additionalProperties"] = values
    model_name = node.pop("x-kubetrain-model", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: _convert(v, defs, rules) for k, v in value.items()}
            for k, default in _FACTORY_DEFAULTS.get(model_name or "", {}).items():
                out[key][k].setdefault("default", default)
        elif key in ("items", "additionalProperties"):
            out[key] = _convert(value, defs, rules)
        elif key == "default":
            out[key] = value
        else:
            out[key] = _convert(value, defs, rules)
    if out.get("type") == "object" and not {"properties", "additionalProperties"} & out.keys():
        out["x-kubernetes-preserve-unknown-fields"] = True
    if model_name and model_name in rules:
        out["x-kubernetes-validations"] = rules[model_name]
    return out


_FACTORY_DEFAULTS = _factory_defaults()


def openapi_schema(model: type[BaseModel], mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a model, as the CRD carries it."""
    schema = model.model_json_schema(by_alias=True, mode=mode)
    defs = schema.pop("$defs", {})
    schema["x-kubetrain-model"] = model.__name__
    return _convert_schema(schema, defs, api.cel_rules())


def crd_object() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec = openapi_schema(api.TrainingRunSpec)
    status = openapi_schema(api.TrainingRunStatus, mode="serialization")
    # Status is written by the operator only; defaults there would fight its patches.
    _strip_defaults(status)
    status.pop("required", None)
    root = {
        "type": "object",
        "description": "A curriculum of training stages run in order as GPU Jobs.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": "size(self.metadata.name) <= 40",
                "message": "metadata.name must be at most 40 characters (it prefixes the names "
                "of the run's Jobs, Services and Pods)",
            }
        ],
    }
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
        {
            "name": "Cost",
            "type": "number",
            "jsonPath": ".status.totals.costUSD",
            "description": "USD accrued",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetrain",
                "app.kubernetes.io/part-of": "kubetrain",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _strip_defaults(node: Any) -> None:
    if isinstance(node, dict):
        node.pop("default", None)
        for value in node.values():
            _strip_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _strip_defaults(value)


HEADER = (
    "# Generated by `make crd` (kubetrain crd) from kubetrain.core.api. Do not edit by\n"
    "# hand: change the model and regenerate.\n"
)


def render_crd() -> str:
    """The CRD as the YAML text committed in crds/trainingrun.yaml."""
    return HEADER + yaml.safe_dump(crd_object(), sort_keys=False, width=100)
