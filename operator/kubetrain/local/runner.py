"""`kubetrain run FILE --local`: the manifest's stages, in order, as processes here.

The local runner plays the operator's part on one machine: each stage gets exactly the
environment a pod would get (:func:`kubetrain.core.contract.stage_environment`), with the
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

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetrain.core import accounting, contract
from kubetrain.core.api import Stage, TrainingRun, TrainingRunSpec
from kubetrain.core.errors import UserError
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord, RecordFormatError, read_progress
from kubetrain.core.store import StoreError, open_store
from kubetrain.local.collector import RunCollector
from kubetrain.local.display import Display, StageLine, stage_line

STATE_DIR = ".kubetrain"
TRAINER_MODULE = "kubetrain_trainer"
POLL_SECONDS = 0.5
# How long a trainer may take to write its checkpoint after SIGINT before it is killed.
STOP_GRACE_SECONDS = 120.0
# How the trainer starts its one-line failure reason (kubetrain_trainer.train.main).
TRAINER_ERROR_PREFIX = "kubetrain-trainer: error: "
INSTALL_TRAINER = "pip install 'kubetrain[trainer]'"


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
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(procs),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "-m",
        TRAINER_MODULE,
    ]


def local_environment(
    run: TrainingRun,
    index: int,
    *,
    store_root: str,
    metrics_port: int,
    master_port: int,
    base: Mapping[str, str],
) -> dict[str, str]:
    """The trainer's environment: ``base`` (this shell) plus the stage contract with the
    values a cluster would supply resolved for this machine."""
    spec = run.spec
    stage = spec.stages[index]
    acc = accounting.accelerator(stage.resources.gpu_type, stage.resources.gpus_per_node)
    env = dict(base)
    for var in contract.stage_environment(
        spec,
        index,
        run=run.metadata.name,
        namespace=run.metadata.namespace,
        store_root=store_root,
        master_addr="127.0.0.1",
        node_rank="0",
        power_watts=acc.watts * max(stage.resources.gpus_per_node, 1),
        metrics_port=metrics_port,
    ):
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
    if f"No module named {TRAINER_MODULE}" in text or f"No module named '{TRAINER_MODULE}'" in text:
        return f"the trainer package is not installed: {INSTALL_TRAINER}"
    for line in reversed(stderr_lines):
        line = line.strip()
        # torchrun closes its error report with rulers and blank lines.
        if line and set(line) - set("=-*"):
            return line.removeprefix(TRAINER_ERROR_PREFIX)
    return "the trainer exited without a message"


def record_cost(
    spec: TrainingRunSpec, stage: Stage, record: ProgressRecord | None
) -> accounting.Spent:
    """USD and grams CO2 of a progress record at the manifest's prices: GPU time is
    the stage's GPUs × the trainer's wall seconds (0 on CPU), energy its joules."""
    if record is None:
        return accounting.Spent(0.0, 0.0)
    res = stage.resources
    return accounting.stage_cost(
        accounting.wall_gpu_seconds(res, record.wall_seconds),
        record.energy_joules,
        res,
        spec.pricing,
    )


@dataclass
class StageOutcome:
    name: str
    result: str  # completed | skipped | interrupted | failed
    reason: str = ""
    record: ProgressRecord | None = None


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
        self.store = open_store(
            self.store_root, endpoint=self._s3_endpoint(), region=self._s3_region()
        )
        self.collector = RunCollector(self.run.metadata.name, self.run.metadata.namespace)
        self._signal: int | None = None
        self._child: subprocess.Popen[bytes] | None = None

    # -- where things are

    def _s3_endpoint(self) -> str | None:
        s3 = self.run.spec.storage.s3
        if s3 and s3.endpoint:
            return s3.endpoint
        return contract.s3_endpoint(self.environ).endpoint

    def _s3_region(self) -> str | None:
        s3 = self.run.spec.storage.s3
        return s3.region if s3 else contract.s3_endpoint(self.environ).region

    def folder(self, stage: Stage) -> StageLayout:
        """The stage's folder, relative to the store root (the root store keeps the S3
        endpoint and region; ``ObjectStore.child`` would not)."""
        return StageLayout.of(self.run.metadata.namespace, self.run.metadata.name, stage.name)

    def line(
        self,
        stage: Stage,
        record: ProgressRecord | None,
        *,
        phase: str | None = None,
        eta_seconds: float | None = None,
    ) -> StageLine:
        """The display's view of a record, with cost and CO2 at the manifest's prices."""
        cost, co2 = record_cost(self.run.spec, stage, record)
        return stage_line(
            stage.name, record, phase=phase, cost_usd=cost, co2_grams=co2, eta_seconds=eta_seconds
        )

    def progress_record(self, stage: Stage) -> ProgressRecord | None:
        try:
            return read_progress(self.store, self.folder(stage).progress)
        except RecordFormatError as exc:
            raise UserError(str(exc)) from None

    def is_final(self, stage: Stage) -> bool:
        return self.store.exists(self.folder(stage).final)

    # -- signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        child = self._child
        if self._signal is None:
            self._signal = signum
            if child is not None and child.poll() is None:
                self.display.message(
                    "stopping: the trainer is writing a checkpoint (Ctrl-C again to stop "
                    "at once, losing the steps since the last checkpoint)"
                )
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
            self.display.stage_ended(
                self.line(stage, record, phase="completed"), note="already complete"
            )
            return StageOutcome(stage.name, "skipped", record=record)

        previous = self.progress_record(stage)
        self.display.stage_started(
            self.line(stage, previous) if previous else StageLine(stage.name, "running", 0, total)
        )
        master_port = free_port()
        env = local_environment(
            self.run,
            index,
            store_root=self.store_root,
            metrics_port=self.trainer_metrics_port,
            master_port=master_port,
            base=self.environ,
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage.name}.log"
        stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage.name}\n".encode())
            log.flush()
            child = subprocess.Popen(
                trainer_command(stage, master_port),
                env=env,
                stdout=log,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._child = child
            assert child.stderr is not None
            reader = threading.Thread(
                target=_copy_stderr, daemon=True, args=(child.stderr, log, stderr_tail)
            )
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
            self.display.stage_ended(self.line(stage, record, phase="interrupted"), "interrupted")
            return StageOutcome(stage.name, "interrupted", record=record)
        if child.returncode != 0:
            reason = failure_reason(list(stderr_tail))
        else:
            phase = record.phase if record is not None and record.phase else "unknown"
            reason = f"the trainer exited without completing the stage (phase {phase})"
        self.display.stage_ended(self.line(stage, record, phase="failed"), "failed")
        return StageOutcome(
            stage.name, "failed", reason=f"{reason} (log: {log_path})", record=record
        )

    def _follow(
        self,
        stage: Stage,
        child: subprocess.Popen[bytes],
        previous: ProgressRecord | None,
        total: int,
    ) -> ProgressRecord | None:
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
                    self.display.message(
                        f"the trainer did not stop within {STOP_GRACE_SECONDS:.0f}s; killing it"
                    )
                    _wait_or_kill(child, 0)
            try:
                fresh = self.progress_record(stage)
            except StoreError:
                continue  # a transient read error; the trainer is still the judge
            if fresh is None or fresh == stale:
                continue
            record = stale = fresh
            step = fresh.step
            now = time.monotonic()
            eta = None
            if first is None:
                first = (now, step)
            elif step > first[1]:
                rate = (step - first[1]) / (now - first[0])
                eta = ((fresh.total_steps or total) - step) / rate
            line = self.line(stage, fresh, phase="running", eta_seconds=eta)
            self.display.update(line)
            self.collector.observe(line, fresh.total_steps or total)
        return record

    # -- the curriculum

    def execute(self) -> list[StageOutcome]:
        """Run (or skip) every stage in order; stop at the first that does not complete."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        outcomes: list[StageOutcome] = []
        try:
            for index, stage in enumerate(self.run.spec.stages):
                if self._signal is not None:
                    outcomes.append(
                        StageOutcome(stage.name, "interrupted", record=self.progress_record(stage))
                    )
                    break
                outcome = self.run_stage(index)
                outcomes.append(outcome)
                if outcome.record is not None:
                    total = accounting.total_steps(stage, self.run.spec.model)
                    self.collector.observe(
                        self.line(stage, outcome.record), outcome.record.total_steps or total
                    )
                if outcome.result in ("interrupted", "failed"):
                    break
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return outcomes

    def summary_lines(self) -> list[StageLine]:
        """Every stage's numbers, read back from the stored progress records."""
        return [self.line(stage, self.progress_record(stage)) for stage in self.run.spec.stages]


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


def resolve_store_root(given: str | None) -> str:
    """The store a local run writes to: ``--store``, else ``.kubetrain/store`` here."""
    if not given:
        return default_store_uri()
    if given.startswith("s3://"):
        return given.rstrip("/")
    if given.startswith("file://"):
        return Path(given.removeprefix("file://")).resolve().as_uri()
    if "://" in given:
        raise UserError(
            f"--store {given!r}: unsupported scheme (accepted: s3://BUCKET/PREFIX "
            "or file://PATH or a folder)"
        )
    return Path(given).resolve().as_uri()
