"""The operator as users run it (`kubetrain operator ...`), as a child process of a test,
with its log in a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.services import free_port, stop_process


def environment_without_aws() -> dict[str, str]:
    """This process's environment minus AWS credentials: an operator started with it must
    read a run's credentials Secret through the API to see progress."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


class OperatorProcess:
    """``kubetrain operator --kubeconfig ... [--config ...] -n NS``: the command users (and
    the chart's Deployment) run. Restartable: each start appends to the same log."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log: Path,
        *,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        metrics_port: int | None = None,
    ):
        self.kubeconfig, self.config, self.namespace, self.log = kubeconfig, config, namespace, log
        self.env = environment_without_aws() if env is None else env
        self.metrics_port = metrics_port or free_port()
        self.liveness_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        exe = Path(sys.executable).parent / "kubetrain"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "kubetrain.cli.main"]
        argv += [
            "operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "-n",
            self.namespace,
            "--metrics-port",
            str(self.metrics_port),
            "--liveness-port",
            str(self.liveness_port),
        ]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        self.starts += 1
        with open(self.log, "ab") as fh:
            fh.write(f"\n===== operator start #{self.starts} =====\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a lost node would: no clean-up, no
        Lease handed back."""
        proc, self.proc = self.proc, None
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def identity(self) -> str:
        """The name this process holds the leader Lease under (host and pid)."""
        assert self.proc is not None
        return f"{socket.gethostname()}-{self.proc.pid}"

    def stop(self) -> None:
        """SIGTERM (what Kubernetes sends a pod), then SIGKILL if it does not exit."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no operator log)"
