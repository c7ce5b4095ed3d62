"""``kubetrain operator``: the process the Helm chart runs (one replica).

Kopf settings, and why:
- progress and the last-handled spec live in annotations (``kubetrain.dev/...``), not in
  status, so that status holds only what users read;
- no finalizers: children carry ownerReferences and the garbage collector removes them;
- standalone (no peering objects needed): there is exactly one replica;
- ``posting.level`` WARNING: events users see are the ones the operator posts on
  purpose (StageStarted, BudgetExceeded ...), not every log line;
- watches are renewed every ``serverTimeoutSeconds`` so a silently dropped connection
  cannot leave the operator deaf;
- Jobs and Pods are watched with a server-side label selector (only kubetrain's).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from kubetrain.core.errors import UserError
from kubetrain.operator.config import ConfigError, load_config


def cli_operator(args: argparse.Namespace) -> int:
    """Run the operator until SIGTERM/SIGINT."""
    import kopf

    from kubetrain.operator import handlers, kube, resources
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
    if args.kubeconfig:
        # The kubernetes client in this process and anything it spawns use the same file.
        os.environ["KUBECONFIG"] = args.kubeconfig
    try:
        client_config = kube.load_client_config(args.kubeconfig)
    except kube.NoClusterError as exc:
        raise UserError(str(exc)) from None

    registry = kopf.OperatorRegistry()
    metrics = OperatorMetrics()
    reconciler = handlers.Reconciler(kube.KubeApi(), config, metrics)
    handlers.register(registry, reconciler, config)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The credentials loaded above (--kubeconfig, in-cluster or ~/.kube), so the
        # watch streams and the client calls always talk to the same cluster as the same
        # user.
        header = (
            client_config.get_api_key_with_prefix("BearerToken")
            or client_config.get_api_key_with_prefix("authorization")
            or ""
        )
        parts = header.split(" ", 1)
        scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, header or None)
        return kopf.ConnectionInfo(
            server=client_config.host,
            ca_path=client_config.ssl_ca_cert,
            insecure=not client_config.verify_ssl,
            scheme=scheme,
            token=token,
            username=client_config.username or None,
            password=client_config.password or None,
            certificate_path=client_config.cert_file,
            private_key_path=client_config.key_file,
        )

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="kubetrain.dev"
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kubetrain.dev", key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "kubetrain-operator"
        settings.watching.server_timeout = config.server_timeout_seconds
        settings.watching.client_timeout = config.server_timeout_seconds + 30
        settings.watching.label_selectors["batch", "v1", "jobs"] = resources.LABEL_RUN
        settings.watching.label_selectors["", "v1", "pods"] = resources.LABEL_RUN
        settings.peering.standalone = True

    if args.metrics_port:
        metrics.serve(args.metrics_port)
    namespaces = list(args.namespace or [])
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=(
            f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
        ),
    )
    return 0
