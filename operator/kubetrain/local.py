"""`kubetrain run FILE --local`: the manifest's stages, in order, as processes here.

The local runner plays the operator's part on one machine: each stage gets exactly the
environment a pod would get (:func:`kubetrain.contract.stage_environment`), with the
values a cluster would fill in resolved locally (node rank 0, master 127.0.0.1,
Secret references read from this shell's ``AWS_*`` variables). Progress, resumption
and the summary all come from what the trainer writes to the store, as on a cluster:
a stage with a FINAL pointer is complete and skipped, a restarted stage resumes from
LATEST, and the numbers shown are the stored progress records.

Choices, and why:
- Storage defaults to ``file://<cwd>/.kubetrain/store`` even when the manifest names
  S3: the same manifest must run on a fresh laptop without S3 credentials, and a local
  run quietly writing to a team bucket would surprise. ``--store s3://...`` opts in.
- A stage with several nodes runs here as ONE node with nodes × processesPerNode
  processes: the world size, and so the global batch, the data sharding and the
  tokens per step, stay what the manifest says, which is what makes a local run a
  faithful rehearsal of the cluster run (slower, but the same training).
- The trainer runs in its own session so that Ctrl-C reaches it once, through this
  runner (which forwards it), not twice through the terminal's process group.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kubetrain import accounting, contract
from kubetrain.api import Stage, TrainingRun, TrainingRunSpec
from kubetrain.cli import UserError, load_manifest
from kubetrain.display import Display, StageLine, make_display, stage_line
from kubetrain.store import ObjectStore, StoreError, open_store

STATE_DIR = ".kubetrain"
TRAINER_MODULE = "kubetrain_trainer"
POLL_SECONDS = 0.5
# How long a trainer may take to write its checkpoint after SIGINT before it is killed.
STOP_GRACE_SECONDS = 120.0
# How the trainer starts its one-line failure reason (kubetrain_trainer.train.main).
TRAINER_ERROR_PREFIX = "kubetrain-trainer: error: "
INSTALL_TRAINER = "pip install 'kubetrain[trainer]'"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def default_store_uri(cwd: Path | None = None) -> str:
    """``file://<cwd>/.kubetrain/store``: where local checkpoints go by default."""
    return ((cwd or Path.cwd()) / STATE_DIR / "store").resolve().as_uri()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def local_processes(stage: Stage) -> int:
    """Processes for a stage on one machine: nodes × processes per node (see module doc)."""
    return stage.resources.nodes * stage.resources.processes


def trainer_command(stage: Stage, master_port: int, python: str = sys.executable) -> list[str]:
    """``python -m kubetrain_trainer``, or torchrun (as a module of the same Python, so
    it finds the same packages) when the stage asks for several processes."""
    procs = local_processes(stage)
    if procs == 1:
        return [python, "-m", TRAINER_MODULE]
    return [python, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
            "--master-port", str(master_port), "-m", TRAINER_MODULE]


def local_environment(run: TrainingRun, index: int, *, store_root: str, metrics_port: int,
                      master_port: int, base: Mapping[str, str]) -> dict[str, str]:
    """The trainer's environment: ``base`` (this shell) plus the stage contract with the
    values a cluster would supply resolved for this machine."""
    spec = run.spec
    stage = spec.stages[index]
    acc = accounting.accelerator(stage.resources.gpu_type, stage.resources.gpus_per_node)
    env = dict(base)
    for var in contract.stage_environment(
            spec, index, run=run.metadata.name, namespace=run.metadata.namespace,
            store_root=store_root, master_addr="127.0.0.1", node_rank="0",
            power_watts=acc.watts * max(stage.resources.gpus_per_node, 1),
            metrics_port=metrics_port):
        if var.secret is not None:
            # A Secret on a cluster; here, the user's own credentials if they have any.
            if var.name in base:
                env[var.name] = base[var.name]
        elif var.value is not None:
            env[var.name] = var.value
    env[contract.PET_NNODES] = "1"
    env[contract.PET_NPROC_PER_NODE] = str(local_processes(stage))
    env[contract.PET_MASTER_PORT] = str(master_port)
    # Lines reach the log in the order they were written, so the last stderr line
    # really is the trainer's last word.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def failure_reason(stderr_lines: list[str]) -> str:
    """The line that says why a trainer failed: its last meaningful stderr line, with
    the two failures a newcomer meets (no torch, no trainer) turned into what to do."""
    text = "\n".join(stderr_lines)
    if "No module named 'torch'" in text or "No module named torch" in text:
        return f"PyTorch is not installed for {sys.executable}: {INSTALL_TRAINER}"
    if f"No module named {TRAINER_MODULE}" in text or \
            f"No module named '{TRAINER_MODULE}'" in text:
        return f"the trainer package is not installed: {INSTALL_TRAINER}"
    for line in reversed(stderr_lines):
        line = line.strip()
        # torchrun closes its error report with rulers and blank lines.
        if line and set(line) - set("=-*"):
            return line.removeprefix(TRAINER_ERROR_PREFIX)
    return "the trainer exited without a message"


