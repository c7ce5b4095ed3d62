"""Live progress: ``progress.json`` + ``metrics.jsonl`` in the stage folder, and a
Prometheus endpoint.

``progress.json`` (rank 0, every ``logEvery`` steps and at eval/checkpoint/end) is what
the operator and the local runner read: a :class:`kubetrain.core.records.ProgressRecord`
(its fields say what each number is).

``metrics.jsonl`` is the history of those records, one
:class:`kubetrain.core.records.MetricsLine` per step, rewritten whole each time (objects
cannot be appended to on S3); after a resume the lines past the resumed step are
dropped, so curves never double back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kubetrain.core.layout import StageLayout
from kubetrain.core.records import (
    PHASES,
    MetricsLine,
    ProgressRecord,
    read_metrics,
    write_metrics,
    write_progress,
)
from kubetrain.core.store import ObjectStore

log = logging.getLogger("kubetrain_trainer.telemetry")

# The trainer's store is rooted at its stage folder.
FOLDER = StageLayout()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# grpo stages: the progress record's ``train`` keys (TRL's names) exported as gauges.
GRPO_GAUGES = (
    (
        "reward",
        "kubetrain_trainer_grpo_reward",
        "grpo: mean reward of the last step's completions.",
    ),
    (
        "reward_std",
        "kubetrain_trainer_grpo_reward_std",
        "grpo: standard deviation of the last step's rewards.",
    ),
    (
        "kl",
        "kubetrain_trainer_grpo_kl",
        "grpo: mean per-token KL divergence of the policy from the frozen reference.",
    ),
    (
        "clip_ratio",
        "kubetrain_trainer_grpo_clip_ratio",
        "grpo: share of completion tokens whose probability ratio was clipped, 0..1.",
    ),
    (
        "completion_length",
        "kubetrain_trainer_grpo_completion_tokens",
        "grpo: mean length of the sampled completions, in tokens.",
    ),
)


class TrainerCollector:
    """Exposes the newest progress record as Prometheus metrics (no state of its own,
    so a resumed trainer's counters continue from the accumulated values)."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.record: ProgressRecord | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r = self.record
        if r is None:
            return
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily | None:
            if value is None:
                return None
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, float(value))
            return g

        def counter(
            name: str, doc: str, value: Any, extra: dict[str, str] | None = None
        ) -> CounterMetricFamily:
            extra = extra or {}
            c = CounterMetricFamily(name, doc, labels=names + list(extra))
            c.add_metric(values + list(extra.values()), float(value or 0.0))
            return c

        families = [
            gauge("kubetrain_trainer_step", "Optimizer steps done.", r.step),
            counter("kubetrain_trainer_tokens", "Tokens trained on.", r.tokens),
            gauge("kubetrain_trainer_loss", "Training loss of the last step.", r.loss),
            gauge(
                "kubetrain_trainer_tokens_per_second", "Training throughput.", r.tokens_per_second
            ),
            gauge("kubetrain_trainer_mfu_ratio", "Model FLOPs utilisation, 0..1.", r.mfu),
            counter(
                "kubetrain_trainer_energy_joules",
                "Energy of the stage's devices.",
                r.energy_joules,
                {"source": r.energy_source or "estimate"},
            ),
            gauge(
                "kubetrain_trainer_power_watts", "Mean power over the last interval.", r.power_watts
            ),
            gauge(
                "kubetrain_trainer_eval_accuracy",
                "Held-out exact-match accuracy, 0..1.",
                r.eval.get("accuracy"),
            ),
            *(gauge(name, doc, r.train.get(key)) for key, name, doc in GRPO_GAUGES),
        ]
        yield from (f for f in families if f is not None)


class Telemetry:
    """Writes progress records (rank 0 only: ``enabled``) and serves metrics."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        base: ProgressRecord,
        enabled: bool,
        metrics_port: int = 0,
        serve_metrics: bool = False,
    ):
        self.store = store
        self.base = base  # run, namespace, stage, totalSteps, attempt, startedAt, ...
        self.enabled = enabled
        self.history: list[MetricsLine] = []
        self.last: ProgressRecord | None = None
        self.collector = TrainerCollector(
            {"run": base.run or "", "namespace": base.namespace or "", "stage": base.stage or ""}
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.port: int | None = None
        if serve_metrics and metrics_port:
            server, _ = start_http_server(metrics_port, registry=self.registry)
            self.port = server.server_port

    def restore_history(self, step: int) -> None:
        """Load metrics.jsonl, keeping only the lines up to the resumed ``step``."""
        self.history = [m for m in read_metrics(self.store, FOLDER.metrics) if m.step <= step]

    def write(self, **fields: Any) -> ProgressRecord:
        """Publish one record (``fields`` by their ProgressRecord names over ``base``):
        progress.json, metrics.jsonl, the Prometheus snapshot."""
        if fields.get("phase") not in PHASES:
            raise ValueError(f"phase {fields.get('phase')!r} (accepted: {', '.join(PHASES)})")
        return self._publish(self.base.updated(**fields, updated_at=utc_now()))

    def warn(self, message: str) -> None:
        """Carry ``message`` in every record from now on (``warnings``)."""
        self.base = self.base.updated(warnings=[*(self.base.warnings or []), message])

    def fail(self, reason: str) -> ProgressRecord:
        """Publish the last record (or the base) again, as failed for ``reason``."""
        record = self.last or self.base
        return self._publish(record.updated(phase="failed", message=reason, updated_at=utc_now()))

    def _publish(self, record: ProgressRecord) -> ProgressRecord:
        self.last = record
        self.collector.record = record
        if not self.enabled:
            return record
        line = MetricsLine.of(record)
        if self.history and self.history[-1].step == record.step:
            self.history[-1] = line  # eval/checkpoint at a logged step: one point per step
        else:
            self.history.append(line)
        started = time.monotonic()
        write_metrics(self.store, FOLDER.metrics, self.history)
        write_progress(self.store, FOLDER.progress, record)
        elapsed = time.monotonic() - started
        if elapsed > 5:
            log.warning("writing progress took %.1fs; raise logEvery", elapsed)
        return record
