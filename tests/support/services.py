"""Real services for tests, on loopback: moto's S3 server (a separate process, so the
trainer subprocesses and boto3 talk HTTP to it exactly as to a real S3 endpoint)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.wait import wait_for


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:  # type: ignore[type-arg]
    """SIGTERM (what Kubernetes and Ctrl-C send), then SIGKILL if it does not exit."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1; credentials are throwaway test values."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    access_key: str = "testing-access-key"
    secret_key: str = "testing-secret-key"
    region: str = "us-east-1"
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "KUBETRAIN_S3_ENDPOINT": self.endpoint,
        }

    def client(self):  # boto3 S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_s3_server() -> S3Server:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="moto-")) / "moto.log"
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(port, proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        return port_open(port)

    wait_for(
        up,
        timeout=60,
        what=f"moto S3 server listening on 127.0.0.1:{port}",
        detail=lambda: log.read_text()[-2000:],
    )
    return server
