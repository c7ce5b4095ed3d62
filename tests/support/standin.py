"""Trainer pods without a trainer, for runs on KWOK nodes that nothing executes: what the
trainer would leave in the store (``progress.json``, ``FINAL``) written from the pod's own
environment, then the annotation on which KWOK ends the pod with an exit code. Used by
the scale benchmark (bench/scale.py) and the fault scenarios (tests/e2e/test_faults.py),
where hundreds of runs must go through the operator's real path on two CPU cores.

Objects are raw JSON dicts (camelCase, as the API server sends them): ``Watcher`` lists
and watches without model deserialisation, which would cost the CPU it shares with what
it observes.
"""

from __future__ import annotations

import heapq
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubetrain.core import accounting, contract
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord
from kubetrain.operator import resources
from tests.cluster.controlplane import EXIT_CODE_ANNOTATION

Object = dict[str, Any]


def run_stage(obj: Object) -> tuple[str, str]:
    """(run, stage) of a child of a run, from its labels; empty strings when not one."""
    labels = obj["metadata"].get("labels") or {}
    return labels.get(resources.LABEL_RUN, ""), labels.get(resources.LABEL_STAGE, "")


def as_raw(api_client: client.ApiClient, obj: Any) -> Object:
    """A kubernetes model object (``V1Pod``) as the API server's JSON would have it."""
    return json.loads(json.dumps(api_client.sanitize_for_serialization(obj)))


class Watcher(threading.Thread):
    """List, then watch, a collection as raw JSON; relists when the watch expires (410)
    or the connection breaks (an API server restart), one second apart.
    ``on_event(type, object, monotonic_time)`` is called for every object listed
    (type ``ADDED``) and every event but bookmarks."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        args: tuple[Any, ...],
        on_event: Callable[[str, Object, float], None],
        stop: threading.Event,
        label_selector: str | None = None,
    ) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.list_fn, self.args, self.on_event, self.stop = list_fn, args, on_event, stop
        self.kwargs: dict[str, Any] = {"label_selector": label_selector} if label_selector else {}
        self.errors: list[str] = []

    def run(self) -> None:
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
            except Exception as exc:  # reconnect; the callers' deadlines bound this
                self.errors.append(repr(exc))
                version = None
                self.stop.wait(1.0)

    def _list(self) -> str:
        resp = self.list_fn(*self.args, **self.kwargs, _preload_content=False)
        body = json.loads(resp.data)
        now = time.monotonic()
        for item in body.get("items") or []:
            self.on_event("ADDED", item, now)
        return str(body["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str | None:
        resp = self.list_fn(
            *self.args,
            **self.kwargs,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=30,
            _preload_content=False,
            _request_timeout=60,
        )
        try:
            for line in iter_resp_lines(resp):
                if self.stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    return None  # expired (410) or refused: relist
                version = obj["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self.on_event(event["type"], obj, time.monotonic())
        finally:
            resp.close()
            resp.release_conn()
        return version


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StageFolder:
    """Where a trainer pod's stage writes (the bucket, and the folder's keys), and what
    its progress record says."""

    bucket: str
    keys: StageLayout
    config: contract.StageConfig
    total_steps: int

    @classmethod
    def of_pod(cls, pod: Object) -> StageFolder:
        """From the trainer container's environment (the operator's contract with it)."""
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
        config = contract.read_stage_config(env)
        uri = env[contract.ENV_CHECKPOINT_URI].removeprefix("s3://")
        bucket, _, folder = uri.partition("/")
        total = accounting.total_steps(config.stage, config.model)
        return cls(bucket, StageLayout(folder.rstrip("/")), config, total)

    def record(self, step: int) -> ProgressRecord:
        """The trainer's progress record at ``step`` (completed at the last step)."""
        config, total = self.config, self.total_steps
        return ProgressRecord(
            run=config.run,
            namespace=config.namespace,
            stage=config.stage.name,
            stage_type=str(config.stage.type.value),
            step=step,
            total_steps=total,
            tokens=step * accounting.tokens_per_step(config.stage, config.model),
            # Relative to the stage folder, as the trainer writes it.
            checkpoint=StageLayout().checkpoint(step),
            phase="completed" if step >= total else "running",
            updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )


def write_progress(s3: Any, pod: Object, step: int | None = None) -> int:
    """The pod's stage at ``step`` (None: its last) in ``progress.json``; requests made."""
    folder = StageFolder.of_pod(pod)
    record = folder.record(folder.total_steps if step is None else step)
    s3.put_object(Bucket=folder.bucket, Key=folder.keys.progress, Body=record.to_json().encode())
    return 1


