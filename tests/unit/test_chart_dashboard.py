"""The Grafana dashboard and the metric names the dashboard and the alerts query: each
one is a metric the operator or the trainer really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kubetrain.core.api import StagePhase
from kubetrain.docgen.metrics import metric_docs, metrics_table
from tests.support.chart import alert_rules, dashboard, dashboard_exprs

# Suffixes PromQL adds to a histogram's name.
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bkubetrain_[a-z_]+\b", expr))


def _exported_series() -> set[str]:
    names = set()
    for d in metric_docs():
        names.add(d.name)
        if d.type == "histogram":
            names.update(d.name + s for s in _HISTOGRAM_SERIES)
    return names


def test_dashboard_and_alerts_query_only_exported_metrics() -> None:
    exprs = [e for _, e in dashboard_exprs()] + [r["expr"] for r in alert_rules()]
    queried = set().union(*map(_queried_metrics, exprs))
    assert queried, "no kubetrain metric queried at all"
    assert queried <= _exported_series(), queried - _exported_series()


def test_dashboard_shows_what_users_look_for() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    titles = {p["title"] for p in dash["panels"]}
    rows = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert rows == {
        "Runs",
        "Training",
        "Reinforcement learning (grpo)",
        "Energy, cost and carbon",
        "Reliability",
    }
    assert {
        "Runs by phase",
        "Progress",
        "ETA",
        "Stage timeline",
        "Loss",
        "Eval accuracy",
        "Throughput",
        "MFU",
        "Power",
        "Energy",
        "Cost",
        "CO2",
        "Restarts",
        "Reward",
        "KL to reference",
        "Clip ratio",
        "Completion length",
    } <= titles
    kinds = {p["title"]: p["type"] for p in dash["panels"]}
    assert kinds["Stage timeline"] == "state-timeline"
    units = {
        p["title"]: p["fieldConfig"]["defaults"].get("unit")
        for p in dash["panels"]
        if p["type"] != "row"
    }
    assert (units["Power"], units["Energy"], units["Cost"], units["CO2"]) == (
        "watt",
        "kwatth",
        "currencyUSD",
        "masskg",
    )
    power = next(e for t, e in dashboard_exprs() if t == "Power")
    assert "rate(kubetrain_trainer_energy_joules_total" in power


def test_stage_timeline_shows_each_stage_phase_and_stalled(tmp_path: Path) -> None:
    """The timeline encodes the operator's stage_phase state set (and stage_stalled,
    which wins over Running) as one value per stage that its value mappings name; checked
    by evaluating the query with promtool."""
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == "Stage timeline"]
    (mappings,) = panel["fieldConfig"]["defaults"]["mappings"]
    names = {int(v): o["text"] for v, o in mappings["options"].items()}
    assert set(names.values()) == {p.value for p in StagePhase} | {"Stalled"}
    (expr,) = [e for t, e in dashboard_exprs() if t == "Stage timeline"]
    stages = {"pretrain": "Succeeded", "sft": "Running", "dpo": "Pending"}
    series = [
        {
            "series": f'kubetrain_operator_stage_phase{{namespace="ml", run="demo", '
            f'stage="{stage}", phase="{phase.value}", job="kubetrain"}}',
            "values": "1" if phase.value == current else "0",
        }
        for stage, current in stages.items()
        for phase in StagePhase
    ]
    series += [
        {
            "series": f'kubetrain_operator_stage_stalled{{namespace="ml", run="demo", '
            f'stage="{stage}", job="kubetrain"}}',
            "values": "1" if stage == "sft" else "0",
        }
        for stage in stages
    ]
    value = {name: v for v, name in names.items()}
    expected = [
        {
            "labels": f'{{namespace="ml", run="demo", stage="{stage}"}}',
            "value": value["Stalled" if stage == "sft" else phase],
        }
        for stage, phase in stages.items()
    ]
    test = {
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": expr.replace("$namespace", "ml").replace("$run", "demo"),
                        "eval_time": "0m",
                        "exp_samples": expected,
                    }
                ],
            }
        ]
    }
    path = tmp_path / "timeline_test.yaml"
    path.write_text(yaml.safe_dump(test))
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: run `make prometheus`")
    proc = subprocess.run(
        [exe, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_variables_filter_every_run_panel() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "run"} <= set(variables)
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            if re.search(r"\b(run|namespace)\b", expr) and "by (phase)" not in expr:
                assert 'namespace=~"$namespace"' in expr and 'run=~"$run"' in expr, (
                    panel["title"],
                    expr,
                )


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    ids = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        assert panel["id"] not in ids
        ids.add(panel["id"])


def test_metrics_table_lists_every_metric_with_labels() -> None:
    table = metrics_table()
    for d in metric_docs():
        assert f"`{d.name}`" in table
    assert (
        "| `kubetrain_trainer_energy_joules_total` | counter | `run`, `namespace`, "
        "`stage`, `source` | trainer |" in table
    )


def test_readme_metrics_table_is_fresh() -> None:
    from kubetrain.docgen.metrics import BEGIN, sync_readme
    from tests.support.chart import REPO

    text = (REPO / "README.md").read_text()
    assert BEGIN in text, "README lost its metrics section markers"
    assert sync_readme(text) == text, "README metrics table is stale: run `make docs`"
