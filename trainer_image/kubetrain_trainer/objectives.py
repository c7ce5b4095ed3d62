"""Training objectives: next-token CE (pretrain), response-only CE (SFT), DPO.

Pretrain and SFT share one function: the data marks positions outside the loss with
``IGNORE`` (SFT masks the prompt and the padding), so the objective cannot forget to.
DPO follows Rafailov et al. (2023), sigmoid loss, with TRL's names for what it logs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain_trainer.data import IGNORE, LMBatch, PairBatch


def lm_loss(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Mean cross-entropy over the target positions that are not IGNORE."""
    logits = model(batch.inputs)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE
    )


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each sequence's non-IGNORE positions: shape (B,)."""
    mask = targets != IGNORE
    safe = targets.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def pair_logprobs(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen and the rejected responses, one forward pass."""
    n = batch.chosen.inputs.shape[0]
    logits = model(torch.cat([batch.chosen.inputs, batch.rejected.inputs]))
    logps = sequence_logprobs(logits, torch.cat([batch.chosen.targets, batch.rejected.targets]))
    return logps[:n], logps[n:]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO sigmoid loss and its diagnostics.

    The implicit reward of a response is β·(log π(y|x) − log π_ref(y|x)); the loss is
    −log σ(reward_chosen − reward_rejected), so log 2 when the policy equals the
    reference. Metrics (detached): rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies (fraction of pairs whose chosen reward is higher).
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    margins = chosen - rejected
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margins": margins.detach().mean(),
        "rewards/accuracies": (margins.detach() > 0).float().mean(),
    }
    return loss, metrics


def dpo_step_loss(
    policy: nn.Module, reference: nn.Module, batch: PairBatch, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of one micro-batch; the reference runs without building a graph."""
    pc, pr = pair_logprobs(policy, batch)
    with torch.no_grad():
        rc, rr = pair_logprobs(reference, batch)
    return dpo_loss(pc, pr, rc, rr, beta)