def write_done(s3: Any, pod: Object) -> int:
    """What a trainer leaves when its stage completed: the progress record at the last
    step and ``FINAL`` naming its checkpoint; requests made."""
    folder = StageFolder.of_pod(pod)
    record = folder.record(folder.total_steps)
    s3.put_object(Bucket=folder.bucket, Key=folder.keys.progress, Body=record.to_json().encode())
    s3.put_object(Bucket=folder.bucket, Key=folder.keys.final, Body=str(record.checkpoint).encode())
    return 2


def exit_pod(core: client.CoreV1Api, pod: Object, code: int = 0) -> None:
    """End a Running pod on a KWOK node with ``code``, as if its container exited."""
    body = {"metadata": {"annotations": {EXIT_CODE_ANNOTATION: str(code)}}}
    core.patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], body)


# --------------------------------------------------------------------------- stand-in


@dataclass(order=True)
class _Due:
    at: float
    uid: str = field(compare=False)


class StandIn:
    """Completes trainer pods in place of the trainer: ``write_done`` then ``exit_pod``.
    A pod runs at least ``hold`` seconds and none finishes before :meth:`release`;
    after that, finishes are spread uniformly over ``spread`` seconds. With ``midway``,
    a pod seen Running gets a progress record at half its steps at once (so that a
    status' step has somewhere to go back from)."""

    def __init__(
        self,
        core: client.CoreV1Api,
        s3: Any,
        *,
        hold: float,
        spread: float,
        workers: int,
        seed: int,
        first_stage: str = "pretrain",
        midway: bool = False,
    ) -> None:
        self.core, self.s3 = core, s3
        self.hold, self.spread, self.midway = hold, spread, midway
        self.first_stage = first_stage
        self.rng = random.Random(seed)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="standin")
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[Object, float, float]] = {}  # uid -> pod, t, jitter
        self._queue: list[_Due] = []
        self._released_at: float | None = None
        self.running_first_stage: set[str] = set()  # runs whose first stage's pod runs
        self.s3_requests = 0
        self.finished = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="standin", daemon=True)

    def start(self) -> StandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def release(self) -> None:
        with self._lock:
            self._released_at = time.monotonic()
            for uid, (_, seen, jitter) in self._seen.items():
                heapq.heappush(self._queue, _Due(self._due(seen, jitter), uid))

    def on_pod(self, _type: str, pod: Object, t: float) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        if (
            status.get("phase") != "Running"
            or meta.get("deletionTimestamp")
            or EXIT_CODE_ANNOTATION in (meta.get("annotations") or {})
        ):
            return
        run, stage = run_stage(pod)
        with self._lock:
            if meta["uid"] in self._seen:
                return
            jitter = self.rng.uniform(0, self.spread)
            self._seen[meta["uid"]] = (pod, t, jitter)
            if stage == self.first_stage:
                self.running_first_stage.add(run)
            if self._released_at is not None:
                heapq.heappush(self._queue, _Due(self._due(t, jitter), meta["uid"]))
        if self.midway:
            self.pool.submit(self._midway, pod)

    def _due(self, seen: float, jitter: float) -> float:
        assert self._released_at is not None
        return max(seen + self.hold, self._released_at) + jitter

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                due = []
                while self._queue and self._queue[0].at <= now:
                    due.append(self._seen[heapq.heappop(self._queue).uid][0])
            for pod in due:
                self.pool.submit(self._finish, pod, 3)

    def _midway(self, pod: Object) -> None:
        try:
            requests = write_progress(self.s3, pod, StageFolder.of_pod(pod).total_steps // 2)
        except Exception as exc:  # the finish writes the record again
            self.errors.append(f"{pod['metadata']['name']} (midway): {exc!r}")
            return
        with self._lock:
            self.s3_requests += requests

    def _finish(self, pod: Object, tries: int) -> None:
        try:
            requests = write_done(self.s3, pod)
            with self._lock:
                self.s3_requests += requests
            exit_pod(self.core, pod)
            with self._lock:
                self.finished += 1
        except ApiException as exc:
            if exc.status != 404:  # a pod deleted meanwhile needs no finishing
                self._failed(pod, tries, exc)
        except Exception as exc:
            self._failed(pod, tries, exc)

    def _failed(self, pod: Object, tries: int, exc: Exception) -> None:
        self.errors.append(f"{pod['metadata']['name']}: {exc!r}")
        if tries > 1 and not self._stop.is_set():
            self.pool.submit(self._finish, pod, tries - 1)
