"""The steps of ``kubetrain.operator.plan`` one by one: which spec applies, what the
handlers read, accounting, budget, each stage situation, the run's phase and
conditions, TTL. ``test_plan.py`` drives the whole pipeline through situations."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from kubetrain.core import accounting
from kubetrain.core.api import (
    BudgetAction,
    Condition,
    RunPhase,
    StageLedger,
    StagePhase,
    StageStatus,
    TrainingRunSpec,
    TrainingRunStatus,
    parse_spec,
)
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.core.records import ProgressRecord
from kubetrain.operator import plan as planner
from kubetrain.operator.config import OperatorConfig
from kubetrain.operator.progress import StageRecords, StoreAnswer, format_time
from tests.unit.planworld import T0, World, manifest

NO_BUDGET = planner.BudgetCheck([], {})
OVER_BUDGET = planner.BudgetCheck(["GPU-hours 16 h reached budget.maxGPUHours=10"], {})


def spec(**fields: Any) -> TrainingRunSpec:
    return parse_spec(manifest(**fields)["spec"])


def job(stage: str = "pretrain", **status: Any) -> planner.ObservedJob:
    base: dict[str, Any] = {
        "name": f"demo-{stage}",
        "stage": stage,
        "uid": f"uid-{stage}",
        "attempt": 0,
        "active": 1,
        "failed": 0,
        "complete": False,
        "failed_condition": False,
        "failure_message": "",
        "deleting": False,
        "completion_time": None,
    }
    return planner.ObservedJob(**{**base, **status})


def course(
    *, suspend: bool = False, terminal: bool = False, budget: planner.BudgetCheck = NO_BUDGET
) -> planner.Course:
    return planner.Course(terminal, suspend, budget, BudgetAction.Suspend)


def context(
    *,
    jobs: dict[str, planner.ObservedJob] | None = None,
    pods: list[dict[str, Any]] | None = None,
    the_course: planner.Course | None = None,
    now_offset: float = 0.0,
) -> planner.WalkContext:
    observed = planner.Observed(
        jobs=jobs or {},
        pods=pods or [],
        services=[],
        records={},
        now=T0 + timedelta(seconds=now_offset),
    )
    return planner.WalkContext(
        planner.RunRef("demo", "ml", "run-uid"),
        spec(),
        the_course or course(),
        observed,
        OperatorConfig(),
    )


def at(
    ctx: planner.WalkContext,
    status: StageStatus | None = None,
    record: StageRecords | None = None,
) -> planner.StageAt:
    stage = ctx.spec.stages[0]
    return planner.StageAt(
        0,
        stage,
        status or StageStatus(name=stage.name, total_steps=100),
        ctx.observed.jobs.get(stage.name),
        record,
    )


def running_pod(uid: str = "uid-pretrain") -> dict[str, Any]:
    return {
        "metadata": {"ownerReferences": [{"uid": uid}]},
        "status": {"phase": "Running", "startTime": format_time(T0)},
    }


def conditions(now_offset: float = 0.0) -> planner.Conditions:
    return planner.Conditions([], T0 + timedelta(seconds=now_offset), 1)


def get(conds: planner.Conditions, type_: str) -> Condition:
    cond = conds.get(type_)
    assert cond is not None, f"no condition {type_}: {conds.items}"
    return cond


# --------------------------------------------------------------------------- 1. the spec


def test_new_spec_applies_while_nothing_started() -> None:
    run = manifest()
    choice = planner.choose_spec(run, [])
    assert choice.spec == spec() and choice.refused == [] and choice.errors == []


def test_started_stage_is_frozen_to_the_applied_spec() -> None:
    w = World(manifest())
    w.reconcile()  # pretrain's Job exists: pretrain started
    w.run["spec"]["stages"][0]["hyperparameters"]["maxSteps"] = 999
    choice = planner.choose_spec(w.run, ["pretrain"])
    assert choice.spec is not None
    assert choice.spec.stages[0].hyperparameters.max_steps == 100
    assert choice.refused and "spec.stages[0] ('pretrain')" in choice.refused[0]


def test_invalid_new_spec_keeps_the_applied_one() -> None:
    w = World(manifest())
    w.reconcile()
    w.run["spec"]["stages"][0]["resources"] = {"nodes": "two"}
    choice = planner.choose_spec(w.run, ["pretrain"])
    assert choice.spec is not None and choice.spec.stages[0].resources.nodes == 2
    assert choice.refused[0].startswith("the new spec is invalid: spec.stages[0].resources.nodes")


def test_invalid_spec_never_applied_has_no_spec_and_names_the_field() -> None:
    run = manifest()
    run["spec"]["stages"][0]["resources"] = {"nodes": "two"}
    choice = planner.choose_spec(run, [])
    assert choice.spec is None
    assert any("spec.stages[0].resources.nodes" in e for e in choice.errors)


def test_records_are_read_for_the_applied_spec_not_the_edited_one() -> None:
    """pretrain succeeded, sft runs; the user renames pretrain (refused): the handlers
    must keep reading sft's records, which the plan needs, not those of a stage
    'warmup' that never ran."""
    w = World(manifest())
    w.reconcile()
    w.pods_running("pretrain")
    w.progress("pretrain", step=100, total=100, final=True)
    w.job_finished("pretrain", ok=True)
    w.reconcile()  # pretrain Succeeded, sft created
    w.run["spec"]["stages"][0]["name"] = "warmup"
    wanted = planner.records_to_read(w.run, list(w.jobs.values()))
    assert wanted.stages == ["sft"]
    assert wanted.s3 is not None and wanted.s3.uri() == "s3://ckpt/runs"


def test_plan_says_what_the_next_reconcile_reads() -> None:
    w = World(manifest())
    w.reconcile()
    w.pods_running("pretrain")
    w.progress("pretrain", step=100, total=100, final=True)
    w.job_finished("pretrain", ok=True)
    p = w.reconcile()
    assert p.read_next == ["sft"]
    assert planner.records_to_read(w.run, list(w.jobs.values())).stages == p.read_next


def test_nothing_to_read_without_storage_or_when_all_succeeded() -> None:
    no_store = spec()
    no_store.storage.s3 = None
    assert planner.stages_to_read(no_store, []) == []
    done = [StageStatus(name=n, phase=StagePhase.Succeeded) for n in ("pretrain", "sft")]
    assert planner.stages_to_read(spec(), done) == []
    assert planner.stages_to_read(spec(), done[:1]) == ["sft"]


def test_refusal_warns_once_per_message_and_clears() -> None:
    choice = planner.SpecChoice(spec(), ["spec.model (layers) cannot change"], [])
    conds = conditions()
    events = planner.spec_conditions(choice, TrainingRunStatus(), conds)
    assert [e.reason for e in events] == [Reason.SPEC_CHANGE_REFUSED]
    refused = TrainingRunStatus(conditions=conds.items)
    assert planner.spec_conditions(choice, refused, conditions()) == []
    cleared = conditions()
    planner.spec_conditions(planner.SpecChoice(spec(), [], []), refused, cleared)
    cond = cleared.get(ConditionType.SPEC_CHANGE_REFUSED)
    assert cond is not None and (cond.status, cond.reason) == ("False", Reason.SPEC_APPLIED)


def test_applied_spec_is_compact_sorted_json_of_the_spec() -> None:
    text = planner.applied_spec_json(spec())
    assert json.loads(text)["stages"][0]["name"] == "pretrain"
    assert text == planner.applied_spec_json(parse_spec(json.loads(text)))


def test_created_once_with_the_estimate() -> None:
    est = planner.estimate_summary(planner.price(spec(), OperatorConfig()).estimate)
    conds = conditions()
    assert [e.reason for e in planner.created_condition(spec(), est, conds)] == [Reason.CREATED]
    assert "2 stages; estimate" in get(conds, ConditionType.CREATED).message
    assert planner.created_condition(spec(), est, conds) == []


def test_storage_condition_false_without_s3_true_once_fixed() -> None:
    no_store = spec()
    no_store.storage.s3 = None
    conds = conditions()
    assert planner.storage_condition(no_store, conds) is False
    assert get(conds, ConditionType.STORAGE_CONFIGURED).reason == Reason.MISSING_S3_STORAGE
    assert planner.storage_condition(spec(), conds) is True
    fixed = conds.get(ConditionType.STORAGE_CONFIGURED)
    assert fixed is not None and (fixed.status, fixed.reason) == ("True", Reason.S3_CONFIGURED)
    untouched = conditions()
    assert planner.storage_condition(spec(), untouched) is True
    assert untouched.get(ConditionType.STORAGE_CONFIGURED) is None


# --------------------------------------------------------------------------- 3. accounting


def test_pricing_and_estimate_computed_once_per_reconcile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World(manifest(budget={"maxCostUSD": 1000, "projected": True}))
    calls = []
    real = accounting.estimate_run

    def counting(*args: Any, **kwargs: Any) -> accounting.RunEstimate:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(accounting, "estimate_run", counting)
    w.reconcile()
    assert len(calls) == 1


def test_operator_defaults_complete_the_pricing() -> None:
    costing = planner.price(spec(), OperatorConfig(pue=1.5))
    assert costing.pricing.pue == 1.5
    assert costing.estimate.stages[0].name == "pretrain"


def test_account_banks_gpu_seconds_of_a_finished_attempt() -> None:
    s = spec()
    costing = planner.price(s, OperatorConfig())
    before = [
        StageStatus(
            name="pretrain", gpu_seconds=1000.0, ledger=StageLedger(job="old-job", banked=0.0)
        ),
        StageStatus(name="sft"),
    ]
    observed = planner.Observed(
        jobs={"pretrain": job(uid="new-job")},
        pods=[running_pod("new-job"), running_pod("new-job")],
        services=[],
        records={},
        now=T0 + timedelta(seconds=10),
    )
    stages = planner.account(s, before, observed, costing.pricing, {})
    # 1000 s banked from the old Job + 2 pods × 8 GPUs × 10 s of the new one.
    assert stages[0].gpu_seconds == pytest.approx(1000 + 160)
    assert stages[0].cost_usd > 0
    assert stages[0].ledger == StageLedger(job="new-job", banked=1000.0)
    assert stages[1] == before[1]  # no news of sft: untouched


def test_totals_weight_progress_by_steps() -> None:
    stages = [
        StageStatus(name="a", phase=StagePhase.Succeeded, step=90, total_steps=100),
        StageStatus(name="b", step=25, total_steps=100, cost_usd=1.5),
    ]
    t = planner.totals(stages)
    assert t.progress == 0.625 and t.cost_usd == 1.5


# --------------------------------------------------------------------------- 4. budget


def test_budget_accrued_and_projected() -> None:
    s = spec(budget={"maxGPUHours": 10, "projected": True})
    costing = planner.price(s, OperatorConfig())
    half = [
        StageStatus(name="pretrain", progress=0.5, gpu_seconds=6 * 3600),
        StageStatus(name="sft"),
    ]
    check = planner.check_budget(s, half, planner.totals(half), costing)
    assert check.used == {"gpuHours": pytest.approx(0.6)}
    assert check.exceeded and check.exceeded[0].startswith("projected GPU-hours")
    spent = [StageStatus(name="pretrain", gpu_seconds=11 * 3600), StageStatus(name="sft")]
    check = planner.check_budget(s, spent, planner.totals(spent), costing)
    assert check.exceeded[0] == "GPU-hours 11 h reached budget.maxGPUHours=10"


def test_budget_warns_when_exceeded_and_recovers() -> None:
    s = spec(budget={"maxGPUHours": 10})
    conds = conditions()
    events = planner.budget_condition(OVER_BUDGET, s, TrainingRunStatus(), conds)
    assert [(e.type, e.reason) for e in events] == [("Warning", Reason.BUDGET_EXCEEDED)]
    assert events[0].message.endswith(": Suspend the run")
    exceeded = TrainingRunStatus(conditions=conds.items)
    assert planner.budget_condition(OVER_BUDGET, s, exceeded, conditions()) == []
    recovered = planner.Conditions(conds.items, T0, 1)
    assert planner.budget_condition(NO_BUDGET, s, exceeded, recovered) == []
    assert get(recovered, ConditionType.BUDGET_EXCEEDED).reason == Reason.WITHIN_BUDGET


def test_course_says_why_the_run_stops() -> None:
    assert course().should_run
    assert course(suspend=True).stop_reason == "spec.suspend is true"
    assert course(suspend=True, budget=OVER_BUDGET).stop_reason == "budget exceeded"
    assert course(terminal=True).stop_reason == "the run has finished"
    fail = planner.Course(False, False, OVER_BUDGET, BudgetAction.Fail)
    assert fail.fail_on_budget and not fail.suspend_on_budget and not fail.should_run


# --------------------------------------------------------------------------- 5. stages


def test_deleting_job_waits_for_its_pods() -> None:
    ctx = context(jobs={"pretrain": job(deleting=True)})
    d = planner.decide_stage(at(ctx), ctx)
    assert d.phase == RunPhase.Running and not d.create and not d.delete
    assert "waiting for the previous pods to stop" in (d.status.message or "")


def test_complete_job_with_final_succeeds_the_stage() -> None:
    ctx = context(jobs={"pretrain": job(complete=True, completion_time="2025-01-01T13:00:00Z")})
    d = planner.decide_stage(at(ctx, record=StageRecords(None, StoreAnswer.PRESENT)), ctx)
    assert d.done and d.status.phase == StagePhase.Succeeded and d.status.step == 100
    assert d.status.completion_time == "2025-01-01T13:00:00Z"
    assert [e.message for e in d.events] == ["stage 'pretrain' (1/2) succeeded"]


def test_complete_job_without_final_is_recreated() -> None:
    ctx = context(jobs={"pretrain": job(complete=True)})
    d = planner.decide_stage(at(ctx, record=StageRecords(None, StoreAnswer.ABSENT)), ctx)
    assert not d.done and [x.name for x in d.delete] == ["demo-pretrain"]
    assert [e.reason for e in d.events] == [Reason.STAGE_INTERRUPTED]
    assert d.status.completed_without_final == 1


def test_failed_job_restarts_within_max_restarts() -> None:
    ctx = context(jobs={"pretrain": job(failed_condition=True, failure_message="OOMKilled")})
    d = planner.decide_stage(at(ctx), ctx)
    assert d.status.restarts == 1 and d.status.preemptions == 0
    assert d.status.message == ("failure 1/2: OOMKilled; attempt 2 starts at 2025-01-01T12:00:10Z")
    assert d.status.next_attempt_time == "2025-01-01T12:00:10Z" and d.requeue_after == 10
    assert [x.name for x in d.delete] == ["demo-pretrain"] and d.failed is None
    assert [e.reason for e in d.events] == [Reason.STAGE_RESTARTING]
    assert d.restarting is not None and d.restarting.reason == Reason.FAILURE_BACKOFF


def test_failed_job_beyond_max_restarts_fails_the_run() -> None:
    ctx = context(jobs={"pretrain": job(failed_condition=True, attempt=2, failure_message="x")})
    d = planner.decide_stage(at(ctx), ctx)
    assert d.phase == RunPhase.Failed and d.status.phase == StagePhase.Failed
    assert d.failed == "stage 'pretrain' failed 3 times, more than maxRestarts=2: x"
    assert not d.delete


def test_running_job_stopped_when_the_run_must_not_train() -> None:
    ctx = context(jobs={"pretrain": job()}, the_course=course(suspend=True))
    d = planner.decide_stage(at(ctx), ctx)
    assert [x.name for x in d.delete] == ["demo-pretrain"] and d.phase is None
    assert d.events[0].message.startswith("stopping stage 'pretrain': spec.suspend is true")


def test_job_pending_until_a_pod_runs() -> None:
    ctx = context(jobs={"pretrain": job()})
    d = planner.decide_stage(at(ctx), ctx)
    assert (d.phase, d.status.phase) == (RunPhase.Pending, StagePhase.Pending)
    ctx = context(jobs={"pretrain": job()}, pods=[running_pod()])
    d = planner.decide_stage(at(ctx), ctx)
    assert (d.phase, d.status.phase) == (RunPhase.Running, StagePhase.Running)


def test_stage_whose_pods_exited_0_stays_running_until_the_job_completes() -> None:
    """Between the trainer's exit and the Job controller's Complete (seconds on a busy
    cluster) the stage is finishing: it does not go back to Pending."""
    done = running_pod()
    done["status"]["phase"] = "Succeeded"
    ctx = context(jobs={"pretrain": job()}, pods=[done])
    d = planner.decide_stage(at(ctx), ctx)
    assert (d.phase, d.status.phase) == (RunPhase.Running, StagePhase.Running)
    assert d.status.message == "the trainer exited 0; waiting for the Job to complete"
    failed = running_pod()
    failed["status"]["phase"] = "Failed"
    ctx = context(jobs={"pretrain": job()}, pods=[failed])
    d = planner.decide_stage(at(ctx), ctx)
    assert (d.phase, d.status.phase) == (RunPhase.Pending, StagePhase.Pending)


def test_running_stage_without_progress_is_stalled() -> None:
    timeout = OperatorConfig().stall_timeout_seconds
    record = StageRecords(progress=ProgressRecord(step=3, updated_at=format_time(T0)), final=None)
    ctx = context(jobs={"pretrain": job()}, pods=[running_pod()], now_offset=timeout + 5)
    d = planner.decide_stage(at(ctx, record=record), ctx)
    assert d.stalled == f"stage 'pretrain': no progress for {timeout + 5:.0f}s"
    ctx = context(jobs={"pretrain": job()}, pods=[running_pod()], now_offset=timeout - 5)
    assert planner.decide_stage(at(ctx, record=record), ctx).stalled is None


def test_no_job_creates_service_and_job_or_resumes() -> None:
    ctx = context()
    d = planner.decide_stage(at(ctx), ctx)
    assert [o["kind"] for o in d.create] == ["Service", "Job"]
    assert d.events[0].reason == Reason.STAGE_STARTED and d.status.start_time is not None
    resumed = planner.decide_stage(at(ctx, d.status), ctx)
    assert resumed.events[0].reason == Reason.STAGE_RESUMED
    assert resumed.status.message == "Job recreated, resuming from LATEST"


def test_no_job_while_suspended_marks_a_started_stage_suspended() -> None:
    ctx = context(the_course=course(suspend=True))
    started = StageStatus(name="pretrain", phase=StagePhase.Running, start_time="x")
    d = planner.decide_stage(at(ctx, started), ctx)
    assert d.status.phase == StagePhase.Suspended and not d.create and d.phase is None
    never = planner.decide_stage(at(ctx), ctx)
    assert never.status.phase == StagePhase.Pending


def test_walk_passes_succeeded_stages_and_finishes_the_run() -> None:
    ctx = context()
    done = [StageStatus(name=n, phase=StagePhase.Succeeded) for n in ("pretrain", "sft")]
    walk = planner.walk_stages(ctx, done, TrainingRunStatus())
    assert (walk.phase, walk.current) == (RunPhase.Succeeded, "sft")
    walk = planner.walk_stages(ctx, [done[0], StageStatus(name="sft")], TrainingRunStatus())
    assert walk.current == "sft" and walk.phase == RunPhase.Pending
    assert [o["metadata"]["name"] for o in walk.create] == ["demo-sft", "demo-sft"]


# --------------------------------------------------------------------------- 6. outcome


def test_outcome_fail_on_budget_and_suspend() -> None:
    walk = planner.Walk(RunPhase.Running, "pretrain", [])
    fail = planner.Course(False, False, OVER_BUDGET, BudgetAction.Fail)
    outcome = planner.run_outcome(walk, fail)
    assert outcome.phase == RunPhase.Failed and outcome.failed is not None
    assert outcome.failed.startswith("budget exceeded: GPU-hours")
    assert planner.run_outcome(walk, course(suspend=True)).phase == RunPhase.Suspended
    finished = planner.Walk(RunPhase.Succeeded, "sft", [])
    assert planner.run_outcome(finished, course(terminal=True)).phase == RunPhase.Succeeded


def test_running_condition_repeats_the_failure_reason() -> None:
    conds = conditions()
    outcome = planner.Outcome(RunPhase.Failed, "stage 'pretrain' failed 3 times")
    walk = planner.Walk(RunPhase.Failed, "pretrain", [StageStatus(name="pretrain")])
    events = planner.outcome_conditions(outcome, walk, course(), TrainingRunStatus(), conds)
    assert [e.reason for e in events] == [Reason.REACHED_MAX_RESTARTS]
    running = conds.get(ConditionType.RUNNING)
    assert running is not None and running.reason == Reason.REACHED_MAX_RESTARTS


def test_suspended_event_only_when_the_run_becomes_suspended() -> None:
    suspend = course(suspend=True)
    conds = conditions()
    events = planner.suspended_condition(RunPhase.Suspended, suspend, TrainingRunStatus(), conds)
    assert [e.message for e in events] == ["run suspended: spec.suspend is true"]
    already = TrainingRunStatus(phase=RunPhase.Suspended)
    assert planner.suspended_condition(RunPhase.Suspended, suspend, already, conds) == []
    planner.suspended_condition(RunPhase.Running, course(), already, conds)
    assert get(conds, ConditionType.SUSPENDED).reason == Reason.RESUMED


def test_stalled_warns_once_and_clears() -> None:
    conds = conditions()
    events = planner.stalled_condition("no progress for 1900s", TrainingRunStatus(), conds)
    assert [e.reason for e in events] == [Reason.PROGRESS_STALLED]
    stalled = TrainingRunStatus(conditions=conds.items)
    assert planner.stalled_condition("no progress for 1990s", stalled, conds) == []
    planner.stalled_condition(None, stalled, conds)
    assert get(conds, ConditionType.STALLED).reason == Reason.PROGRESSING


# --------------------------------------------------------------------------- 7. TTL


def test_children_expire_ttl_after_the_run_finished() -> None:
    s = spec(ttlSecondsAfterFinished=60)
    conds = conditions()
    conds.set(ConditionType.SUCCEEDED, True, Reason.ALL_STAGES_SUCCEEDED, "done")
    observed = planner.Observed(
        jobs={"sft": job("sft", complete=True)},
        pods=[],
        services=["demo-sft"],
        records={},
        now=T0 + timedelta(seconds=59),
    )
    assert planner.expired_children(s, RunPhase.Succeeded, conds, observed) is None
    later = planner.Observed(**{**observed.__dict__, "now": T0 + timedelta(seconds=60)})
    expired = planner.expired_children(s, RunPhase.Succeeded, conds, later)
    assert [(d.kind, d.name) for d in expired or []] == [
        ("Job", "demo-sft"),
        ("Service", "demo-sft"),
    ]
    assert planner.expired_children(s, RunPhase.Running, conds, later) is None
    assert planner.expired_children(spec(), RunPhase.Succeeded, conds, later) is None


# --------------------------------------------------------------------------- the result


def test_plan_carries_the_typed_spec_and_status() -> None:
    w = World(manifest())
    p = w.reconcile()
    assert isinstance(p.spec, TrainingRunSpec) and [s.name for s in p.spec.stages] == [
        "pretrain",
        "sft",
    ]
    assert p.previous_status == TrainingRunStatus()
    assert p.run_status is not None and p.run_status.phase == RunPhase.Pending
    assert p.status == p.run_status.model_dump(by_alias=True, exclude_none=True, mode="json")
    w.reconcile()  # the Job exists now: "waiting for pods to be scheduled"
    again = w.reconcile()
    assert again.status is None and again.run_status == again.previous_status


def test_invalid_spec_fails_the_run_naming_the_field() -> None:
    run = manifest()
    run["spec"]["stages"][0]["type"] = "rlhf"
    p = World(copy.deepcopy(run)).reconcile()
    assert p.spec is None and p.run_status is not None
    assert p.run_status.phase == RunPhase.Failed
    failed = next(c for c in p.run_status.conditions if c.type == ConditionType.FAILED)
    assert failed.reason == Reason.INVALID_SPEC and "spec.stages[0].type" in failed.message
