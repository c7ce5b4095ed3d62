"""GRPO's loss and advantages against TRL's GRPOTrainer, and its rollouts.

TRL is the reference implementation: its ``_compute_loss`` runs here on a stand-in
trainer object that carries exactly the attributes the method reads, with the per-token
log-probabilities handed in, so both sides see identical inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd as trl_nanstd

from kubetrain.core.api import GRPO, ModelSpec, Reward
from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import IGNORE, PromptBatch
from kubetrain_trainer.grpo import (
    GRPOLearner,
    group_advantages,
    grpo_loss,
    hf_codec,
    rollout_metrics,
    to_sequences,
    token_logprobs,
)
from kubetrain_trainer.model import build_model
from kubetrain_trainer.rewards import RewardSet

torch.set_num_threads(1)
TOLERANCE = 1e-5


def _trl_trainer(
    loss_type: str, beta: float, epsilon: float, accumulation: int, logps: torch.Tensor
) -> Any:
    """What TRL's ``_compute_loss`` reads of its trainer, on one process."""

    def per_token_logps(*_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, None]:
        return logps, torch.zeros_like(logps), None

    accelerator = SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
    )
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation
        ),
    )


def _inputs(seed: int, off_policy: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    logps = -torch.rand(b, t, generator=g) * 3
    shift = 0.5 if off_policy else 0.0  # far enough from the policy for clipping
    return {
        "logps": logps,
        "old": logps + shift * torch.randn(b, t, generator=g),
        "ref": logps + 0.3 * torch.randn(b, t, generator=g),
        "advantages": torch.randn(b, generator=g),
        "mask": mask,
    }


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "iterations>1"])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_loss_and_gradient_equal_trls(loss_type: str, off_policy: bool, accumulation: int) -> None:
    x = _inputs(seed=accumulation, off_policy=off_policy)
    beta, epsilon = 0.04, 0.2
    # TRL's dapo normaliser is the generation batch's completion tokens (here: this
    # micro-batch's, times the accumulation, as if every micro-batch had as many).
    items = float(x["mask"].sum()) * accumulation

    ours_logps = x["logps"].clone().requires_grad_(True)
    old = x["old"] if off_policy else None
    ours, metrics = grpo_loss(
        ours_logps,
        old,
        x["ref"],
        x["advantages"],
        x["mask"],
        beta=beta,
        epsilon=epsilon,
        loss_type=loss_type,
        accumulation=accumulation,
        tokens_per_process=items,
    )
    ours.backward()

    trl_logps = x["logps"].clone().requires_grad_(True)
    trainer = _trl_trainer(loss_type, beta, epsilon, accumulation, trl_logps)
    b = x["mask"].shape[0]
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros_like(x["mask"]),
        "completion_mask": x["mask"],
        "advantages": x["advantages"],
        "old_per_token_logps": old,
        "ref_per_token_logps": x["ref"],
        "num_items_in_batch": torch.tensor(items),
    }
    theirs = GRPOTrainer._compute_loss(trainer, None, inputs)
    theirs.backward()

    assert abs(ours.item() - theirs.item()) <= TOLERANCE
    assert trl_logps.grad is not None and ours_logps.grad is not None
    assert (ours_logps.grad - trl_logps.grad).abs().max().item() <= TOLERANCE
    logged = trainer._metrics["train"]
    tokens = float(metrics["tokens"])
    assert abs(float(metrics["kl"]) / tokens - logged["kl"][0]) <= TOLERANCE
    assert abs(float(metrics["clip_ratio"]) / tokens - logged["clip_ratio/region_mean"][0]) <= 1e-6
    if off_policy:
        assert float(metrics["clip_ratio"]) > 0, "the test must exercise clipping"


def test_advantages_equal_trls_group_normalisation() -> None:
    g = 4
    rewards = torch.tensor(
        [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, math.nan, 0.0, 1.0], dtype=torch.float64
    )
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    std = trl_nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    expected = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    got = group_advantages(rewards, g)
    assert torch.allclose(got, expected, atol=1e-12)
    # A group whose completions all scored the same teaches nothing.
    assert got[4:8].abs().max() == 0
    # An unscorable completion gets no advantage.
    assert got[9] == 0


def test_no_kl_term_without_a_reference() -> None:
    x = _inputs(seed=0, off_policy=False)
    loss, metrics = grpo_loss(
        x["logps"], None, None, x["advantages"], x["mask"], beta=0.1, epsilon=0.2, loss_type="grpo"
    )
    # On-policy, ratio 1: the loss is minus the mean advantage.
    assert abs(float(loss) + float(x["advantages"].mean())) <= TOLERANCE
    assert "kl" not in metrics


def test_sequences_mark_only_completion_tokens_as_targets() -> None:
    inputs, targets = to_sequences([[257, 10, 11], [257, 12]], [[20, 258], [21, 22, 258]], 256)
    assert inputs.tolist() == [[257, 10, 11, 20], [257, 12, 21, 22]]
    assert targets.tolist() == [
        [IGNORE, IGNORE, 20, 258],
        [IGNORE, 21, 22, 258],
    ]


