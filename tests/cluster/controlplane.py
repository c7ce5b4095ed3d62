"""A real, throw-away Kubernetes control plane for the test suite.

``ControlPlane`` runs etcd, kube-apiserver (TLS, RBAC, service-account
tokens), kube-controller-manager, kube-scheduler and kwok as local processes
on loopback ports, all state under one temporary directory. Nodes are fake:
kwok makes them Ready and moves pods on them through their lifecycle using the
Stages in ``kwok/stages.yaml`` (a pod stays Running until the annotation
``kubetrain.dev/test-exit-code`` is set on it, see ``finish_pod``).

Binaries come from ``.cache/bin`` (built by ``make cluster-bin``); if
``KUBEBUILDER_ASSETS`` names a directory holding kube-apiserver and etcd,
those two are taken from there instead.

Usage::

    with ControlPlane() as cp:
        api = cp.api_client()          # kubernetes.client.ApiClient (admin)
        cp.create_namespace("demo")
        cp.add_gpu_node("gpu-0", gpus=8, gpu_type="h100")
        ...                            # kubeconfig file: cp.kubeconfig
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import yaml
from kubernetes import client, config

from tests.support.services import die_with_parent

CLUSTER_DIR = Path(__file__).resolve().parent
REPO_ROOT = CLUSTER_DIR.parent.parent
DEFAULT_BIN_DIR = REPO_ROOT / ".cache" / "bin"
KWOK_STAGES = CLUSTER_DIR / "kwok" / "stages.yaml"
# Who sent which request, for tests that count a client's requests (the operator's).
# The control plane's own components are left out; the rest is logged at Metadata level.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "users": ["system:kube-controller-manager", "system:kube-scheduler"]},
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system", "system:nodes"]},
        {"level": "Metadata"},
    ],
}

#: Annotation that makes the test-only kwok Stage finish a Running pod.
EXIT_CODE_ANNOTATION = "kubetrain.dev/test-exit-code"
#: Annotation selecting the nodes this cluster's kwok manages.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TYPE_LABEL = "kubetrain.dev/gpu-type"

# What the NVIDIA GPU feature discovery would label a node with; unknown types
# fall back to an upper-cased name.
_GPU_PRODUCTS = {
    "h100": "NVIDIA-H100-80GB-HBM3",
    "h200": "NVIDIA-H200",
    "a100": "NVIDIA-A100-SXM4-80GB",
    "l4": "NVIDIA-L4",
}

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# First address of the range: the in-cluster "kubernetes" service, which the
# apiserver's serving cert must cover.
KUBERNETES_SERVICE_IP = "10.96.0.1"

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started, or did not behave."""


def pinned_version(component: str) -> str:
    """Version pinned in tests/cluster/<component>/go.mod, e.g. "v1.36.3".

    ``component`` is one of "k8s", "etcd", "kwok", "helm", "seaweedfs", "kueue".
    """
    modules = {
        "k8s": "k8s.io/kubernetes",
        "etcd": "go.etcd.io/etcd/server/v3",
        "kwok": "sigs.k8s.io/kwok",
        "helm": "helm.sh/helm/v3",
        "seaweedfs": "github.com/seaweedfs/seaweedfs",
        "kueue": "sigs.k8s.io/kueue",
    }
    module = modules[component]
    text = (CLUSTER_DIR / component / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.MULTILINE)
    if not match:
        raise ControlPlaneError(f"{module} is not required in tests/cluster/{component}/go.mod")
    return match.group(1)


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns a truthy value or ``timeout`` passes.

    On timeout raises ``ControlPlaneError`` naming ``what`` did not happen,
    with the last exception the probe raised and ``detail()`` (e.g. a log
    tail) so a failure explains itself.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except Exception as exc:
            # Not ready yet (e.g. 404, connection refused); kept for the timeout message.
            last_error = exc
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_error is not None:
                message += f"\nlast error: {last_error!r}"
            if detail is not None:
                message += "\n" + detail()
            raise ControlPlaneError(message)
        time.sleep(interval)


