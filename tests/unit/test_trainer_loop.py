"""Pieces of the training loop that need no process: schedule and launcher."""

from __future__ import annotations

import pytest

from kubetrain.core.api import Hyperparameters
from kubetrain_trainer.launch import torchrun_command
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
        assert command[-3:] == ["torch.distributed.run", "--module", "kubetrain_trainer"]
