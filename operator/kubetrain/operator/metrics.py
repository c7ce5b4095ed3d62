"""The operator's Prometheus metrics, on their own registry (served on --metrics-port).

Per-run values (phases, progress, GPU-seconds, energy, cost, CO2, budget use, restarts,
stalled stages) are not counted by the operator: they are read from each run's status
after a reconcile and exported by a custom collector. That keeps them exact across
operator restarts (the status is the source of truth), lets the accumulating ones be
real counters with the ``_total`` suffix although their value is *set*, and removing a
run's snapshot removes all its series at once. Phases are Kubernetes-style state sets
(like kube-state-metrics' ``kube_pod_status_phase``): one series per possible phase, 1
for the current one and 0 for the others, so ``{phase="Failed"} == 1`` holds exactly
while the status says so, also after an operator restart. Event-like metrics
(transitions, durations, errors, reconcile latency) are ordinary prometheus_client
counters and histograms. The operator's own health (requests to the API and the stores,
its work queue, whether it leads) is exported too.

Labels are bounded: namespace, run, stage, phase, stage type, energy source, budget
kind, API verb and resource. Nothing from a spec's free-form fields or a Secret is ever
used as a label.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetrain.core.api import RunPhase, StagePhase, TrainingRunStatus
from kubetrain.core.conditions import ConditionType
from kubetrain.operator.progress import parse_time

PREFIX = "kubetrain_operator"


@dataclass(frozen=True)
class RunSnapshot:
    """The numbers of one run, as its status has them."""

    phase: str
    progress: float
    gpu_seconds: float
    energy_joules: float
    energy_source: str
    cost_usd: float
    co2_grams: float
    restarts: dict[str, int] = field(default_factory=dict)  # stage -> restarts
    preemptions: dict[str, int] = field(default_factory=dict)  # stage -> preemptions
    budget_used: dict[str, float] = field(default_factory=dict)  # kind -> used / limit
    stage_phases: dict[str, str] = field(default_factory=dict)  # stage -> phase
    stalled_stage: str | None = None  # the stage the condition Stalled is about


def snapshot(status: TrainingRunStatus, budget_used: dict[str, float]) -> RunSnapshot:
    """A RunSnapshot of a run's status."""
    totals = status.totals
    sources = {s.energy_source for s in status.stages if s.energy_source}
    # One source label per run: a run mixing measured and estimated stages is reported
    # as "estimate" (the weakest source), so that the label set stays bounded.
    source = sources.pop() if len(sources) == 1 else ("estimate" if sources else "none")
    return RunSnapshot(
        phase=status.phase.value,
        progress=totals.progress,
        gpu_seconds=totals.gpu_seconds,
        energy_joules=totals.energy_joules,
        energy_source=source,
        cost_usd=totals.cost_usd,
        co2_grams=totals.co2_grams,
        restarts={s.name: s.restarts for s in status.stages},
        preemptions={s.name: s.preemptions for s in status.stages},
        budget_used=dict(budget_used),
        stage_phases={s.name: s.phase.value for s in status.stages},
        stalled_stage=stalled_stage(status),
    )


def stalled_stage(status: TrainingRunStatus) -> str | None:
    """The stage the operator considers stalled: the run's current stage while its
    condition Stalled is True (kubetrain.operator.plan sets it on the running stage whose
    progress record has not changed for stallTimeoutSeconds, and clears it once the
    trainer reports progress or the stage stops running)."""
    for cond in status.conditions:
        if cond.type == ConditionType.STALLED and cond.status == "True":
            return status.current_stage or None
    return None


class _RunCollector(Collector):
    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        runs = self.metrics.snapshots()
        by_phase = GaugeMetricFamily(f"{PREFIX}_runs", "TrainingRuns by phase.", labels=["phase"])
        for phase in RunPhase:
            by_phase.add_metric(
                [phase.value], sum(1 for s in runs.values() if s.phase == phase.value)
            )
        yield by_phase
        nr = ["namespace", "run"]
        run_phase = GaugeMetricFamily(
            f"{PREFIX}_run_phase",
            "The run's phase as a state set: 1 for status.phase, 0 for the other phases.",
            labels=[*nr, "phase"],
        )
        stage_phase = GaugeMetricFamily(
            f"{PREFIX}_stage_phase",
            "Each stage's phase as a state set: 1 for its status phase, 0 for the others.",
            labels=[*nr, "stage", "phase"],
        )
        stalled = GaugeMetricFamily(
            f"{PREFIX}_stage_stalled",
            "1 while the stage has made no progress for stallTimeoutSeconds (condition "
            "Stalled), else 0.",
            labels=[*nr, "stage"],
        )
        progress = GaugeMetricFamily(
            f"{PREFIX}_run_progress_ratio",
            "Curriculum progress 0..1, weighted by steps.",
            labels=nr,
        )
        gpu = CounterMetricFamily(
            f"{PREFIX}_gpu_seconds", "GPU-seconds allocated to the run.", labels=nr
        )
        energy = CounterMetricFamily(
            f"{PREFIX}_energy_joules",
            "IT energy of the run, by how it was obtained.",
            labels=[*nr, "source"],
        )
        cost = CounterMetricFamily(f"{PREFIX}_cost_usd", "Cost of the run so far.", labels=nr)
        co2 = CounterMetricFamily(
            f"{PREFIX}_co2_grams", "CO2 of the run so far (× PUE).", labels=nr
        )
        budget = GaugeMetricFamily(
            f"{PREFIX}_budget_used_ratio",
            "Share of each budget limit used (1: reached).",
            labels=[*nr, "kind"],
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_stage_restarts",
            "Failed attempts retried, per stage (counted against maxRestarts).",
            labels=[*nr, "stage"],
        )
        preemptions = CounterMetricFamily(
            f"{PREFIX}_stage_preemptions",
            "Attempts ended by a disruption (drain, eviction, preemption), per stage.",
            labels=[*nr, "stage"],
        )
        for (ns, run), s in sorted(runs.items()):
            for run_state in RunPhase:
                run_phase.add_metric([ns, run, run_state.value], float(s.phase == run_state.value))
            for stage, current in s.stage_phases.items():
                for stage_state in StagePhase:
                    stage_phase.add_metric(
                        [ns, run, stage, stage_state.value], float(current == stage_state.value)
                    )
                stalled.add_metric([ns, run, stage], float(stage == s.stalled_stage))
            progress.add_metric([ns, run], s.progress)
            gpu.add_metric([ns, run], s.gpu_seconds)
            energy.add_metric([ns, run, s.energy_source], s.energy_joules)
            cost.add_metric([ns, run], s.cost_usd)
            co2.add_metric([ns, run], s.co2_grams)
            for kind, ratio in sorted(s.budget_used.items()):
                budget.add_metric([ns, run, kind], ratio)
            for stage, n in sorted(s.restarts.items()):
                restarts.add_metric([ns, run, stage], n)
            for stage, n in sorted(s.preemptions.items()):
                preemptions.add_metric([ns, run, stage], n)
        yield from (
            run_phase,
            stage_phase,
            stalled,
            progress,
            gpu,
            energy,
            cost,
            co2,
            budget,
            restarts,
            preemptions,
        )


