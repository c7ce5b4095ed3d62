"""``kubetrain.operator.plan`` as a table of situations: each row sets up what the operator
observes (possibly after earlier reconciles), reconciles once more, and states what a
user would notice: the phase, the children created or deleted, conditions and events."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator import plan as planner
from tests.unit.planworld import World, manifest


def started() -> World:
    """A run whose first stage's Job was created."""
    w = World(manifest())
    w.reconcile()
    return w


def running() -> World:
    w = started()
    w.pods_running("pretrain")
    w.tick(60)
    w.progress("pretrain", step=40, total=100, energy=3.6e6)
    w.reconcile()
    return w


def fresh() -> World:
    return World(manifest())


def stage_running() -> World:
    w = running()
    w.tick(30)
    return w


def stage_done() -> World:
    w = running()
    w.tick(60)
    w.progress("pretrain", step=100, total=100, final=True, energy=7.2e6)
    w.job_finished("pretrain", ok=True)
    return w


def interrupted() -> World:
    w = running()
    w.job_finished("pretrain", ok=True)  # exit 0 after SIGTERM, no FINAL
    return w


def pod_failed_retrying() -> World:
    w = running()
    w.job_finished("pretrain", ok=False, message="Pod demo-pretrain-1 exit code 1")
    return w


def recreated_after_failure() -> World:
    w = pod_failed_retrying()
    w.reconcile()
    w.job_gone("pretrain")
    w.tick(w.config.restart_backoff_seconds)  # the first failure's backoff
    return w


def out_of_restarts() -> World:
    w = running()
    for _ in range(2):  # maxRestarts: 2
        w.job_finished("pretrain", ok=False, message="OOMKilled")
        w.reconcile()
        w.job_gone("pretrain")
        w.tick(w.config.restart_backoff_max_seconds)
        w.reconcile()
        w.pods_running("pretrain")
    w.job_finished("pretrain", ok=False, message="OOMKilled")
    return w


def suspended() -> World:
    w = running()
    w.run["spec"]["suspend"] = True
    return w


def suspended_and_stopped() -> World:
    w = suspended()
    w.reconcile()
    w.job_gone("pretrain")
    return w


def unsuspended() -> World:
    w = suspended_and_stopped()
    w.reconcile()
    w.run["spec"]["suspend"] = False
    return w


def budget_accrued() -> World:
    w = running()
    # 2 pods × 8 GPUs × 3600 s = 16 GPU-hours > 10.
    w.run["spec"]["budget"] = {"maxGPUHours": 10}
    w.tick(3600)
    return w


def budget_fail() -> World:
    w = budget_accrued()
    w.run["spec"]["budget"]["action"] = "Fail"
    return w


def budget_projected() -> World:
    w = World(
        manifest(
            budget={"maxCostUSD": 0.5, "projected": True},
            model={"layers": 24, "heads": 16, "dim": 2048, "contextLength": 2048},
        )
    )
    return w


def budget_raised() -> World:
    w = budget_accrued()
    w.reconcile()
    w.job_gone("pretrain")
    w.reconcile()
    w.run["spec"]["budget"] = {"maxGPUHours": 1000}
    return w


def finished_stage_changed() -> World:
    w = stage_done()
    w.reconcile()  # pretrain Succeeded, sft started
    w.run["spec"]["stages"][0]["hyperparameters"]["maxSteps"] = 500
    w.run["metadata"]["generation"] = 2
    return w


def future_stage_changed() -> World:
    w = running()
    w.run["spec"]["stages"][1]["hyperparameters"]["maxSteps"] = 80
    w.run["metadata"]["generation"] = 2
    return w


def operator_restarted() -> World:
    """A new operator process: nothing in memory, status says Running, the Job exists."""
    w = running()
    w.tick(5)
    return w


def deleted() -> World:
    w = running()
    w.run["metadata"]["deletionTimestamp"] = "2025-01-01T13:00:00Z"
    return w


def no_storage() -> World:
    w = World(manifest())
    del w.run["spec"]["storage"]
    return w


