"""Operator metrics as Prometheus scrapes them: names, labels, values from status, and
a deleted run's series gone."""

from __future__ import annotations

from prometheus_client import generate_latest

from kubetrain.metrics import OperatorMetrics


def status(phase: str = "Running", stage_phase: str = "Running") -> dict:
    return {
        "phase": phase,
        "stages": [{"name": "pretrain", "phase": stage_phase, "restarts": 2,
                    "energySource": "nvml", "startTime": "2025-01-01T00:00:00Z",
                    "completionTime": "2025-01-01T01:00:00Z"}],
        "totals": {"progress": 0.25, "gpuSeconds": 3600.0, "energyJoules": 7.2e6,
                   "costUSD": 2.5, "co2Grams": 960.0},
    }


def scrape(m: OperatorMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_run_series_named_and_labelled() -> None:
    m = OperatorMetrics()
    m.observe_run("ml", "demo", {}, status(), {"cost": 0.5}, {"pretrain": "pretrain"})
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
        'kubetrain_operator_stage_transitions_total{namespace="ml",phase="Running",'
        'run="demo",stage="pretrain"} 1.0',
    ]:
        assert line in text, line
    assert "# TYPE kubetrain_operator_cost_usd_total counter" in text


def test_transition_counted_once_and_duration_observed_on_success() -> None:
    m = OperatorMetrics()
    m.observe_run("ml", "demo", {}, status(), {}, {"pretrain": "pretrain"})
    m.observe_run("ml", "demo", status(), status(), {}, {"pretrain": "pretrain"})
    m.observe_run("ml", "demo", status(), status("Succeeded", "Succeeded"), {},
                  {"pretrain": "pretrain"})
    text = scrape(m)
    assert ('kubetrain_operator_stage_transitions_total{namespace="ml",phase="Running",'
            'run="demo",stage="pretrain"} 1.0') in text
    assert ('kubetrain_operator_stage_duration_seconds_sum{stage_type="pretrain"} 3600.0'
            in text)


def test_deleted_run_series_removed() -> None:
    m = OperatorMetrics()
    m.observe_run("ml", "demo", {}, status(), {"cost": 0.1}, {"pretrain": "pretrain"})
    m.observe_run("ml", "other", {}, status(), {}, {"pretrain": "pretrain"})
    m.forget_run("ml", "demo")
    text = scrape(m)
    assert 'run="demo"' not in text
    assert 'run="other"' in text
    assert 'kubetrain_operator_runs{phase="Running"} 1.0' in text


def test_reconcile_metrics_exist() -> None:
    m = OperatorMetrics()
    m.reconcile_errors.inc()
    m.reconcile_duration.observe(0.02)
    text = scrape(m)
    assert "kubetrain_operator_reconcile_errors_total 1.0" in text
    assert "kubetrain_operator_reconcile_duration_seconds_count 1.0" in text