def record_cost(spec: TrainingRunSpec, stage: Stage,
                record: Mapping[str, Any] | None) -> tuple[float, float]:
    """USD and grams CO2 of a progress record at the manifest's prices: GPU time is
    the stage's GPUs × the trainer's wall seconds (0 on CPU), energy its joules."""
    if not record:
        return 0.0, 0.0
    res = stage.resources
    acc = accounting.accelerator(res.gpu_type, res.gpus_per_node)
    return accounting.accrue(
        res.gpus_per_node * res.nodes * float(record.get("wallSeconds") or 0.0),
        float(record.get("energyJoules") or 0.0), spec.pricing,
        accounting.gpu_hour_price(spec.pricing, acc))


# --------------------------------------------------------------------------- metrics


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
        g = {name: GaugeMetricFamily(f"kubetrain_local_stage_{name}", doc, labels=labels)
             for name, doc in [
                 ("step", "Last optimizer step reported by the trainer."),
                 ("total_steps", "Steps the stage will take."),
                 ("progress_ratio", "step / total steps, 0..1."),
                 ("loss", "Last training loss."),
                 ("eval_accuracy_ratio", "Last evaluation accuracy, 0..1."),
                 ("tokens_per_second", "Recent training throughput."),
             ]}
        c = {name: CounterMetricFamily(f"kubetrain_local_stage_{name}", doc,
                                       labels=[*labels, *extra])
             for name, doc, extra in [
                 ("tokens", "Tokens trained on.", []),
                 ("energy_joules", "Energy used (IT load).", ["source"]),
                 ("cost_usd", "Cost so far (GPU time and energy at the manifest's prices).", []),
                 ("co2_grams", "Grams CO2 so far.", []),
             ]}
        with self.lock:
            observed = list(self.stages.values())
        for obs in observed:
            line, key = obs.line, [self.run, self.namespace, obs.line.name]
            g["step"].add_metric(key, line.step)
            g["total_steps"].add_metric(key, obs.total_steps)
            g["progress_ratio"].add_metric(key, min(1.0, line.step / max(obs.total_steps, 1)))
            for name, value in [("loss", line.loss), ("eval_accuracy_ratio", line.accuracy),
                                ("tokens_per_second", line.tokens_per_second)]:
                if value is not None:
                    g[name].add_metric(key, value)
            c["tokens"].add_metric(key, line.tokens)
            c["energy_joules"].add_metric([*key, line.energy_source or "estimate"],
                                          line.energy_joules)
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
        raise UserError(f"port {port} is already in use (another `kubetrain run`?): pass "
                        "--metrics-port with a free port, or --metrics-port 0 for no "
                        "metrics endpoint") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


# --------------------------------------------------------------------------- runner


@dataclass
class StageOutcome:
    name: str
    result: str  # completed | skipped | interrupted | failed
    reason: str = ""
    record: dict[str, Any] | None = None