class OperatorMetrics:
    """All operator metrics on one registry; thread-safe (handlers run in threads)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], RunSnapshot] = {}
        self._transition_labels: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.transitions = Counter(
            f"{PREFIX}_stage_transitions",
            "Stage phase changes observed by this process.",
            ["namespace", "run", "stage", "phase"],
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Wall time of succeeded stages, by type.",
            ["stage_type"],
            registry=self.registry,
            buckets=(
                60,
                300,
                900,
                1800,
                3600,
                3 * 3600,
                6 * 3600,
                12 * 3600,
                24 * 3600,
                3 * 86400,
                7 * 86400,
                float("inf"),
            ),
        )
        self.reconcile_errors = Counter(
            f"{PREFIX}_reconcile_errors", "Reconciles that raised.", registry=self.registry
        )
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Time to reconcile one run.",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf")),
        )
        # How the operator itself is doing: its load on the API server and the stores,
        # its work queue, its role among the replicas.
        self.api_requests = Counter(
            f"{PREFIX}_api_requests",
            "Requests sent to the Kubernetes API, by verb and resource (watches count "
            "once per watch request).",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.store_requests = Counter(
            f"{PREFIX}_store_requests",
            "Requests sent to object stores for progress records and FINAL pointers.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Runs waiting for a worker (not counting those scheduled for later).",
            registry=self.registry,
        )
        self.workers_busy = Gauge(
            f"{PREFIX}_workers_busy", "Workers reconciling a run now.", registry=self.registry
        )
        self.leader = Gauge(
            f"{PREFIX}_leader",
            "1 while this replica holds the leader Lease and reconciles, else 0.",
            registry=self.registry,
        )
        self.registry.register(_RunCollector(self))

    def count_request(self, verb: str, resource: str) -> None:
        """One request to the Kubernetes API (``KubeApi``'s ``on_request``)."""
        self.api_requests.labels(verb, resource).inc()

    def snapshots(self) -> dict[tuple[str, str], RunSnapshot]:
        with self._lock:
            return dict(self._runs)

    def observe_run(
        self,
        namespace: str,
        run: str,
        before: TrainingRunStatus,
        after: TrainingRunStatus,
        budget_used: dict[str, float],
        stage_types: dict[str, str],
    ) -> None:
        """Record a reconcile's outcome (the run's status ``before`` and ``after`` it,
        the budget's used / limit by kind, each stage's type): the run's numbers and its
        stage transitions."""
        old_phases = {s.name: s.phase for s in before.stages}
        with self._lock:
            self._runs[(namespace, run)] = snapshot(after, budget_used)
            for st in after.stages:
                if old_phases.get(st.name, StagePhase.Pending) == st.phase:
                    continue
                self.transitions.labels(namespace, run, st.name, st.phase.value).inc()
                self._transition_labels.setdefault((namespace, run), set()).add(
                    (st.name, st.phase.value)
                )
                if st.phase == StagePhase.Succeeded and st.name in stage_types:
                    duration = _seconds_between(st.start_time, st.completion_time)
                    if duration is not None:
                        self.stage_duration.labels(stage_types[st.name]).observe(duration)

    def forget_run(self, namespace: str, run: str) -> None:
        """Remove every series of a deleted run."""
        with self._lock:
            self._runs.pop((namespace, run), None)
            for stage, phase in self._transition_labels.pop((namespace, run), set()):
                self.transitions.remove(namespace, run, stage, phase)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on ``port`` in a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    a, b = parse_time(start), parse_time(end)
    if a is None or b is None:
        return None
    return max(0.0, (b - a).total_seconds())
