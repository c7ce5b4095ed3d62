"""Helpers for the end-to-end scenarios (tests/e2e/test_scenarios.py, and the scale
benchmark bench/scale.py): the CRD and an operator identity on the cluster, the operator
as a process, a namespace per scenario with its bucket and credentials Secret, the tiny
curriculum, S3 and API reads, and the failure detail every wait prints.

The trainer runs on CPU (PodRunner executes the container command as a local process);
stages still request ``nvidia.com/gpu`` so that the real scheduler places them on the
fake KWOK GPU nodes, whose capacity is what it checks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api, layout
from kubetrain.core.crd import render_crd
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import MetricsLine, ProgressRecord, parse_metrics
from kubetrain.operator import resources
from tests.cluster.podrunner import PodRunner
from tests.support.images import Images, OperatorContainer
from tests.support.operator import OperatorProcess
from tests.support.services import S3Service
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-run.yaml"

# The fake GPU nodes whose pods PodRunner executes. They carry a taint and a label that
# only the scenarios' stages tolerate and select, so that nothing else scheduled on the
# shared control plane (the chart's operator Deployment, other tests' pods) lands there
# and gets executed, and the scenarios' pods land nowhere else (where nothing would run
# them).
RUNNER_NODES = ("e2e-gpu-0", "e2e-gpu-1")
RUNNER_KEY = "kubetrain.dev/e2e-podrunner"
CREDENTIALS_SECRET = "kubetrain-s3"
STORE_PREFIX = "kubetrain"


# --------------------------------------------------------------------------- manifests


def tiny_curriculum(
    name: str,
    *,
    steps: int | dict[str, int] = 20,
    checkpoint_every: int = 10,
    stages: tuple[str, ...] | None = None,
    runner: str = "true",
) -> dict[str, Any]:
    """``examples/tiny-run.yaml`` with its curriculum shape (stage names, types, data,
    pricing, budget) but a model and step counts that train in seconds on a busy CPU.

    ``steps`` is one count for every stage or a count per stage name; ``stages`` keeps
    only those stages (in the example's order); ``runner`` is the value of the
    ``RUNNER_KEY`` label of the nodes its stages run on (see :func:`add_runner_nodes`).
    Storage is filled in by :meth:`Scenario.create_run`.
    """
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": name}
    doc["spec"]["model"] = {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32}
    kept = []
    for stage in doc["spec"]["stages"]:
        if stages is not None and stage["name"] not in stages:
            continue
        hp = stage.setdefault("hyperparameters", {})
        hp.pop("tokens", None)
        hp["maxSteps"] = steps if isinstance(steps, int) else steps[stage["name"]]
        hp["batchSize"] = 8
        hp["logEvery"] = 5
        hp["warmupSteps"] = min(int(hp.get("warmupSteps", 0)), 2)
        stage.setdefault("data", {})["evalExamples"] = 8
        stage["checkpointEvery"] = checkpoint_every
        stage["resources"] = {
            "gpusPerNode": 1,
            "nodeSelector": {RUNNER_KEY: runner},
            "tolerations": [{"key": RUNNER_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        }
        kept.append(stage)
    doc["spec"]["stages"] = kept
    return doc


# --------------------------------------------------------------------------- cluster


def install_crd(admin: client.ApiClient) -> None:
    """The CRD generated from kubetrain.core.api (what `kubetrain crd` and the chart ship);
    replaced when another test installed an older copy."""
    ext = client.ApiextensionsV1Api(admin)
    crd = yaml.safe_load(render_crd())
    name = crd["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:
            raise
        crd["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(
            name
        ).metadata.resource_version
        ext.replace_custom_resource_definition(name, crd)
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(name).status.conditions or []
        ),
        timeout=60,
        what="the TrainingRun CRD becoming Established",
    )


def add_runner_nodes(
    control_plane: Any,
    admin: client.ApiClient,
    nodes: tuple[str, ...] = RUNNER_NODES,
    value: str = "true",
) -> None:
    """Fake GPU nodes labelled and tainted ``RUNNER_KEY=value``: only stages of
    :func:`tiny_curriculum` with the same ``runner`` value land there."""
    core = client.CoreV1Api(admin)
    for node in nodes:
        try:
            core.read_node(node)
            continue  # a previous module of this session added it
        except ApiException as exc:
            if exc.status != 404:
                raise
        control_plane.add_gpu_node(
            node,
            gpus=4,
            labels={RUNNER_KEY: value},
            taints=[client.V1Taint(key=RUNNER_KEY, value=value, effect="NoSchedule")],
        )


def service_account_kubeconfig(admin_kubeconfig: Path, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a ServiceAccount token, as the operator's pod
    does in a cluster (the same CA and server as the admin's).

    A token rather than impersonation (the kubeconfig's ``as:``): the kubernetes Python
    client's kubeconfig loader ignores ``as:`` and kopf's connection settings carry no
    Impersonate-User header, so an impersonating kubeconfig would silently run the
    operator as the admin."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "operator",
                        "context": {"cluster": cluster["name"], "user": "operator"},
                    }
                ],
                "current-context": "operator",
            }
        )
    )
    return path


# --------------------------------------------------------------------------- operator


def write_operator_config(
    path: Path,
    overrides: dict[str, Any] | None = None,
    trainer_image: str = "kubetrain/trainer:e2e",
) -> Path:
    """Operator settings for tests: progress read every second, and a grace period long
    enough for a tiny model's checkpoint but short enough that a stuck pod fails fast;
    ``overrides`` (camelCase fields) win. The trainer image is never pulled: PodRunner
    runs its command as a local process, or runs the image built here."""
    settings = {
        "pollIntervalSeconds": 1,
        "terminationGraceSeconds": 20,
        "restartBackoffSeconds": 2,
        "image": trainer_image,
        "imagePullPolicy": "Never",
    }
    path.write_text(yaml.safe_dump({**settings, **(overrides or {})}))
    return path


# --------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    """One namespace, one bucket, one credentials Secret, the operators started for it."""

    admin: client.ApiClient
    admin_kubeconfig: Path
    runner: PodRunner
    s3: S3Service
    namespace: str
    bucket: str
    workdir: Path
    operators: list[OperatorProcess | OperatorContainer] = field(default_factory=list)

    # ---- clients
    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.admin)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.admin)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.admin)

    # ---- operator
    def start_operator(
        self,
        kubeconfig: Path | None = None,
        env: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> OperatorProcess:
        """``kubetrain operator -n NAMESPACE`` (its Lease in that namespace, unless
        ``env`` names another by POD_NAMESPACE); ``settings`` override the tests'
        operator configuration."""
        config = write_operator_config(self.workdir / "operator-config.yaml", settings)
        op = OperatorProcess(
            kubeconfig or self.admin_kubeconfig,
            self.namespace,
            self.workdir / f"operator-{len(self.operators)}.log",
            config=config,
            env=env,
        )
        self.operators.append(op)
        return op.start()

    def start_operator_container(self, images: Images) -> OperatorContainer:
        """The operator image's `kubetrain operator`, whose runs use ``images.trainer``."""
        config = write_operator_config(
            self.workdir / "operator-config.yaml", trainer_image=images.trainer
        )
        op = OperatorContainer(
            images.operator,
            self.admin_kubeconfig,
            self.namespace,
            self.workdir / f"operator-{len(self.operators)}.log",
            config=config,
        )
        self.operators.append(op)
        return op.start()

    def close(self) -> None:
        for op in self.operators:
            op.stop()
        # Deleting the namespace deletes the pods, so PodRunner stops their trainers.
        with contextlib.suppress(ApiException):
            self.core.delete_namespace(self.namespace)

    # ---- runs
    def create_run(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest = json.loads(json.dumps(manifest))
        manifest["metadata"]["namespace"] = self.namespace
        manifest["spec"]["storage"] = {
            "s3": {
                "bucket": self.bucket,
                "prefix": STORE_PREFIX,
                "endpoint": self.s3.endpoint,
                "region": self.s3.region,
                "credentialsSecret": CREDENTIALS_SECRET,
            }
        }
        return self.custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, api.PLURAL, manifest
        )

    def get_run(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, api.PLURAL, name
        )

    def status(self, name: str) -> dict[str, Any]:
        return self.get_run(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, api.PLURAL, name, {"spec": spec}
        )

    def phase_is(self, name: str, phase: str) -> dict[str, Any] | None:
        status = self.status(name)
        if status.get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"run {name} failed: {json.dumps(status)[:2000]}")
        return status if status.get("phase") == phase else None

    def wait_phase(self, name: str, phase: str, timeout: float = 240) -> dict[str, Any]:
        return wait_for(
            lambda: self.phase_is(name, phase),
            timeout=timeout,
            what=f"run {self.namespace}/{name} reaching phase {phase}",
            interval=0.5,
            detail=self.detail,
        )

    # ---- children
    def jobs(self, run: str) -> list[client.V1Job]:
        return self.batch.list_namespaced_job(
            self.namespace, label_selector=f"{resources.LABEL_RUN}={run}"
        ).items

    def pods(self, run: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{resources.LABEL_RUN}={run}"
        ).items

    def services(self, run: str) -> list[client.V1Service]:
        return self.core.list_namespaced_service(
            self.namespace, label_selector=f"{resources.LABEL_RUN}={run}"
        ).items

    def running_trainer(self, run: str, stage: str) -> str | None:
        """Name of the pod of ``stage`` whose trainer process PodRunner is running."""
        prefix = f"{resources.child_name(run, stage)}-"
        return next(
            (
                name
                for ns, name in self.runner.running_pods()
                if ns == self.namespace and name.startswith(prefix)
            ),
            None,
        )

    def evict(self, pod: str) -> None:
        """Evict ``pod`` through the Eviction API, as ``kubectl drain`` does: the API
        server adds the condition DisruptionTarget and deletes the pod."""
        self.core.create_namespaced_pod_eviction(
            pod,
            self.namespace,
            client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=self.namespace)),
        )

    def trainer_logs(self) -> str:
        """Output of every trainer process of this namespace, oldest first."""
        logs = sorted(
            self.runner.logdir.glob(f"{self.namespace}_*.log"), key=lambda p: p.stat().st_mtime
        )
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)

    # ---- store
    def key(self, run: str, stage: str, name: str) -> str:
        return f"{STORE_PREFIX}/{StageLayout.of(self.namespace, run, stage).key(name)}"

    def s3_text(self, run: str, stage: str, name: str) -> str | None:
        try:
            obj = self.s3.client().get_object(Bucket=self.bucket, Key=self.key(run, stage, name))
        except self.s3.client().exceptions.NoSuchKey:
            return None
        return obj["Body"].read().decode()

    def s3_exists(self, run: str, stage: str, name: str) -> bool:
        return self.s3_text(run, stage, name) is not None

    def latest_step(self, run: str, stage: str) -> int | None:
        """Step of the checkpoint LATEST points to (``checkpoints/step-000020``)."""
        text = self.s3_text(run, stage, "LATEST")
        return int(text.strip().rsplit("-", 1)[1]) if text else None

    def progress(self, run: str, stage: str) -> ProgressRecord:
        """The stage's progress record; an empty one while there is none."""
        key = self.key(run, stage, layout.PROGRESS)
        text = self.s3_text(run, stage, layout.PROGRESS)
        return (ProgressRecord.from_json(text, key) if text else None) or ProgressRecord()

    def metrics_history(self, run: str, stage: str) -> list[MetricsLine]:
        text = self.s3_text(run, stage, layout.METRICS) or ""
        return parse_metrics(text, self.key(run, stage, layout.METRICS))

    # ---- failure detail
    def detail(self) -> str:
        parts = []
        for run in self._run_names():
            try:
                parts.append(f"run {run} status: {json.dumps(self.status(run))[:3000]}")
                jobs = [
                    (
                        j.metadata.name,
                        j.metadata.uid[:8],
                        j.status.active,
                        j.status.succeeded,
                        j.status.failed,
                    )
                    for j in self.jobs(run)
                ]
                pods = [(p.metadata.name, p.spec.node_name, p.status.phase) for p in self.pods(run)]
                parts.append(f"jobs: {jobs}")
                parts.append(f"pods: {pods}")
            except Exception as exc:  # the detail must never hide the real failure
                parts.append(f"run {run}: {exc!r}")
        for i, op in enumerate(self.operators):
            parts.append(f"operator log ({i}, alive={op.alive()}):\n{op.tail()}")
        parts.append(f"podrunner errors: {self.runner.errors[-10:]}")
        parts.append(f"podrunner history: {self.runner.history[-10:]}")
        parts.append(f"trainer logs:\n{self.trainer_logs()[-5000:]}")
        return "\n".join(parts)

    def _run_names(self) -> list[str]:
        try:
            out = self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, api.PLURAL
            )
        except ApiException:
            return []
        return [r["metadata"]["name"] for r in out.get("items") or []]