def finished_with_ttl() -> World:
    w = World(
        manifest(
            ttlSecondsAfterFinished=60,
            stages=[{"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 10}}],
        )
    )
    w.reconcile()
    w.pods_running("sft")
    w.progress("sft", step=10, total=10, final=True)
    w.job_finished("sft", ok=True)
    w.reconcile()
    w.tick(61)
    return w


@dataclass
class Row:
    situation: Callable[[], World]
    phase: str
    creates: list[str] = field(default_factory=list)  # "Kind/name"
    deletes: list[str] = field(default_factory=list)
    condition: tuple[str, str, str] | None = None  # type, status, reason
    events: list[str] = field(default_factory=list)
    check: Callable[[World, planner.Plan], None] | None = None


def _stage(w: World, name: str) -> dict[str, Any]:
    return w.stage_status(name)


def _check_fresh(w: World, p: planner.Plan) -> None:
    est = w.status["estimate"]
    assert est["gpuHours"] > 0 and est["costUSD"] > 0
    assert _stage(w, "pretrain")["phase"] == "Pending"
    assert _stage(w, "pretrain")["startTime"] == "2025-01-01T12:00:00Z"
    assert w.status["observedGeneration"] == 1


def _check_running(w: World, p: planner.Plan) -> None:
    st = _stage(w, "pretrain")
    assert st["step"] == 40 and st["totalSteps"] == 100 and st["progress"] == 0.4
    # 2 pods × 8 GPUs × 90 s
    assert st["gpuSeconds"] == pytest.approx(2 * 8 * 90)
    assert st["energyJoules"] == 3.6e6 and st["energySource"] == "nvml"
    assert st["costUSD"] > 0 and st["co2Grams"] > 0
    assert st["etaSeconds"] > 0
    assert w.status["currentStage"] == "pretrain"
    assert 0 < w.status["totals"]["progress"] < 1


def _check_done(w: World, p: planner.Plan) -> None:
    assert _stage(w, "pretrain")["phase"] == "Succeeded"
    assert _stage(w, "pretrain")["progress"] == 1.0
    assert w.status["currentStage"] == "sft"
    job = next(o for o in p.create if o["kind"] == "Job")
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETRAIN_INIT_URI"] == "s3://ckpt/runs/ml/demo/pretrain"


def _check_restart_counted(w: World, p: planner.Plan) -> None:
    assert _stage(w, "pretrain")["restarts"] == 1
    # Observing the same failed Job again must not count twice.
    again = w.reconcile()
    assert _stage(w, "pretrain")["restarts"] == 1
    assert again.events == [] or all(e.reason == Reason.STAGE_RESTARTING for e in again.events)


def _check_recreated(w: World, p: planner.Plan) -> None:
    job = next(o for o in p.create if o["kind"] == "Job")
    assert job["metadata"]["annotations"]["kubetrain.dev/attempt"] == "1"
    # GPU time of the failed attempt is kept.
    assert _stage(w, "pretrain")["gpuSeconds"] == pytest.approx(2 * 8 * 60)


def _check_max_restarts(w: World, p: planner.Plan) -> None:
    failed = w.condition(ConditionType.FAILED)
    assert failed is not None and "'pretrain'" in failed["message"]
    assert "maxRestarts=2" in failed["message"]
    assert _stage(w, "pretrain")["phase"] == "Failed"
    assert _stage(w, "pretrain")["restarts"] == 3


def _check_suspended_stage(w: World, p: planner.Plan) -> None:
    assert _stage(w, "pretrain")["phase"] == "Suspended"
    assert _stage(w, "pretrain")["step"] == 40


def _check_resumed(w: World, p: planner.Plan) -> None:
    suspended_cond = w.condition(ConditionType.SUSPENDED)
    assert suspended_cond is not None and suspended_cond["status"] == "False"
    assert _stage(w, "pretrain")["restarts"] == 0


def _check_budget(w: World, p: planner.Plan) -> None:
    cond = w.condition(ConditionType.BUDGET_EXCEEDED)
    assert cond is not None and "maxGPUHours=10" in cond["message"]
    assert p.budget_used["gpuHours"] > 1


def _check_projected(w: World, p: planner.Plan) -> None:
    assert "projected" in (w.condition(ConditionType.BUDGET_EXCEEDED) or {})["message"]


def _check_refused(w: World, p: planner.Plan) -> None:
    cond = w.condition(ConditionType.SPEC_CHANGE_REFUSED)
    assert cond is not None and cond["observedGeneration"] == 2
    assert "spec.stages[0] ('pretrain')" in cond["message"]
    assert "hyperparameters" in cond["message"]
    applied = json.loads(w.status["appliedSpec"])
    assert applied["stages"][0]["hyperparameters"]["maxSteps"] == 100
    assert _stage(w, "pretrain")["phase"] == "Succeeded"


def _check_future_applied(w: World, p: planner.Plan) -> None:
    assert w.condition(ConditionType.SPEC_CHANGE_REFUSED) is None
    applied = json.loads(w.status["appliedSpec"])
    assert applied["stages"][1]["hyperparameters"]["maxSteps"] == 80


def _check_no_duplicate(w: World, p: planner.Plan) -> None:
    assert len(w.jobs) == 1
    assert p.status is not None  # time moved on: GPU-seconds grew
    assert _stage(w, "pretrain")["gpuSeconds"] == pytest.approx(2 * 8 * 65)


def _check_deleted(w: World, p: planner.Plan) -> None:
    assert p.status is None and p.annotations == {}


def _check_storage(w: World, p: planner.Plan) -> None:
    assert "storage.s3.bucket" in w.condition(ConditionType.STORAGE_CONFIGURED)["message"]


ROWS = {
    "fresh run": Row(
        fresh,
        "Pending",
        creates=["Service/demo-pretrain", "Job/demo-pretrain"],
        condition=(ConditionType.CREATED, "True", Reason.CREATED),
        events=[Reason.CREATED, Reason.STAGE_STARTED],
        check=_check_fresh,
    ),
    "stage running": Row(
        stage_running,
        "Running",
        condition=(ConditionType.RUNNING, "True", Reason.RUNNING),
        check=_check_running,
    ),
    "stage done -> next stage": Row(
        stage_done,
        "Pending",
        creates=["Service/demo-sft", "Job/demo-sft"],
        condition=(ConditionType.SUCCEEDED, "False", Reason.STAGE_SUCCEEDED),
        events=[Reason.STAGE_SUCCEEDED, Reason.STAGE_STARTED],
        check=_check_done,
    ),
    "job complete without FINAL -> recreate": Row(
        interrupted, "Running", deletes=["Job/demo-pretrain"], events=[Reason.STAGE_INTERRUPTED]
    ),
    "pod failed, retrying": Row(
        pod_failed_retrying,
        "Running",
        deletes=["Job/demo-pretrain"],
        events=[Reason.STAGE_RESTARTING],
        check=_check_restart_counted,
    ),
    "failed job gone -> recreated at attempt 1": Row(
        recreated_after_failure,
        "Pending",
        creates=["Service/demo-pretrain", "Job/demo-pretrain"],
        events=[Reason.STAGE_RESUMED],
        check=_check_recreated,
    ),
    "out of restarts": Row(
        out_of_restarts,
        "Failed",
        condition=(ConditionType.FAILED, "True", Reason.REACHED_MAX_RESTARTS),
        events=[Reason.REACHED_MAX_RESTARTS],
        check=_check_max_restarts,
    ),
    "suspend -> job deleted": Row(
        suspended,
        "Suspended",
        deletes=["Job/demo-pretrain"],
        condition=(ConditionType.SUSPENDED, "True", Reason.SUSPENDED),
        events=[Reason.SUSPENDING, Reason.SUSPENDED],
    ),
    "suspended, pods gone": Row(
        suspended_and_stopped,
        "Suspended",
        condition=(ConditionType.RUNNING, "False", Reason.SUSPENDED),
        check=_check_suspended_stage,
    ),
    "unsuspended -> recreated": Row(
        unsuspended,
        "Pending",
        creates=["Service/demo-pretrain", "Job/demo-pretrain"],
        events=[Reason.STAGE_RESUMED],
        check=_check_resumed,
    ),
    "budget hit (accrued), Suspend": Row(
        budget_accrued,
        "Suspended",
        deletes=["Job/demo-pretrain"],
        condition=(ConditionType.BUDGET_EXCEEDED, "True", Reason.BUDGET_EXCEEDED),
        events=[Reason.BUDGET_EXCEEDED, Reason.SUSPENDING, Reason.SUSPENDED],
        check=_check_budget,
    ),
    "budget hit, Fail": Row(
        budget_fail,
        "Failed",
        deletes=["Job/demo-pretrain"],
        condition=(ConditionType.FAILED, "True", Reason.BUDGET_EXCEEDED),
        events=[Reason.BUDGET_EXCEEDED, Reason.SUSPENDING, Reason.BUDGET_EXCEEDED],
    ),
    "budget projected over before start": Row(
        budget_projected,
        "Suspended",
        condition=(ConditionType.BUDGET_EXCEEDED, "True", Reason.BUDGET_EXCEEDED),
        events=[Reason.CREATED, Reason.BUDGET_EXCEEDED, Reason.SUSPENDED],
        check=_check_projected,
    ),
    "budget raised -> resumes": Row(
        budget_raised,
        "Pending",
        creates=["Service/demo-pretrain", "Job/demo-pretrain"],
        condition=(ConditionType.BUDGET_EXCEEDED, "False", Reason.WITHIN_BUDGET),
        events=[Reason.STAGE_RESUMED],
    ),
    "finished stage changed -> refused": Row(
        finished_stage_changed,
        "Pending",
        condition=(ConditionType.SPEC_CHANGE_REFUSED, "True", Reason.SPEC_CHANGE_REFUSED),
        events=[Reason.SPEC_CHANGE_REFUSED],
        check=_check_refused,
    ),
    "future stage changed -> applied": Row(
        future_stage_changed, "Running", check=_check_future_applied
    ),
    "operator restarted mid-stage": Row(operator_restarted, "Running", check=_check_no_duplicate),
    "deleted": Row(deleted, "Running", check=_check_deleted),
    "missing storage.s3": Row(
        no_storage,
        "Pending",
        condition=(ConditionType.STORAGE_CONFIGURED, "False", Reason.MISSING_S3_STORAGE),
        events=[Reason.CREATED],
        check=_check_storage,
    ),
    "finished, ttl passed -> children deleted": Row(
        finished_with_ttl, "Succeeded", deletes=["Job/demo-sft", "Service/demo-sft"]
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_plan_situation(row: Row) -> None:
    w = row.situation()
    p = w.reconcile()
    assert w.status.get("phase") == row.phase
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in p.create] == row.creates
    assert [f"{d.kind}/{d.name}" for d in p.delete] == row.deletes
    if row.condition:
        type_, status, reason = row.condition
        cond = w.condition(type_)
        assert cond is not None, f"no condition {type_}: {w.status.get('conditions')}"
        assert (cond["status"], cond["reason"]) == (status, reason), cond
        assert cond["lastTransitionTime"] and cond["observedGeneration"] is not None
    assert [e.reason for e in p.events] == row.events
    if row.check:
        row.check(w, p)


def test_reconcile_is_idempotent_when_nothing_changed() -> None:
    w = running()
    again = w.reconcile()
    assert again.create == [] and again.delete == [] and again.events == []
    assert again.status is None and again.annotations == {}


def test_full_curriculum_reaches_succeeded() -> None:
    w = World(manifest())
    for stage, total in (("pretrain", 100), ("sft", 50)):
        w.reconcile()
        w.pods_running(stage)
        w.tick(120)
        w.progress(stage, step=total, total=total, final=True, energy=1e6)
        w.job_finished(stage, ok=True)
    p = w.reconcile()
    assert w.status["phase"] == "Succeeded"
    assert w.condition(ConditionType.SUCCEEDED)["reason"] == Reason.ALL_STAGES_SUCCEEDED
    assert w.status["totals"]["progress"] == 1.0
    assert w.status["progress"] == "2/2 100%"
    assert [e.reason for e in p.events] == [Reason.STAGE_SUCCEEDED, Reason.ALL_STAGES_SUCCEEDED]
    assert w.status["totals"]["gpuSeconds"] == pytest.approx(2 * 8 * 120 + 8 * 120)


def test_condition_transition_time_kept_while_status_unchanged() -> None:
    w = running()
    before = w.condition(ConditionType.RUNNING)["lastTransitionTime"]
    w.tick(600)
    w.reconcile()
    assert w.condition(ConditionType.RUNNING)["lastTransitionTime"] == before


def test_stall_detected() -> None:
    w = running()
    w.tick(w.config.stall_timeout_seconds + 1)
    p = w.reconcile()
    assert w.condition(ConditionType.STALLED)["status"] == "True"
    assert [e.reason for e in p.events] == [Reason.PROGRESS_STALLED]


def test_effective_spec_refuses_model_change_keeps_future_stages() -> None:
    from kubetrain.core.api import parse_spec

    old = parse_spec(manifest()["spec"])
    new_raw = manifest()["spec"]
    new_raw["model"] = {"layers": 4}
    new_raw["stages"][1]["hyperparameters"]["maxSteps"] = 7
    spec, refused = planner.effective_spec(parse_spec(new_raw), [], old, started=1)
    assert spec is not None and spec.model == old.model
    assert spec.stages[1].hyperparameters.max_steps == 7
    assert refused and "spec.model (layers)" in refused[0]
