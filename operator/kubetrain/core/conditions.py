"""The names a TrainingRun's status and events use: condition types and reasons.

The operator (``kubetrain.operator.plan``) writes them, its metrics, ``kubetrain status``
and the tests read them, and users select on them (``kubectl wait
--for=condition=Succeeded``, alerts, dashboards), so their values are part of the API:
change one only with a new API version.
"""

from __future__ import annotations

from typing import Final


class ConditionType:
    """``status.conditions[].type``."""

    CREATED: Final = "Created"
    STORAGE_CONFIGURED: Final = "StorageConfigured"
    RUNNING: Final = "Running"
    SUSPENDED: Final = "Suspended"
    BUDGET_EXCEEDED: Final = "BudgetExceeded"
    SPEC_CHANGE_REFUSED: Final = "SpecChangeRefused"
    STALLED: Final = "Stalled"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"


# The order status lists conditions in: lifecycle first, then what needs attention,
# then the outcome.
CONDITION_ORDER: Final = (
    ConditionType.CREATED,
    ConditionType.STORAGE_CONFIGURED,
    ConditionType.RUNNING,
    ConditionType.SUSPENDED,
    ConditionType.BUDGET_EXCEEDED,
    ConditionType.SPEC_CHANGE_REFUSED,
    ConditionType.STALLED,
    ConditionType.SUCCEEDED,
    ConditionType.FAILED,
)


class Reason:
    """``status.conditions[].reason`` and the reasons of the run's Kubernetes events
    (several are both: a condition set and the event announcing it)."""

    # Conditions (and their events)
    CREATED: Final = "Created"
    INVALID_SPEC: Final = "InvalidSpec"
    MISSING_S3_STORAGE: Final = "MissingS3Storage"
    S3_CONFIGURED: Final = "S3Configured"
    RUNNING: Final = "Running"
    PENDING: Final = "Pending"
    SUSPENDED: Final = "Suspended"
    RESUMED: Final = "Resumed"
    BUDGET_EXCEEDED: Final = "BudgetExceeded"
    WITHIN_BUDGET: Final = "WithinBudget"
    SPEC_CHANGE_REFUSED: Final = "SpecChangeRefused"
    SPEC_APPLIED: Final = "SpecApplied"
    PROGRESS_STALLED: Final = "ProgressStalled"
    PROGRESSING: Final = "Progressing"
    STAGE_SUCCEEDED: Final = "StageSucceeded"
    ALL_STAGES_SUCCEEDED: Final = "AllStagesSucceeded"
    REACHED_MAX_RESTARTS: Final = "ReachedMaxRestarts"
    FAILED: Final = "Failed"

    # Events only
    STAGE_STARTED: Final = "StageStarted"
    STAGE_RESUMED: Final = "StageResumed"
    STAGE_RESTARTING: Final = "StageRestarting"
    STAGE_INTERRUPTED: Final = "StageInterrupted"
    SUSPENDING: Final = "Suspending"
