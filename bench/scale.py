"""The operator at scale: N TrainingRuns x 3 stages on M fake GPU nodes, no training.

A real control plane (tests/cluster/controlplane.py: etcd, kube-apiserver,
controller-manager, scheduler, KWOK nodes with 8 ``nvidia.com/gpu`` each), SeaweedFS as
the S3 store, and ``kubetrain operator`` as users run it (a subprocess, default
configuration unless ``--operator-config``), authenticated as its own ServiceAccount so
that the API server can attribute its requests. A stand-in replaces the trainer: for each
Running trainer pod it writes ``progress.json`` and ``FINAL`` to the stage's folder, then
sets the annotation on which the KWOK stages end the pod with exit code 0.

Phases: create N runs (the stage-0 Jobs appear, their pods run); hold every pod until all
N run, then measure a steady window (nothing changes but what the operator polls); then
release the pods, spread over ``--spread`` seconds, and follow every run to Succeeded.

Measured (times are when this process saw the event on a watch):
- create -> first Job: the create call returned -> the run's stage-0 Job appeared;
- stage transition: a stage's pod Succeeded -> the next stage's Job appeared, split into
  the Job controller's share (pod Succeeded -> Job Complete) and the operator's share
  (Job Complete -> next Job); and last pod Succeeded -> run Succeeded;
- API requests/s of the operator (``apiserver_flowcontrol_dispatched_requests_total`` of
  a FlowSchema that matches only its ServiceAccount) and of every client by verb and
  resource (``apiserver_request_total``), in the steady window and over the whole run;
- S3 requests/s of the operator (SeaweedFS's ``SeaweedFS_s3_request_total`` less the
  stand-in's own writes), and per run per poll interval;
- the operator's CPU (``/proc/PID/stat``) and peak RSS (``VmHWM``); wall time.

Numbers go to ``bench/results/scale-<N>.json`` (with the operator's log next to it) and a
table to stdout; numbers, not pass/fail. Needs ``make cluster-bin``.

    python bench/scale.py --runs 100 --nodes 18
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from kubetrain.core import api
from kubetrain.operator import resources
from kubetrain.operator.config import load_config
from tests.cluster.controlplane import ControlPlane, pinned_version
from tests.e2e.scenario_harness import (
    CREDENTIALS_SECRET,
    STORE_PREFIX,
    install_crd,
    service_account_kubeconfig,
    tiny_curriculum,
)
from tests.support.operator import OperatorProcess
from tests.support.services import SeaweedS3
from tests.support.standin import StandIn, Watcher, run_stage
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NAMESPACE = "bench"
STAGES = ("pretrain", "sft", "dpo")
OPERATOR_NAMESPACE = "kubetrain-system"
OPERATOR_SA = "kubetrain-operator"
FLOW_SCHEMA = "kubetrain-bench-operator"
OPERATOR_METRICS = "kubetrain_operator"
GPUS_PER_NODE = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- timeline


class Timeline:
    """When each event was first seen: (kind, run, stage) -> monotonic seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.at: dict[tuple[str, str, str], float] = {}
        self.run_phase: dict[str, str] = {}

    def mark(self, kind: str, run: str, stage: str, t: float) -> None:
        with self._lock:
            self.at.setdefault((kind, run, stage), t)

    def get(self, kind: str, run: str, stage: str = "") -> float | None:
        return self.at.get((kind, run, stage))

    def count(self, kind: str, stage: str = "") -> int:
        with self._lock:
            return sum(1 for k, _, s in self.at if k == kind and s == stage)

    # ---- watch callbacks
    def on_job(self, _type: str, job: dict[str, Any], t: float) -> None:
        run, stage = run_stage(job)
        if not run:
            return
        self.mark("job", run, stage, t)
        for cond in (job.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Complete" and cond.get("status") == "True":
                self.mark("complete", run, stage, t)

    def on_pod(self, _type: str, pod: dict[str, Any], t: float) -> None:
        run, stage = run_stage(pod)
        if run and (pod.get("status") or {}).get("phase") == "Succeeded":
            self.mark("finished", run, stage, t)

    def on_run(self, _type: str, run: dict[str, Any], t: float) -> None:
        name = run["metadata"]["name"]
        phase = (run.get("status") or {}).get("phase") or "(none)"
        with self._lock:
            self.run_phase[name] = phase
        if phase == "Succeeded":
            self.mark("succeeded", name, "", t)

    def phases(self) -> Counter[str]:
        with self._lock:
            return Counter(self.run_phase.values())


# --------------------------------------------------------------------------- counters


@dataclass
class Snapshot:
    """Cumulative counters at one moment."""

    t: float
    api_by_verb_resource: Counter[str]
    operator_api: float
    s3_requests: int
    standin_s3: int
    operator_cpu: float
    reconciles: float = 0.0  # the operator's own count, and the seconds they took
    reconcile_seconds: float = 0.0


def operator_metrics(port: int) -> dict[str, float]:
    """The operator's own figures (its /metrics): reconciles so far, the seconds they
    took, the runs waiting for a worker now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = {
        f"{OPERATOR_METRICS}_reconcile_duration_seconds_count": "reconciles",
        f"{OPERATOR_METRICS}_reconcile_duration_seconds_sum": "reconcile_seconds",
        f"{OPERATOR_METRICS}_queue_depth": "queue_depth",
    }
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] = sample.value
    return out


class QueueSampler(threading.Thread):
    """The operator's work-queue depth, once a second, while the bench runs."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(name="queue-sampler", daemon=True)
        self.port, self.stop = port, stop
        self.depths: list[float] = []

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.depths.append(operator_metrics(self.port).get("queue_depth", 0.0))
            except OSError:
                continue  # the operator busy or restarting: a sample missed


def _parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    wanted = {"apiserver_request", "apiserver_flowcontrol_dispatched_requests"}
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            out[family.name] = [
                (s.labels, s.value) for s in family.samples if s.name.endswith("_total")
            ]
    return out


def snapshot(
    admin: client.ApiClient, s3: SeaweedS3, stand_in: StandIn, operator: OperatorProcess
) -> Snapshot:
    assert operator.proc is not None
    request = admin.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    resp = admin.call_api(*request, _request_timeout=60)
    resp.read()
    families = _parse(resp.data.decode())
    by_verb: Counter[str] = Counter()
    for labels, value in families.get("apiserver_request", []):
        resource = labels.get("resource") or "(non-resource)"
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        by_verb[f"{labels.get('verb')} {resource}"] += value
    operator_api = sum(
        value
        for labels, value in families.get("apiserver_flowcontrol_dispatched_requests", [])
        if labels.get("flow_schema") == FLOW_SCHEMA
    )
    return Snapshot(
        time.monotonic(),
        by_verb,
        operator_api,
        s3.request_count(),
        stand_in.s3_requests,
        process_cpu_seconds(operator.proc.pid),
        **{
            k: v
            for k, v in operator_metrics(operator.metrics_port).items()
            if k in ("reconciles", "reconcile_seconds")
        },
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def rates(a: Snapshot, b: Snapshot, runs: int, poll_seconds: float) -> dict[str, Any]:
    """Per-second rates between two snapshots."""
    dt = b.t - a.t
    operator_s3 = (b.s3_requests - a.s3_requests) - (b.standin_s3 - a.standin_s3)
    reconciles = b.reconciles - a.reconciles
    reconcile_seconds = b.reconcile_seconds - a.reconcile_seconds
    by_verb = {
        k: round((b.api_by_verb_resource[k] - a.api_by_verb_resource.get(k, 0)) / dt, 3)
        for k in b.api_by_verb_resource
        if b.api_by_verb_resource[k] > a.api_by_verb_resource.get(k, 0)
    }
    return {
        "seconds": round(dt, 1),
        "operator_api_per_s": round((b.operator_api - a.operator_api) / dt, 3),
        "all_clients_api_per_s": round(sum(by_verb.values()), 3),
        "all_clients_api_per_s_by_verb_resource": dict(
            sorted(by_verb.items(), key=lambda kv: -kv[1])
        ),
        "operator_s3_per_s": round(operator_s3 / dt, 3),
        "operator_s3_per_run_per_poll_interval": round(operator_s3 / dt * poll_seconds / runs, 3),
        "operator_cpu_cores": round((b.operator_cpu - a.operator_cpu) / dt, 3),
        "operator_reconciles_per_s": round(reconciles / dt, 3),
        "operator_reconcile_mean_ms": round(1000 * reconcile_seconds / reconciles, 1)
        if reconciles
        else None,
    }


# --------------------------------------------------------------------------- cluster


def add_nodes(cp: ControlPlane, count: int) -> None:
    """``count`` fake GPU nodes, created a few at a time (each waits until Ready)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(
                lambda i: cp.add_gpu_node(f"bench-gpu-{i}", gpus=GPUS_PER_NODE, timeout=300),
                range(count),
            )
        )


def operator_identity(cp: ControlPlane, admin: client.ApiClient, workdir: Path) -> Path:
    """A ServiceAccount bound to cluster-admin, a FlowSchema that matches only it (same
    priority level as service accounts get by default, so it changes nothing but the
    label its requests are counted under), and a kubeconfig with its token."""
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    cp.create_namespace(OPERATOR_NAMESPACE)
    core.create_namespaced_service_account(OPERATOR_NAMESPACE, {"metadata": {"name": OPERATOR_SA}})
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": OPERATOR_SA},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE}
            ],
        }
    )
    everything = {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}
    client.CustomObjectsApi(admin).create_cluster_custom_object(
        "flowcontrol.apiserver.k8s.io",
        "v1",
        "flowschemas",
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": FLOW_SCHEMA},
            "spec": {
                "priorityLevelConfiguration": {"name": "workload-low"},
                "matchingPrecedence": 500,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [
                            {
                                "kind": "ServiceAccount",
                                "serviceAccount": {
                                    "name": OPERATOR_SA,
                                    "namespace": OPERATOR_NAMESPACE,
                                },
                            }
                        ],
                        "resourceRules": [
                            {**everything, "clusterScope": True, "namespaces": ["*"]}
                        ],
                        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    }
                ],
            },
        },
    )
    token = core.create_namespaced_service_account_token(
        OPERATOR_SA,
        OPERATOR_NAMESPACE,
        {"spec": {"audiences": [], "expirationSeconds": 86400}},
    ).status.token
    return service_account_kubeconfig(cp.kubeconfig, token, workdir / "operator.kubeconfig")


def bench_namespace(cp: ControlPlane, admin: client.ApiClient, s3: SeaweedS3) -> str:
    """The runs' namespace with its credentials Secret, and their bucket."""
    cp.create_namespace(NAMESPACE)
    client.CoreV1Api(admin).create_namespaced_secret(
        NAMESPACE,
        {
            "metadata": {"name": CREDENTIALS_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            },
        },
    )
    return s3.create_bucket("bench")


def manifest(name: str, s3: SeaweedS3, bucket: str) -> dict[str, Any]:
    """The example's three-stage curriculum, one GPU per stage, no budget."""
    doc = tiny_curriculum(name, stages=STAGES)
    doc["metadata"]["namespace"] = NAMESPACE
    doc["spec"].pop("budget", None)
    for stage in doc["spec"]["stages"]:
        stage["resources"] = {"gpusPerNode": 1}
    doc["spec"]["storage"] = {
        "s3": {
            "bucket": bucket,
            "prefix": STORE_PREFIX,
            "endpoint": s3.endpoint,
            "region": s3.region,
            "credentialsSecret": CREDENTIALS_SECRET,
        }
    }
    assert tuple(s["name"] for s in doc["spec"]["stages"]) == STAGES
    return doc


def wait_operator_live(op: OperatorProcess, timeout: float) -> None:
    def live() -> bool:
        if not op.alive():
            raise RuntimeError(f"the operator exited:\n{op.tail()}")
        url = f"http://127.0.0.1:{op.liveness_port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200

    wait_for(live, timeout=timeout, what="the operator answering /healthz", detail=op.tail)


# --------------------------------------------------------------------------- summary


def percentiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank p50/p99, and the max, in seconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)

    return {"n": len(ordered), "p50": rank(0.5), "p99": rank(0.99), "max": rank(1.0)}


def latencies(tl: Timeline, runs: list[str]) -> dict[str, Any]:
    def spans(a: tuple[str, int], b: tuple[str, int]) -> list[float]:
        out = []
        for run in runs:
            for i in range(len(STAGES) - 1):
                start = tl.get(a[0], run, STAGES[i + a[1]])
                end = tl.get(b[0], run, STAGES[i + b[1]])
                if start is not None and end is not None:
                    out.append(end - start)
        return out

    first_job = [
        tl.get("job", r, STAGES[0]) - tl.get("created", r)  # type: ignore[operator]
        for r in runs
        if tl.get("job", r, STAGES[0]) is not None and tl.get("created", r) is not None
    ]
    last = [
        tl.get("succeeded", r) - tl.get("finished", r, STAGES[-1])  # type: ignore[operator]
        for r in runs
        if tl.get("succeeded", r) is not None and tl.get("finished", r, STAGES[-1]) is not None
    ]
    return {
        "create_to_first_job_s": percentiles(first_job),
        "transition_s": percentiles(spans(("finished", 0), ("job", 1))),
        "transition_job_controller_share_s": percentiles(spans(("finished", 0), ("complete", 0))),
        "transition_operator_share_s": percentiles(spans(("complete", 0), ("job", 1))),
        "last_pod_finished_to_run_succeeded_s": percentiles(last),
    }


def goals(results: dict[str, Any], runs: int) -> list[tuple[str, Any, str]]:
    """(metric, value, goal) rows of the table."""
    lat, steady, overall = results["latency"], results["steady"], results["overall"]
    last = lat["last_pod_finished_to_run_succeeded_s"]
    return [
        ("create -> first Job p50 / p99 (s)", _pair(lat["create_to_first_job_s"]), "p99 < 2"),
        ("pod finished -> next Job p50 / p99 (s)", _pair(lat["transition_s"]), "p99 < 5"),
        ("  Job controller share", _pair(lat["transition_job_controller_share_s"]), ""),
        ("  operator share", _pair(lat["transition_operator_share_s"]), "p99 < 1"),
        ("last pod finished -> run Succeeded (s)", _pair(last), ""),
        ("operator API requests/s (steady)", steady["operator_api_per_s"], f"< {runs / 20:g}"),
        ("all clients' API requests/s (steady)", steady["all_clients_api_per_s"], ""),
        ("operator S3 requests/s (steady)", steady["operator_s3_per_s"], ""),
        ("  per run per poll interval", steady["operator_s3_per_run_per_poll_interval"], "< 1"),
        ("operator CPU, cores (steady)", steady["operator_cpu_cores"], f"< {runs / 1000:g}"),
        ("operator CPU, cores (whole run)", overall["operator_cpu_cores"], ""),
        ("operator CPU, cores (pods finishing)", results["release"]["operator_cpu_cores"], ""),
        (
            "operator reconciles/s (pods finishing)",
            results["release"]["operator_reconciles_per_s"],
            "",
        ),
        ("  mean reconcile (ms)", results["release"]["operator_reconcile_mean_ms"], ""),
        ("operator queue depth p50 / p99", _pair(results["operator_queue_depth"]), ""),
        ("operator peak RSS (MB)", results["operator_peak_rss_mb"], "< 300 at 1,000 runs"),
        ("wall time, first create -> all Succeeded (s)", results["wall_seconds"], ""),
    ]


def _pair(p: dict[str, Any]) -> str:
    return f"{p['p50']} / {p['p99']}" if p.get("n") else "n/a"


def print_table(results: dict[str, Any], runs: int, nodes: int) -> None:
    rows = goals(results, runs)
    width = max(len(r[0]) for r in rows)
    print(f"\n{runs} runs x {len(STAGES)} stages on {nodes} KWOK GPU nodes")
    print(f"{'metric'.ljust(width)}  {'value':>14}  goal")
    for name, value, goal in rows:
        print(f"{name.ljust(width)}  {value!s:>14}  {goal}")


# --------------------------------------------------------------------------- phases


@dataclass
class Bench:
    """Everything one measurement holds while it runs."""

    args: argparse.Namespace
    cp: ControlPlane
    admin: client.ApiClient
    s3: SeaweedS3
    bucket: str
    operator: OperatorProcess
    timeline: Timeline
    stand_in: StandIn
    watchers: list[Watcher]
    poll_seconds: float
    queue: QueueSampler

    def snapshot(self) -> Snapshot:
        return snapshot(self.admin, self.s3, self.stand_in, self.operator)

    def detail(self) -> str:
        errors = [e for w in self.watchers for e in w.errors[-3:]]
        return (
            f"run phases: {dict(self.timeline.phases())}; "
            f"stage-0 pods running: {len(self.stand_in.running_first_stage)}; "
            f"pods finished by the stand-in: {self.stand_in.finished}; "
            f"stand-in errors: {self.stand_in.errors[-5:]}; watch errors: {errors}\n"
            f"operator log tail:\n{self.operator.tail(3000)}"
        )

    def wait(self, what: str, condition: Callable[[], bool], deadline: float) -> None:
        """Wait for ``condition``; a dead operator or a failed run ends the wait at once."""
        failure: list[str] = []

        def check() -> bool:
            if not self.operator.alive():
                failure.append(f"the operator exited:\n{self.operator.tail()}")
            elif self.timeline.phases().get("Failed"):
                failure.append(f"a run failed; {self.detail()}")
            return bool(failure) or condition()

        wait_for(
            check,
            timeout=max(1.0, deadline - time.monotonic()),
            what=what,
            interval=0.5,
            detail=self.detail,
        )
        if failure:
            raise RuntimeError(f"while waiting for {what}: {failure[0]}")


def measure(b: Bench) -> dict[str, Any]:
    """Create the runs, measure the steady window, release the pods, follow every run to
    Succeeded; the results (not yet the table)."""
    args, tl = b.args, b.timeline
    deadline = time.monotonic() + args.timeout
    names = [f"run-{i:04d}" for i in range(args.runs)]
    custom = client.CustomObjectsApi(b.admin)
    start = b.snapshot()
    for name in names:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, manifest(name, b.s3, b.bucket)
        )
        tl.mark("created", name, "", time.monotonic())
    created = time.monotonic()
    b.wait(
        f"all {args.runs} runs' first-stage pods Running",
        lambda: len(b.stand_in.running_first_stage) >= args.runs,
        deadline,
    )
    # The steady window: every run has a pod that runs and nothing changes but time, so
    # what the operator does now is what it does per poll interval for N running stages.
    # The sleeps are the measurement's duration, not a wait for something to happen.
    time.sleep(args.settle)
    steady_start = b.snapshot()
    time.sleep(args.window)
    steady_end = b.snapshot()
    b.wait("the operator to stay up through the steady window", lambda: True, deadline)
    released = b.snapshot()
    b.stand_in.release()
    b.wait(
        f"all {args.runs} runs Succeeded",
        lambda: tl.count("succeeded") >= args.runs,
        deadline,
    )
    end = b.snapshot()
    assert b.operator.proc is not None
    last_success = max(tl.get("succeeded", n) or 0.0 for n in names)
    first_create = min(tl.get("created", n) or math.inf for n in names)
    return {
        "latency": latencies(tl, names),
        "steady": rates(steady_start, steady_end, args.runs, b.poll_seconds),
        "overall": rates(start, end, args.runs, b.poll_seconds),
        # From the release of the pods to the last run Succeeded: the transitions.
        "release": rates(released, end, args.runs, b.poll_seconds),
        "operator_peak_rss_mb": round(process_peak_rss_mb(b.operator.proc.pid), 1),
        # Runs waiting for a worker, sampled once a second over the whole bench.
        "operator_queue_depth": percentiles(b.queue.depths),
        "wall_seconds": round(last_success - first_create, 1),
        "create_seconds": round(created - first_create, 1),
        "stand_in": {"pods_finished": b.stand_in.finished, "errors": b.stand_in.errors[:20]},
    }


