"""A tiny curriculum that ends in grpo, run as a user runs it (`kubetrain run --local`,
the real trainer on the CPU): the grpo stage's reward rises, its diagnostics reach the
progress record, the summary and the report, a reward of the user's own (a module next
to the manifest) is imported by the trainer, and a grpo stage interrupted between two
rollouts resumes on the completions it was training on."""

from __future__ import annotations

import signal
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetrain.core import contract
from kubetrain.core.api import ModelSpec, Stage
from kubetrain.core.contract import StageConfig
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import read_metrics
from kubetrain.core.store import open_store
from kubetrain_trainer.train import Trainer, init_distributed
from tests.support.localrun import parse_summary, progress, run_cli, write_manifest
from tests.support.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GRPO_STEPS = 30


# A team's own reward, in a module beside the manifest (the trainer runs in that folder):
# it pays answers that start with a 1, which a model that has just learnt to answer
# with a number gives about as often as not, so that every group has something to teach
# and the rise is quick and certain. The exact-match reward comes on top.
USER_REWARD = """
def starts_with_one(prompts, completions, **columns):
    return [1.0 if c.strip().startswith("1") else 0.0 for c in completions]
"""


def curriculum(name: str) -> dict[str, Any]:
    """pretrain -> sft -> grpo of a 2-layer model on the arithmetic task."""
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"layers": 2, "heads": 4, "dim": 64, "contextLength": 32},
            "stages": [
                {
                    "name": "pretrain",
                    "type": "pretrain",
                    "data": {"evalExamples": 16},
                    "hyperparameters": {"maxSteps": 10, "batchSize": 8, "learningRate": 0.003},
                    "checkpointEvery": 10,
                },
                {
                    "name": "sft",
                    "type": "sft",
                    "data": {"evalExamples": 64},
                    "hyperparameters": {
                        "maxSteps": 150,
                        "batchSize": 32,
                        "learningRate": 0.003,
                        "warmupSteps": 20,
                        "logEvery": 50,
                    },
                    "checkpointEvery": 150,
                },
                {
                    "name": "grpo",
                    "type": "grpo",
                    "data": {"evalExamples": 64},
                    "hyperparameters": {
                        "maxSteps": GRPO_STEPS,
                        "batchSize": 8,
                        "learningRate": 0.001,
                        "schedule": "constant",
                        "beta": 0.04,
                        "logEvery": 1,
                    },
                    "grpo": {
                        "generations": 8,
                        "maxCompletionTokens": 5,
                        "iterations": 2,
                        "rewards": [
                            {"function": "exact-match"},
                            {"function": "team_rewards:starts_with_one"},
                        ],
                    },
                    "checkpointEvery": 7,
                },
            ],
        },
    }


def test_a_curriculum_ending_in_grpo_raises_the_reward(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, curriculum("rl"))
    (tmp_path / "team_rewards.py").write_text(USER_REWARD)
    out = run_cli(
        "run",
        str(manifest),
        "--local",
        "--plain",
        "--metrics-port",
        str(free_port()),
        cwd=tmp_path,
        timeout=800,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 3 stages complete" in out.stdout
    store = tmp_path / ".kubetrain" / "store"
    record = progress(store, "rl", "grpo")
    assert record.phase == "completed" and record.step == GRPO_STEPS
    for key in ("reward", "reward_std", "kl", "clip_ratio", "completion_length"):
        assert key in record.train, record.train
    assert {"rewards/exact-match", "rewards/team_rewards:starts_with_one"} <= set(record.train)
    assert record.train["completion_length"] <= 5
    assert "accuracy" in record.eval

    history = read_metrics(
        open_store(store.as_uri()), StageLayout.of("default", "rl", "grpo").metrics
    )
    rewards = [m.train["reward"] for m in history if "reward" in m.train]
    assert len(rewards) == GRPO_STEPS
    first, last = statistics.mean(rewards[:6]), statistics.mean(rewards[-6:])
    assert last > first + 0.2, f"reward did not rise: {rewards}"
    # Completions are reused for a second step (iterations 2): the ratio moves off 1.
    assert max(m.train["clip_ratio"] for m in history if "clip_ratio" in m.train) > 0

    table = parse_summary(out.stdout)
    assert abs(float(table["grpo"]["eval acc"]) - record.eval["accuracy"]) <= 5e-4
    assert "reward " in out.stdout  # the live line shows it
    curves = tmp_path / ".kubetrain" / "reports" / "rl" / "curves.png"
    assert curves.stat().st_size > 10_000


# --------------------------------------------------------------------------- resume


class StopAfter:
    """A stop request that arrives once the trainer has done ``step`` steps (what
    SIGTERM does, at a step chosen by the test)."""

    def __init__(self, step: int):
        self.step = step
        self.trainer: Trainer | None = None

    @property
    def signal(self) -> int | None:
        done = self.trainer is not None and self.trainer.step >= self.step
        return signal.SIGTERM if done else None


def _grpo_trainer(folder: Path) -> Trainer:
    stage = Stage.model_validate(
        {
            "name": "rl",
            "type": "grpo",
            "checkpointEvery": 100,
            "data": {"evalExamples": 8},
            "hyperparameters": {
                "maxSteps": 6,
                "batchSize": 4,
                "gradientAccumulation": 2,
                "logEvery": 1,
                "learningRate": 1e-3,
            },
            "grpo": {"generations": 4, "maxCompletionTokens": 4, "iterations": 2},
        }
    )
    config = StageConfig(
        run="rl",
        model=ModelSpec(layers=1, heads=2, dim=32, context_length=32),
        stage=stage,
    )
    env = {
        contract.ENV_STAGE_CONFIG: config.model_dump_json(by_alias=True),
        contract.ENV_CHECKPOINT_URI: folder.as_uri(),
        contract.ENV_METRICS_PORT: "0",
        "OMP_NUM_THREADS": "1",
    }
    return Trainer(env, init_distributed(env))


def test_a_grpo_stage_stopped_between_rollouts_resumes_on_the_same_completions(
    tmp_path: Path,
) -> None:
    whole = _grpo_trainer(tmp_path / "whole")
    whole.run(StopAfter(10**9))  # type: ignore[arg-type]

    # Stopped after step 3: the completions sampled at step 2 still have one step to go.
    first = _grpo_trainer(tmp_path / "split")
    stop = StopAfter(3)
    stop.trainer = first
    first.run(stop)  # type: ignore[arg-type]
    assert first.step == 3
    saved = torch.load(
        tmp_path / "split" / "checkpoints" / "step-000003" / "trainer.pt", weights_only=True
    )
    assert len(saved["grpo"]["rollouts"]) == 2  # one per micro-batch

    second = _grpo_trainer(tmp_path / "split")
    second.run(StopAfter(10**9))  # type: ignore[arg-type]
    assert second.step == 6
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), f"{name} differs"
    assert second.train_metrics == whole.train_metrics
