"""Informers against a scripted list/watch API: the copy they keep, the changes they
report (and the ones they do not: a pod's IP), continuing a watch where it stopped,
and listing again after 410 Gone, which reports what was deleted meanwhile."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from kubetrain.operator.informer import (
    Informer,
    Resource,
    WatchError,
    trim_job,
    trim_pod,
)

PODS = Resource("pods", "/api/v1", "pods")


def pod(name: str, rv: str, phase: str = "Running", ip: str = "10.0.0.1") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "labels": {"kubetrain.dev/run": "demo"},
            "ownerReferences": [{"uid": "job-1", "kind": "Job", "name": "demo-pretrain"}],
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {"nodeName": "gpu-0", "containers": [{"name": "trainer", "image": "x"}]},
        "status": {"phase": phase, "podIP": ip, "startTime": "2025-01-01T00:00:00Z"},
    }


class ScriptedApi:
    """Lists answer from ``pages``; each watch request takes the next script from
    ``watches`` (a list of events, or an exception to raise)."""

    def __init__(self) -> None:
        self.pages: list[dict[str, Any]] = []
        self.watches: list[list[dict[str, Any]] | Exception] = []
        self.list_params: list[dict[str, str]] = []
        self.watch_params: list[dict[str, str]] = []
        self.exhausted: Callable[[], None] = lambda: None

    def list_objects(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        self.list_params.append(dict(params))
        return self.pages.pop(0)

    def watch_objects(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> Iterator[dict[str, Any]]:
        self.watch_params.append(dict(params))
        if not self.watches:
            self.exhausted()
            return
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script


def page(items: list[dict[str, Any]], rv: str, token: str = "") -> dict[str, Any]:
    meta = {"resourceVersion": rv}
    if token:
        meta["continue"] = token
    return {"metadata": meta, "items": items}


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str | None]] = []

    def __call__(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        def describe(obj: dict[str, Any] | None) -> str | None:
            return None if obj is None else f"{obj['metadata']['name']}:{obj['status']['phase']}"

        self.changes.append((describe(old), describe(new)))


@pytest.fixture
def api() -> ScriptedApi:
    return ScriptedApi()


def informer(api: ScriptedApi, handler: Recorder) -> Informer:
    return Informer(
        api,
        PODS,
        "ml",
        handler,
        transform=trim_pod,
        label_selector="kubetrain.dev/run",
        page_size=2,
        sleep=lambda seconds: False,
    )


def test_lists_in_pages_then_watches_from_the_listed_version(api: ScriptedApi) -> None:
    seen = Recorder()
    inf = informer(api, seen)
    api.pages = [page([pod("a", "1"), pod("b", "2")], "", token="t1"), page([pod("c", "3")], "9")]
    inf.relist()
    assert api.list_params == [
        {"labelSelector": "kubetrain.dev/run", "limit": "2"},
        {"labelSelector": "kubetrain.dev/run", "limit": "2", "continue": "t1"},
    ]
    assert inf.synced.is_set() and len(inf) == 3
    assert seen.changes == [(None, "a:Running"), (None, "b:Running"), (None, "c:Running")]

    api.watches = [
        [
            {"type": "MODIFIED", "object": pod("a", "10", ip="10.0.0.2")},  # IP only
            {"type": "MODIFIED", "object": pod("b", "11", phase="Succeeded")},
            {"type": "DELETED", "object": pod("c", "12")},
            {"type": "ADDED", "object": pod("d", "13", phase="Pending")},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}},
        ]
    ]
    assert inf.watch() == 5
    assert api.watch_params[0] == {
        "labelSelector": "kubetrain.dev/run",
        "watch": "true",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "60",
        "resourceVersion": "9",
    }
    assert seen.changes[3:] == [
        ("b:Running", "b:Succeeded"),
        ("c:Running", None),
        (None, "d:Pending"),
    ]
    assert inf.get("ml", "c") is None and inf.get("ml", "d") is not None

    api.watches = [[]]
    inf.watch()
    assert api.watch_params[1]["resourceVersion"] == "20"  # from the bookmark


def test_410_gone_lists_again_and_reports_what_vanished_meanwhile(api: ScriptedApi) -> None:
    seen = Recorder()
    inf = informer(api, seen)
    sleeps: list[float] = []
    inf._sleep = lambda seconds: bool(sleeps.append(seconds))
    api.exhausted = inf.stop
    api.pages = [
        page([pod("a", "1"), pod("b", "2")], "5"),
        page([pod("b", "2"), pod("e", "30")], "31"),  # a was deleted while we were away
    ]
    api.watches = [
        OSError("connection reset"),  # retried after a pause, from the same version
        [{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}],
        [{"type": "MODIFIED", "object": pod("e", "32", phase="Succeeded")}],
    ]
    inf.run()
    assert [p.get("resourceVersion") for p in api.watch_params] == ["5", "5", "31", "32"]
    assert len(api.list_params) == 2
    assert sleeps[0] > 0
    assert seen.changes == [
        (None, "a:Running"),
        (None, "b:Running"),
        (None, "e:Running"),
        ("a:Running", None),
        ("e:Running", "e:Succeeded"),
    ]


def test_an_error_event_other_than_410_raises() -> None:
    inf = Informer(ScriptedApi(), PODS, None, lambda old, new: None)
    with pytest.raises(WatchError) as err:
        inf.apply({"type": "ERROR", "object": {"code": 500, "message": "etcd"}})
    assert err.value.status == 500


def test_a_pod_is_kept_with_what_the_plan_reads_only() -> None:
    full = pod("a", "7", phase="Failed")
    full["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "lastProbeTime": None},
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting",
            "lastTransitionTime": "2025-01-01T00:01:00Z",
        },
    ]
    full["status"]["containerStatuses"] = [
        {
            "name": "trainer",
            "ready": False,
            "restartCount": 0,
            "image": "x",
            "imageID": "sha256:...",
            "state": {
                "terminated": {
                    "exitCode": 137,
                    "reason": "OOMKilled",
                    "startedAt": "2025-01-01T00:00:00Z",
                    "finishedAt": "2025-01-01T00:01:00Z",
                    "containerID": "containerd://...",
                }
            },
        }
    ]
    assert trim_pod(full) == {
        "metadata": {
            "name": "a",
            "namespace": "ml",
            "uid": "uid-a",
            "labels": {"kubetrain.dev/run": "demo"},
            "ownerReferences": [{"uid": "job-1", "kind": "Job", "name": "demo-pretrain"}],
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
        "spec": {"nodeName": "gpu-0"},
        "status": {
            "phase": "Failed",
            "startTime": "2025-01-01T00:00:00Z",
            "conditions": [
                {"type": "Ready", "status": "False"},
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "Eviction API: evicting",
                    "lastTransitionTime": "2025-01-01T00:01:00Z",
                },
            ],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "startedAt": "2025-01-01T00:00:00Z",
                            "finishedAt": "2025-01-01T00:01:00Z",
                        }
                    },
                }
            ],
        },
    }


def test_a_job_is_kept_without_its_pod_template_and_version() -> None:
    job = {
        "metadata": {
            "name": "demo-pretrain",
            "namespace": "ml",
            "uid": "job-1",
            "resourceVersion": "5",
            "annotations": {"kubetrain.dev/attempt": "1"},
            "labels": {"kubetrain.dev/stage": "pretrain"},
            "managedFields": [{}],
        },
        "spec": {"parallelism": 2, "template": {"spec": {"containers": []}}, "selector": {}},
        "status": {"active": 2, "ready": 1},
    }
    trimmed = trim_job(job)
    assert trimmed["spec"] == {"parallelism": 2}
    assert trimmed["status"] == {"active": 2, "ready": 1}
    assert "resourceVersion" not in trimmed["metadata"]
    assert trimmed["metadata"]["annotations"] == {"kubetrain.dev/attempt": "1"}
