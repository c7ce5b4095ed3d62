"""``kubetrain operator``: the process the Helm chart runs (two replicas by default).

What it runs is ``kubetrain.operator.controller.Controller``: informers instead of
per-reconcile requests, a fair work queue served by ``workers`` threads, and a Lease so
that exactly one replica acts. It needs no finalizer and no bookkeeping annotation on
the runs (children are owned through ownerReferences), so deleting a run or its
namespace never waits for the operator, also while it is down or uninstalled.

/healthz (``--liveness-port``) answers 200 while every thread is alive and no reconcile
is stuck, 500 with the reasons otherwise; metrics are served on ``--metrics-port``.
SIGTERM finishes the reconciles under way, hands the Lease back so that another replica
takes over at once, and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubetrain.core.errors import UserError
from kubetrain.operator.config import ConfigError, OperatorConfig, load_config

log = logging.getLogger("kubetrain.operator")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def identity(environ: Mapping[str, str] = os.environ) -> str:
    """This replica's name in the Lease: the pod's name ($POD_NAME, set by the chart),
    else host and process (two operators started by hand on one machine differ)."""
    return environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def lease_namespace(
    config: OperatorConfig,
    namespaces: Sequence[str],
    environ: Mapping[str, str] = os.environ,
    service_account_namespace: Path = SERVICE_ACCOUNT_NAMESPACE,
) -> str:
    """Where the Lease lives: ``leaseNamespace``, else the operator pod's namespace,
    else the first watched namespace, else default."""
    if config.lease_namespace:
        return config.lease_namespace
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    if service_account_namespace.is_file():
        return service_account_namespace.read_text().strip()
    return namespaces[0] if namespaces else "default"


def serve_health(port: int, problems: Callable[[], list[str]], addr: str = "0.0.0.0") -> None:
    """Serve GET /healthz on ``port`` in a background thread: 200 ``ok`` when
    ``problems()`` is empty, else 500 and one problem per line."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            found = problems()
            body = ("\n".join(found) if found else "ok").encode() + b"\n"
            self.send_response(500 if found else 200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the kubelet probes every few seconds

    server = ThreadingHTTPServer((addr, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubetrain")
    except PackageNotFoundError:
        return "dev"


def kueue_version(kube_api: Any, namespaces: Sequence[str]) -> str | None:
    """The Kueue API version whose Workloads the operator watches: the one served, when
    the operator may list Workloads in every namespace it watches; None otherwise (the
    queue of a run still works, the condition Queued then lacks Kueue's reason). Kueue
    installed later is seen after a restart of the operator."""
    from kubetrain.operator.controller import KUEUE_GROUP, KUEUE_VERSIONS, workloads_resource

    version: str | None = kube_api.served_version(KUEUE_GROUP, KUEUE_VERSIONS)
    if version is None:
        log.info("Kueue is not installed (no %s API): runs cannot name a queue", KUEUE_GROUP)
        return None
    resource = workloads_resource(version)
    scopes: Sequence[str | None] = namespaces or [None]  # None: every namespace
    denied = [ns or "all namespaces" for ns in scopes if not kube_api.may_list(resource.path(ns))]
    if denied:
        log.warning(
            "Kueue %s is installed but the operator may not list its Workloads in %s: "
            "queued stages show no reason from Kueue (grant list and watch on "
            "workloads.%s, chart value kueue.watchWorkloads)",
            version,
            ", ".join(denied),
            KUEUE_GROUP,
        )
        return None
    log.info("Kueue %s is installed: watching its Workloads", version)
    return version


def cli_operator(args: argparse.Namespace) -> int:
    """Run the operator until SIGTERM/SIGINT."""
    from kubetrain.operator import handlers, kube
    from kubetrain.operator.controller import Controller
    from kubetrain.operator.metrics import OperatorMetrics

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers.silence_credential_loggers()
    try:
        client_config = kube.load_client_config(args.kubeconfig)
    except kube.NoClusterError as exc:
        raise UserError(str(exc)) from None

    me = identity()
    metrics = OperatorMetrics()
    kube_api = kube.KubeApi(
        kube.api_client(client_config, f"{kube.USER_AGENT}/{_version()} ({me})"),
        connect_timeout=config.api_connect_timeout_seconds,
        read_timeout=config.api_read_timeout_seconds,
        on_request=metrics.count_request,
    )
    namespaces = list(args.namespace or [])
    controller = Controller(
        kube_api,
        config,
        metrics,
        namespaces=namespaces,
        identity=me,
        lease_namespace=lease_namespace(config, namespaces),
        kueue_version=kueue_version(kube_api, namespaces),
    )
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    if args.liveness_port:
        serve_health(args.liveness_port, controller.health)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "kubetrain operator %s starting: %s, %d workers, %s",
        me,
        f"namespaces {', '.join(namespaces)}" if namespaces else "all namespaces",
        config.workers,
        f"Lease {controller.elector.namespace}/{controller.elector.name}"
        if controller.elector
        else "no leader election",
    )
    controller.start()
    while not stop.wait(1.0):
        pass
    log.info("stopping: finishing the reconciles under way")
    # Within the pod's grace period (30 s by default), leaving time to hand the Lease on.
    controller.stop(grace=20.0)
    return 0
