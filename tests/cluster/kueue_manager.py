"""Kueue's manager on the test control plane, installed as a real install does it.

``KueueManager`` installs Kueue's CRDs and admission webhooks from the manifests of the
pinned module (copied into ``.cache/kueue`` by ``tests/cluster/build.sh``) and runs
``.cache/bin/kueue`` as a component of a running ``ControlPlane``::

    with ControlPlane() as cp, KueueManager(cp) as kueue:
        ...  # suspended Jobs labelled kueue.x-k8s.io/queue-name are admitted by Kueue

How the webhooks are reached. In a cluster the API server calls Kueue's webhooks through
the Service ``kueue-webhook-service``; here there are no Service networking and no pods,
and Endpoints may not point at loopback addresses. So the webhook configurations (and
the CRDs' conversion webhooks) carry ``url: https://127.0.0.1:<port>/<path>``, the
manager serves on that address, and its certificate names both 127.0.0.1 and the Service.

Why that certificate goes through Kueue's internal certificate management rather than
around it: with ``internalCertManagement.enable: false`` the manager insists on a metrics
certificate at the fixed path /etc/kueue/metrics/certs, outside any test directory. With
it enabled, Kueue keeps the CA and serving certificate in the Secret
``kueue-system/kueue-webhook-server-cert``, injects the CA into the webhook configurations
and CRDs, and rotates only what is invalid. Seeding that Secret with our own CA and a
certificate that is valid for the Service name (and also for 127.0.0.1) makes Kueue keep
it; the same files in the manager's ``certDir`` stand in for the mounted Secret.

Only the webhooks of Kueue's own kinds and of the one integration enabled here
(``batch/job``) are installed. Kueue answers the webhooks of disabled integrations with
no-ops; installing them would put every Pod, Deployment and StatefulSet created in the
test session behind a webhook (with failurePolicy Fail) for nothing.
"""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from controlplane import (
    DEFAULT_BIN_DIR,
    REPO_ROOT,
    ControlPlane,
    ControlPlaneError,
    _free_port,
    pinned_version,
    wait_for,
)
from kubernetes import client
from kubernetes.client.exceptions import ApiException

DEFAULT_CONFIG_DIR = REPO_ROOT / ".cache" / "kueue"
NAMESPACE = "kueue-system"
# The names Kueue's internal certificate management expects (its defaults): it derives
# the webhook configurations' names from the Service's.
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
MUTATING = "kueue-mutating-webhook-configuration"
VALIDATING = "kueue-validating-webhook-configuration"
# Kueue's integration for plain batch/v1 Jobs, which kubetrain's stages are.
FRAMEWORKS = ["batch/job"]
_WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}

try:
    _YamlLoader: Any = yaml.CSafeLoader  # the workloads CRD alone is 1.4 MB of YAML
except AttributeError:
    _YamlLoader = yaml.SafeLoader


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_YamlLoader) if d]


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the openssl CLI is needed to generate Kueue's certificates")
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


