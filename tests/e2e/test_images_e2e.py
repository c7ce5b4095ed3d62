"""The images on the test control plane: the operator image's `kubetrain operator` (run as
the chart's Deployment runs it: read-only root filesystem, non-root, capabilities
dropped) reconciles a TrainingRun whose pods PodRunner runs as containers of the trainer
image, stage after stage of the example's curriculum.

Skipped, with the command that builds them, when the images are not built. The fake GPU
nodes of this module are their own (label and taint ``RUNNER_KEY=image``), so that the
process-mode scenarios' pods never land here, nor these pods there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.podrunner import PodRunner
from tests.e2e.scenario_harness import (
    Scenario,
    add_runner_nodes,
    install_crd,
    new_scenario,
    stage_status,
    tiny_curriculum,
)
from tests.support import images
from tests.support.services import S3Service
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.images]

IMAGE_NODES = ("e2e-image-gpu-0",)
RUNNER = "image"
CURRICULUM = ("pretrain", "sft", "dpo", "grpo")


@pytest.fixture(scope="module")
def built() -> images.Images:
    names = images.names()
    images.require(names.operator)
    images.require(names.trainer)
    return names


@pytest.fixture(scope="module")
def image_runner(built: images.Images, control_plane: Any) -> Iterator[PodRunner]:
    """PodRunner in image mode on this module's fake GPU node. One thread per trainer:
    two busy cores are shared with everything else."""
    admin = control_plane.api_client()
    install_crd(admin)
    add_runner_nodes(control_plane, admin, IMAGE_NODES, RUNNER)
    runner = PodRunner(
        admin,
        set(IMAGE_NODES),
        extra_env={"OMP_NUM_THREADS": "1"},
        image_engine=images.ENGINE,
    ).start()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture
def scenario(
    control_plane: Any,
    image_runner: PodRunner,
    seaweed_s3: S3Service,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[Scenario]:
    label = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())
    sc = new_scenario(
        control_plane.api_client(),
        control_plane.kubeconfig,
        image_runner,
        seaweed_s3,
        control_plane,
        label[:12].strip("-"),
        tmp_path,
    )
    failed_before = request.session.testsfailed
    try:
        yield sc
    finally:
        if request.session.testsfailed > failed_before:
            print(sc.detail())
        sc.close()


def test_curriculum_runs_in_the_operator_and_trainer_images(
    scenario: Scenario, built: images.Images
) -> None:
    """pretrain -> sft -> dpo -> grpo, every process in an image: the operator container creates
    each stage's Job with the trainer image, PodRunner runs the pods as containers of it
    with the pod's environment and user, and the run succeeds with every stage's FINAL
    checkpoint in the S3 store. The operator exits 0 on SIGTERM, as on a Deployment rollout."""
    operator = scenario.start_operator_container(built)
    scenario.create_run(tiny_curriculum("tiny", steps=20, checkpoint_every=10, runner=RUNNER))

    def succeeded_or_operator_gone() -> dict[str, Any] | None:
        if not operator.alive():
            return {"operatorExited": True}
        return scenario.phase_is("tiny", "Succeeded")

    status = wait_for(
        succeeded_or_operator_gone,
        timeout=900,
        what="run tiny reaching phase Succeeded",
        interval=0.5,
        detail=scenario.detail,
    )
    assert operator.alive(), f"the operator container exited:\n{operator.tail()}"

    for stage in CURRICULUM:
        st = stage_status(status, stage)
        assert st["phase"] == "Succeeded" and st["step"] == 20, st
        assert scenario.s3_text("tiny", stage, "FINAL") == "checkpoints/step-000020", stage
        assert scenario.progress("tiny", stage).phase == "completed", stage
    assert status["progress"] == "4/4 100%"

    pods = scenario.pods("tiny")
    assert {p.spec.containers[0].image for p in pods} == {built.trainer}, pods
    assert len(scenario.runner.history) >= len(CURRICULUM), scenario.runner.history
    logs = scenario.trainer_logs()
    assert logs.count("completed 20 steps") == len(CURRICULUM), logs[-4000:]

    assert operator.alive(), operator.tail()
    assert operator.stop() == 0, operator.tail()
