"""Several processes per pod: torchrun as a child of ``python -m kubetrain_trainer``.

The pod's exit code must say what happened (``kubetrain.core.contract``, exit codes):
the Job's podFailurePolicy ignores ``EXIT_CHECKPOINTED_ON_SIGTERM``, so a node drain or
a spot reclaim never counts against maxRestarts. torchrun does not pass its workers'
codes through: when a worker exits non-zero it exits 1, after SIGTERM 1 or 143, and it
kills its workers 30 s after forwarding a SIGTERM unless told otherwise. So this process
stays the pod's main process instead of exec-ing torchrun:

- it starts torchrun (in a session of its own) with ``KUBETRAIN_EXIT_DIR``, a fresh
  pod-local directory, and a shutdown timeout longer than any grace period (the
  kubelet's SIGKILL at the end of ``terminationGracePeriodSeconds`` is the limit);
- it forwards the first SIGTERM/SIGINT to torchrun, which forwards it to the workers;
- every worker writes its exit code to ``<dir>/local-rank-<N>`` as it exits
  (``report_exit``);
- the pod's exit code comes from those reports (``pod_exit_code``): when every local
  worker stopped after a complete checkpoint, ``EXIT_CHECKPOINTED_ON_SIGTERM``;
  otherwise torchrun's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetrain.core import contract
from kubetrain_trainer import signals

# Set by the launcher for its torchrun workers only: a pod-local directory where each
# worker leaves its exit code.
ENV_EXIT_DIR = "KUBETRAIN_EXIT_DIR"
REPORT_PREFIX = "local-rank-"
# torchrun's grace for its workers after a SIGTERM (its default: 30 s, too short for a
# large checkpoint upload); the pod's terminationGracePeriodSeconds is the real limit.
TORCHRUN_SHUTDOWN_SECONDS = 86400


def local_workers(environ: Mapping[str, str]) -> int:
    """Processes per node (``PET_NPROC_PER_NODE``, at least 1)."""
    return max(1, int(environ.get(contract.PET_NPROC_PER_NODE, "1") or 1))


def torchrun_command(environ: Mapping[str, str]) -> list[str] | None:
    """The torchrun command line to run, or None to train in this process.

    torchrun sets ``LOCAL_RANK`` in its workers, which is how a worker knows not to
    launch again.
    """
    if "LOCAL_RANK" in environ:
        return None
    nnodes = int(environ.get(contract.PET_NNODES, "1") or 1)
    if local_workers(environ) <= 1 and nnodes <= 1:
        return None
    # torchrun takes --nnodes, --nproc-per-node, --node-rank, --master-addr and
    # --master-port from the PET_* variables; only the module is named here.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--shutdown-timeout",
        str(TORCHRUN_SHUTDOWN_SECONDS),
        "--module",
        "kubetrain_trainer",
    ]


def report_exit(code: int, environ: Mapping[str, str]) -> int:
    """A torchrun worker's side: leave ``code`` for the launcher (nothing outside
    torchrun); returns ``code``."""
    folder = environ.get(ENV_EXIT_DIR)
    if not folder:
        return code
    path = Path(folder) / f"{REPORT_PREFIX}{environ.get('LOCAL_RANK', '0')}"
    with contextlib.suppress(OSError):  # the exit code itself still tells torchrun
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(str(code))
        os.replace(tmp, path)
    return code


def read_reports(folder: str | os.PathLike[str]) -> dict[int, int]:
    """The exit codes the workers left, by local rank."""
    out: dict[int, int] = {}
    for path in Path(folder).glob(f"{REPORT_PREFIX}*"):
        with contextlib.suppress(ValueError, OSError):
            out[int(path.name.removeprefix(REPORT_PREFIX))] = int(path.read_text().strip())
    return out


def pod_exit_code(torchrun_code: int, reports: Mapping[int, int], workers: int) -> int:
    """The pod's exit code: 0 when torchrun succeeded; ``EXIT_CHECKPOINTED_ON_SIGTERM``
    when every one of the ``workers`` local workers reported that it stopped after a
    complete checkpoint (or completed); otherwise torchrun's code, which is then a
    failure (never the checkpoint code by accident, and 128 + N when a signal killed it)."""
    if torchrun_code == 0:
        return contract.EXIT_COMPLETED
    codes = [reports.get(rank) for rank in range(workers)]
    stopped = (contract.EXIT_COMPLETED, contract.EXIT_CHECKPOINTED_ON_SIGTERM)
    if all(c in stopped for c in codes) and contract.EXIT_CHECKPOINTED_ON_SIGTERM in codes:
        return contract.EXIT_CHECKPOINTED_ON_SIGTERM
    if torchrun_code < 0:
        return 128 - torchrun_code
    return 1 if torchrun_code == contract.EXIT_CHECKPOINTED_ON_SIGTERM else torchrun_code


class _Forwarder:
    """Passes the first stop signal to torchrun, also one that came before it started
    (``signals.pending``); later ones are dropped: a second SIGTERM would cut torchrun's
    graceful shutdown short and leave its workers behind."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.signal: int | None = None
        self.sent = False

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
        self.forward()

    def forward(self) -> None:
        if self.sent or self.signal is None or self.child is None:
            return
        self.sent = True
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(self.signal)


def run_torchrun(command: list[str], environ: Mapping[str, str]) -> int:
    """Run ``command`` (torchrun) to its end; the pod's exit code (see the module)."""
    folder = tempfile.mkdtemp(prefix="kubetrain-exit-")
    forwarder = _Forwarder()
    for sig in signals.STOP_SIGNALS:
        signal.signal(sig, forwarder)
    if signals.pending and forwarder.signal is None:
        forwarder.signal = signals.pending[0]  # it came while this process was starting
    try:
        sys.stdout.flush()
        forwarder.child = subprocess.Popen(
            command, env={**environ, ENV_EXIT_DIR: folder}, start_new_session=True
        )
        forwarder.forward()
        code = forwarder.child.wait()
        return pod_exit_code(code, read_reports(folder), local_workers(environ))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
