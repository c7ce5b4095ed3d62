"""Condition types and reasons are API: users wait on them, alerts and the README name
them, and ``kubetrain status`` points at the ones that need action."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kubetrain.cli.cluster import attention_lines
from kubetrain.core.conditions import CONDITION_ORDER, ConditionType, Reason

ROOT = Path(__file__).resolve().parents[2]


def _values(namespace: type) -> set[str]:
    return {v for k, v in vars(namespace).items() if k.isupper()}


def test_condition_types_keep_their_wire_values() -> None:
    assert list(CONDITION_ORDER) == [
        "Created",
        "StorageConfigured",
        "StorageReachable",
        "Running",
        "Restarting",
        "Queued",
        "Suspended",
        "BudgetExceeded",
        "SpecChangeRefused",
        "ChildConflict",
        "Stalled",
        "Succeeded",
        "Failed",
    ]
    assert _values(ConditionType) == set(CONDITION_ORDER)


def test_reasons_are_camel_case_and_distinct() -> None:
    names = {k: v for k, v in vars(Reason).items() if k.isupper()}
    assert all(re.fullmatch(r"[A-Z][A-Za-z0-9]+", v) for v in names.values()), names
    assert len(set(names.values())) == len(names)


def test_alerts_name_existing_condition_types() -> None:
    text = (ROOT / "charts/kubetrain/files/alerts.yaml").read_text()
    named = set(re.findall(r"condition\s+([A-Z][A-Za-z]+)", text))
    assert named and named <= _values(ConditionType), named - _values(ConditionType)


def test_readme_names_existing_reasons() -> None:
    text = (ROOT / "README.md").read_text()
    for value in ("ReachedMaxRestarts", "SpecChangeRefused"):
        assert f"`{value}`" in text
        assert value in _values(Reason)


def _run(name: str, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ml"}, "status": {"conditions": conditions}}


def test_status_lists_what_needs_action() -> None:
    runs = [
        _run(
            "b",
            [
                {"type": ConditionType.RUNNING, "status": "False", "reason": Reason.SUSPENDED},
                {
                    "type": ConditionType.SUSPENDED,
                    "status": "True",
                    "reason": Reason.SUSPENDED,
                    "message": "spec.suspend is true",
                },
                {
                    "type": ConditionType.STORAGE_CONFIGURED,
                    "status": "False",
                    "reason": Reason.MISSING_S3_STORAGE,
                    "message": "spec.storage.s3 is required on a cluster",
                },
            ],
        ),
        _run(
            "a",
            [
                {
                    "type": ConditionType.STALLED,
                    "status": "False",
                    "reason": Reason.PROGRESSING,
                    "message": "the trainer reports progress",
                },
                {
                    "type": ConditionType.FAILED,
                    "status": "True",
                    "reason": Reason.REACHED_MAX_RESTARTS,
                    "message": "stage 'pretrain' failed 3 times",
                },
            ],
        ),
    ]
    assert attention_lines(runs) == [
        "ml/a: Failed (ReachedMaxRestarts): stage 'pretrain' failed 3 times",
        "ml/b: StorageConfigured (MissingS3Storage): spec.storage.s3 is required on a cluster",
    ]
