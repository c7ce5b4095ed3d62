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
    STORAGE_REACHABLE: Final = "StorageReachable"
    RUNNING: Final = "Running"
    RESTARTING: Final = "Restarting"
    QUEUED: Final = "Queued"
    SUSPENDED: Final = "Suspended"
    BUDGET_EXCEEDED: Final = "BudgetExceeded"
    SPEC_CHANGE_REFUSED: Final = "SpecChangeRefused"
    CHILD_CONFLICT: Final = "ChildConflict"
    STALLED: Final = "Stalled"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"


# The order status lists conditions in: lifecycle first, then what needs attention,
# then the outcome.
CONDITION_ORDER: Final = (
    ConditionType.CREATED,
    ConditionType.STORAGE_CONFIGURED,
    ConditionType.STORAGE_REACHABLE,
    ConditionType.RUNNING,
    ConditionType.RESTARTING,
    ConditionType.QUEUED,
    ConditionType.SUSPENDED,
    ConditionType.BUDGET_EXCEEDED,
    ConditionType.SPEC_CHANGE_REFUSED,
    ConditionType.CHILD_CONFLICT,
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
    COMPLETED_WITHOUT_FINAL: Final = "CompletedWithoutFinal"
    FAILED: Final = "Failed"
    STORE_UNREACHABLE: Final = "StoreUnreachable"
    STORE_REACHABLE: Final = "StoreReachable"
    FAILURE_BACKOFF: Final = "FailureBackoff"  # Restarting: waiting out the backoff
    PREEMPTED: Final = "Preempted"  # Restarting: after a disruption, no backoff
    RESTARTED: Final = "Restarted"  # Restarting False: the new attempt runs
    NO_RESTART_PENDING: Final = "NoRestartPending"  # Restarting False: the run stopped
    NOT_OWNED: Final = "NotOwned"  # ChildConflict: a Job or Service of ours is someone's
    CHILDREN_OWNED: Final = "ChildrenOwned"
    QUEUED: Final = "Queued"  # Queued True (no Workload reason yet), Running False
    ADMITTED: Final = "Admitted"  # Queued False: Kueue admitted the stage's Job
    NOT_QUEUED: Final = "NotQueued"  # Queued False: the run has no Job waiting in a queue
    GANG_TIMEOUT: Final = "GangScheduleTimeout"  # Restarting: the gang was released
    ENDPOINT_NOT_ALLOWED: Final = "EndpointNotAllowed"  # StorageConfigured False

    # Events only
    STAGE_STARTED: Final = "StageStarted"
    STAGE_RESUMED: Final = "StageResumed"
    STAGE_RESTARTING: Final = "StageRestarting"
    STAGE_INTERRUPTED: Final = "StageInterrupted"
    STAGE_PREEMPTED: Final = "StagePreempted"
    WAITING_FOR_PODS: Final = "WaitingForOldPods"
    SUSPENDING: Final = "Suspending"
    STAGE_QUEUED: Final = "StageQueued"
    GANG_RELEASED: Final = "GangReleased"