def _tiny_learner(**settings: Any) -> tuple[torch.nn.Module, GRPOLearner]:
    torch.manual_seed(0)
    spec = ModelSpec(layers=1, heads=2, dim=16, context_length=32)
    policy, reference = build_model(spec), build_model(spec)
    reference.load_state_dict(policy.state_dict())
    learner = GRPOLearner(
        GRPO(**settings),
        beta=0.1,
        rewards=RewardSet.from_spec(
            [Reward(function="exact-match"), Reward(function="format", weight=0.5)]
        ),
        reference=reference.eval().requires_grad_(False),
        seq_len=32,
    )
    return policy, learner


def test_a_rollout_samples_groups_scores_them_and_normalises_within_each() -> None:
    policy, learner = _tiny_learner(generations=4, max_completion_tokens=5, iterations=2)
    batch = PromptBatch(["Q: 1+2\nA: ", "Q: 10+20\nA: "], {"answer": ["3", "30"]})
    generator = torch.Generator().manual_seed(0)
    rollout, stats = learner.roll_out(policy, batch, generator, contextlib.nullcontext())
    assert rollout.inputs.shape[0] == 8 and rollout.advantages.shape == (8,)
    for group in rollout.advantages.view(2, 4):
        assert abs(float(group.sum())) <= 1e-4
    # The reference is the policy: their log-probs agree where there is a target.
    assert rollout.ref_logps is not None and rollout.old_logps is not None
    assert torch.allclose(rollout.ref_logps, rollout.old_logps, atol=1e-6)
    # Every completion is at most maxCompletionTokens, and the prompts are untouched.
    assert stats.completions == 8
    assert stats.completion_tokens <= 8 * 5
    assert rollout.inputs[0, : len(tok.encode("Q: 1+2\nA: ", bos=True))].tolist() == tok.encode(
        "Q: 1+2\nA: ", bos=True
    )
    metrics = rollout_metrics(stats)
    assert set(metrics) >= {
        "reward",
        "reward_std",
        "rewards/exact-match",
        "rewards/format",
        "completion_length",
        "frac_reward_zero_std",
    }
    loss, m = learner.loss(
        policy, rollout, accumulation=1, tokens_per_process=rollout.completion_tokens
    )
    loss.backward()
    assert float(m["clip_ratio"]) == 0  # the policy has not moved since sampling
    assert any(p.grad is not None for p in policy.parameters())


def test_token_logprobs_are_the_temperature_scaled_distribution() -> None:
    policy, _ = _tiny_learner()
    inputs, targets = to_sequences([[257, 10]], [[20, 258]], 256)
    with torch.no_grad():
        logp = torch.log_softmax(policy(inputs).float() / 0.7, -1)
        got = token_logprobs(policy, inputs, targets, 0.7)
    expected = logp[0, 1, 20] + logp[0, 2, 258]
    assert abs(float(got.sum()) - float(expected)) <= 1e-5
    assert float(got[0, 0]) == 0.0


def test_a_hugging_face_model_rolls_out_and_trains_through_its_tokenizer(
    tmp_path: Path,
) -> None:
    from kubetrain.core.hf_config import from_hf_config
    from kubetrain_trainer.hf.model import build_model as build_hf
    from kubetrain_trainer.hf.tokenizer import HFTokenizer
    from tests.unit.test_hf_data import write_tokenizer

    tokenizer = HFTokenizer.from_folder(write_tokenizer(tmp_path, None, eos="<|endoftext|>"))
    config = from_hf_config(
        {
            "model_type": "qwen2",
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
        }
    )
    torch.manual_seed(0)
    policy, reference = build_hf(config), build_hf(config)
    policy.reset_parameters()
    reference.load_state_dict(policy.state_dict())
    learner = GRPOLearner(
        GRPO(generations=4, max_completion_tokens=6),
        beta=0.04,
        # Rewards that differ within a group, so that the advantages are not all zero.
        rewards=RewardSet(
            ("length",), (lambda prompts, completions, **_: [len(c) for c in completions],), (1.0,)
        ),
        reference=reference.eval().requires_grad_(False),
        seq_len=64,
        codec=hf_codec(tokenizer),
    )
    batch = PromptBatch(["What is two plus two?", "Say yes."], {})
    rollout, stats = learner.roll_out(
        policy, batch, torch.Generator().manual_seed(0), contextlib.nullcontext()
    )
    assert stats.completions == 8 and rollout.inputs.shape[0] == 8
    prompt = tokenizer.encode("Say yes.", add_special_tokens=True)
    assert rollout.inputs[4, : len(prompt)].tolist() == prompt
    loss, _ = learner.loss(
        policy, rollout, accumulation=1, tokens_per_process=rollout.completion_tokens
    )
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
