"""KubeApi against a stand-in API server on 127.0.0.1: the requests it sends (paths,
query, bodies in wire form), how it reads answers (including the 404 and 409 it treats
as success, and the 409 that means someone else wrote first), watch streams, and the
timeout every request carries."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client

from kubetrain.operator import resources
from kubetrain.operator.informer import WatchError
from kubetrain.operator.kube import Conflict, KubeApi, api_client
from tests.unit.test_resources import job, spec_dict

Route = tuple[int, Any]


class FakeApiServer:
    """Answers each (method, path) from ``routes`` (404 otherwise) and records what it
    was sent: method, path, body decoded, query. An answer that is a ``Stream`` is
    written as one JSON line per event, as a watch is."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.received: list[tuple[str, str, Any]] = []
        self.queries: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                url = urlsplit(self.path)
                server.received.append((self.command, url.path, body))
                server.queries.append(dict(parse_qsl(url.query)))
                status, answer = server.routes.get((self.command, url.path), (404, None))
                if answer is None:
                    answer = {"kind": "Status", "apiVersion": "v1", "code": status}
                if answer == "echo":
                    answer = body
                if isinstance(answer, Stream):
                    data = b"".join(json.dumps(e).encode() + b"\n" for e in answer.events)
                else:
                    data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


class Stream:
    def __init__(self, *events: dict[str, Any]):
        self.events = events


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    thread = threading.Thread(target=fake.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.httpd.shutdown()
        fake.httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def requests_sent() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def kube(apiserver: FakeApiServer, requests_sent: list[tuple[str, str]]) -> KubeApi:
    return KubeApi(
        api_client(client.Configuration(host=apiserver.url)),
        on_request=lambda verb, resource: requests_sent.append((verb, resource)),
    )


RUN_PATH = "/apis/kubetrain.dev/v1alpha1/namespaces/ml/trainingruns/demo"
JOBS_PATH = "/apis/batch/v1/namespaces/ml/jobs"
SERVICES_PATH = "/api/v1/namespaces/ml/services"
LEASES_PATH = "/apis/coordination.k8s.io/v1/namespaces/ops/leases"


def test_create_posts_the_manifest_in_wire_form(
    apiserver: FakeApiServer, kube: KubeApi, requests_sent: list[tuple[str, str]]
) -> None:
    apiserver.routes[("POST", JOBS_PATH)] = (201, "echo")
    apiserver.routes[("POST", SERVICES_PATH)] = (201, "echo")
    manifest = job(spec_dict())
    service = resources.build_service(run="demo", namespace="ml", uid="uid-1", stage="pretrain")

    assert kube.create(manifest) is True
    assert kube.create(service) is True

    assert apiserver.received == [
        ("POST", JOBS_PATH, manifest),
        ("POST", SERVICES_PATH, service),
    ]
    assert requests_sent == [("create", "jobs"), ("create", "services")]


def test_create_of_an_existing_object_is_not_an_error(
    apiserver: FakeApiServer, kube: KubeApi
) -> None:
    apiserver.routes[("POST", JOBS_PATH)] = (409, None)
    assert kube.create(job(spec_dict())) is False


def test_get_run_returns_the_object_or_none_when_gone(
    apiserver: FakeApiServer, kube: KubeApi
) -> None:
    run = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun", "metadata": {}}
    apiserver.routes[("GET", RUN_PATH)] = (200, run)
    assert kube.get_run("ml", "demo") == run
    assert kube.get_run("ml", "other") is None


def test_list_runs(apiserver: FakeApiServer, kube: KubeApi) -> None:
    runs = [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]
    apiserver.routes[("GET", "/apis/kubetrain.dev/v1alpha1/namespaces/ml/trainingruns")] = (
        200,
        {"items": runs},
    )
    assert kube.list_runs("ml") == runs


def test_get_child_reads_by_name_whoever_owns_it(
    apiserver: FakeApiServer, kube: KubeApi, requests_sent: list[tuple[str, str]]
) -> None:
    theirs = job(spec_dict(), run="other")
    apiserver.routes[("GET", f"{JOBS_PATH}/demo-pretrain")] = (200, theirs)
    got = kube.get_child("Job", "ml", "demo-pretrain")
    assert (
        got is not None
        and got["metadata"]["ownerReferences"] == theirs["metadata"]["ownerReferences"]
    )
    assert kube.get_child("Service", "ml", "demo-pretrain") is None  # 404
    assert requests_sent == [("get", "jobs"), ("get", "services")]


def test_secret_data_is_decoded(apiserver: FakeApiServer, kube: KubeApi) -> None:
    apiserver.routes[("GET", "/api/v1/namespaces/ml/secrets/s3-creds")] = (
        200,
        {"metadata": {"name": "s3-creds"}, "data": {"accessKeyId": "QUtJQQ=="}},
    )
    assert kube.read_secret("ml", "s3-creds") == {"accessKeyId": "AKIA"}


def test_run_writes_carry_the_resource_version_they_were_planned_from(
    apiserver: FakeApiServer, kube: KubeApi, requests_sent: list[tuple[str, str]]
) -> None:
    written = {"metadata": {"name": "demo", "resourceVersion": "8"}, "status": {"phase": "Running"}}
    apiserver.routes[("PATCH", RUN_PATH + "/status")] = (200, written)
    apiserver.routes[("PATCH", RUN_PATH)] = (200, written)

    assert kube.patch_run_status("ml", "demo", {"phase": "Running"}, "7") == written
    assert kube.patch_run_metadata("ml", "demo", {"annotations": {"a": "b"}}, "7") == written

    assert apiserver.received == [
        (
            "PATCH",
            RUN_PATH + "/status",
            {"metadata": {"resourceVersion": "7"}, "status": {"phase": "Running"}},
        ),
        ("PATCH", RUN_PATH, {"metadata": {"annotations": {"a": "b"}, "resourceVersion": "7"}}),
    ]
    assert requests_sent == [("patch", "trainingruns/status"), ("patch", "trainingruns")]


def test_a_write_based_on_an_old_copy_is_a_conflict_not_an_overwrite(
    apiserver: FakeApiServer, kube: KubeApi
) -> None:
    apiserver.routes[("PATCH", RUN_PATH + "/status")] = (
        409,
        {"kind": "Status", "code": 409, "message": "the object has been modified"},
    )
    with pytest.raises(Conflict, match="has been modified"):
        kube.patch_run_status("ml", "demo", {"phase": "Running"}, "7")


def test_job_deletes_name_the_uid_observed(apiserver: FakeApiServer, kube: KubeApi) -> None:
    apiserver.routes[("DELETE", f"{JOBS_PATH}/demo-pretrain")] = (200, {"kind": "Status"})
    assert kube.delete("Job", "ml", "demo-pretrain", "Foreground", uid="uid-7") is True
    _, _, body = apiserver.received[-1]
    assert body["propagationPolicy"] == "Foreground"
    assert body["preconditions"] == {"uid": "uid-7"}

    # 409: a newer Job of that name exists (the precondition failed); 404: already gone.
    apiserver.routes[("DELETE", f"{JOBS_PATH}/demo-pretrain")] = (409, None)
    assert kube.delete("Job", "ml", "demo-pretrain", "Foreground", uid="uid-7") is False
    apiserver.routes[("DELETE", f"{JOBS_PATH}/demo-pretrain")] = (404, None)
    assert kube.delete("Job", "ml", "demo-pretrain", "Foreground") is False


def test_list_pages_and_watch_streams_for_the_informers(
    apiserver: FakeApiServer, kube: KubeApi, requests_sent: list[tuple[str, str]]
) -> None:
    pods = "/api/v1/namespaces/ml/pods"
    page = {"metadata": {"resourceVersion": "5", "continue": "next"}, "items": [{"a": 1}]}
    apiserver.routes[("GET", pods)] = (200, page)
    assert kube.list_objects(pods, {"labelSelector": "kubetrain.dev/run", "limit": "2"}) == page
    assert apiserver.queries[-1] == {"labelSelector": "kubetrain.dev/run", "limit": "2"}

    events = [
        {"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "6"}}},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}},
    ]
    apiserver.routes[("GET", pods)] = (200, Stream(*events))
    params = {"watch": "true", "resourceVersion": "5", "timeoutSeconds": "60"}
    assert list(kube.watch_objects(pods, params, read_timeout=5)) == events
    assert apiserver.queries[-1] == params
    assert requests_sent == [("list", "pods"), ("watch", "pods")]

    apiserver.routes[("GET", pods)] = (410, {"kind": "Status", "code": 410, "message": "too old"})
    with pytest.raises(WatchError, match="too old") as gone:
        list(kube.watch_objects(pods, params, read_timeout=5))
    assert gone.value.status == 410
    with pytest.raises(WatchError) as listed:
        kube.list_objects(pods, {})
    assert listed.value.status == 410


def test_leases(apiserver: FakeApiServer, kube: KubeApi) -> None:
    lease = {"metadata": {"name": "kubetrain-operator", "resourceVersion": "3"}, "spec": {}}
    assert kube.get_lease("ops", "kubetrain-operator") is None
    apiserver.routes[("POST", LEASES_PATH)] = (201, "echo")
    assert kube.create_lease("ops", lease) == lease
    apiserver.routes[("PUT", f"{LEASES_PATH}/kubetrain-operator")] = (200, "echo")
    assert kube.replace_lease("ops", lease) == lease
    assert apiserver.received[-1] == ("PUT", f"{LEASES_PATH}/kubetrain-operator", lease)
    apiserver.routes[("PUT", f"{LEASES_PATH}/kubetrain-operator")] = (409, None)
    with pytest.raises(Conflict):
        kube.replace_lease("ops", lease)
    apiserver.routes[("POST", LEASES_PATH)] = (409, None)
    with pytest.raises(Conflict):
        kube.create_lease("ops", lease)


def test_a_silent_connection_fails_the_request_instead_of_hanging() -> None:
    """The server accepts the connection and never answers (a dropped connection looks
    like this): the request fails after its read timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        kube = KubeApi(api_client(client.Configuration(host=host)), read_timeout=0.5)
        for call in (
            lambda: kube.read_secret("ml", "s3-creds"),
            lambda: kube.get_lease("ops", "kubetrain-operator"),
            lambda: list(kube.watch_objects("/api/v1/pods", {"watch": "true"}, read_timeout=0.5)),
        ):
            started = time.monotonic()
            with pytest.raises(Exception, match=r"(?i)timed out"):
                call()
            # One timeout, not one per retry of the HTTP library.
            assert time.monotonic() - started < 1.5
    finally:
        listener.close()
