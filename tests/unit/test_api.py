"""The TrainingRun model: examples accepted, bad manifests rejected with messages a user
can act on (field path, bad value, what is accepted)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain.cli.main import main
from kubetrain.core.api import ManifestError, parse_run, parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def base() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())


def with_change(path: str, value: Any) -> dict[str, Any]:
    """The tiny example with the value at ``path`` (dots, [i]) replaced; None deletes."""
    doc = copy.deepcopy(base())
    node: Any = doc
    parts = path.replace("]", "").replace("[", ".").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is None:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    run = parse_run(yaml.safe_load(path.read_text()))
    assert run.spec.stages, "an example without stages teaches nothing"


def test_defaults_are_filled_in() -> None:
    spec = parse_spec({"stages": [{"name": "pre", "type": "pretrain"}]})
    stage = spec.stages[0]
    assert stage.hyperparameters.beta == 0.1
    assert stage.resources.nodes == 1 and stage.resources.gpus_per_node == 0
    assert stage.max_restarts == 3
    assert spec.pricing.pue == 1.2
    assert spec.budget.action.value == "Suspend"


def test_model_fields_default_to_the_builtin_model_or_come_from_a_model_folder() -> None:
    from kubetrain.core.architecture import builtin

    spec = parse_spec({"stages": [{"name": "pre", "type": "pretrain"}]})
    assert spec.model.layers is None and builtin(spec.model).layers == 2
    assert spec.model.context_limit == 64
    # Defaults still take part in the checks: 3 heads cannot divide the default width.
    with pytest.raises(ManifestError, match=r"model\.heads=3 must divide model\.dim=64"):
        parse_spec({"model": {"heads": 3}, "stages": [{"name": "p", "type": "pretrain"}]})
    # With `from`, config.json gives what the manifest leaves out, so a long seqLen and a
    # lone heads value are for the trainer to check against it.
    hf = {"from": "s3://models/llama", "heads": 3}
    spec = parse_spec(
        {"model": hf, "stages": [{"name": "s", "type": "sft", "hyperparameters": {"seqLen": 4096}}]}
    )
    assert spec.model.context_limit is None
    with pytest.raises(ManifestError, match=r"seqLen=4096 exceeds model\.contextLength=2048"):
        parse_spec(
            {
                "model": {**hf, "contextLength": 2048},
                "stages": [{"name": "s", "type": "sft", "hyperparameters": {"seqLen": 4096}}],
            }
        )


# (case id, manifest, field path the message must name, words the message must contain)
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("layers-wrong-type", with_change("spec.model.layers", "two"), "spec.model.layers", "integer"),
    (
        "unknown-stage-type",
        with_change("spec.stages[0].type", "rlhf"),
        "spec.stages[0].type",
        "pretrain",
    ),
    (
        "negative-steps",
        with_change("spec.stages[0].hyperparameters.maxSteps", -5),
        "spec.stages[0].hyperparameters.maxSteps",
        "greater than or equal to 1",
    ),
    (
        "zero-batch",
        with_change("spec.stages[1].hyperparameters.batchSize", 0),
        "spec.stages[1].hyperparameters.batchSize",
        "greater than or equal to 1",
    ),
    (
        "duplicate-names",
        with_change("spec.stages[1].name", "pretrain"),
        "spec.stages[1].name",
        "unique",
    ),
    (
        "missing-bucket",
        with_change("spec.storage.s3.bucket", None),
        "spec.storage.s3.bucket",
        "required",
    ),
    (
        "huge-name",
        with_change("spec.stages[0].name", "p" * 300),
        "spec.stages[0].name",
        "at most 20",
    ),
    (
        "unicode-name",
        with_change("spec.stages[0].name", "prétrain"),
        "spec.stages[0].name",
        "lowercase letters",
    ),
    ("empty-stages", with_change("spec.stages", []), "spec.stages", "at least 1"),
    ("no-stages", with_change("spec.stages", None), "spec.stages", "required"),
    (
        "dpo-without-sft",
        with_change("spec.stages", [{"name": "d", "type": "dpo"}]),
        "spec.stages[0]",
        "sft",
    ),
    (
        "grpo-without-sft",
        with_change(
            "spec.stages", [{"name": "p", "type": "pretrain"}, {"name": "g", "type": "grpo"}]
        ),
        "spec.stages[1]",
        "grpo stage with no sft stage before it",
    ),
    (
        "grpo-settings-on-sft",
        with_change("spec.stages[1].grpo", {"generations": 4}),
        "spec.stages[1]",
        "only on a stage of type grpo",
    ),
    (
        "grpo-one-generation",
        with_change(
            "spec.stages",
            [
                {"name": "s", "type": "sft"},
                {"name": "g", "type": "grpo", "grpo": {"generations": 1}},
            ],
        ),
        "spec.stages[1].grpo.generations",
        "greater than or equal to 2",
    ),
    (
        "grpo-reward-not-an-entry-point",
        with_change(
            "spec.stages",
            [
                {"name": "s", "type": "sft"},
                {"name": "g", "type": "grpo", "grpo": {"rewards": [{"function": "my_rewards"}]}},
            ],
        ),
        "spec.stages[1].grpo.rewards[0].function",
        "package.module:function",
    ),
    ("heads-do-not-divide", with_change("spec.model.heads", 3), "model.heads", "divide"),
    (
        "seq-longer-than-context",
        with_change("spec.stages[0].hyperparameters.seqLen", 4096),
        "spec.stages[0].hyperparameters.seqLen",
        "contextLength",
    ),
    (
        "steps-and-tokens",
        with_change("spec.stages[0].hyperparameters.tokens", 1000),
        "spec.stages[0].hyperparameters",
        "at most one",
    ),
    (
        "unknown-field",
        with_change("spec.stages[0].learningRate", 0.1),
        "spec.stages[0].learningRate",
        "hyperparameters",
    ),
    (
        "bad-schedule",
        with_change("spec.stages[0].hyperparameters.schedule", "step"),
        "spec.stages[0].hyperparameters.schedule",
        "cosine",
    ),
    (
        "too-many-gpus",
        with_change("spec.stages[0].resources.gpusPerNode", 64),
        "spec.stages[0].resources.gpusPerNode",
        "less than or equal to 16",
    ),
    (
        "bad-memory-quantity",
        with_change("spec.stages[0].resources.memory", "lots"),
        "spec.stages[0].resources.memory",
        "64Gi",
    ),
    # What the API server would refuse later, at Job creation, for ever (the CRD's own
    # quantity pattern lets "-4" and "1..2" through).
    (
        "negative-cpu",
        with_change("spec.stages[0].resources.cpu", "-4"),
        "spec.stages[0].resources.cpu",
        "non-negative Kubernetes quantity",
    ),
    (
        "two-dots-cpu",
        with_change("spec.stages[0].resources.cpu", "1..2"),
        "spec.stages[0].resources.cpu",
        "500m",
    ),
    (
        "keyless-equal-toleration",
        with_change("spec.stages[0].resources.tolerations", [{"operator": "Equal"}]),
        "spec.stages[0].resources.tolerations[0]",
        "operator Exists without a key",
    ),
    (
        "exists-toleration-with-value",
        with_change(
            "spec.stages[0].resources.tolerations",
            [{"key": "gpu", "operator": "Exists", "value": "yes"}],
        ),
        "spec.stages[0].resources.tolerations[0]",
        "no value with Exists",
    ),
    (
        "toleration-seconds-without-noexecute",
        with_change(
            "spec.stages[0].resources.tolerations",
            [{"key": "gpu", "value": "a", "effect": "NoSchedule", "tolerationSeconds": 30}],
        ),
        "spec.stages[0].resources.tolerations[0]",
        "effect NoExecute",
    ),
    (
        "bad-node-selector-key",
        with_change("spec.stages[0].resources.nodeSelector", {"gpu type": "a100"}),
        "spec.stages[0].resources.nodeSelector",
        "a label key",
    ),
    (
        "bad-node-selector-value",
        with_change("spec.stages[0].resources.nodeSelector", {"gpu": "a100!"}),
        "spec.stages[0].resources.nodeSelector.gpu",
        "a label value",
    ),
    ("bad-from-uri", with_change("spec.model.from", "http://x/y"), "spec.model.from", "s3"),
    (
        "small-vocab",
        with_change("spec.model.vocabSize", 100),
        "spec.model.vocabSize",
        "greater than or equal to 260",
    ),
    (
        "bad-budget-action",
        with_change("spec.budget.action", "Explode"),
        "spec.budget.action",
        "Suspend",
    ),
    (
        "negative-price",
        with_change("spec.pricing.gpuHourUSD", -1),
        "spec.pricing.gpuHourUSD",
        "greater than or equal to 0",
    ),
    ("long-run-name", with_change("metadata.name", "r" * 41), "metadata.name", "at most 40"),
    (
        "bad-data-source",
        with_change("spec.stages[0].data.source", "hf://gsm8k"),
        "spec.stages[0].data.source",
        "synthetic",
    ),
]


@pytest.mark.parametrize(
    ("manifest", "field", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_manifest_message_names_field(manifest: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_run(manifest)
    message = str(exc.value)
    assert field in message, f"message does not name {field}: {message}"
    assert words in message, f"message does not say {words!r}: {message}"


def test_bad_value_is_shown() -> None:
    with pytest.raises(ManifestError) as exc:
        parse_run(with_change("spec.stages[0].hyperparameters.maxSteps", -5))
    assert "-5" in str(exc.value)


def test_validate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "examples" / "tiny-run.yaml")]) == 0
    assert "pretrain (pretrain) -> sft (sft) -> dpo (dpo)" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_change("spec.stages[0].type", "rlhf")))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.stages[0].type" in err and "'rlhf'" in err

    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "resources",
    [
        {"cpu": "500m", "memory": "64Gi"},
        {"cpu": "1.5", "memory": "1e9"},
        {"tolerations": [{"operator": "Exists"}]},
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        {
            "tolerations": [
                {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60}
            ]
        },
        {"nodeSelector": {"cloud.example.com/pool": "h100-spot", "zone": ""}},
    ],
    ids=[
        "quantities",
        "decimal-quantities",
        "tolerate-all",
        "exists-key",
        "noexecute-seconds",
        "prefixed-selector",
    ],
)
def test_what_the_pod_api_accepts_is_accepted(resources: dict[str, Any]) -> None:
    parse_run(with_change("spec.stages[0].resources", resources))