class KueueManager:
    """Kueue (CRDs, webhooks, manager) on ``control_plane``, until ``stop()``."""

    def __init__(
        self,
        control_plane: ControlPlane,
        bin_dir: Path | None = None,
        config_dir: Path | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.cp = control_plane
        self.binary = (bin_dir or DEFAULT_BIN_DIR) / "kueue"
        self.config_dir = config_dir or DEFAULT_CONFIG_DIR
        self.start_timeout = start_timeout
        missing = [
            str(p)
            for p in (
                self.binary,
                self.config_dir / "VERSION",
                self.config_dir / "crd" / "bases",
                self.config_dir / "webhook",
            )
            if not p.exists()
        ]
        if missing:
            raise ControlPlaneError(
                "Kueue is not built: missing "
                + ", ".join(missing)
                + "\nrun `make cluster-bin` (tests/cluster/build.sh) to build it"
            )
        self.version = (self.config_dir / "VERSION").read_text().strip()
        if self.version != pinned_version("kueue"):
            raise ControlPlaneError(
                f"{self.config_dir} holds Kueue {self.version}'s manifests, but "
                f"tests/cluster/kueue/go.mod pins {pinned_version('kueue')}: "
                "run `make cluster-bin`"
            )
        self.workdir = self.cp.workdir / "kueue"
        self.webhook_url = ""
        #: The manager's log file (once started).
        self.log_path = Path()
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    def __enter__(self) -> KueueManager:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Install CRDs, certificates and webhooks, start the manager, wait until its
        webhooks answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            self._start()
        except BaseException:
            # Webhook configurations left behind would refuse every Job of the session.
            self.stop()
            raise

    def _start(self) -> None:
        webhook_port, health_port = _free_port(), _free_port()
        self.webhook_url = f"https://127.0.0.1:{webhook_port}"
        api = self.cp.api_client()
        ca_bundle = self._make_certificates()
        self._install_crds(api, ca_bundle)
        self._seed_certificate_secret(api)
        self._install_webhooks(api, ca_bundle)
        config = self._write_config(webhook_port, health_port)
        component = self.cp.spawn(
            "kueue",
            [
                str(self.binary),
                f"--config={config}",
                f"--kubeconfig={self.cp.kubeconfig}",
                # An aggregated API for queue positions the tests do not use; it would
                # bind a port on every interface.
                "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=info",
            ],
        )
        self._process, self.log_path = component.process, component.log_path
        self._wait_ready(health_port, api)

    def stop(self) -> None:
        """Remove the webhook configurations (so that the cluster keeps admitting Jobs
        without Kueue), then stop the manager. CRDs and Kueue's objects stay."""
        if not self._started:
            return
        self._started = False
        admission = client.AdmissionregistrationV1Api(self.cp.api_client())
        for delete, name in (
            (admission.delete_mutating_webhook_configuration, MUTATING),
            (admission.delete_validating_webhook_configuration, VALIDATING),
        ):
            try:
                delete(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        if self._process is not None:
            self._process = None
            self.cp.stop_component("kueue")

    def logs(self, lines: int = 60) -> str:
        return self.cp.logs("kueue", lines)

    # -- installation -------------------------------------------------------

    def _make_certificates(self) -> str:
        """A CA and a serving certificate for 127.0.0.1 and the webhook Service; the CA
        (PEM) is returned. Kueue's certificate management reads the CA key as PKCS#1 RSA
        and checks the CA for the name ``kueue-ca`` and validity beyond 90 days."""
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        days = "3650"
        _openssl("genrsa", "-traditional", "-out", str(pki / "ca.key"), "2048")
        _openssl(
            "req", "-x509", "-new", "-key", str(pki / "ca.key"), "-days", days,
            "-subj", "/O=kueue/CN=kueue-ca", "-out", str(pki / "ca.crt"),
            "-addext", "subjectAltName=DNS:kueue-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        )  # fmt: skip
        ext = pki / "tls.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName=IP:127.0.0.1,DNS:{SERVICE}.{NAMESPACE}.svc\n"
        )
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(pki / "tls.key"), "-out", str(pki / "tls.csr"),
            "-subj", f"/CN={SERVICE}.{NAMESPACE}.svc",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(pki / "tls.csr"), "-CA", str(pki / "ca.crt"),
            "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", days,
            "-extfile", str(ext), "-out", str(pki / "tls.crt"),
        )  # fmt: skip
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            shutil.copy(pki / name, certs / name)
        return (pki / "ca.crt").read_text()

    def _install_crds(self, api: client.ApiClient, ca_bundle: str) -> None:
        """Every CRD of Kueue's manifests, with the conversion webhooks its kustomization
        enables (config/components/crd/kustomization.yaml) pointed at the manager."""
        crd_dir = self.config_dir / "crd"
        kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
        conversions = set()
        for patch in kustomization.get("patches") or []:
            (doc,) = _load_all(crd_dir / patch["path"])
            if doc["spec"].get("conversion", {}).get("strategy") == "Webhook":
                conversions.add(doc["metadata"]["name"])
        ext = client.ApiextensionsV1Api(api)
        names = []
        for path in sorted((crd_dir / "bases").glob("*.yaml")):
            for crd in _load_all(path):
                if crd["metadata"]["name"] in conversions:
                    crd["spec"]["conversion"] = {
                        "strategy": "Webhook",
                        "webhook": {
                            "clientConfig": self._client_config("/convert", ca_bundle),
                            "conversionReviewVersions": ["v1"],
                        },
                    }
                names.append(crd["metadata"]["name"])
                # No model round trip: the workloads CRD is large and slow to decode.
                ext.create_custom_resource_definition(crd, _preload_content=False)

        def established() -> bool:
            for name in names:
                crd = ext.read_custom_resource_definition_status(name)
                conditions = {c.type: c.status for c in crd.status.conditions or []}
                if conditions.get("Established") != "True":
                    return False
            return True

        wait_for("Kueue's CRDs to be Established", established, self.start_timeout)

    def _seed_certificate_secret(self, api: client.ApiClient) -> None:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        pki = self.workdir / "pki"
        data = {
            name: base64.b64encode((pki / name).read_bytes()).decode()
            for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")
        }
        core.create_namespaced_secret(
            NAMESPACE,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name=SECRET), type="kubernetes.io/tls", data=data
            ),
        )

    def _client_config(self, path: str, ca_bundle: str) -> dict[str, str]:
        return {
            "url": f"{self.webhook_url}{path}",
            "caBundle": base64.b64encode(ca_bundle.encode()).decode(),
        }

    def _install_webhooks(self, api: client.ApiClient, ca_bundle: str) -> None:
        """Kueue's webhook configurations (config/components/webhook/manifests.yaml),
        named as its kustomization names them, for Kueue's kinds and batch Jobs."""
        admission = client.AdmissionregistrationV1Api(api)
        create = {
            "MutatingWebhookConfiguration": (
                MUTATING,
                admission.create_mutating_webhook_configuration,
            ),
            "ValidatingWebhookConfiguration": (
                VALIDATING,
                admission.create_validating_webhook_configuration,
            ),
        }
        for doc in _load_all(self.config_dir / "webhook" / "manifests.yaml"):
            name, create_fn = create[doc["kind"]]
            config = copy.deepcopy(doc)
            config["metadata"] = {"name": name}
            config["webhooks"] = []
            for webhook in doc["webhooks"]:
                groups = {g for rule in webhook["rules"] for g in rule["apiGroups"]}
                if not groups <= _WEBHOOK_GROUPS:
                    continue
                path = webhook["clientConfig"]["service"]["path"]
                config["webhooks"].append(
                    {**webhook, "clientConfig": self._client_config(path, ca_bundle)}
                )
            create_fn(config)

    def _write_config(self, webhook_port: int, health_port: int) -> Path:
        """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for this cluster."""
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            # "0": no metrics server (and no port to collide over).
            "metrics": {"bindAddress": "0"},
            "webhook": {
                "host": "127.0.0.1",
                "port": webhook_port,
                "certDir": str(self.workdir / "certs"),
            },
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": SERVICE,
                "webhookSecretName": SECRET,
            },
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": FRAMEWORKS},
        }
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _wait_ready(self, health_port: int, api: client.ApiClient) -> None:
        """Ready when its /readyz says so (certificates in place, webhook server up) and
        the API server gets through to a webhook: a dry-run create that Kueue's
        ResourceFlavor webhooks must answer."""

        def alive() -> None:
            code = self._process.poll() if self._process else None
            if code is not None:
                raise ControlPlaneError(f"kueue exited with code {code}\n{self.logs()}")

        def ready() -> bool:
            alive()
            try:
                url = f"http://127.0.0.1:{health_port}/readyz"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        def webhooks_answer() -> bool:
            alive()
            probe = {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ResourceFlavor",
                "metadata": {"name": "webhook-probe"},
            }
            client.CustomObjectsApi(api).create_cluster_custom_object(
                "kueue.x-k8s.io", "v1beta2", "resourceflavors", probe, dry_run="All"
            )
            return True

        wait_for("Kueue's /readyz", ready, self.start_timeout, detail=self.logs)
        wait_for(
            "the API server to reach Kueue's webhooks",
            webhooks_answer,
            self.start_timeout,
            detail=self.logs,
        )