def new_scenario(
    admin: client.ApiClient,
    kubeconfig: Path,
    runner: PodRunner,
    s3: S3Service,
    control_plane: Any,
    label: str,
    workdir: Path,
) -> Scenario:
    """A fresh namespace with the S3 credentials Secret the runs name, and a bucket."""
    suffix = uuid.uuid4().hex[:6]
    namespace = f"e2e-{label}-{suffix}"
    control_plane.create_namespace(namespace)
    bucket = s3.create_bucket(f"e2e-{label}-{suffix}")
    data = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    client.CoreV1Api(admin).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=CREDENTIALS_SECRET),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        ),
    )
    return Scenario(admin, kubeconfig, runner, s3, namespace, bucket, workdir)


# --------------------------------------------------------------------------- watchers


class BackgroundSampler:
    """Calls ``sample()`` every ``interval`` seconds in a thread while in a ``with``
    block; a failing sample is recorded in ``errors``, not fatal."""

    def __init__(self, interval: float):
        self.interval = interval
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:
                self.errors.append(repr(exc))
            self._stop.wait(self.interval)


class JobWatcher(BackgroundSampler):
    """Samples a run's Jobs in the background: how many exist per stage at once, and
    every Job uid seen per stage (a new uid means the Job was recreated)."""

    def __init__(self, scenario: Scenario, run: str, interval: float = 0.2):
        super().__init__(interval)
        self.scenario, self.run = scenario, run
        self.max_at_once: Counter[str] = Counter()
        self.uids: dict[str, set[str]] = {}
        self.order: list[str] = []  # stages in the order their first Job appeared

    def sample(self) -> None:
        now: Counter[str] = Counter()
        for job in self.scenario.jobs(self.run):
            stage = (job.metadata.labels or {}).get(resources.LABEL_STAGE, "?")
            now[stage] += 1
            self.uids.setdefault(stage, set()).add(job.metadata.uid)
            if stage not in self.order:
                self.order.append(stage)
        for stage, count in now.items():
            self.max_at_once[stage] = max(self.max_at_once[stage], count)


class StatusSampler(BackgroundSampler):
    """Samples a stage's status (restarts, step) and the run's condition Restarting in
    the background."""

    def __init__(self, scenario: Scenario, run: str, stage: str, interval: float = 0.3):
        super().__init__(interval)
        self.scenario, self.run, self.stage = scenario, run, stage
        self.samples: list[tuple[int, int]] = []  # (restarts, step)
        self.restarting: list[tuple[str, str]] = []  # (status, reason) as it changed

    def sample(self) -> None:
        status = self.scenario.status(self.run)
        st = stage_status(status, self.stage)
        if st:
            self.samples.append((int(st.get("restarts", 0)), int(st.get("step", 0))))
        cond = condition(status, "Restarting")
        seen = (cond.get("status", ""), cond.get("reason", ""))
        if cond and (not self.restarting or self.restarting[-1] != seen):
            self.restarting.append(seen)


def stage_status(status: dict[str, Any], stage: str) -> dict[str, Any]:
    return next((s for s in status.get("stages") or [] if s.get("name") == stage), {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})
