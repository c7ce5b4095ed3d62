"""A real Prometheus scrapes a real trainer during a tiny local training run and the
operator's metrics registry; then every PromQL expression of the Grafana dashboard and
of the alerting rules is evaluated against what it collected, and the rules loaded into
that Prometheus fire for the runs that should alert."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import start_http_server

from kubetrain.core.api import TrainingRunStatus
from kubetrain.operator.metrics import OperatorMetrics
from tests.support.chart import ALERTS, alert_rules, concrete, dashboard_exprs
from tests.support.localrun import cli_env, kubetrain_cmd, tiny_manifest, write_manifest
from tests.support.prometheus import Prometheus, free_port
from tests.support.services import stop_process
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

NAMESPACE, RUN = "default", "prom-run"  # the local runner's namespace; the run's name


class OperatorExporter:
    """The operator's real metrics registry, served over HTTP like `kubetrain operator`
    does, fed with the statuses a reconcile loop would write: ``RUN`` advancing with a
    stage that keeps restarting and 90% of its cost budget used, and a failed run."""

    def __init__(self) -> None:
        self.metrics = OperatorMetrics()
        self.port = free_port()
        self.server, self.thread = start_http_server(
            self.port, addr="127.0.0.1", registry=self.metrics.registry
        )
        self._stop = threading.Event()
        self.metrics.observe_run(
            NAMESPACE,
            "broken",
            TrainingRunStatus.model_validate(
                {"stages": [{"name": "pretrain", "phase": "Running"}]}
            ),
            TrainingRunStatus.model_validate(
                {
                    "phase": "Failed",
                    "stages": [{"name": "pretrain", "phase": "Failed", "restarts": 3}],
                }
            ),
            {},
            {},
        )
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        started, old = time.monotonic(), TrainingRunStatus()
        while not self._stop.wait(0.2):
            t = time.monotonic() - started
            status = TrainingRunStatus.model_validate(
                {
                    "phase": "Running",
                    "totals": {
                        "progress": min(0.99, 0.01 * t),
                        "gpuSeconds": 8 * t,
                        "energyJoules": 5600 * t,
                        "costUSD": 0.02 * t,
                        "co2Grams": 0.7 * t,
                    },
                    "stages": [
                        {
                            "name": "pretrain",
                            "phase": "Running",
                            "restarts": int(t / 2),
                            "energySource": "estimate",
                        }
                    ],
                }
            )
            self.metrics.observe_run(
                NAMESPACE, RUN, old, status, {"cost": 0.9}, {"pretrain": "pretrain"}
            )
            self.metrics.reconcile_duration.observe(0.02 + (t % 1) / 10)
            old = status

    def stop(self) -> None:
        self._stop.set()
        self._feeder.join(timeout=5)
        self.server.shutdown()
        self.server.server_close()


class LocalRun:
    """`kubetrain run --local` of a tiny run, long enough to be scraped: a short sft
    stage, then a grpo stage, so that the reinforcement-learning gauges have series too."""

    def __init__(self, folder: Path):
        manifest = tiny_manifest(RUN, steps=(1, 2, 1))
        sft = manifest["spec"]["stages"][1]
        grpo = {
            "name": "grpo",
            "type": "grpo",
            "data": {"evalExamples": 16},
            "hyperparameters": {"maxSteps": 2000, "batchSize": 2, "logEvery": 5, "evalEvery": 20},
            "grpo": {"generations": 2, "maxCompletionTokens": 3},
            "checkpointEvery": 500,
        }
        manifest["spec"]["stages"] = [sft, grpo]
        path = write_manifest(folder, manifest)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            kubetrain_cmd(
                "run",
                str(path),
                "--local",
                "--plain",
                "--metrics-port",
                str(free_port()),
                "--store",
                f"file://{folder / 'store'}",
            ),
            cwd=folder,
            env=cli_env({"PYTHONUNBUFFERED": "1"}),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines[-40:])

    def trainer_endpoint(self) -> str:
        def announced() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"kubetrain run exited early:\n{self.output()}")
            m = re.search(r"trainer: http://(127\.0\.0\.1:\d+)/metrics", "".join(self.lines))
            return m.group(1) if m else None

        return wait_for(
            announced,
            timeout=120,
            what="the local run announcing its trainer metrics endpoint",
            detail=self.output,
        )

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[Prometheus, LocalRun]]:
    operator = OperatorExporter()
    run = LocalRun(tmp_path)
    prom: Prometheus | None = None
    try:
        trainer = run.trainer_endpoint()
        (tmp_path / "prometheus").mkdir()
        prom = Prometheus(
            tmp_path / "prometheus",
            {"kubetrain-operator": [f"127.0.0.1:{operator.port}"], "kubetrain-trainer": [trainer]},
            rule_files=[ALERTS],
        )
        yield prom, run
    finally:
        if prom is not None:
            prom.stop()
        run.stop()
        operator.stop()


def _left_side(expr: str) -> str:
    """What an alert's expression measures: the inside of absent(), or the part before
    its final threshold comparison."""
    m = re.fullmatch(r"absent\((.*)\)", expr.strip())
    if m:
        return m.group(1)
    return re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$", "", expr.strip())


def _firing(prom: Prometheus) -> set[tuple[str, str]]:
    return {
        (a["labels"]["alertname"], a["labels"].get("run", ""))
        for a in prom.api("alerts")["alerts"]
        if a["state"] == "firing"
    }


def test_dashboard_and_alert_queries_return_series_from_a_real_run(
    scraped: tuple[Prometheus, LocalRun],
) -> None:
    prom, run = scraped
    sel = f'{{namespace="{NAMESPACE}", run="{RUN}"}}'

    def enough_samples() -> float | None:
        # Every trainer gauge (eval accuracy only after the first evaluation) and a
        # few scrapes of both targets, so that rate() and deriv() have points.
        checks = [
            f"count_over_time(kubetrain_trainer_step{sel}[1m]) >= 5",
            f"kubetrain_trainer_eval_accuracy{sel}",
            f"count_over_time(kubetrain_operator_run_progress_ratio{sel}[1m]) >= 5",
        ]
        results = [prom.query(q) for q in checks]
        if not all(results):
            return None
        return float(results[0][0]["value"][0])  # the server's evaluation time

    at = wait_for(
        enough_samples,
        timeout=180,
        interval=0.5,
        what="Prometheus scraping the trainer during training and the operator",
        detail=lambda: run.output() + "\n" + prom.log_tail(5),
    )

    empty = []
    for title, expr in dashboard_exprs():
        query = concrete(expr, NAMESPACE, RUN)
        if not prom.query(query, at):
            empty.append(f"{title}: {query}")
    for rule in alert_rules():
        prom.query(rule["expr"], at)  # parses and evaluates
        if not prom.query(_left_side(rule["expr"]), at):
            empty.append(f"{rule['alert']}: {_left_side(rule['expr'])}")
    assert not empty, "queries with no series:\n" + "\n".join(empty)

    # Progress and throughput are plausible numbers, not just present.
    (tps,) = prom.query(
        concrete(next(e for t, e in dashboard_exprs() if t == "Throughput"), NAMESPACE, RUN), at
    )
    assert float(tps["value"][1]) > 0
    (eta,) = prom.query(
        concrete(next(e for t, e in dashboard_exprs() if t == "ETA"), NAMESPACE, RUN), at
    )
    assert 0 < float(eta["value"][1]) < 3600

    # The rules, loaded by this Prometheus, fire for the runs that should alert; the
    # healthy trainer is not stalled.
    expected = {
        ("KubetrainRunFailed", "broken"),
        ("KubetrainBudget80Percent", RUN),
        ("KubetrainTrainerRestartsRising", RUN),
    }
    wait_for(
        lambda: expected <= _firing(prom),
        timeout=60,
        interval=0.5,
        what=f"alerts {sorted(expected)} firing",
        detail=lambda: str(_firing(prom)),
    )
    assert not {a for a, _ in _firing(prom)} & {"KubetrainStageStalled", "KubetrainOperatorDown"}
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), rules

    # The run itself completes: scraping it did not disturb training.
    wait_for(
        lambda: run.proc.poll() is not None,
        timeout=300,
        interval=0.5,
        what="the local run finishing",
        detail=run.output,
    )
    assert run.proc.returncode == 0, run.output()
