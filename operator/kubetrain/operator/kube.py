"""The only operator code that talks to the Kubernetes API (kubernetes client, sync).

Objects come back as plain dicts (the wire form), which is what ``kubetrain.operator.plan``
takes. Creating what exists (409) and deleting what is gone (404) count as success:
the plan is level-based, so a retry after a partial failure must be harmless.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from kubetrain.operator.resources import LABEL_RUN


class NoClusterError(RuntimeError):
    """No kubeconfig and not in a cluster; the message says what to do."""


def load_client_config(kubeconfig: str | None = None) -> client.Configuration:
    """Load credentials (``kubeconfig``, else in-cluster, else $KUBECONFIG or
    ~/.kube/config) into the client's default configuration and return it."""
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config()
    except (config.ConfigException, FileNotFoundError, TypeError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise NoClusterError(
            f"no Kubernetes cluster configured ({where}: {exc}); "
            "pass --kubeconfig or set KUBECONFIG"
        ) from None
    return client.Configuration.get_default_copy()


def _json_object(value: object) -> dict[str, Any]:
    """A decoded JSON object from the client (custom-object calls are typed ``object``)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API server, got {type(value).__name__}")
    return value


class KubeApi:
    """What the operator does with the API, one method per call."""

    def __init__(
        self, api_client: client.ApiClient | None = None, component: str = "kubetrain-operator"
    ):
        self.client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.client)
        self.batch = client.BatchV1Api(self.client)
        self.core = client.CoreV1Api(self.client)
        self.component = component

    def _plain(self, obj: object) -> dict[str, Any]:
        return _json_object(self.client.sanitize_for_serialization(obj))

    @staticmethod
    def _selector(run: str) -> str:
        return f"{LABEL_RUN}={run}"

    # ---- runs
    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json_object(
                self.custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_runs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace:
            out = self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL
            )
        else:
            out = self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)
        return list(_json_object(out).get("items") or [])

    def patch_run_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Set annotations; a None value removes one (merge patch)."""
        self.custom.patch_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            name,
            {"metadata": {"annotations": annotations}},
        )

    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        # Merge patch: lists (stages, conditions) are replaced whole, which is what a
        # status computed from scratch needs.
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}
        )

    # ---- children
    def list_jobs(self, namespace: str, run: str) -> list[dict[str, Any]]:
        jobs = self.batch.list_namespaced_job(namespace, label_selector=self._selector(run))
        return [self._plain(j) for j in jobs.items]

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=self._selector(run))
        return [self._plain(p) for p in pods.items]

    def list_services(self, namespace: str, run: str) -> list[dict[str, Any]]:
        svcs = self.core.list_namespaced_service(namespace, label_selector=self._selector(run))
        return [self._plain(s) for s in svcs.items]

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Job or Service by name, whoever owns it; None when there is none."""
        try:
            if kind == "Job":
                obj: object = self.batch.read_namespaced_job(name, namespace)
            elif kind == "Service":
                obj = self.core.read_namespaced_service(name, namespace)
            else:
                raise ValueError(f"cannot read a {kind}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self._plain(obj)

    def create(self, obj: dict[str, Any]) -> bool:
        """Create a Job or Service (a manifest in wire form); False when it already existed."""
        ns = obj["metadata"]["namespace"]
        try:
            if obj["kind"] == "Job":
                self.batch.create_namespaced_job(ns, client.V1Job.model_validate(obj))
            elif obj["kind"] == "Service":
                self.core.create_namespaced_service(ns, client.V1Service.model_validate(obj))
            else:
                raise ValueError(f"cannot create a {obj['kind']}")
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, kind: str, namespace: str, name: str, propagation: str) -> bool:
        """Delete a Job or Service; False when it was already gone."""
        body = client.V1DeleteOptions(propagation_policy=propagation)
        try:
            if kind == "Job":
                self.batch.delete_namespaced_job(name, namespace, body=body)
            elif kind == "Service":
                self.core.delete_namespaced_service(name, namespace, body=body)
            else:
                raise ValueError(f"cannot delete a {kind}")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's data, decoded. Callers keep it in memory only."""
        secret = self.core.read_namespaced_secret(name, namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def secret_version(self, namespace: str, name: str) -> str:
        secret = self.core.read_namespaced_secret(name, namespace)
        return (secret.metadata.resource_version if secret.metadata else None) or ""

    # ---- events
    def emit_event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = run["metadata"]
        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=api.API_VERSION,
                kind=api.KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=self.component),
            reporting_component=self.component,
            reporting_instance=self.component,
        )
        self.core.create_namespaced_event(meta["namespace"], event)
