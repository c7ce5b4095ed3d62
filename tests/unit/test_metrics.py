"""Operator metrics as Prometheus scrapes them: names, labels, values from status, and
a deleted run's series gone."""

from __future__ import annotations

from prometheus_client import generate_latest

from kubetrain.core.api import Condition, TrainingRunStatus
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator.metrics import OperatorMetrics

NONE = TrainingRunStatus()  # a run's status before its first reconcile


def status(
    phase: str = "Running", stage_phase: str = "Running", stalled: bool = False
) -> TrainingRunStatus:
    conditions = (
        [
            {
                "type": ConditionType.STALLED,
                "status": "True",
                "reason": Reason.PROGRESS_STALLED,
                "message": "stage 'pretrain': no progress for 1900s",
            }
        ]
        if stalled
        else []
    )
    wire = {
        "phase": phase,
        "currentStage": "pretrain",
        "conditions": conditions,
        "stages": [
            {
                "name": "pretrain",
                "phase": stage_phase,
                "restarts": 2,
                "preemptions": 3,
                "energySource": "nvml",
                "startTime": "2025-01-01T00:00:00Z",
                "completionTime": "2025-01-01T01:00:00Z",
            }
        ],
        "totals": {
            "progress": 0.25,
            "gpuSeconds": 3600.0,
            "energyJoules": 7.2e6,
            "costUSD": 2.5,
            "co2Grams": 960.0,
        },
    }
    return TrainingRunStatus.model_validate(wire)


def scrape(m: OperatorMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_run_series_named_and_labelled() -> None:
    m = OperatorMetrics()
    m.observe_run("ml", "demo", NONE, status(), {"cost": 0.5}, {"pretrain": "pretrain"})
    text = scrape(m)
    for line in [
        'kubetrain_operator_runs{phase="Running"} 1.0',
        'kubetrain_operator_runs{phase="Failed"} 0.0',
        'kubetrain_operator_run_progress_ratio{namespace="ml",run="demo"} 0.25',
        'kubetrain_operator_gpu_seconds_total{namespace="ml",run="demo"} 3600.0',
        'kubetrain_operator_energy_joules_total{namespace="ml",run="demo",source="nvml"} 7.2e+06',
        'kubetrain_operator_cost_usd_total{namespace="ml",run="demo"} 2.5',
        'kubetrain_operator_co2_grams_total{namespace="ml",run="demo"} 960.0',
        'kubetrain_operator_budget_used_ratio{kind="cost",namespace="ml",run="demo"} 0.5',
        'kubetrain_operator_stage_restarts_total{namespace="ml",run="demo",stage="pretrain"} 2.0',
        'kubetrain_operator_stage_preemptions_total{namespace="ml",run="demo",'
        'stage="pretrain"} 3.0',
        'kubetrain_operator_stage_transitions_total{namespace="ml",phase="Running",'
        'run="demo",stage="pretrain"} 1.0',
        'kubetrain_operator_run_phase{namespace="ml",phase="Running",run="demo"} 1.0',
        'kubetrain_operator_run_phase{namespace="ml",phase="Failed",run="demo"} 0.0',
        'kubetrain_operator_stage_phase{namespace="ml",phase="Running",run="demo",'
        'stage="pretrain"} 1.0',
        'kubetrain_operator_stage_phase{namespace="ml",phase="Pending",run="demo",'
        'stage="pretrain"} 0.0',
        'kubetrain_operator_stage_stalled{namespace="ml",run="demo",stage="pretrain"} 0.0',
    ]:
        assert line in text, line
    assert "# TYPE kubetrain_operator_cost_usd_total counter" in text
    assert "# TYPE kubetrain_operator_run_phase gauge" in text


def test_phases_are_state_sets_read_from_the_status() -> None:
    """Exactly one phase series is 1 per run and per stage, whatever this process saw
    before: a Failed run read on the first reconcile after an operator restart is
    Failed."""
    m = OperatorMetrics()
    m.observe_run("ml", "demo", status("Failed", "Failed"), status("Failed", "Failed"), {}, {})
    samples = [
        line
        for line in scrape(m).splitlines()
        if line.startswith(("kubetrain_operator_run_phase{", "kubetrain_operator_stage_phase{"))
    ]
    ones = [line for line in samples if line.endswith(" 1.0")]
    assert ones == [
        'kubetrain_operator_run_phase{namespace="ml",phase="Failed",run="demo"} 1.0',
        'kubetrain_operator_stage_phase{namespace="ml",phase="Failed",run="demo",'
        'stage="pretrain"} 1.0',
    ]
    assert len(samples) == 2 * 5  # one series per phase, run and stage


def test_stalled_follows_the_condition() -> None:
    m = OperatorMetrics()
    series = 'kubetrain_operator_stage_stalled{namespace="ml",run="demo",stage="pretrain"}'
    m.observe_run("ml", "demo", NONE, status(stalled=True), {}, {})
    assert f"{series} 1.0" in scrape(m)
    recovered = status()
    recovered.conditions = [
        Condition(
            type=ConditionType.STALLED,
            status="False",
            reason=Reason.PROGRESSING,
            message="progress",
        )
    ]
    m.observe_run("ml", "demo", status(stalled=True), recovered, {}, {})
    assert f"{series} 0.0" in scrape(m)


def test_transition_counted_once_and_duration_observed_on_success() -> None:
    m = OperatorMetrics()
    m.observe_run("ml", "demo", NONE, status(), {}, {"pretrain": "pretrain"})
    m.observe_run("ml", "demo", status(), status(), {}, {"pretrain": "pretrain"})
    m.observe_run(
        "ml", "demo", status(), status("Succeeded", "Succeeded"), {}, {"pretrain": "pretrain"}
    )
    text = scrape(m)
    assert (
        'kubetrain_operator_stage_transitions_total{namespace="ml",phase="Running",'
        'run="demo",stage="pretrain"} 1.0'
    ) in text
    assert 'kubetrain_operator_stage_duration_seconds_sum{stage_type="pretrain"} 3600.0' in text


def test_deleted_run_series_removed() -> None:
    m = OperatorMetrics()
    m.observe_run("ml", "demo", NONE, status(stalled=True), {"cost": 0.1}, {"pretrain": "pretrain"})
    m.observe_run("ml", "other", NONE, status(), {}, {"pretrain": "pretrain"})
    assert 'kubetrain_operator_stage_stalled{namespace="ml",run="demo"' in scrape(m)
    m.forget_run("ml", "demo")
    text = scrape(m)
    assert 'run="demo"' not in text
    for family in ("run_phase", "stage_phase", "stage_stalled"):
        assert f'kubetrain_operator_{family}{{namespace="ml"' in text  # "other" stays
    assert 'run="other"' in text
    assert 'kubetrain_operator_runs{phase="Running"} 1.0' in text


def test_reconcile_metrics_exist() -> None:
    m = OperatorMetrics()
    m.reconcile_errors.inc()
    m.reconcile_duration.observe(0.02)
    text = scrape(m)
    assert "kubetrain_operator_reconcile_errors_total 1.0" in text
    assert "kubetrain_operator_reconcile_duration_seconds_count 1.0" in text
