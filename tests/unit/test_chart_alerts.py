"""The chart's alerting rules: promtool checks them and runs a unit test for each alert;
every alert tells on-call what to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.chart import ALERTS, alert_rules

PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "alerts_test.yaml"
ALERT_NAMES = {
    "KubetrainRunFailed",
    "KubetrainStageStalled",
    "KubetrainBudget80Percent",
    "KubetrainTrainerRestartsRising",
    "KubetrainOperatorDown",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: run `make prometheus`")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in proc.stdout


def test_every_alert_fires_in_its_promtool_unit_test() -> None:
    proc = promtool("test", "rules", str(PROMTOOL_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert fired == quiet == ALERT_NAMES


def test_alerts_are_the_documented_set() -> None:
    assert {r["alert"] for r in alert_rules()} == ALERT_NAMES


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_tells_on_call_what_to_do(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
    assert summary
    # At least one command to run, in backticks, naming the run when there is one.
    commands = re.findall(r"`((?:kubectl|kubetrain) [^`]+)`", description)
    assert commands, description
    if re.search(r"by \([^)]*\brun\b", rule["expr"]):
        assert any("{{ $labels.run }}" in c for c in commands)
