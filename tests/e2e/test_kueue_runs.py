"""TrainingRuns in Kueue queues, end to end: the operator (watching Kueue's Workloads),
Kueue's manager and webhooks, the real Job controller and scheduler on fake KWOK GPU
nodes, and trainers that really train (PodRunner runs them on CPU) with checkpoints in
SeaweedFS.

- Two runs compete for a ClusterQueue's one ``nvidia.com/gpu``: the second waits with
  condition Queued (Kueue's reason and message), is billed nothing while it waits, and
  runs and completes once the first is done.
- A run of a higher WorkloadPriorityClass preempts a running lower one: Kueue suspends
  the lower run's Job, its trainer checkpoints on SIGTERM, the stage waits queued and
  resumes from that checkpoint when readmitted: a preemption, not a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.scenario_harness import Scenario, condition, stage_status, tiny_curriculum
from tests.e2e.test_scenarios import (  # noqa: F401  (the fixtures)
    E2E,
    RESUMED_RE,
    e2e,
    scenario,
)
from tests.support.kueue import PRIORITY_LABEL, create_priority_class, create_queue
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def queued(scenario: Scenario, kueue: Any) -> Scenario:  # noqa: F811
    """A scenario whose operator starts once Kueue is up (it looks for Kueue's API when
    it starts)."""
    scenario.start_operator()
    return scenario


def _wait(sc: Scenario, cond: Callable[[], Any], what: str, timeout: float = 180) -> Any:
    return wait_for(cond, timeout=timeout, what=what, interval=0.3, detail=sc.detail)


def _queued_run(name: str, queue: str, steps: int, priority: str | None = None) -> dict[str, Any]:
    run = tiny_curriculum(name, steps=steps, checkpoint_every=10, stages=("pretrain",))
    run["spec"]["queueName"] = queue
    if priority:
        run["metadata"]["labels"] = {PRIORITY_LABEL: priority}
    return run


def _queued_condition(sc: Scenario, run: str) -> dict[str, Any] | None:
    cond = condition(sc.status(run), "Queued")
    return cond if cond.get("status") == "True" else None


def test_second_run_waits_for_gpu_quota_unbilled_then_completes(queued: Scenario) -> None:
    sc = queued
    queue = create_queue(sc.admin, sc.namespace, sc.namespace, gpus=1)
    sc.create_run(_queued_run("first", queue, steps=150))
    sc.wait_phase("first", "Running", timeout=120)
    sc.create_run(_queued_run("second", queue, steps=20))

    waiting = _wait(sc, lambda: _queued_condition(sc, "second"), "run second to show Queued")
    assert waiting["reason"] == "Pending", waiting
    assert f"LocalQueue '{queue}'" in waiting["message"], waiting
    assert "insufficient unused quota for nvidia.com/gpu" in waiting["message"], waiting
    job = sc.jobs("second")[0]
    assert job.spec.suspend is True and not sc.pods("second")

    # It waits while the first trains: nothing billed for that.
    _wait(sc, lambda: sc.progress("first", "pretrain").step >= 50, "first to train on")
    status = sc.status("second")
    assert status["phase"] == "Pending", status
    assert stage_status(status, "pretrain").get("gpuSeconds", 0) == 0, status
    assert _queued_condition(sc, "second") is not None

    sc.wait_phase("first", "Succeeded", timeout=300)
    done = sc.wait_phase("second", "Succeeded", timeout=300)
    admitted = condition(done, "Queued")
    assert admitted["status"] == "False" and admitted["reason"] == "Admitted", admitted
    st = stage_status(done, "pretrain")
    assert st["step"] == 20 and st["restarts"] == 0 and st["preemptions"] == 0, st
    assert st["gpuSeconds"] > 0, st
    # The Job the operator created is the one Kueue admitted: never recreated.
    assert [j.metadata.uid for j in sc.jobs("second")] == [job.metadata.uid]


def test_higher_priority_run_preempts_a_lower_one_which_resumes(queued: Scenario) -> None:
    sc = queued
    low = create_priority_class(sc.admin, f"{sc.namespace}-low", 100)
    high = create_priority_class(sc.admin, f"{sc.namespace}-high", 1000)
    queue = create_queue(
        sc.admin,
        sc.namespace,
        sc.namespace,
        gpus=1,
        preemption={"withinClusterQueue": "LowerPriority"},
    )
    sc.create_run(_queued_run("background", queue, steps=400, priority=low))
    _wait(sc, lambda: sc.latest_step("background", "pretrain"), "a first checkpoint of background")
    job_uid = sc.jobs("background")[0].metadata.uid

    sc.create_run(_queued_run("urgent", queue, steps=20, priority=high))

    def preempted() -> dict[str, Any] | None:
        st = stage_status(sc.status("background"), "pretrain")
        return st if st.get("preemptions", 0) >= 1 and _queued_condition(sc, "background") else None

    st = _wait(sc, preempted, "background to be preempted by Kueue and queued again")
    assert st["restarts"] == 0, st
    stopped = _wait(
        sc,
        lambda: (
            sc.progress("background", "pretrain").phase == "interrupted"
            and sc.progress("background", "pretrain").step
        ),
        "background's checkpoint on SIGTERM (progress phase interrupted)",
    )
    sc.wait_phase("urgent", "Succeeded", timeout=300)
    done = sc.wait_phase("background", "Succeeded", timeout=400)

    st = stage_status(done, "pretrain")
    assert st["restarts"] == 0 and st["preemptions"] >= 1, st
    assert st["step"] == 400, st
    codes = [c for name, _, c in sc.runner.history if name.startswith(f"{sc.namespace}/background")]
    assert 75 in codes and codes[-1] == 0, codes
    resumed = [int(m) for m in RESUMED_RE.findall(sc.trainer_logs())]
    assert stopped in resumed, (resumed, stopped)
    # Kueue suspended and readmitted the same Job; the operator never recreated it.
    assert [j.metadata.uid for j in sc.jobs("background")] == [job_uid]
    assert condition(done, "Restarting")["status"] == "False", done["conditions"]
