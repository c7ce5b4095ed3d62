"""KubeApi against a stand-in API server on 127.0.0.1: the requests it sends (paths,
bodies in wire form) and how it reads answers, including the 404 and 409 it treats as
success."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from kubetrain.operator import resources
from kubetrain.operator.kube import KubeApi
from tests.unit.test_resources import job, spec_dict

Route = tuple[int, Any]


class FakeApiServer:
    """Answers each (method, path) from ``routes`` (404 otherwise) and records what it
    was sent, body decoded."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.received: list[tuple[str, str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = self.path.split("?")[0]
                server.received.append((self.command, path, body))
                status, answer = server.routes.get((self.command, path), (404, None))
                if answer is None:
                    answer = {"kind": "Status", "apiVersion": "v1", "code": status}
                if answer == "echo":
                    answer = body
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


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
def kube(apiserver: FakeApiServer) -> KubeApi:
    return KubeApi(client.ApiClient(client.Configuration(host=apiserver.url)))


RUN_PATH = "/apis/kubetrain.dev/v1alpha1/namespaces/ml/trainingruns/demo"
JOBS_PATH = "/apis/batch/v1/namespaces/ml/jobs"
SERVICES_PATH = "/api/v1/namespaces/ml/services"


def test_create_posts_the_manifest_in_wire_form(apiserver: FakeApiServer, kube: KubeApi) -> None:
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


def test_list_runs_and_services(apiserver: FakeApiServer, kube: KubeApi) -> None:
    runs = [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]
    apiserver.routes[("GET", "/apis/kubetrain.dev/v1alpha1/namespaces/ml/trainingruns")] = (
        200,
        {"items": runs},
    )
    apiserver.routes[("GET", SERVICES_PATH)] = (
        200,
        {"items": [{"metadata": {"name": "demo-pretrain"}}, {"metadata": {"name": "demo-sft"}}]},
    )
    assert kube.list_runs("ml") == runs
    services = kube.list_services("ml", "demo")
    assert [s["metadata"]["name"] for s in services] == ["demo-pretrain", "demo-sft"]


def test_get_child_reads_by_name_whoever_owns_it(apiserver: FakeApiServer, kube: KubeApi) -> None:
    theirs = job(spec_dict(), run="other")
    apiserver.routes[("GET", f"{JOBS_PATH}/demo-pretrain")] = (200, theirs)
    got = kube.get_child("Job", "ml", "demo-pretrain")
    assert (
        got is not None
        and got["metadata"]["ownerReferences"] == theirs["metadata"]["ownerReferences"]
    )
    assert kube.get_child("Service", "ml", "demo-pretrain") is None  # 404


def test_secret_data_is_decoded_and_its_version_read(
    apiserver: FakeApiServer, kube: KubeApi
) -> None:
    apiserver.routes[("GET", "/api/v1/namespaces/ml/secrets/s3-creds")] = (
        200,
        {
            "metadata": {"name": "s3-creds", "resourceVersion": "42"},
            "data": {"accessKeyId": "QUtJQQ=="},
        },
    )
    assert kube.read_secret("ml", "s3-creds") == {"accessKeyId": "AKIA"}
    assert kube.secret_version("ml", "s3-creds") == "42"
