"""The local run's Prometheus endpoint: the runner's view of each stage at scrape time
(the trainer's own progress records), labelled by run and stage."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubetrain.core.errors import UserError
from kubetrain.local.display import StageLine


@dataclass
class _Observed:
    line: StageLine
    total_steps: int


class RunCollector:
    """Prometheus collector mirroring the runner's view of each stage at scrape time
    (the trainer's own records), labelled by run and stage."""

    def __init__(self, run: str, namespace: str):
        self.run = run
        self.namespace = namespace
        self.stages: dict[str, _Observed] = {}
        self.lock = threading.Lock()

    def observe(self, line: StageLine, total_steps: int) -> None:
        with self.lock:
            self.stages[line.name] = _Observed(line, total_steps)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["run", "namespace", "stage"]
        g = {
            name: GaugeMetricFamily(f"kubetrain_local_stage_{name}", doc, labels=labels)
            for name, doc in [
                ("step", "Last optimizer step reported by the trainer."),
                ("total_steps", "Steps the stage will take."),
                ("progress_ratio", "step / total steps, 0..1."),
                ("loss", "Last training loss."),
                ("eval_accuracy_ratio", "Last evaluation accuracy, 0..1."),
                ("tokens_per_second", "Recent training throughput."),
            ]
        }
        c = {
            name: CounterMetricFamily(
                f"kubetrain_local_stage_{name}", doc, labels=[*labels, *extra]
            )
            for name, doc, extra in [
                ("tokens", "Tokens trained on.", []),
                ("energy_joules", "Energy used (IT load).", ["source"]),
                ("cost_usd", "Cost so far (GPU time and energy at the manifest's prices).", []),
                ("co2_grams", "Grams CO2 so far.", []),
            ]
        }
        with self.lock:
            observed = list(self.stages.values())
        for obs in observed:
            line, key = obs.line, [self.run, self.namespace, obs.line.name]
            g["step"].add_metric(key, line.step)
            g["total_steps"].add_metric(key, obs.total_steps)
            g["progress_ratio"].add_metric(key, min(1.0, line.step / max(obs.total_steps, 1)))
            for name, value in [
                ("loss", line.loss),
                ("eval_accuracy_ratio", line.accuracy),
                ("tokens_per_second", line.tokens_per_second),
            ]:
                if value is not None:
                    g[name].add_metric(key, value)
            c["tokens"].add_metric(key, line.tokens)
            c["energy_joules"].add_metric(
                [*key, line.energy_source or "estimate"], line.energy_joules
            )
            c["cost_usd"].add_metric(key, line.cost_usd)
            c["co2_grams"].add_metric(key, line.co2_grams)
        yield from g.values()
        yield from c.values()


def serve_metrics(collector: RunCollector, port: int) -> Callable[[], None]:
    """Serve ``collector`` on 127.0.0.1:``port``; returns the function that stops it."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError:
        raise UserError(
            f"port {port} is already in use (another `kubetrain run`?): pass "
            "--metrics-port with a free port, or --metrics-port 0 for no "
            "metrics endpoint"
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
