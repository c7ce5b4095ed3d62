"""End-to-end scenarios: `kubetrain operator --kubeconfig ...` as users run it, against a
real control plane (etcd, kube-apiserver, controller-manager with the Job and garbage
collector controllers, scheduler) with fake KWOK GPU nodes, and stages that really train.

Stages request ``gpusPerNode: 1`` so that the real scheduler must place them on the fake
nodes' ``nvidia.com/gpu`` capacity; PodRunner (a test-only kubelet) then runs each pod's
trainer container as a local process, which trains a tiny model on CPU here, reading and
writing checkpoints and progress in a real object store (SeaweedFS's S3 gateway, a
separate server process) with the credentials of the Secret named in
``storage.s3.credentialsSecret``. The operator has no AWS credentials of its own:
it reads that Secret through the API.

Every wait prints, when it times out, the run's status, its Jobs and Pods, the operator's
log tail, PodRunner's errors and the trainer logs.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetrain.core import api
from tests.cluster.podrunner import PodRunner
from tests.e2e.scenario_harness import (
    RUNNER_NODES,
    JobWatcher,
    Scenario,
    StatusSampler,
    add_runner_nodes,
    condition,
    install_crd,
    new_scenario,
    service_account_kubeconfig,
    stage_status,
    tiny_curriculum,
)
from tests.support.chart import render
from tests.support.operator import environment_without_aws
from tests.support.services import S3Service
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

TABLE_ACCEPT = "application/json;as=Table;v=v1;g=meta.k8s.io"
RESUMED_RE = re.compile(r"resumed from \S+ at step (\d+)")


@dataclass
class E2E:
    control_plane: Any
    admin: client.ApiClient
    runner: PodRunner
    s3: S3Service


@pytest.fixture(scope="module")
def e2e(control_plane: Any, seaweed_s3: S3Service) -> Iterator[E2E]:
    """The shared control plane with the CRD, two fake GPU nodes and a PodRunner on them,
    and SeaweedFS as the S3 store. One trainer thread per process: two busy cores are
    shared with everything else."""
    admin = control_plane.api_client()
    install_crd(admin)
    add_runner_nodes(control_plane, admin)
    runner = PodRunner(admin, set(RUNNER_NODES), extra_env={"OMP_NUM_THREADS": "1"}).start()
    try:
        yield E2E(control_plane, admin, runner, seaweed_s3)
    finally:
        runner.stop()


@pytest.fixture
def scenario(e2e: E2E, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scenario]:
    """A namespace, bucket and credentials Secret for one test; its operators are
    stopped and its namespace deleted afterwards (which stops its trainers)."""
    label = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())
    sc = new_scenario(
        e2e.admin,
        e2e.control_plane.kubeconfig,
        e2e.runner,
        e2e.s3,
        e2e.control_plane,
        label[:12].strip("-"),
        tmp_path,
    )
    failed_before = request.session.testsfailed
    try:
        yield sc
    finally:
        if request.session.testsfailed > failed_before:
            # Plain asserts (not waits) carry no detail of their own: print it, pytest
            # shows it under the failed test's captured teardown output.
            print(sc.detail())
        sc.close()


def _wait(scenario: Scenario, cond: Callable[[], Any], what: str, timeout: float = 180) -> Any:
    return wait_for(cond, timeout=timeout, what=what, interval=0.2, detail=scenario.detail)


def _no_children(scenario: Scenario, run: str) -> bool:
    return not (scenario.jobs(run) or scenario.pods(run) or scenario.services(run))


# --------------------------------------------------------------------------- 1


CURRICULUM = ["pretrain", "sft", "dpo", "grpo"]


def test_curriculum_trains_in_order_with_status_store_and_columns(scenario: Scenario) -> None:
    """The example's curriculum (pretrain -> sft -> dpo -> grpo, shrunk): stages run in order,
    status reports training and accounting, FINAL checkpoints are in S3, and
    `kubectl get ktr` columns (the API's Table output) show phase, stage, progress, cost.

    Pods request nvidia.com/gpu and are scheduled on fake KWOK GPU nodes; the trainer
    itself runs on CPU here."""
    manifest = tiny_curriculum("tiny", steps=20, checkpoint_every=10)
    assert [s["type"] for s in manifest["spec"]["stages"]] == CURRICULUM
    scenario.start_operator()
    with JobWatcher(scenario, "tiny") as jobs:
        scenario.create_run(manifest)
        status = scenario.wait_phase("tiny", "Succeeded", timeout=360)
    assert jobs.order == CURRICULUM, jobs.order
    assert not jobs.errors, jobs.errors

    stages = status["stages"]
    assert [s["name"] for s in stages] == CURRICULUM
    for prev, nxt in itertools.pairwise(stages):
        # Strictly in order: the next stage's Job is created after the previous one ended.
        assert nxt["startTime"] >= prev["completionTime"], (prev, nxt)
    for st in stages:
        assert st["phase"] == "Succeeded", st
        assert st["step"] == st["totalSteps"] == 20, st
        # GRPO's loss is 0 when no completion of a group scores differently from the
        # others (a 20-step model answers no sum right) and may be negative.
        assert st["loss"] > 0 if st["name"] != "grpo" else st["loss"] is not None, st
        # A 20-step, one-layer model rarely answers arithmetic right: accuracy is reported
        # (a ratio) while the evaluation loss shows it was really computed.
        assert 0.0 <= st["eval"]["accuracy"] <= 1.0 and st["eval"]["loss"] > 0, st
        assert st["energyJoules"] > 0 and st["energySource"], st
        assert st["gpuSeconds"] > 0 and st["costUSD"] > 0, st
        assert st["checkpoint"].endswith("checkpoints/step-000020"), st
    totals = status["totals"]
    assert totals["costUSD"] > 0 and totals["gpuSeconds"] > 0 and totals["energyJoules"] > 0
    assert status["progress"] == "4/4 100%"
    # The grpo stage reports its rewards and KL in the status.
    assert {"reward", "kl", "clip_ratio", "completion_length"} <= set(stages[3]["train"])
    assert condition(status, "Succeeded")["status"] == "True"

    for stage in CURRICULUM:
        final = scenario.s3_text("tiny", stage, "FINAL")
        assert final == "checkpoints/step-000020", (stage, final)
        assert scenario.s3_exists("tiny", stage, f"{final}/MANIFEST.json"), stage
        assert scenario.progress("tiny", stage).phase == "completed"

    path = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{scenario.namespace}/{api.PLURAL}/tiny"
    resp = scenario.admin.call_api(
        "GET", scenario.admin.configuration.host + path, header_params={"Accept": TABLE_ACCEPT}
    )
    table = json.loads(resp.read())
    assert table["kind"] == "Table", table
    names = [c["name"] for c in table["columnDefinitions"]]
    cells = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert {"Phase", "Stage", "Progress", "Cost", "Age"} <= set(cells), names
    assert cells["Phase"] == "Succeeded"
    assert cells["Stage"] == "grpo"
    assert cells["Progress"] == "4/4 100%"
    assert cells["Cost"] == pytest.approx(totals["costUSD"]) and cells["Cost"] > 0
    assert re.fullmatch(r"\d+[smhd].*", cells["Age"]), cells["Age"]

    # `kubetrain status`, as a user runs it with their kubeconfig, shows the same run.
    exe = Path(sys.executable).parent / "kubetrain"
    out = subprocess.run(
        [str(exe), "status", "-n", scenario.namespace],
        env={**os.environ, "KUBECONFIG": str(scenario.admin_kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    row = next((line for line in out.stdout.splitlines() if " tiny " in f" {line} "), None)
    assert row is not None, out.stdout
    assert "Succeeded" in row and "grpo" in row and "100%" in row, out.stdout


# --------------------------------------------------------------------------- 2


def test_killed_trainer_is_retried_and_resumes_from_its_checkpoint(scenario: Scenario) -> None:
    """A crash (SIGKILL of the trainer process) fails the pod and the Job; the operator
    recreates the Job, and the trainer resumes from LATEST instead of step 0.
    GPUs are fake (KWOK nodes); the trainer runs on CPU."""
    scenario.start_operator()
    scenario.create_run(
        tiny_curriculum("crash", steps=300, checkpoint_every=20, stages=("pretrain",))
    )
    with StatusSampler(scenario, "crash", "pretrain") as sampler:
        checkpointed = _wait(
            scenario,
            lambda: scenario.latest_step("crash", "pretrain"),
            "a first checkpoint (LATEST) in S3",
        )
        pod = _wait(
            scenario,
            lambda: scenario.running_trainer("crash", "pretrain"),
            "the trainer process of stage pretrain",
        )
        assert scenario.runner.kill(scenario.namespace, pod)
        status = scenario.wait_phase("crash", "Succeeded", timeout=300)

    st = stage_status(status, "pretrain")
    assert st["restarts"] == 1, st
    assert st["step"] == 300, st
    codes = [
        code
        for name, _, code in scenario.runner.history
        if name.startswith(f"{scenario.namespace}/")
    ]
    assert codes == [137, 0], codes  # killed by SIGKILL, then the resumed attempt

    resumed = [int(m) for m in RESUMED_RE.findall(scenario.trainer_logs())]
    assert len(resumed) == 1 and resumed[0] >= checkpointed, (resumed, checkpointed)
    # Once the status showed the checkpointed step, it never went back past it (the
    # status lags the trainer by a poll interval, so earlier samples may be lower).
    steps = [step for _, step in sampler.samples]
    reached = next(i for i, step in enumerate(steps) if step >= checkpointed)
    assert min(steps[reached:]) >= checkpointed, (checkpointed, steps)
    assert any(restarts == 1 for restarts, _ in sampler.samples)
    history = [r.step for r in scenario.metrics_history("crash", "pretrain")]
    assert history == sorted(history) and history[-1] == 300, history


# --------------------------------------------------------------------------- 2b


def test_evicted_trainer_is_a_preemption_and_resumes_from_its_checkpoint(
    scenario: Scenario,
) -> None:
    """The Eviction API (what `kubectl drain` and a spot reclaim's node handler use)
    evicts the trainer's pod: the pod gets the condition DisruptionTarget and SIGTERM,
    the trainer checkpoints and exits 75, the Job's podFailurePolicy ignores the pod and
    the Job controller replaces it in the same Job; the new pod resumes from that
    checkpoint. Counted as a preemption, not a restart; the run completes. GPUs are fake
    (KWOK nodes); the trainer runs on CPU."""
    scenario.start_operator()
    scenario.create_run(
        tiny_curriculum("evict", steps=300, checkpoint_every=20, stages=("pretrain",))
    )
    with (
        JobWatcher(scenario, "evict") as jobs,
        StatusSampler(scenario, "evict", "pretrain") as sampler,
    ):
        _wait(
            scenario,
            lambda: scenario.latest_step("evict", "pretrain"),
            "a first checkpoint (LATEST) in S3",
        )
        pod = _wait(
            scenario,
            lambda: scenario.running_trainer("evict", "pretrain"),
            "the trainer process of stage pretrain",
        )
        scenario.evict(pod)
        stopped = _wait(
            scenario,
            lambda: (
                scenario.progress("evict", "pretrain").phase == "interrupted"
                and scenario.progress("evict", "pretrain").step
            ),
            "the evicted trainer's checkpoint (progress phase interrupted)",
        )
        status = scenario.wait_phase("evict", "Succeeded", timeout=300)

    st = stage_status(status, "pretrain")
    assert st["preemptions"] == 1 and st["restarts"] == 0, st
    assert st["step"] == 300, st
    codes = [
        code
        for name, _, code in scenario.runner.history
        if name.startswith(f"{scenario.namespace}/")
    ]
    assert codes == [75, 0], codes  # checkpointed on SIGTERM, then the resumed attempt
    assert scenario.latest_step("evict", "pretrain") == 300
    resumed = [int(m) for m in RESUMED_RE.findall(scenario.trainer_logs())]
    assert resumed == [stopped], (resumed, stopped)  # nothing lost, nothing replayed
    # The Job controller replaced the pod: the operator never recreated the Job.
    assert len(jobs.uids["pretrain"]) == 1, jobs.uids
    assert ("True", "Preempted") in sampler.restarting, sampler.restarting
    assert condition(status, "Restarting")["status"] == "False", status["conditions"]
    assert all(restarts == 0 for restarts, _ in sampler.samples)


# --------------------------------------------------------------------------- 3


def test_operator_restarts_mid_stage_and_between_stages(scenario: Scenario) -> None:
    """The operator stops while pretrain trains and stays down while it finishes (the
    stage boundary passes without it), then restarts again in the middle of sft: no Job
    is ever duplicated or recreated, and the run completes. Trainers run on CPU on fake
    GPU nodes."""
    op = scenario.start_operator()
    scenario.create_run(
        tiny_curriculum(
            "restart",
            steps={"pretrain": 600, "sft": 100},
            checkpoint_every=50,
            stages=("pretrain", "sft"),
        )
    )
    with JobWatcher(scenario, "restart") as jobs:
        _wait(
            scenario,
            lambda: scenario.progress("restart", "pretrain").step > 0,
            "pretrain training (progress step > 0)",
        )
        op.stop()
        assert not any(j.status.succeeded for j in scenario.jobs("restart")), (
            "pretrain finished before the operator stopped: not a mid-stage restart"
        )

        # Down across the boundary: the Job completes, nobody starts sft.
        _wait(
            scenario,
            lambda: any(j.status.succeeded for j in scenario.jobs("restart")),
            "pretrain's Job completing while the operator is down",
            timeout=300,
        )
        assert [j.metadata.labels["kubetrain.dev/stage"] for j in scenario.jobs("restart")] == [
            "pretrain"
        ]

        op.start()
        _wait(
            scenario,
            lambda: scenario.running_trainer("restart", "sft"),
            "sft's trainer running after the operator came back",
        )
        op.stop()
        op.start()
        status = scenario.wait_phase("restart", "Succeeded", timeout=300)

    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Succeeded"]
    assert jobs.order == ["pretrain", "sft"], jobs.order
    assert dict(jobs.max_at_once) == {"pretrain": 1, "sft": 1}, jobs.max_at_once
    assert {k: len(v) for k, v in jobs.uids.items()} == {"pretrain": 1, "sft": 1}, jobs.uids
    final = sorted(j.metadata.labels["kubetrain.dev/stage"] for j in scenario.jobs("restart"))
    assert final == ["pretrain", "sft"]
    assert all(s["restarts"] == 0 for s in status["stages"]), status["stages"]


# --------------------------------------------------------------------------- 4


def test_deleting_a_run_garbage_collects_its_children(scenario: Scenario) -> None:
    """Deleting a TrainingRun mid-stage: the garbage collector removes its Job, Service
    and Pods through ownerReferences (no finalizer), and the trainer process gets SIGTERM.
    Pods run on fake KWOK GPU nodes; the trainer on CPU."""
    scenario.start_operator()
    scenario.create_run(
        tiny_curriculum("doomed", steps=100000, checkpoint_every=50, stages=("pretrain",))
    )
    _wait(
        scenario,
        lambda: scenario.progress("doomed", "pretrain").step > 0,
        "the stage training",
    )
    assert scenario.jobs("doomed") and scenario.pods("doomed") and scenario.services("doomed")

    scenario.custom.delete_namespaced_custom_object(
        api.GROUP, api.VERSION, scenario.namespace, api.PLURAL, "doomed"
    )
    _wait(
        scenario,
        lambda: _no_children(scenario, "doomed"),
        "Jobs, Pods and Services of the deleted run garbage-collected",
        timeout=120,
    )
    _wait(
        scenario,
        lambda: scenario.running_trainer("doomed", "pretrain") is None,
        "the deleted pod's trainer process exiting",
        timeout=60,
    )
    with pytest.raises(ApiException) as gone:
        scenario.get_run("doomed")
    assert gone.value.status == 404


# --------------------------------------------------------------------------- 5


def _valid_run(name: str = "valid") -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32},
            "storage": {"s3": {"bucket": "kubetrain"}},
            "stages": [
                {"name": "pretrain", "type": "pretrain", "hyperparameters": {"maxSteps": 10}},
                {"name": "sft", "type": "sft"},
                {"name": "dpo", "type": "dpo"},
            ],
        },
    }


def _edit(change: Callable[[dict[str, Any]], None], name: str = "valid") -> dict[str, Any]:
    doc = copy.deepcopy(_valid_run(name))
    change(doc["spec"])
    return doc


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return change


INVALID = {
    # OpenAPI schema
    "wrong type": (_edit(_set("model.layers", "two")), ["spec.model.layers", "integer"]),
    "unknown stage type": (
        _edit(_set("stages.0.type", "rlhf")),
        ["spec.stages[0].type", "Unsupported value", "rlhf"],
    ),
    "negative steps": (
        _edit(_set("stages.0.hyperparameters.maxSteps", -5)),
        ["spec.stages[0].hyperparameters.maxSteps", "greater than or equal to 1"],
    ),
    "empty stages": (_edit(_set("stages", [])), ["spec.stages", "at least 1"]),
    # What the Job create would otherwise refuse for ever, after the run was accepted.
    "negative cpu": (
        _edit(_set("stages.0.resources", {"cpu": "-4"})),
        ["spec.stages[0].resources.cpu", "-4"],
    ),
    "cpu with two dots": (
        _edit(_set("stages.0.resources", {"cpu": "1..2"})),
        ["spec.stages[0].resources.cpu", "1..2"],
    ),
    "keyless Equal toleration": (
        _edit(_set("stages.0.resources", {"tolerations": [{"operator": "Equal"}]})),
        [
            "spec.stages[0].resources.tolerations[0]",
            "a toleration without a key must use operator Exists",
        ],
    ),
    "node selector key": (
        _edit(_set("stages.0.resources", {"nodeSelector": {"gpu type": "a100"}})),
        ["spec.stages[0].resources.nodeSelector", "nodeSelector keys must be label keys"],
    ),
    "bad stage name": (_edit(_set("stages.0.name", "Pre_Train")), ["spec.stages[0].name"]),
    # CEL
    "duplicate stage names": (
        _edit(_set("stages.1.name", "pretrain")),
        ["spec.stages", "spec.stages[].name must be unique"],
    ),
    "dpo without sft": (
        _edit(
            _set(
                "stages", [{"name": "pretrain", "type": "pretrain"}, {"name": "dpo", "type": "dpo"}]
            )
        ),
        ["spec.stages", "a dpo stage needs an sft stage before it"],
    ),
    "dpo first": (
        _edit(_set("stages", [{"name": "dpo", "type": "dpo"}, {"name": "sft", "type": "sft"}])),
        ["spec.stages", "a dpo stage needs an sft stage before it"],
    ),
    "grpo without sft": (
        _edit(
            _set(
                "stages",
                [{"name": "pretrain", "type": "pretrain"}, {"name": "grpo", "type": "grpo"}],
            )
        ),
        ["spec.stages", "a grpo stage needs an sft stage before it"],
    ),
    "grpo settings on an sft stage": (
        _edit(_set("stages.1.grpo", {"generations": 4})),
        ["spec.stages[1].grpo", "stages[].grpo is only for stages of type grpo"],
    ),
    "heads not dividing dim": (
        _edit(_set("model.heads", 3)),
        ["spec.model.heads", "model.dim must be a multiple of model.heads"],
    ),
    "heads not dividing the default dim": (
        _edit(_set("model", {"heads": 3})),
        ["spec.model.heads", "model.dim must be a multiple of model.heads"],
    ),
    "seqLen over contextLength": (
        _edit(_set("stages.0.hyperparameters.seqLen", 64)),
        ["spec.stages", "seqLen must be at most model.contextLength"],
    ),
    "maxSteps and tokens": (
        _edit(_set("stages.0.hyperparameters.tokens", 1000)),
        [
            "spec.stages[0].hyperparameters",
            "set at most one of hyperparameters.maxSteps and hyperparameters.tokens",
        ],
    ),
    "run name too long": (
        _edit(lambda spec: None, name="r" * 41),
        ["metadata.name must be at most 40 characters"],
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_api_server_rejects_invalid_manifests(e2e: E2E, case: str) -> None:
    """The API server itself (OpenAPI schema and CEL rules of the CRD) answers 422 with
    a message naming the field; no operator is involved."""
    manifest, expected = INVALID[case]
    custom = client.CustomObjectsApi(e2e.admin)
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, "default", api.PLURAL, manifest
        )
    assert rejected.value.status == 422, rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_api_server_leaves_a_hugging_face_models_shape_to_its_config(e2e: E2E) -> None:
    """With model.from the model fields are optional and config.json decides: a lone
    heads value and a seqLen beyond the built-in context pass the API server (the trainer
    checks them against config.json)."""
    manifest = _edit(
        _set("model", {"from": "s3://models/llama", "heads": 3}),
        name="hf-shape",
    )
    manifest["spec"]["stages"][0]["hyperparameters"]["seqLen"] = 4096
    custom = client.CustomObjectsApi(e2e.admin)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "default", api.PLURAL, manifest)
    custom.delete_namespaced_custom_object(
        api.GROUP, api.VERSION, "default", api.PLURAL, "hf-shape"
    )
    api.parse_run(manifest)


def test_api_server_cel_approximates_the_dpo_order_rule(e2e: E2E) -> None:
    """CEL checks "an sft exists and dpo is not first" (the cost estimator refuses
    list-index functions): pretrain -> dpo -> sft passes the API server; `kubetrain
    validate` and the operator check the exact order."""
    manifest = _edit(
        _set(
            "stages",
            [
                {"name": "pretrain", "type": "pretrain"},
                {"name": "dpo", "type": "dpo"},
                {"name": "sft", "type": "sft"},
            ],
        ),
        name="cel-gap",
    )
    custom = client.CustomObjectsApi(e2e.admin)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "default", api.PLURAL, manifest)
    custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, "default", api.PLURAL, "cel-gap")
    with pytest.raises(api.ManifestError, match="no sft stage before it"):
        api.parse_run(manifest)


# --------------------------------------------------------------------------- 6


def test_budget_hit_suspends_after_a_checkpoint(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU-hour budget below what the stage has used: condition BudgetExceeded, the
    stage stops (SIGTERM: the trainer checkpoints and exits 75), phase Suspended as
    budget.action says, and the last checkpoint is complete and loadable from S3.

    The limit is lowered once the stage has trained (the same path as reaching it), so
    the stop lands mid-training whatever the speed of the machine. GPUs are fake; the
    trainer runs on CPU."""
    manifest = tiny_curriculum("budget", steps=100000, checkpoint_every=20, stages=("pretrain",))
    manifest["spec"]["budget"] = {"maxGPUHours": 10, "action": "Suspend"}
    scenario.start_operator()
    scenario.create_run(manifest)
    _wait(scenario, lambda: scenario.latest_step("budget", "pretrain"), "a first checkpoint")
    assert scenario.status("budget")["phase"] == "Running"

    scenario.patch_spec("budget", {"budget": {"maxGPUHours": 1e-6}})
    status = scenario.wait_phase("budget", "Suspended", timeout=60)
    budget = condition(status, "BudgetExceeded")
    assert budget["status"] == "True" and "budget.maxGPUHours" in budget["message"], budget
    suspended = condition(status, "Suspended")
    assert suspended["status"] == "True" and suspended["reason"] == "BudgetExceeded", suspended
    _wait(
        scenario,
        lambda: (
            not scenario.jobs("budget") and scenario.running_trainer("budget", "pretrain") is None
        ),
        "the stage's Job and trainer stopped",
        timeout=90,
    )
    codes = [
        code
        for name, _, code in scenario.runner.history
        if name.startswith(f"{scenario.namespace}/")
    ]
    assert codes == [75], codes  # checkpointed on SIGTERM (EXIT_CHECKPOINTED_ON_SIGTERM)

    # Nothing lost: the interrupted record's step is the step of LATEST, which is complete.
    progress = scenario.progress("budget", "pretrain")
    latest = scenario.latest_step("budget", "pretrain")
    assert progress.phase == "interrupted" and progress.step == latest, (progress, latest)
    assert scenario.s3_exists("budget", "pretrain", f"checkpoints/step-{latest:06d}/MANIFEST.json")
    for key, value in scenario.s3.env().items():
        monkeypatch.setenv(key, value)
    from kubetrain.core.store import open_store
    from kubetrain_trainer.checkpoint import Checkpointer

    folder = f"s3://{scenario.bucket}/{scenario.key('budget', 'pretrain', '')}".rstrip("/")
    loaded = Checkpointer(open_store(folder, endpoint=scenario.s3.endpoint)).load_latest()
    assert loaded is not None and loaded.step == latest
    assert loaded.state["trainer"]["step"] == latest and loaded.state["model"]
    assert stage_status(scenario.status("budget"), "pretrain")["phase"] == "Suspended"


# --------------------------------------------------------------------------- 7


def test_suspend_and_resume_continue_from_the_checkpoint(scenario: Scenario) -> None:
    """spec.suspend: true stops the pod (SIGTERM; the trainer checkpoints and exits 75),
    phase Suspended; false recreates the Job and the stage continues from that
    checkpoint to the end. GPUs are fake (KWOK); the trainer runs on CPU."""
    scenario.start_operator()
    # Enough steps that the suspend lands mid-stage on a fast machine too.
    scenario.create_run(
        tiny_curriculum("pause", steps=600, checkpoint_every=20, stages=("pretrain",))
    )
    _wait(scenario, lambda: scenario.latest_step("pause", "pretrain"), "a first checkpoint")
    assert scenario.running_trainer("pause", "pretrain"), "the stage ended before suspend"

    scenario.patch_spec("pause", {"suspend": True})
    status = scenario.wait_phase("pause", "Suspended", timeout=60)
    assert condition(status, "Suspended")["reason"] == "Suspended"
    _wait(
        scenario,
        lambda: (
            not scenario.jobs("pause") and scenario.running_trainer("pause", "pretrain") is None
        ),
        "the suspended stage's Job and trainer stopped",
        timeout=90,
    )
    progress = scenario.progress("pause", "pretrain")
    stopped_at = scenario.latest_step("pause", "pretrain")
    assert progress.phase == "interrupted" and progress.step == stopped_at, progress
    assert 0 < stopped_at < 600
    _wait(
        scenario,
        lambda: stage_status(scenario.status("pause"), "pretrain")["phase"] == "Suspended",
        "stage phase Suspended",
    )

    scenario.patch_spec("pause", {"suspend": False})
    status = scenario.wait_phase("pause", "Succeeded", timeout=240)
    st = stage_status(status, "pretrain")
    assert st["step"] == 600 and st["restarts"] == 0, st
    assert st.get("preemptions", 0) == 0, st  # the run's own stop is no disruption
    codes = [
        code
        for name, _, code in scenario.runner.history
        if name.startswith(f"{scenario.namespace}/")
    ]
    assert codes == [75, 0], codes
    assert [int(m) for m in RESUMED_RE.findall(scenario.trainer_logs())] == [stopped_at]
    history = [r.step for r in scenario.metrics_history("pause", "pretrain")]
    assert history == sorted(history) and history[-1] == 600, history


# --------------------------------------------------------------------------- 8


def test_operator_works_with_only_the_charts_rbac(e2e: E2E, scenario: Scenario) -> None:
    """The chart's ServiceAccount, ClusterRole and ClusterRoleBinding (rendered by Helm)
    are all the operator gets: it authenticates with a token of that ServiceAccount and
    completes a one-stage run; the same identity may not delete a namespace or list
    Secrets, so the identity is really the restricted one. Fake GPU nodes; CPU trainer."""
    admin = e2e.admin
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    release = f"kt-{scenario.namespace[-6:]}"
    op_ns = f"{release}-system"
    e2e.control_plane.create_namespace(op_ns)
    # The run's namespace grants the operator its Secrets (rbac.secretNamespaces), as a
    # team's RoleBinding to the chart's secret reader would.
    objects = render(
        {"rbac": {"secretNamespaces": [scenario.namespace]}}, release=release, namespace=op_ns
    )
    sa = next(o for o in objects if o["kind"] == "ServiceAccount")
    roles = [o for o in objects if o["kind"] == "ClusterRole"]
    (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    # The Lease rights, in the operator's own namespace only.
    (lease_role,) = [o for o in objects if o["kind"] == "Role"]
    (lease_binding, secret_binding) = sorted(
        (o for o in objects if o["kind"] == "RoleBinding"),
        key=lambda o: o["roleRef"]["kind"] == "ClusterRole",
    )
    assert lease_role["metadata"]["namespace"] == op_ns
    assert secret_binding["metadata"]["namespace"] == scenario.namespace
    core.create_namespaced_service_account(op_ns, sa)
    for role in roles:
        rbac.create_cluster_role(role)
    rbac.create_cluster_role_binding(binding)
    rbac.create_namespaced_role(op_ns, lease_role)
    rbac.create_namespaced_role_binding(op_ns, lease_binding)
    rbac.create_namespaced_role_binding(scenario.namespace, secret_binding)
    try:
        token = core.create_namespaced_service_account_token(
            sa["metadata"]["name"],
            op_ns,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
            ),
        ).status.token
        kubeconfig = service_account_kubeconfig(
            e2e.control_plane.kubeconfig, token, scenario.workdir / "operator.kubeconfig"
        )
        restricted = config.new_client_from_config(config_file=str(kubeconfig))
        as_operator = client.CoreV1Api(restricted)
        with pytest.raises(ApiException) as denied:
            as_operator.delete_namespace(scenario.namespace)
        assert denied.value.status == 403, denied.value.body
        user = f"system:serviceaccount:{op_ns}:{sa['metadata']['name']}"
        assert user in json.loads(denied.value.body)["message"]
        with pytest.raises(ApiException) as no_list:
            as_operator.list_namespaced_secret(scenario.namespace)
        assert no_list.value.status == 403
        # Secrets of a namespace that granted nothing stay unreadable.
        with pytest.raises(ApiException) as no_get:
            as_operator.read_namespaced_secret("kubetrain-s3", op_ns)
        assert no_get.value.status == 403

        # As the chart's Deployment sets it: the Lease goes in the operator's namespace.
        op = scenario.start_operator(
            kubeconfig, env={**environment_without_aws(), "POD_NAMESPACE": op_ns}
        )
        scenario.create_run(
            tiny_curriculum("rbac", steps=20, checkpoint_every=10, stages=("pretrain",))
        )
        status = scenario.wait_phase("rbac", "Succeeded", timeout=240)
        st = stage_status(status, "pretrain")
        assert st["step"] == 20 and st["costUSD"] > 0, st
        assert scenario.s3_text("rbac", "pretrain", "FINAL") == "checkpoints/step-000020"
        log = op.tail(200000)
        assert "Forbidden" not in log and " 403" not in log, log[-4000:]
        assert f"leads (Lease {op_ns}/kubetrain-operator)" in log, log[-4000:]
    finally:
        for op in scenario.operators:
            op.stop()
        rbac.delete_cluster_role_binding(binding["metadata"]["name"])
        for role in roles:
            rbac.delete_cluster_role(role["metadata"]["name"])
        core.delete_namespace(op_ns)