def setup_and_measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    poll = load_config(args.operator_config).poll_interval_seconds
    with ControlPlane(start_timeout=180) as cp, SeaweedS3() as s3:
        admin = cp.api_client()
        add_nodes(cp, args.nodes)
        install_crd(admin)
        bucket = bench_namespace(cp, admin, s3)
        # The token's kubeconfig stays in the control plane's (temporary) directory.
        kubeconfig = operator_identity(cp, admin, cp.workdir)
        operator = OperatorProcess(
            kubeconfig,
            NAMESPACE,
            workdir / f"scale-{args.runs}.operator.log",
            config=Path(args.operator_config) if args.operator_config else None,
        )
        stop = threading.Event()
        timeline = Timeline()
        # Own API clients (connection pools) for the stand-in's workers and each watch,
        # which holds its connection for as long as it streams.
        stand_in = StandIn(
            client.CoreV1Api(cp.api_client()),
            s3.client(),
            first_stage=STAGES[0],
            hold=args.hold,
            spread=args.spread,
            workers=args.workers,
            seed=args.seed,
        )

        def on_pod(kind: str, pod: dict[str, Any], t: float) -> None:
            timeline.on_pod(kind, pod, t)
            stand_in.on_pod(kind, pod, t)

        selector = resources.LABEL_RUN
        watchers = [
            Watcher(
                "pods",
                client.CoreV1Api(cp.api_client()).list_namespaced_pod,
                (NAMESPACE,),
                on_pod,
                stop,
                selector,
            ),
            Watcher(
                "jobs",
                client.BatchV1Api(cp.api_client()).list_namespaced_job,
                (NAMESPACE,),
                timeline.on_job,
                stop,
                selector,
            ),
            Watcher(
                "runs",
                client.CustomObjectsApi(cp.api_client()).list_namespaced_custom_object,
                (api.GROUP, api.VERSION, NAMESPACE, api.PLURAL),
                timeline.on_run,
                stop,
            ),
        ]
        operator.start()
        try:
            wait_operator_live(operator, timeout=120)
            stand_in.start()
            for w in watchers:
                w.start()
            queue = QueueSampler(operator.metrics_port, stop)
            queue.start()
            bench = Bench(
                args, cp, admin, s3, bucket, operator, timeline, stand_in, watchers, poll, queue
            )
            return measure(bench)
        finally:
            stop.set()
            stand_in.stop()
            operator.stop()


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "commit": commit,
        "kubernetes": pinned_version("k8s"),
        "kwok": pinned_version("kwok"),
        "seaweedfs": pinned_version("seaweedfs"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="TrainingRuns (3 stages each)")
    p.add_argument("--nodes", type=int, default=18, help=f"KWOK nodes, {GPUS_PER_NODE} GPUs each")
    p.add_argument("--hold", type=float, default=10.0, help="least seconds a stage's pod runs")
    p.add_argument(
        "--spread", type=float, default=30.0, help="finishes spread over this many seconds"
    )
    p.add_argument("--settle", type=float, default=15.0, help="seconds before the steady window")
    p.add_argument("--window", type=float, default=60.0, help="steady window, seconds")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the whole run")
    p.add_argument("--workers", type=int, default=8, help="stand-in threads")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--operator-config", default=None, help="operator config YAML (default: none)")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/scale-N.json")
    args = p.parse_args(argv)
    if args.runs < 1 or args.nodes < 1:
        p.error("--runs and --nodes must be at least 1")
    if args.runs > args.nodes * GPUS_PER_NODE:
        p.error(
            f"--runs {args.runs} needs {args.runs} GPUs at once; --nodes {args.nodes} "
            f"offers {args.nodes * GPUS_PER_NODE} (nodes x {GPUS_PER_NODE})"
        )
    if args.timeout is None:
        args.timeout = 600 + 3 * args.runs + args.settle + args.window + args.spread
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / f"scale-{args.runs}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    before = machine()
    t0 = time.monotonic()
    results = setup_and_measure(args, out.parent)
    doc = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
        },
        "poll_interval_seconds": load_config(args.operator_config).poll_interval_seconds,
        "machine": before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "bench_seconds": round(time.monotonic() - t0, 1),
        **results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(results, args.runs, args.nodes)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
