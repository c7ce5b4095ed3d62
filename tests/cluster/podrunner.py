"""A test-only kubelet for KWOK nodes: it really runs the trainer container of pods
bound to designated fake nodes, as local processes or, with ``image_engine``, as
containers of the pod's image.

KWOK makes fake nodes Ready and pods Running, but runs nothing. For end-to-end tests
that must really train, :class:`PodRunner` watches for Running pods on its nodes,
resolves the container's environment the way the kubelet would (literal values,
``secretKeyRef``, ``fieldRef`` of labels/annotations — the completion index among
them), starts the container's command as a local process, and when the process exits
reports the exit code through the annotation that the KWOK stages turn into pod phase
Succeeded or Failed (see ``kwok/stages.yaml``). The Job controller then sees real pod
outcomes. A pod that is deleted (suspend, run deletion, Job deletion, eviction) gets
SIGTERM and, after its grace period, SIGKILL — as on a real node; when it has stopped and
the pod is still there (the Job controller's finalizer holds it), its terminal phase and
exit code are written to its status, as a kubelet writes them.

What differs from a real node, on purpose:
- Process mode (the default) has no image: ``python``/``python3`` in the command means
  this interpreter, the one with kubetrain installed.
- Image mode (``image_engine``: the command that runs containers, ``images/engine.sh``)
  runs the pod's image as the kubelet would: the container's ``command`` replaces the
  image's entrypoint and ``args`` its command, only the pod's environment, the pod's
  user, capabilities dropped, no privilege escalation, /dev/shm as large as the pod's
  memory emptyDir there. Containers use the host's network, to reach the test S3
  server and the rendezvous on 127.0.0.1.
- There is no cluster DNS on this host: ``PET_MASTER_ADDR`` becomes 127.0.0.1.
- Pods share one host: ``KUBETRAIN_METRICS_PORT`` gets a free port per pod
  (``metrics_port(pod)`` tells which).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from tests.cluster.controlplane import EXIT_CODE_ANNOTATION
from tests.support.services import free_port


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    proc: subprocess.Popen[bytes]
    log: Path
    grace_seconds: int
    metrics_port: int
    #: Image mode: the container's name, which signals go to (the engine's client
    #: process does not forward SIGKILL).
    container: str | None = None
    started: float = field(default_factory=time.monotonic)
    terminating_since: float | None = None


_FIELD_RE = re.compile(r"^metadata\.(annotations|labels)\['(.+)'\]$")


class PodRunner:
    """Runs pods bound to ``nodes`` as local processes (or, with ``image_engine``, as
    containers of their image) until :meth:`stop`."""

    def __init__(
        self,
        api: client.ApiClient,
        nodes: set[str],
        *,
        extra_env: dict[str, str] | None = None,
        poll: float = 0.3,
        image_engine: list[str] | None = None,
    ):
        self.core = client.CoreV1Api(api)
        self.nodes = set(nodes)
        self.extra_env = dict(extra_env or {})
        self.poll = poll
        self.image_engine = list(image_engine) if image_engine else None
        self.logdir = Path(tempfile.mkdtemp(prefix="podrunner-"))
        self.running: dict[str, RunningPod] = {}
        self.finished: dict[str, int] = {}  # pod uid -> exit code
        self.history: list[tuple[str, str, int]] = []  # (namespace/name, uid, exit code)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PodRunner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for pod in list(self.running.values()):
                self._terminate(pod, hard=True)
            self.running.clear()

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test controls
    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> bool:
        """Signal the process of a running pod (a crash, an OOM kill)."""
        with self._lock:
            for pod in self.running.values():
                if pod.namespace == namespace and pod.name == name:
                    self._signal(pod, sig)
                    return True
        return False

    def running_pods(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(p.namespace, p.name) for p in self.running.values()]

    def metrics_port(self, namespace: str, name: str) -> int | None:
        with self._lock:
            for pod in self.running.values():
                if pod.namespace == namespace and pod.name == name:
                    return pod.metrics_port
        return None

    def log_of(self, name: str) -> str:
        """The output of every process that ran for pods called ``name``."""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.logdir.glob(f"*{name}*.log"))
        )

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep running: a test reads self.errors on failure
                self.errors.append(repr(exc))
            self._stop.wait(self.poll)

    def _tick(self) -> None:
        pods = self.core.list_pod_for_all_namespaces().items
        present = {}
        for pod in pods:
            if pod.spec.node_name not in self.nodes:
                continue
            present[pod.metadata.uid] = pod
            uid = pod.metadata.uid
            with self._lock:
                known = uid in self.running or uid in self.finished
            annotations = pod.metadata.annotations or {}
            if (
                not known
                and pod.status.phase == "Running"
                and pod.metadata.deletion_timestamp is None
                and EXIT_CODE_ANNOTATION not in annotations
            ):
                self._launch(pod)
        with self._lock:
            items = list(self.running.items())
        for uid, running in items:
            pod = present.get(uid)
            code = running.proc.poll()
            if code is not None:
                self._finish(uid, running, code, pod)
            elif pod is None or pod.metadata.deletion_timestamp is not None:
                # Deleted (suspend, Job or run deleted): SIGTERM now, SIGKILL after grace.
                if running.terminating_since is None:
                    running.terminating_since = time.monotonic()
                    self._signal(running, signal.SIGTERM)
                elif time.monotonic() - running.terminating_since > running.grace_seconds:
                    self._signal(running, signal.SIGKILL)

    def _launch(self, pod: client.V1Pod) -> None:
        container = pod.spec.containers[0]
        env = self._resolve_env(pod, container)
        env["PET_MASTER_ADDR"] = "127.0.0.1"
        port = free_port()
        if "KUBETRAIN_METRICS_PORT" in env:
            env["KUBETRAIN_METRICS_PORT"] = str(port)
        env.update(self.extra_env)
        meta = pod.metadata
        name = None
        if self.image_engine is None:
            argv = list(container.command or []) + list(container.args or [])
            if not argv:
                self.errors.append(f"{meta.name}: container has no command")
                return
            if argv[0] in ("python", "python3"):
                argv[0] = sys.executable
            host = ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")
            env = {**{k: v for k, v in os.environ.items() if k in host}, **env}
        else:
            name = f"podrunner-{meta.name[:40]}-{uuid.uuid4().hex[:6]}"
            argv = self._container_argv(pod, container, name, env)
            env = dict(os.environ)  # the engine's own environment; the pod's is in argv
        log = self.logdir / f"{meta.namespace}_{meta.name}_{meta.uid[:8]}.log"
        fh = open(log, "wb")  # noqa: SIM115 - closed when the process is reaped
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=self.logdir,
            start_new_session=True,
        )
        fh.close()
        grace = pod.spec.termination_grace_period_seconds or 30
        with self._lock:
            self.running[meta.uid] = RunningPod(
                meta.namespace, meta.name, meta.uid, proc, log, grace, port, container=name
            )

    def _container_argv(
        self, pod: client.V1Pod, container: client.V1Container, name: str, env: dict[str, str]
    ) -> list[str]:
        """``ENGINE run`` of the pod's container as the kubelet would start it."""
        assert self.image_engine is not None
        argv = [*self.image_engine, "run", "--rm", f"--name={name}", "--network=host"]
        argv.append("--pull=never" if container.image_pull_policy == "Never" else "--pull=missing")
        pod_sc = pod.spec.security_context
        sc = container.security_context
        user = (sc and sc.run_as_user) or (pod_sc and pod_sc.run_as_user)
        group = (sc and sc.run_as_group) or (pod_sc and pod_sc.run_as_group)
        if user is not None:
            argv.append(f"--user={user}" + (f":{group}" if group is not None else ""))
        if sc is not None:
            for cap in (sc.capabilities and sc.capabilities.drop) or []:
                argv.append(f"--cap-drop={cap}")
            if sc.allow_privilege_escalation is False:
                argv.append("--security-opt=no-new-privileges")
            if sc.read_only_root_filesystem:
                argv.append("--read-only")
        shm = _shm_bytes(pod, container)
        if shm is not None:
            argv.append(f"--shm-size={shm}")
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        # Kubernetes: `command` replaces the image's ENTRYPOINT, `args` its CMD.
        args = list(container.args or [])
        if container.command:
            argv.append(f"--entrypoint={json.dumps(list(container.command))}")
        argv.append(container.image)
        return argv + args

    def _signal(self, pod: RunningPod, sig: int) -> None:
        """Deliver ``sig`` to the pod's main process, as the kubelet does: the local
        process, or the container's process 1."""
        if pod.container is None:
            pod.proc.send_signal(sig)
            return
        name = signal.Signals(sig).name.removeprefix("SIG")
        subprocess.run(
            [*(self.image_engine or []), "kill", f"--signal={name}", pod.container],
            capture_output=True,
            timeout=60,
        )

    def _finish(self, uid: str, running: RunningPod, code: int, pod: client.V1Pod | None) -> None:
        exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128 + N
        with self._lock:
            self.running.pop(uid, None)
            self.finished[uid] = exit_code
            self.history.append((f"{running.namespace}/{running.name}", uid, exit_code))
        if pod is None:
            return
        try:
            if pod.metadata.deletion_timestamp is None:
                # The KWOK stage pod-exit turns the annotation into the terminal phase.
                body = {"metadata": {"annotations": {EXIT_CODE_ANNOTATION: str(exit_code)}}}
                self.core.patch_namespaced_pod(running.name, running.namespace, body)
            else:
                self._terminated(pod, exit_code)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    def _terminated(self, pod: client.V1Pod, exit_code: int) -> None:
        """A deleted pod held by a finalizer (the Job controller's): set its terminal
        phase and exit code as a kubelet does once the container has stopped, so that the
        Job controller can account it (a pod failure policy needs the phase) and let it
        go. KWOK's stages handle only pods that are not being deleted."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        started = pod.status.start_time
        body = {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": c.name,
                        "image": c.image,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "started": False,
                        "state": {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": "Completed" if exit_code == 0 else "Error",
                                "startedAt": started.strftime("%Y-%m-%dT%H:%M:%SZ")
                                if started
                                else now,
                                "finishedAt": now,
                            }
                        },
                    }
                    for c in pod.spec.containers
                ],
            }
        }
        self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, body)

    def _terminate(self, pod: RunningPod, hard: bool = False) -> None:
        if pod.proc.poll() is None:
            if pod.container is not None:
                self._signal(pod, signal.SIGKILL if hard else signal.SIGTERM)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                pod.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if pod.container is not None:
                    self._signal(pod, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ env
    def _resolve_env(self, pod: client.V1Pod, container: client.V1Container) -> dict[str, str]:
        out: dict[str, str] = {}
        for var in container.env or []:
            if var.value_from is None:
                out[var.name] = var.value or ""
                continue
            src = var.value_from
            if src.secret_key_ref is not None:
                ref = src.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
                data = (secret.data or {}).get(ref.key)
                if data is None:
                    raise RuntimeError(f"secret {ref.name} has no key {ref.key}")
                out[var.name] = base64.b64decode(data).decode()
            elif src.field_ref is not None:
                out[var.name] = self._field(pod, src.field_ref.field_path)
            elif src.config_map_key_ref is not None:
                ref = src.config_map_key_ref
                cm = self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace)
                out[var.name] = (cm.data or {})[ref.key]
        return out

    @staticmethod
    def _field(pod: client.V1Pod, path: str) -> str:
        simple = {
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
            "metadata.uid": pod.metadata.uid,
            "spec.nodeName": pod.spec.node_name,
            "spec.serviceAccountName": pod.spec.service_account_name,
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path in simple:
            return simple[path] or ""
        m = _FIELD_RE.match(path)
        if m:
            meta = pod.metadata
            source = meta.annotations if m.group(1) == "annotations" else meta.labels
            return (source or {}).get(m.group(2), "")
        raise RuntimeError(f"fieldRef {path!r} is not supported by the test pod runner")


_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def _shm_bytes(pod: client.V1Pod, container: client.V1Container) -> int | None:
    """Size limit of the memory emptyDir mounted at /dev/shm, in bytes (None: none)."""
    mount = next((m for m in container.volume_mounts or [] if m.mount_path == "/dev/shm"), None)
    if mount is None:
        return None
    volume = next((v for v in pod.spec.volumes or [] if v.name == mount.name), None)
    empty = volume.empty_dir if volume is not None else None
    if empty is None or empty.medium != "Memory" or not empty.size_limit:
        return None
    m = _QUANTITY.match(str(empty.size_limit))
    if m is None:
        raise RuntimeError(f"emptyDir sizeLimit {empty.size_limit!r} is not supported here")
    return int(m.group(1)) * _UNITS[m.group(2)]