@dataclass
class LocalRunner:
    """Runs one TrainingRun's stages in order; see the module docstring."""

    run: TrainingRun
    store_root: str
    display: Display
    metrics_port: int = 0
    trainer_metrics_port: int = 0
    log_dir: Path = field(default_factory=lambda: Path(STATE_DIR) / "logs")
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        self.store = open_store(self.store_root, endpoint=self._s3_endpoint(),
                                region=self._s3_region())
        self.collector = RunCollector(self.run.metadata.name, self.run.metadata.namespace)
        self._signal: int | None = None
        self._child: subprocess.Popen[bytes] | None = None

    # -- where things are

    def _s3_endpoint(self) -> str | None:
        s3 = self.run.spec.storage.s3
        return s3.endpoint if s3 and s3.endpoint else None

    def _s3_region(self) -> str | None:
        s3 = self.run.spec.storage.s3
        return s3.region if s3 else None

    def key(self, stage: Stage, name: str) -> str:
        """A key in the stage's folder, relative to the store root (the root store keeps
        the S3 endpoint and region; ``ObjectStore.child`` would not)."""
        return f"{self.run.metadata.namespace}/{self.run.metadata.name}/{stage.name}/{name}"

    def line(self, stage: Stage, record: Mapping[str, Any] | None, *, phase: str | None = None,
             eta_seconds: float | None = None) -> StageLine:
        """The display's view of a record, with cost and CO2 at the manifest's prices."""
        cost, co2 = record_cost(self.run.spec, stage, record)
        return stage_line(stage.name, record, phase=phase, cost_usd=cost, co2_grams=co2,
                          eta_seconds=eta_seconds)

    def progress_record(self, stage: Stage) -> dict[str, Any] | None:
        record = self.store.get_json(self.key(stage, contract.PROGRESS))
        return record if isinstance(record, dict) else None

    def is_final(self, stage: Stage) -> bool:
        return self.store.exists(self.key(stage, contract.FINAL))

    # -- signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        child = self._child
        if self._signal is None:
            self._signal = signum
            if child is not None and child.poll() is None:
                self.display.message(
                    "stopping: the trainer is writing a checkpoint (Ctrl-C again to stop "
                    "at once, losing the steps since the last checkpoint)")
                # Only the trainer (torchrun forwards to its workers): one signal each.
                child.send_signal(signum)
        elif child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)

    # -- one stage

    def run_stage(self, index: int) -> StageOutcome:
        stage = self.run.spec.stages[index]
        total = accounting.total_steps(stage, self.run.spec.model)
        if self.is_final(stage):
            record = self.progress_record(stage)
            self.display.stage_ended(self.line(stage, record, phase="completed"),
                                     note="already complete")
            return StageOutcome(stage.name, "skipped", record=record)

        previous = self.progress_record(stage)
        self.display.stage_started(self.line(stage, previous)
                                   if previous else StageLine(stage.name, "running", 0, total))
        master_port = free_port()
        env = local_environment(self.run, index, store_root=self.store_root,
                                metrics_port=self.trainer_metrics_port,
                                master_port=master_port, base=self.environ)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage.name}.log"
        stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage.name}\n".encode())
            log.flush()
            child = subprocess.Popen(trainer_command(stage, master_port), env=env,
                                     stdout=log, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            self._child = child
            assert child.stderr is not None
            reader = threading.Thread(target=_copy_stderr, daemon=True,
                                      args=(child.stderr, log, stderr_tail))
            reader.start()
            try:
                record = self._follow(stage, child, previous, total)
            finally:
                # Whatever stopped us (a broken pipe, a bug), never leave a trainer
                # running unattended: ask it to checkpoint and stop, as Ctrl-C would.
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                    _wait_or_kill(child, STOP_GRACE_SECONDS)
                reader.join(timeout=10)
                self._child = None

        record = self.progress_record(stage) or record
        if self.is_final(stage):
            self.display.stage_ended(self.line(stage, record, phase="completed"), "completed")
            return StageOutcome(stage.name, "completed", record=record)
        if self._signal is not None:
            self.display.stage_ended(self.line(stage, record, phase="interrupted"),
                                     "interrupted")
            return StageOutcome(stage.name, "interrupted", record=record)
        if child.returncode != 0:
            reason = failure_reason(list(stderr_tail))
        else:
            phase = (record or {}).get("phase", "unknown")
            reason = f"the trainer exited without completing the stage (phase {phase})"
        self.display.stage_ended(self.line(stage, record, phase="failed"), "failed")
        return StageOutcome(stage.name, "failed", reason=f"{reason} (log: {log_path})",
                            record=record)

    def _follow(self, stage: Stage, child: subprocess.Popen[bytes],
                previous: dict[str, Any] | None, total: int) -> dict[str, Any] | None:
        """Poll the stage's progress record until the trainer exits; feed the display and
        the metrics. ETA comes from the step rate seen in this attempt."""
        # Compare whole records: updatedAt has one-second resolution, steps are faster.
        stale = previous
        record = previous
        first: tuple[float, int] | None = None
        stopping_since: float | None = None
        while child.poll() is None:
            time.sleep(POLL_SECONDS)
            if self._signal is not None:
                stopping_since = stopping_since or time.monotonic()
                if time.monotonic() - stopping_since > STOP_GRACE_SECONDS:
                    self.display.message(f"the trainer did not stop within "
                                         f"{STOP_GRACE_SECONDS:.0f}s; killing it")
                    _wait_or_kill(child, 0)
            try:
                fresh = self.progress_record(stage)
            except StoreError:
                continue  # a transient read error; the trainer is still the judge
            if not fresh or fresh == stale:
                continue
            record = stale = fresh
            step = int(fresh.get("step") or 0)
            now = time.monotonic()
            eta = None
            if first is None:
                first = (now, step)
            elif step > first[1]:
                rate = (step - first[1]) / (now - first[0])
                eta = (int(fresh.get("totalSteps") or total) - step) / rate
            line = self.line(stage, fresh, phase="running", eta_seconds=eta)
            self.display.update(line)
            self.collector.observe(line, int(fresh.get("totalSteps") or total))
        return record

    # -- the curriculum

    def execute(self) -> list[StageOutcome]:
        """Run (or skip) every stage in order; stop at the first that does not complete."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        outcomes: list[StageOutcome] = []
        try:
            for index, stage in enumerate(self.run.spec.stages):
                if self._signal is not None:
                    outcomes.append(StageOutcome(stage.name, "interrupted",
                                                 record=self.progress_record(stage)))
                    break
                outcome = self.run_stage(index)
                outcomes.append(outcome)
                if outcome.record:
                    total = accounting.total_steps(stage, self.run.spec.model)
                    self.collector.observe(self.line(stage, outcome.record),
                                           int(outcome.record.get("totalSteps") or total))
                if outcome.result in ("interrupted", "failed"):
                    break
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return outcomes

    def summary_lines(self) -> list[StageLine]:
        """Every stage's numbers, read back from the stored progress records."""
        return [self.line(stage, self.progress_record(stage))
                for stage in self.run.spec.stages]


def _wait_or_kill(child: subprocess.Popen[bytes], grace: float) -> None:
    """Wait up to ``grace`` seconds for the trainer, then kill its whole session
    (torchrun's workers included)."""
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _copy_stderr(stream: Any, log: Any, tail: collections.deque[str]) -> None:
    """Copy the trainer's stderr to its log and keep the last lines for the failure line."""
    for raw in iter(stream.readline, b""):
        log.write(raw)
        log.flush()
        tail.append(raw.decode(errors="replace").rstrip("\n"))
    stream.close()


# --------------------------------------------------------------------------- CLI


def check_trainer_installed() -> None:
    """Fail in one line, before anything starts, when this Python cannot train."""
    if importlib.util.find_spec("torch") is None:
        raise UserError(f"PyTorch is not installed for {sys.executable}, and local runs "
                        f"train with it: {INSTALL_TRAINER}")
    if importlib.util.find_spec(TRAINER_MODULE) is None:
        raise UserError(f"the trainer package is not installed: {INSTALL_TRAINER}")


def resolve_store_root(given: str | None) -> str:
    """The store a local run writes to: ``--store``, else ``.kubetrain/store`` here."""
    if not given:
        return default_store_uri()
    if given.startswith("s3://"):
        return given.rstrip("/")
    if given.startswith("file://"):
        return Path(given.removeprefix("file://")).resolve().as_uri()
    if "://" in given:
        raise UserError(f"--store {given!r}: unsupported scheme (accepted: s3://BUCKET/PREFIX "
                        "or file://PATH or a folder)")
    return Path(given).resolve().as_uri()


def check_store(store: ObjectStore, uri: str) -> None:
    """Touch the store once up front so an unreachable S3 is one line, not a traceback."""
    try:
        store.exists(contract.PROGRESS)
    except StoreError as exc:
        raise UserError(f"store {uri}: {exc}") from None
    except Exception as exc:
        # botocore's credential and connection errors are not StoreErrors.
        name = type(exc).__name__
        if name == "NoCredentialsError":
            raise UserError(f"store {uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (and KUBETRAIN_S3_ENDPOINT for a "
                            "non-AWS store), or drop --store to use a local folder") from None
        raise UserError(f"store {uri}: {name}: {exc}") from None


def cli_run(args: argparse.Namespace) -> int:
    """``kubetrain run FILE --local``; returns the exit code."""
    run = load_manifest(args.file)
    check_trainer_installed()
    store_root = resolve_store_root(args.store)
    out = sys.stdout
    name = run.metadata.name
    display = make_display(args.plain)
    try:
        runner = LocalRunner(run, store_root, display,
                             log_dir=Path(STATE_DIR) / "logs" / name)
    except (StoreError, ValueError) as exc:
        display.close()
        raise UserError(f"--store {store_root}: {exc}") from None
    try:
        check_store(runner.store, store_root)
    except UserError:
        display.close()
        raise
    stop_metrics: Callable[[], None] | None = None
    if args.metrics_port:
        try:
            stop_metrics = serve_metrics(runner.collector, args.metrics_port)
        except UserError:
            display.close()
            raise
        trainer_port = args.metrics_port + 1
        runner.trainer_metrics_port = trainer_port if port_free(trainer_port) else free_port()
    try:
        _intro(runner, display, args)
        outcomes = runner.execute()
        return _conclude(runner, display, outcomes, args, out)
    finally:
        display.close()
        if stop_metrics is not None:
            stop_metrics()


def _intro(runner: LocalRunner, display: Display, args: argparse.Namespace) -> None:
    run = runner.run
    stages = " -> ".join(s.name for s in run.spec.stages)
    params = accounting.parameter_count(run.spec.model)
    folder = f"{runner.store_root}/{run.metadata.namespace}/{run.metadata.name}/"
    display.message(f"kubetrain: run {run.metadata.name!r}, {params / 1e6:.2f}M parameters, "
                    f"stages {stages}")
    display.message(f"  checkpoints: {folder}")
    s3 = run.spec.storage.s3
    if s3 is not None and not args.store:
        display.message(f"  (the manifest's {s3.uri()} is used on a cluster; pass --store "
                        f"{s3.uri()} to use it here)")
    if args.metrics_port:
        display.message(f"  metrics:     http://127.0.0.1:{args.metrics_port}/metrics "
                        f"(trainer: http://127.0.0.1:{runner.trainer_metrics_port}/metrics)")
    display.message(f"  logs:        {runner.log_dir}/")


def _conclude(runner: LocalRunner, display: Display, outcomes: list[StageOutcome],
              args: argparse.Namespace, out: TextIO) -> int:
    run = runner.run
    again = f"kubetrain run {args.file} --local" + (f" --store {args.store}"
                                                     if args.store else "")
    last = outcomes[-1] if outcomes else None
    if last is not None and last.result == "interrupted":
        where = ""
        if last.record and last.record.get("checkpoint"):
            where = f"; last checkpoint {last.record['checkpoint']}"
        display.close()
        print(f"kubetrain: interrupted in stage {last.name!r}{where}; continue with: {again}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if last is not None and last.result == "failed":
        display.close()
        print(f"kubetrain: stage {last.name!r} failed: {last.reason}", file=sys.stderr)
        print(f"kubetrain: fix it, then continue with: {again}", file=sys.stderr)
        return EXIT_FAILED

    display.summary(f"TrainingRun {run.metadata.name!r}: all "
                    f"{len(run.spec.stages)} stages complete", runner.summary_lines())
    display.close()
    if outcomes and all(o.result == "skipped" for o in outcomes):
        folder = f"{runner.store_root}/{run.metadata.namespace}/{run.metadata.name}"
        if folder.startswith("file://"):
            folder = os.path.relpath(folder.removeprefix("file://"))
        print(f"(nothing to train: every stage was already complete; to train again from "
              f"scratch, delete {folder})", file=out)
    try:
        from kubetrain.report import write_report

        path = write_report(runner.store, run.metadata.namespace, run.metadata.name,
                            Path(STATE_DIR) / "reports" / run.metadata.name, spec=run.spec)
        print(f"report: {path}  (loss curves: {path.parent / 'loss.png'})", file=out)
    except ImportError:
        print("report: skipped, matplotlib is not installed: pip install 'kubetrain[local]'",
              file=out)
    return 0
