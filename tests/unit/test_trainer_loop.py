"""Pieces of the training loop that need no process: schedule and launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain.core.api import Hyperparameters
from kubetrain.core.contract import EXIT_CHECKPOINTED_ON_SIGTERM
from kubetrain_trainer.launch import (
    ENV_EXIT_DIR,
    TORCHRUN_SHUTDOWN_SECONDS,
    pod_exit_code,
    read_reports,
    report_exit,
    torchrun_command,
)
from kubetrain_trainer.train import MIN_LR_RATIO, lr_factor


def test_warmup_then_cosine_to_a_tenth() -> None:
    f = lr_factor(Hyperparameters(warmupSteps=10, schedule="cosine"), total=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5)
    assert f(110) == pytest.approx(MIN_LR_RATIO)
    values = [f(s) for s in range(10, 111)]
    assert values == sorted(values, reverse=True)


def test_linear_and_constant_schedules() -> None:
    linear = lr_factor(Hyperparameters(schedule="linear"), total=100)
    assert linear(0) == pytest.approx(1.0) and linear(50) == pytest.approx(0.55)
    constant = lr_factor(Hyperparameters(schedule="constant", warmupSteps=4), total=100)
    assert constant(1) == pytest.approx(0.5) and constant(99) == 1.0


@pytest.mark.parametrize(
    "env,launches",
    [
        ({}, False),
        ({"PET_NPROC_PER_NODE": "1", "PET_NNODES": "1"}, False),
        ({"PET_NPROC_PER_NODE": "2", "PET_NNODES": "1"}, True),
        ({"PET_NPROC_PER_NODE": "1", "PET_NNODES": "4"}, True),
        # Already a torchrun worker: never launch again.
        ({"PET_NPROC_PER_NODE": "2", "LOCAL_RANK": "0"}, False),
    ],
)
def test_torchrun_only_when_the_stage_needs_several_processes(
    env: dict[str, str], launches: bool
) -> None:
    command = torchrun_command(env)
    assert (command is not None) == launches
    if command:
        assert command[1:3] == ["-m", "torch.distributed.run"]
        assert command[-2:] == ["--module", "kubetrain_trainer"]
        # torchrun must not SIGKILL workers that are still uploading their checkpoint
        # (its default: 30 s after SIGTERM); the pod's grace period is the limit.
        at = command.index("--shutdown-timeout")
        assert int(command[at + 1]) == TORCHRUN_SHUTDOWN_SECONDS >= 86400


CKPT = EXIT_CHECKPOINTED_ON_SIGTERM


@pytest.mark.parametrize(
    "torchrun,reports,workers,pod",
    [
        (0, {0: 0, 1: 0}, 2, 0),
        # torchrun exits 1 when a worker exits non-zero, and 1 or 143 after a SIGTERM:
        # the workers' reports decide.
        (1, {0: CKPT, 1: CKPT}, 2, CKPT),
        (143, {0: CKPT, 1: CKPT}, 2, CKPT),
        (1, {0: CKPT, 1: 0}, 2, CKPT),
        # One worker failed, or did not report (killed): a failure, torchrun's code.
        (1, {0: CKPT, 1: 1}, 2, 1),
        (1, {0: CKPT}, 2, 1),
        (143, {}, 2, 143),
        (-9, {0: CKPT}, 2, 137),
        # torchrun's own code is never mistaken for the checkpoint code.
        (CKPT, {}, 2, 1),
    ],
)
def test_pod_exit_code_comes_from_the_workers(
    torchrun: int, reports: dict[int, int], workers: int, pod: int
) -> None:
    assert pod_exit_code(torchrun, reports, workers) == pod


def test_workers_report_their_exit_code_by_local_rank(tmp_path: Path) -> None:
    for rank, code in ((0, CKPT), (1, 1)):
        env = {ENV_EXIT_DIR: str(tmp_path), "LOCAL_RANK": str(rank)}
        assert report_exit(code, env) == code
    (tmp_path / "local-rank-x").write_text("junk")
    assert read_reports(tmp_path) == {0: CKPT, 1: 1}
    # Outside the launcher a worker reports nothing.
    assert report_exit(CKPT, {"LOCAL_RANK": "0"}) == CKPT
