"""The only operator code that talks to the Kubernetes API (kubernetes client, sync).

Objects come back as plain dicts (the wire form), which is what ``kubetrain.operator.plan``
takes. Creating what exists (409) and deleting what is gone (404) count as success:
the plan is level-based, so a retry after a partial failure must be harmless.

Every request has a connect and a read timeout, so a silently dropped connection fails
the request instead of hanging the worker that made it. Writes to a run carry the
resourceVersion it was read at (optimistic concurrency): a replica acting on an old copy
gets a ``Conflict`` instead of overwriting what another wrote. Job deletes carry the uid
of the Job that was observed, so that a late delete never hits the Job's successor.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from kubetrain.operator.informer import WatchError
from kubetrain.operator.resources import LABEL_RUN

# Identifies the operator's requests in the API server's audit log and metrics.
USER_AGENT = "kubetrain-operator"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class NoClusterError(RuntimeError):
    """No kubeconfig and not in a cluster; the message says what to do."""


class Conflict(RuntimeError):
    """The object changed since the copy the write was based on (HTTP 409): nothing was
    written; act again on the newer copy."""


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


def api_client(
    configuration: client.Configuration, user_agent: str | None = None
) -> client.ApiClient:
    """A client for ``configuration`` without urllib3's own retries: a request that
    times out fails after its timeout (the operator retries with backoff) instead of
    after four of them, which would make a dead watch go unnoticed for minutes."""
    configuration.retries = False
    out = client.ApiClient(configuration)
    if user_agent:
        out.user_agent = user_agent
    return out


def _json_object(value: object) -> dict[str, Any]:
    """A decoded JSON object from the client (custom-object calls are typed ``object``)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API server, got {type(value).__name__}")
    return value


