"""Live progress: ``progress.json`` + ``metrics.jsonl`` in the stage folder, and a
Prometheus endpoint.

``progress.json`` (rank 0, every ``logEvery`` steps and at eval/checkpoint/end) is what
the operator and the local runner read; its keys are camelCase like the API:
step, totalSteps, tokens, tokensPerSecond, loss, eval{accuracy, loss,
preferenceAccuracy, examples, ...}, energyJoules, energySource, powerWatts, mfu,
checkpoint (URI of the newest complete checkpoint), phase
(running|completed|interrupted|failed), startedAt, updatedAt (ISO-8601 UTC),
wallSeconds, attempt, plus run/namespace/stage/stageType and, for DPO, the training
batch's rewards/* diagnostics under ``train``.

``metrics.jsonl`` is the history of those records, one JSON object per line,
rewritten whole each time (objects cannot be appended to on S3); after a resume the
records past the resumed step are dropped, so curves never double back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kubetrain.core import contract
from kubetrain.core.store import ObjectStore

log = logging.getLogger("kubetrain_trainer.telemetry")

METRICS = "metrics.jsonl"
PHASES = ("running", "completed", "interrupted", "failed")


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TrainerCollector:
    """Exposes the newest progress record as Prometheus metrics (no state of its own,
    so a resumed trainer's counters continue from the accumulated values)."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.record: dict[str, Any] = {}

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r = self.record
        if not r:
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
            gauge("kubetrain_trainer_step", "Optimizer steps done.", r.get("step")),
            counter("kubetrain_trainer_tokens", "Tokens trained on.", r.get("tokens")),
            gauge("kubetrain_trainer_loss", "Training loss of the last step.", r.get("loss")),
            gauge(
                "kubetrain_trainer_tokens_per_second",
                "Training throughput.",
                r.get("tokensPerSecond"),
            ),
            gauge("kubetrain_trainer_mfu_ratio", "Model FLOPs utilisation, 0..1.", r.get("mfu")),
            counter(
                "kubetrain_trainer_energy_joules",
                "Energy of the stage's devices.",
                r.get("energyJoules"),
                {"source": str(r.get("energySource", "estimate"))},
            ),
            gauge(
                "kubetrain_trainer_power_watts",
                "Mean power over the last interval.",
                r.get("powerWatts"),
            ),
            gauge(
                "kubetrain_trainer_eval_accuracy",
                "Held-out exact-match accuracy, 0..1.",
                (r.get("eval") or {}).get("accuracy"),
            ),
        ]
        yield from (f for f in families if f is not None)


class Telemetry:
    """Writes progress records (rank 0 only: ``enabled``) and serves metrics."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        base: dict[str, Any],
        enabled: bool,
        metrics_port: int = 0,
        serve_metrics: bool = False,
    ):
        self.store = store
        self.base = base  # run, namespace, stage, totalSteps, attempt, startedAt, ...
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.collector = TrainerCollector(
            {
                "run": str(base.get("run", "")),
                "namespace": str(base.get("namespace", "")),
                "stage": str(base.get("stage", "")),
            }
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)  # type: ignore[arg-type]
        self.port: int | None = None
        if serve_metrics and metrics_port:
            server, _ = start_http_server(metrics_port, registry=self.registry)
            self.port = server.server_port

    def previous(self) -> dict[str, Any] | None:
        """The progress record a previous attempt left, if any."""
        prev = self.store.get_json(contract.PROGRESS)
        return prev if isinstance(prev, dict) else None

    def restore_history(self, step: int) -> None:
        """Load metrics.jsonl, keeping only records up to the resumed ``step``."""
        text = self.store.get_text(METRICS) or ""
        self.history = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                self.history.append(rec)

    def write(self, **fields: Any) -> dict[str, Any]:
        """Publish one record: progress.json, metrics.jsonl, the Prometheus snapshot."""
        if fields.get("phase") not in PHASES:
            raise ValueError(f"phase {fields.get('phase')!r} (accepted: {PHASES})")
        record = {**self.base, **fields, "updatedAt": utc_now()}
        self.last = record
        self.collector.record = record
        if not self.enabled:
            return record
        if self.history and self.history[-1].get("step") == record["step"]:
            self.history[-1] = record  # eval/checkpoint at a logged step: one point per step
        else:
            self.history.append(record)
        started = time.monotonic()
        self.store.put_bytes(
            METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history).encode()
        )
        self.store.put_json(contract.PROGRESS, record)
        elapsed = time.monotonic() - started
        if elapsed > 5:
            log.warning("writing progress took %.1fs; raise logEvery", elapsed)
        return record