def _free_port() -> int:
    # Bind to port 0 so the kernel picks an unused port. It is released again
    # before the component binds it; collisions are possible but rare, and a
    # collision shows up as a readiness failure with the component's log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Component:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: object = field(default=None, repr=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"--- {self.name} log unreadable: {exc}"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.name} log ({self.log_path}):\n{tail}"


class ControlPlane:
    """Context manager running a complete local Kubernetes control plane."""

    def __init__(
        self,
        bin_dir: Path | str | None = None,
        workdir: Path | str | None = None,
        start_timeout: float = 90.0,
        keep_workdir: bool = False,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else DEFAULT_BIN_DIR
        self._workdir_arg = Path(workdir) if workdir else None
        self.start_timeout = start_timeout
        self.keep_workdir = keep_workdir
        self.workdir: Path = Path()
        self.kubeconfig: Path = Path()
        self.server: str = ""
        self.audit_log: Path = Path()
        self._components: list[_Component] = []
        self._binaries = self._resolve_binaries()
        #: True when kube-apiserver/etcd come from KUBEBUILDER_ASSETS.
        self.external_assets = self._binaries["kube-apiserver"].parent != self.bin_dir

    # -- binaries ---------------------------------------------------------

    def _resolve_binaries(self) -> dict[str, Path]:
        names = ["kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok"]
        found = {name: self.bin_dir / name for name in names}
        assets = os.environ.get("KUBEBUILDER_ASSETS")
        if assets:
            asset_dir = Path(assets)
            if all(os.access(asset_dir / n, os.X_OK) for n in ("kube-apiserver", "etcd")):
                found["kube-apiserver"] = asset_dir / "kube-apiserver"
                found["etcd"] = asset_dir / "etcd"
        missing = [str(path) for path in found.values() if not os.access(path, os.X_OK)]
        if missing:
            raise ControlPlaneError(
                "control-plane binaries missing: "
                + ", ".join(missing)
                + "\nrun `make cluster-bin` (tests/cluster/build.sh) to build them"
            )
        return found

    def binary(self, name: str) -> Path:
        """Path of the binary used for component ``name``."""
        return self._binaries[name]

    def apiserver_binary_version(self) -> str:
        """gitVersion the kube-apiserver binary reports (``--version``)."""
        out = subprocess.run(
            [str(self._binaries["kube-apiserver"]), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return out.split()[-1]

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component and wait until each is ready."""
        if self._workdir_arg:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="kubetrain-controlplane-"))
        try:
            self._start()
        except BaseException:
            # A half-started cluster must not leak processes.
            self.stop()
            raise

    def _start(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir()
        self._make_pki(pki)

        etcd_port, etcd_peer_port = _free_port(), _free_port()
        api_port = _free_port()
        kcm_port, sched_port, kwok_port = _free_port(), _free_port(), _free_port()
        self.server = f"https://127.0.0.1:{api_port}"

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd_peer = f"http://127.0.0.1:{etcd_peer_port}"
        # etcd listens on loopback only, so plain HTTP is enough here.
        self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={etcd_peer}",
                f"--initial-advertise-peer-urls={etcd_peer}",
                f"--initial-cluster=default={etcd_peer}",
                # Durability is worthless for a throw-away cluster; fsync is
                # the slowest part of etcd on CI disks.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait_http("etcd", f"{etcd_url}/health", lambda body: '"health":"true"' in body)

        self.audit_log = self.workdir / "audit.log"
        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self._spawn(
            "kube-apiserver",
            [
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=200",
                "--audit-log-maxbackup=1",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                # A single apiserver: no need to coordinate endpoints.
                "--endpoint-reconciler-type=none",
            ],
        )
        self.kubeconfig = self._write_kubeconfig("admin", pki)
        self._wait_https("kube-apiserver", f"{self.server}/readyz", pki)

        kcm_kubeconfig = self._write_kubeconfig("kube-controller-manager", pki)
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
            ],
        )
        sched_kubeconfig = self._write_kubeconfig("kube-scheduler", pki)
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={sched_kubeconfig}",
                f"--authentication-kubeconfig={sched_kubeconfig}",
                f"--authorization-kubeconfig={sched_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
                "--leader-elect=false",
            ],
        )
        # kwok needs to write node and pod status and node leases; the admin
        # identity keeps that free of RBAC bookkeeping.
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{kwok_port}",
            ],
        )
        self._wait_https("kube-controller-manager", f"https://127.0.0.1:{kcm_port}/healthz", None)
        self._wait_https("kube-scheduler", f"https://127.0.0.1:{sched_port}/healthz", None)
        self._wait_http("kwok", f"http://127.0.0.1:{kwok_port}/healthz", lambda body: body == "ok")
        # /healthz only says the controller manager serves; a default service
        # account appearing proves its controllers run and are authorized.
        core = client.CoreV1Api(self.api_client())
        wait_for(
            "kube-controller-manager to create the default service account",
            lambda: core.read_namespaced_service_account("default", "default"),
            self.start_timeout,
            detail=lambda: self._component("kube-controller-manager").log_tail(),
        )

    def stop(self) -> None:
        """Terminate every component (whole process groups) and verify it."""
        survivors: list[str] = []
        # Reverse start order: clients of the apiserver first, etcd last.
        for comp in reversed(self._components):
            if comp.process is None:
                continue
            if not self._terminate(comp.process):
                survivors.append(f"{comp.name} (pid {comp.process.pid})")
            if comp.log_file is not None:
                comp.log_file.close()  # type: ignore[attr-defined]
        self._components = []
        if survivors:
            raise ControlPlaneError("processes still alive after teardown: " + ", ".join(survivors))
        if not self.keep_workdir and self._workdir_arg is None and self.workdir != Path():
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> bool:
        """SIGTERM, then SIGKILL, the process group; True if none is left."""
        pgid = proc.pid  # start_new_session=True made it a group leader
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            # The leader exited; children in its group may still be running.
            if not _group_alive(pgid):
                break
        if proc.poll() is None:
            proc.wait(timeout=5)
        return not _group_alive(pgid)

    # -- processes ----------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> _Component:
        return self.spawn(name, [str(self._binaries[name]), *args])

    def spawn(self, name: str, argv: list[str]) -> _Component:
        """Run ``argv`` as component ``name`` of this cluster: its log in the work
        directory (``logs(name)``), its own process group, killed with the test process,
        stopped by ``stop()`` or ``stop_component(name)``. For add-ons such as Kueue."""
        log_path = self.workdir / f"{name}.log"
        comp = _Component(name, argv, log_path)
        comp.log_file = log_path.open("wb")
        comp.process = self._popen(comp)
        self._components.append(comp)
        return comp

    def _popen(self, comp: _Component) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            comp.argv,
            stdin=subprocess.DEVNULL,
            stdout=comp.log_file,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            # Own process group, so teardown can signal everything it forks.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def stop_component(self, name: str) -> None:
        """Stop component ``name`` (its whole process group) before the cluster stops."""
        comp = self._component(name)
        self._components.remove(comp)
        alive = comp.process is not None and not self._terminate(comp.process)
        if comp.log_file is not None:
            comp.log_file.close()  # type: ignore[attr-defined]
        if alive:
            raise ControlPlaneError(f"{name} is still alive after SIGKILL")

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver (SIGTERM, as an upgrade of the control plane does) and
        start it again on the same port with the same flags; etcd keeps the state.
        Returns once it is ready again. Clients' connections and watches break
        meanwhile; the other components reconnect on their own."""
        comp = self._component("kube-apiserver")
        assert comp.process is not None
        if not self._terminate(comp.process):
            raise ControlPlaneError("kube-apiserver is still alive after SIGKILL")
        comp.log_file.close()  # type: ignore[attr-defined]
        comp.log_file = comp.log_path.open("ab")
        comp.log_file.write(b"\n===== restarted =====\n")  # type: ignore[attr-defined]
        comp.log_file.flush()  # type: ignore[attr-defined]
        comp.process = self._popen(comp)
        self._wait_https("kube-apiserver", f"{self.server}/readyz", self.workdir / "pki")

    def _component(self, name: str) -> _Component:
        for comp in self._components:
            if comp.name == name:
                return comp
        raise KeyError(name)

    def _check_alive(self, comp: _Component) -> None:
        assert comp.process is not None
        code = comp.process.poll()
        if code is not None:
            raise ControlPlaneError(f"{comp.name} exited with code {code}\n{comp.log_tail()}")

    def _wait_http(self, name: str, url: str, ok: Callable[[str], bool]) -> None:
        comp = self._component(name)

        def probe() -> bool:
            self._check_alive(comp)
            with urllib.request.urlopen(url, timeout=2) as resp:
                return ok(resp.read().decode())

        self._wait_ready(comp, url, probe)

    def _wait_https(self, name: str, url: str, pki: Path | None) -> None:
        comp = self._component(name)
        if pki is None:
            # controller-manager and scheduler serve a self-signed cert from
            # their --cert-dir; their /healthz is open to anyone.
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

        def probe() -> bool:
            self._check_alive(comp)
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return resp.read().decode().strip() == "ok"

        self._wait_ready(comp, url, probe)

    def _wait_ready(self, comp: _Component, url: str, probe: Callable[[], bool]) -> None:
        def guarded() -> bool:
            try:
                return probe()
            except ControlPlaneError:
                raise
            except (OSError, urllib.error.URLError):
                return False

        deadline = time.monotonic() + self.start_timeout
        while True:
            # A dead process is reported at once rather than after the timeout.
            if guarded():
                return
            if time.monotonic() >= deadline:
                raise ControlPlaneError(
                    f"{comp.name} did not become ready within {self.start_timeout:.0f}s"
                    f" (probing {url})\n{comp.log_tail()}"
                )
            time.sleep(0.2)

    # -- certificates and kubeconfigs --------------------------------------

    def _openssl(self, *args: str) -> None:
        if shutil.which("openssl") is None:
            raise ControlPlaneError("the openssl CLI is needed to generate test certificates")
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    def _make_pki(self, pki: Path) -> None:
        days = "7"
        # EC P-256 keys: generation is instant and every component accepts them.
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        self._openssl(
            "req", "-x509", *ec, "-days", days,
            "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
            "-subj", "/CN=kubetrain-test-ca",
        )  # fmt: skip
        self._openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", str(pki / "sa.key"),
        )  # fmt: skip
        self._openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))

        server_sans = ",".join(
            [
                "IP:127.0.0.1",
                f"IP:{KUBERNETES_SERVICE_IP}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
        )
        self._issue(pki, "apiserver", "/CN=kube-apiserver", "serverAuth", server_sans)
        # O=system:masters is bound to cluster-admin by the default RBAC policy.
        self._issue(pki, "admin", "/O=system:masters/CN=kubetrain-admin", "clientAuth")
        # These CNs are the users the default RBAC policy grants each component.
        self._issue(
            pki, "kube-controller-manager", "/CN=system:kube-controller-manager", "clientAuth"
        )
        self._issue(pki, "kube-scheduler", "/CN=system:kube-scheduler", "clientAuth")

    def _issue(self, pki: Path, name: str, subject: str, usage: str, sans: str = "") -> None:
        key, csr, crt = pki / f"{name}.key", pki / f"{name}.csr", pki / f"{name}.crt"
        ext = pki / f"{name}.ext"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if sans:
            lines.append(f"subjectAltName={sans}")
        ext.write_text("\n".join(lines) + "\n")
        self._openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject,
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
            "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "7",
            "-extfile", str(ext), "-out", str(crt),
        )  # fmt: skip

    def _write_kubeconfig(self, user: str, pki: Path) -> Path:
        """A kubeconfig for ``user``'s client certificate; its path."""
        path = self.workdir / f"{user}.kubeconfig"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetrain-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(pki / f"{user}.crt"),
                        "client-key": str(pki / f"{user}.key"),
                    },
                }
            ],
            "contexts": [{"name": "test", "context": {"cluster": "kubetrain-test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- client helpers -------------------------------------------------------

    def api_client(self) -> client.ApiClient:
        """A new admin ``kubernetes.client.ApiClient`` for this cluster."""
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def pids(self) -> list[int]:
        """Process ids of the running components (each leads its own group)."""
        return [c.process.pid for c in self._components if c.process is not None]

    def logs(self, name: str, lines: int = 40) -> str:
        """Tail of component ``name``'s log, for failure messages."""
        return self._component(name).log_tail(lines)

    def create_namespace(self, name: str, timeout: float = 30.0) -> client.V1Namespace:
        """Create a namespace and wait for its default service account.

        The ServiceAccount admission plugin rejects pods until the
        serviceaccount controller has created "default" there.
        """
        core = client.CoreV1Api(self.api_client())
        ns = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        wait_for(
            f"service account default in namespace {name}",
            lambda: core.read_namespaced_service_account("default", name),
            timeout,
            detail=lambda: self.logs("kube-controller-manager"),
        )
        return ns

    def add_gpu_node(
        self,
        name: str,
        gpus: int = 8,
        gpu_type: str = "h100",
        labels: Mapping[str, str] | None = None,
        taints: list[client.V1Taint] | None = None,
        timeout: float = 60.0,
    ) -> client.V1Node:
        """Create a kwok-managed fake GPU node and wait until it is Ready.

        The node offers ``gpus`` of ``nvidia.com/gpu`` and carries the labels
        GPU feature discovery and kubetrain use to select GPU types.
        """
        core = client.CoreV1Api(self.api_client())
        product = _GPU_PRODUCTS.get(gpu_type, f"NVIDIA-{gpu_type.upper()}")
        node_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            GPU_PRODUCT_LABEL: product,
            "nvidia.com/gpu.count": str(gpus),
            GPU_TYPE_LABEL: gpu_type,
            **(labels or {}),
        }
        resources = {"cpu": "128", "memory": "2Ti", "pods": "110", GPU_RESOURCE: str(gpus)}
        node = client.V1Node(
            metadata=client.V1ObjectMeta(
                name=name,
                labels=node_labels,
                # The annotation is what this cluster's kwok manages.
                annotations={KWOK_NODE_ANNOTATION: "fake"},
            ),
            spec=client.V1NodeSpec(taints=taints),
            # Node status may be set on create (kubelets register this way);
            # kwok's node-initialize Stage keeps the capacity given here.
            status=client.V1NodeStatus(capacity=resources, allocatable=resources),
        )
        core.create_node(node)

        def ready() -> client.V1Node | None:
            current = core.read_node(name)
            conditions = {c.type: c.status for c in current.status.conditions or []}
            allocatable = current.status.allocatable or {}
            # The node lifecycle controller taints a node not-ready until it
            # sees the Ready condition; the scheduler would skip it meanwhile.
            lifecycle_taints = [
                t for t in current.spec.taints or [] if t.key.startswith("node.kubernetes.io/")
            ]
            if (
                conditions.get("Ready") == "True"
                and allocatable.get(GPU_RESOURCE) == str(gpus)
                and not lifecycle_taints
            ):
                return current
            return None

        return wait_for(
            f"fake node {name} to be Ready with {gpus} {GPU_RESOURCE} allocatable and untainted",
            ready,
            timeout,
            detail=lambda: self.logs("kwok"),
        )

    def finish_pod(self, namespace: str, name: str, exit_code: int) -> None:
        """Make a Running pod on a fake node terminate with ``exit_code``.

        Sets the annotation the test-only kwok Stage reacts to; the pod then
        goes Succeeded (0) or Failed (non-zero), as if its container exited.
        """
        core = client.CoreV1Api(self.api_client())
        body = {"metadata": {"annotations": {EXIT_CODE_ANNOTATION: str(exit_code)}}}
        core.patch_namespaced_pod(name, namespace, body)

    def audit_events(self) -> list[dict[str, object]]:
        """The API server's audit log so far: one event per request (and stage), with
        ``userAgent``, ``verb``, ``objectRef`` and ``requestReceivedTimestamp``."""
        try:
            lines = self.audit_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # the line being written
        return events

    def server_version(self) -> dict[str, str]:
        """The apiserver's /version document."""
        info = client.VersionApi(self.api_client()).get_code()
        return json.loads(json.dumps(info.to_dict()))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
