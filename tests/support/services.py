"""Real services for tests, on loopback, each a separate process so that the trainer
subprocesses and boto3 talk HTTP to it exactly as to a real S3 endpoint:

- moto's S3 server (:class:`S3Server`): in memory, starts in a second; the unit and
  integration tiers, and fault injection that needs moto;
- SeaweedFS (:class:`SeaweedS3`, ``weed server -s3``, built by ``make cluster-bin``): a
  real object store with its own S3 gateway, data on disk; the e2e tier and the scale
  benchmark. It can be paused (SIGSTOP), stopped and started again on the same ports and
  data, for fault tests.

Both offer the same interface (:class:`S3Service`): ``endpoint``, ``env()``,
``client()``, ``create_bucket()``, ``stop()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from tests.support.wait import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
WEED_BINARY = REPO_ROOT / ".cache" / "bin" / "weed"


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


def die_with_parent() -> None:
    """``preexec_fn`` for a server process: Linux SIGKILLs it when its parent dies
    without tearing down (e.g. pytest killed by a CI timeout), so no server outlives its
    test run. Linux means the parent *thread*: start servers from one that outlives
    them (the main thread), not from a short-lived helper."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class S3Service(Protocol):
    """What tests and benchmarks use of an S3 server, whichever implements it."""

    access_key: str
    secret_key: str
    region: str

    @property
    def endpoint(self) -> str: ...

    def env(self) -> dict[str, str]: ...

    def client(self) -> Any: ...

    def create_bucket(self, name: str) -> str: ...

    def stop(self) -> None: ...


class _S3Clients:
    """``env``, ``client`` and ``create_bucket`` from ``endpoint`` and the credentials."""

    access_key: str
    secret_key: str
    region: str
    buckets: list[str]

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

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


@dataclass
class S3Server(_S3Clients):
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


class SeaweedError(RuntimeError):
    """SeaweedFS is not built, did not start, or did not answer."""


# The listeners of `weed server -s3`, each given a free loopback port (SeaweedFS's
# defaults are fixed ports, and its gRPC ports default to HTTP port + 10000).
_SEAWEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "metricsPort",
)


class SeaweedS3(_S3Clients):
    """SeaweedFS on 127.0.0.1: master, volume server, filer and S3 gateway in one
    ``weed server`` process, its data under a temporary directory.

    The S3 gateway checks signatures against an identities file (``-s3.config``) holding
    this object's throwaway credentials. ``pause``/``resume`` freeze and thaw the server
    (SIGSTOP/SIGCONT: requests hang, as on a stalled network); ``stop`` (clean) or
    ``kill`` (a crash) take it down and ``start`` brings it back on the same ports with
    the same data. ``close`` kills it and deletes the data. Usable as a context manager
    (start ... close).

    Starting takes about 10 s; starting again over existing data about 15 s more,
    because SeaweedFS's master refuses writes for three heartbeat intervals after it
    takes over a topology with volumes (it waits for volume servers to report them).
    """

    def __init__(
        self,
        binary: Path | None = None,
        *,
        start_timeout: float = 120.0,
        access_key: str = "testing-access-key",
        secret_key: str = "testing-secret-key",
        region: str = "us-east-1",
    ) -> None:
        self.binary = Path(binary) if binary else WEED_BINARY
        if not os.access(self.binary, os.X_OK):
            raise SeaweedError(
                f"SeaweedFS binary missing: {self.binary}\n"
                "run `make cluster-bin` (tests/cluster/build.sh) to build it"
            )
        self.start_timeout = start_timeout
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.buckets: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.log = self.workdir / "weed.log"
        self.config = self.workdir / "s3.json"
        self.ports = {name: free_port() for name in _SEAWEED_PORTS}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._write_identities()

    # ---- S3Service
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metricsPort']}/metrics"

    # ---- lifecycle
    def start(self) -> Self:
        """Start the server (again, after ``stop``) and wait until a write round-trips."""
        if self.alive():
            return self
        self.starts += 1
        with open(self.log, "ab") as fh:
            fh.write(f"\n===== weed server start #{self.starts} =====\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                # weed reads master.toml, filer.toml, ... from its working directory
                # (and from ~/.seaweedfs, /etc/seaweedfs): none of ours exist there.
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """Freeze every process of the server: connections are accepted by the kernel
        but nothing answers until :meth:`resume`."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, grace: float = 30.0) -> None:
        """Shut the server down (SIGTERM, SIGKILL after ``grace`` seconds); its data
        stays for :meth:`start`. A clean shutdown takes SeaweedFS about 15 s."""
        self._end(grace)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; its data stays for :meth:`start`
        (everything it acknowledged was written to the OS, which a process crash
        does not lose)."""
        self._end(None)

    def close(self) -> None:
        """Kill the server and delete its data."""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- observation
    def request_count(self) -> int:
        """S3 requests the gateway has answered since this process started (its
        ``SeaweedFS_s3_request_total``, all operations, buckets and status codes)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no weed log)"

    # ---- internals
    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "kubetrain-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.config.write_text(json.dumps(identities, indent=2))

    def _argv(self) -> list[str]:
        p = self.ports
        return [
            str(self.binary),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            "-s3",
            f"-s3.config={self.config}",
            *(f"-{name}={port}" for name, port in p.items()),
            # Listeners this server would otherwise open on fixed ports.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            # Tests never phone home.
            "-master.telemetry=false",
            # One master: nothing to wait for before it leads (the default waits 10 s
            # on every start).
            "-master.electionTimeout=1s",
            # Shut down at once on SIGTERM (the default waits 10 s for heartbeats to stop).
            "-volume.preStopSeconds=0",
            # Every bucket is a collection that grows 7 volumes at its first write. They
            # take disk only as they fill, so the count is set rather than derived from
            # free disk / size (which would allow 20 buckets on a 36 GB disk), and small
            # volumes keep what one test can fill in check.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
        ]

    def _signal(self, sig: signal.Signals) -> None:
        if not self.alive():
            raise SeaweedError("the SeaweedFS server is not running")
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def _end(self, grace: float | None) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            if grace is not None:
                # A paused server must be thawed to act on SIGTERM.
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # weed puts a Unix socket per gRPC service in /tmp whatever its flags say, and
        # leaves it behind when killed.
        for service in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{service}-grpc-{self.ports[f'{service}.port.grpc']}.sock").unlink(
                missing_ok=True
            )

    def _wait_ready(self) -> None:
        """Until a bucket is listed and an object stored and read back: the gateway, the
        filer behind it, the master and a writable volume all answer."""
        import boto3
        from botocore.config import Config

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            # One try per probe: the loop below is the retry, with its own deadline.
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )
        bucket = "kubetrain-ready"
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise SeaweedError(f"weed server exited:\n{self.log_tail()}")
            try:
                if port_open(self.ports["s3.port"]):
                    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
                        s3.create_bucket(Bucket=bucket)
                    s3.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                    if s3.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok":
                        return
            except Exception as exc:  # not ready yet; kept for the timeout message
                last_error = exc
            if time.monotonic() > deadline:
                raise SeaweedError(
                    f"SeaweedFS S3 gateway on {self.endpoint} did not store an object within "
                    f"{self.start_timeout:.0f}s (last error: {last_error!r})\n{self.log_tail()}"
                )
            time.sleep(0.5)


def start_seaweed_s3(binary: Path | None = None) -> SeaweedS3:
    """A started :class:`SeaweedS3`; ``close()`` it when done."""
    server = SeaweedS3(binary)
    try:
        return server.start()
    except BaseException:
        server.close()
        raise