class KubeApi:
    """What the operator does with the API, one method per call. ``on_request`` is told
    (verb, resource) of every request sent, for the operator's metrics."""

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        component: str = "kubetrain-operator",
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        on_request: Callable[[str, str], None] | None = None,
    ):
        self.client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.client)
        self.batch = client.BatchV1Api(self.client)
        self.core = client.CoreV1Api(self.client)
        self.component = component
        self.connect_timeout = connect_timeout
        self.timeout = (connect_timeout, read_timeout)
        self._on_request = on_request

    def _count(self, verb: str, resource: str) -> None:
        if self._on_request is not None:
            self._on_request(verb, resource)

    def _plain(self, obj: object) -> dict[str, Any]:
        return _json_object(self.client.sanitize_for_serialization(obj))

    @staticmethod
    def _selector(run: str) -> str:
        return f"{LABEL_RUN}={run}"

    # ---- plain requests (lists and watches of any kind, Leases)
    def _send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        read_timeout: float | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        timeout = (self.connect_timeout, read_timeout or self.timeout[1])
        return self.client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=timeout
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer is one JSON object; errors raise ApiException."""
        resp = self._send(method, path, **kwargs)
        data = resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(status=resp.status, reason=resp.reason, body=data.decode())
        return _json_object(json.loads(data))

    def list_objects(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """One page of a list (for the informers)."""
        self._count("list", path.rsplit("/", 1)[-1])
        try:
            return self._request("GET", path, query=params)
        except ApiException as exc:
            raise WatchError(exc.status or 0, _status_message(exc.body)) from None

    def watch_objects(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> Iterator[dict[str, Any]]:
        """The events of one watch request (for the informers), until the server ends
        it; a read that waits longer than ``read_timeout`` raises."""
        self._count("watch", path.rsplit("/", 1)[-1])
        resp = self._send("GET", path, query=params, read_timeout=read_timeout)
        raw = resp.response
        try:
            if not 200 <= resp.status <= 299:
                raise WatchError(resp.status, _status_message(resp.read().decode()))
            buffer = b""
            for chunk in raw.stream(amt=None, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _json_object(json.loads(line))
        finally:
            # Closed rather than returned half-read to the pool, where the next request
            # would read this watch's leftovers.
            raw.close()
            raw.release_conn()

    def served_version(self, group: str, versions: tuple[str, ...]) -> str | None:
        """The first of ``versions`` the API server serves for ``group`` (discovery,
        open to every authenticated client); None when it serves none of them."""
        try:
            found = self._request("GET", f"/apis/{group}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        served = {str(v.get("version")) for v in found.get("versions") or []}
        return next((v for v in versions if v in served), None)

    def may_list(self, path: str) -> bool:
        """Whether a list of ``path`` is allowed (one object asked for); False on 403."""
        try:
            self._request("GET", path, query={"limit": "1"})
        except ApiException as exc:
            if exc.status == 403:
                return False
            raise
        return True

    # ---- runs
    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json_object(
                self.custom.get_namespaced_custom_object(
                    api.GROUP,
                    api.VERSION,
                    namespace,
                    api.PLURAL,
                    name,
                    _request_timeout=self.timeout,
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_runs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace:
            out = self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, _request_timeout=self.timeout
            )
        else:
            out = self.custom.list_cluster_custom_object(
                api.GROUP, api.VERSION, api.PLURAL, _request_timeout=self.timeout
            )
        return list(_json_object(out).get("items") or [])

    def patch_run_metadata(
        self, namespace: str, name: str, metadata: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        """Merge ``metadata`` (annotations, finalizers) into the run, if it is still at
        ``resource_version``; the run as written. ``Conflict`` when it changed."""
        self._count("patch", api.PLURAL)
        body = {"metadata": {**metadata, "resourceVersion": resource_version}}
        return self._patch_run(
            lambda: self.custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                body,
                _request_timeout=self.timeout,
            )
        )

    def patch_run_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        """Write the run's status, if the run is still at ``resource_version``; the run
        as written. ``Conflict`` when it changed."""
        # Merge patch: lists (stages, conditions) are replaced whole, which is what a
        # status computed from scratch needs.
        self._count("patch", f"{api.PLURAL}/status")
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return self._patch_run(
            lambda: self.custom.patch_namespaced_custom_object_status(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                body,
                _request_timeout=self.timeout,
            )
        )

    @staticmethod
    def _patch_run(call: Callable[[], object]) -> dict[str, Any]:
        try:
            return _json_object(call())
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(_status_message(exc.body)) from None
            raise

    # ---- children
    def list_jobs(self, namespace: str, run: str) -> list[dict[str, Any]]:
        jobs = self.batch.list_namespaced_job(
            namespace, label_selector=self._selector(run), _request_timeout=self.timeout
        )
        return [self._plain(j) for j in jobs.items]

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Job or Service by name, whoever owns it; None when there is none."""
        try:
            if kind == "Job":
                self._count("get", "jobs")
                obj: object = self.batch.read_namespaced_job(
                    name, namespace, _request_timeout=self.timeout
                )
            elif kind == "Service":
                self._count("get", "services")
                obj = self.core.read_namespaced_service(
                    name, namespace, _request_timeout=self.timeout
                )
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
                self._count("create", "jobs")
                self.batch.create_namespaced_job(
                    ns, client.V1Job.model_validate(obj), _request_timeout=self.timeout
                )
            elif obj["kind"] == "Service":
                self._count("create", "services")
                self.core.create_namespaced_service(
                    ns, client.V1Service.model_validate(obj), _request_timeout=self.timeout
                )
            else:
                raise ValueError(f"cannot create a {obj['kind']}")
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(
        self, kind: str, namespace: str, name: str, propagation: str, uid: str | None = None
    ) -> bool:
        """Delete a Job or Service (only the one with ``uid``, when given); False when it
        was already gone or replaced by another of the same name."""
        body = client.V1DeleteOptions(
            propagation_policy=propagation,
            preconditions=client.V1Preconditions(uid=uid) if uid else None,
        )
        try:
            if kind == "Job":
                self._count("delete", "jobs")
                self.batch.delete_namespaced_job(
                    name, namespace, body=body, _request_timeout=self.timeout
                )
            elif kind == "Service":
                self._count("delete", "services")
                self.core.delete_namespaced_service(
                    name, namespace, body=body, _request_timeout=self.timeout
                )
            else:
                raise ValueError(f"cannot delete a {kind}")
        except ApiException as exc:
            # 409: the uid precondition failed, the object is a newer one of that name.
            if exc.status in (404, 409):
                return False
            raise
        return True

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's data, decoded. Callers keep it in memory only."""
        self._count("get", "secrets")
        secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=self.timeout)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    # ---- leases (leader election)
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._count("get", "leases")
        try:
            return self._request("GET", f"{LEASES.format(namespace=namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        """Create the Lease; ``Conflict`` when another replica created it first."""
        self._count("create", "leases")
        try:
            return self._request(
                "POST",
                LEASES.format(namespace=namespace),
                body=lease,
                content_type="application/json",
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(_status_message(exc.body)) from None
            raise

    def replace_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        """Replace the Lease (its metadata.resourceVersion is the precondition);
        ``Conflict`` when another replica wrote it meanwhile."""
        self._count("update", "leases")
        name = lease["metadata"]["name"]
        try:
            return self._request(
                "PUT",
                f"{LEASES.format(namespace=namespace)}/{name}",
                body=lease,
                content_type="application/json",
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(_status_message(exc.body)) from None
            raise

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
        self._count("create", "events")
        self.core.create_namespaced_event(meta["namespace"], event, _request_timeout=self.timeout)


def _status_message(body: str | None) -> str:
    """The message of a Status answer (or the raw body)."""
    try:
        return str(json.loads(body or "{}").get("message") or body)
    except ValueError:
        return body or ""
