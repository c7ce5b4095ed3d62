"""kubetrain's images (``make images``) as tests use them: their names, whether they are
built, and containers started from them through ``images/engine.sh`` (podman or docker,
with the options this project's hosts need, written down there once).

Image tests skip, saying how to build the images, when they are not built: building the
trainer image takes minutes and gigabytes, so ``make test`` runs these tests only where
``make images`` (or ``make test-images``) already ran.
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.services import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
ENGINE = ["bash", str(REPO / "images" / "engine.sh")]


@dataclass(frozen=True)
class Images:
    operator: str
    trainer: str


@functools.cache
def names() -> Images:
    """The names ``make images`` gives the images (the chart's defaults)."""
    out = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh"), "--names"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    operator, trainer = out.stdout.split()
    return Images(operator, trainer)


def engine_name() -> str | None:
    """``podman`` or ``docker``; None when neither is installed."""
    out = subprocess.run([*ENGINE, "--name"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def is_built(image: str) -> bool:
    return (
        subprocess.run(
            [*ENGINE, "image", "inspect", image], capture_output=True, timeout=60
        ).returncode
        == 0
    )


@functools.cache
def checkout_revision() -> str | None:
    """The commit this checkout is at; None outside a git checkout."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() if out.returncode == 0 else None


def require(image: str) -> str:
    """``image`` if it is built from this checkout's commit; else the test is skipped with
    the reason and the fix. The engine's image store is the host's, shared by every
    checkout on it: an image another checkout built tests that checkout's code."""
    if shutil.which("podman") is None and shutil.which("docker") is None:
        pytest.skip("image tests: neither podman nor docker is installed (make test-images)")
    if not is_built(image):
        pytest.skip(f"image tests: {image} is not built (make images, or make test-images)")
    labels = inspect(image)["Config"].get("Labels") or {}
    built_from = labels.get("org.opencontainers.image.revision", "unknown")
    head = checkout_revision()
    if head is not None and built_from.removesuffix("-dirty") != head:
        pytest.skip(
            f"image tests: {image} was built from {built_from[:12]}, this checkout is at "
            f"{head[:12]} (make images, or make test-images)"
        )
    return image


def engine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``images/engine.sh ARGS``; its output as text, never raising on failure."""
    return subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=timeout)


def run_in(image: str, *argv: str, entrypoint: str = "", timeout: float = 120) -> str:
    """Output of ``argv`` run in a fresh container of ``image`` (its entrypoint replaced by
    ``entrypoint``, default none); fails the test on a non-zero exit."""
    out = engine(
        "run", "--rm", "--pull=never", f"--entrypoint={entrypoint}", image, *argv, timeout=timeout
    )
    assert out.returncode == 0, f"{argv} in {image} exited {out.returncode}:\n{out.stderr}"
    return out.stdout


def container_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def embedded_kubeconfig(source: Path, dest: Path) -> Path:
    """A copy of the kubeconfig ``source`` whose certificate and key files are inlined
    (``*-data``), so that it works when mounted alone into a container; readable by the
    image's non-root user."""
    doc = yaml.safe_load(source.read_text())
    for section, key in (("clusters", "cluster"), ("users", "user")):
        for entry in doc.get(section) or []:
            body = entry[key]
            for field in ("certificate-authority", "client-certificate", "client-key"):
                if field in body:
                    data = Path(body.pop(field)).read_bytes()
                    body[f"{field}-data"] = base64.b64encode(data).decode()
    dest.write_text(yaml.safe_dump(doc))
    dest.chmod(0o644)
    return dest


class OperatorContainer:
    """The operator image's ``kubetrain operator`` as the chart's Deployment runs it —
    read-only root filesystem, an emptyDir-like /tmp, the config file in /etc/kubetrain,
    its non-root user — on the host's network so that it reaches the test control plane
    on 127.0.0.1. The same interface as :class:`tests.support.operator.OperatorProcess`."""

    def __init__(
        self, image: str, kubeconfig: Path, namespace: str, log: Path, *, config: Path
    ) -> None:
        self.image, self.namespace, self.log = image, namespace, log
        self.confdir = log.parent / f"{log.stem}-etc"
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.confdir.chmod(0o755)
        embedded_kubeconfig(kubeconfig, self.confdir / "kubeconfig")
        shutil.copyfile(config, self.confdir / "config.yaml")
        (self.confdir / "config.yaml").chmod(0o644)
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.name = container_name("kubetrain-operator")
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            *ENGINE,
            "run",
            "--rm",
            "--pull=never",
            f"--name={self.name}",
            "--network=host",
            "--read-only",
            "--tmpfs=/tmp",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            f"--volume={self.confdir}:/etc/kubetrain:ro",
            self.image,
            # After the image's entrypoint (`kubetrain operator --config ...`), as the
            # chart's args.
            "--kubeconfig",
            "/etc/kubetrain/kubeconfig",
            "-n",
            self.namespace,
            "--metrics-port",
            str(self.metrics_port),
            "--liveness-port",
            str(self.liveness_port),
        ]

    def start(self) -> OperatorContainer:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.argv(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM to the container (what the kubelet sends), then SIGKILL after 30 s;
        its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            engine("kill", "--signal=TERM", self.name)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                engine("rm", "--force", self.name)
        stop_process(proc)
        return proc.returncode

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no operator log)"


def inspect(image: str) -> dict:
    """``image inspect`` of ``image``: its config, labels, size."""
    out = engine("image", "inspect", image)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]
