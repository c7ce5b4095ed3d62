"""Held-out evaluation: exact match by greedy decoding, answer loss, and preference
accuracy (does the model give the chosen response a higher log-probability than the
rejected one?). The same numbers after every stage make the curriculum comparable."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import IGNORE, EvalSet, _pair_batch, _sequence, collate
from kubetrain_trainer.model import GPT
from kubetrain_trainer.objectives import pair_logprobs

BATCH = 64


@torch.no_grad()
def greedy_answers(
    model: GPT, prompts: list[str], max_new_tokens: int, device: torch.device
) -> list[str]:
    """Greedy continuations of ``prompts`` until EOS or ``max_new_tokens``.

    Prompts are grouped by token length so a batch needs no padding (positions stay
    exact without attention masks); without a KV cache, fine at evaluation sizes.
    """
    context = model.cfg.context_length
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [tok.encode(p, bos=True) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out = [""] * len(prompts)
    for length, members in by_len.items():
        for s in range(0, len(members), BATCH):
            idx = members[s : s + BATCH]
            seq = torch.tensor([encoded[i] for i in idx], device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for _ in range(min(max_new_tokens, context - length)):
                nxt = model(seq[:, -context:])[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tok.EOS), nxt)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                done |= nxt == tok.EOS
                if bool(done.all()):
                    break
            for row, i in zip(seq[:, length:].tolist(), idx, strict=True):
                out[i] = tok.decode(row)
    return out


@torch.no_grad()
def evaluate(model: GPT, eval_set: EvalSet, seq_len: int, device: torch.device) -> dict[str, float]:
    """Metrics on the held-out set: ``accuracy`` (exact match), ``loss`` (mean CE on
    answer tokens, or on held-out text), ``preferenceAccuracy``, ``examples``."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        if eval_set.qa:
            prompts = [p for p, _ in eval_set.qa]
            answers = [a for _, a in eval_set.qa]
            longest = max(len(tok.encode(a)) for a in answers)
            got = greedy_answers(model, prompts, longest + 1, device)
            hits = sum(g.strip() == a.strip() for g, a in zip(got, answers, strict=True))
            metrics["accuracy"] = hits / len(answers)
            metrics["examples"] = float(len(answers))
            metrics["loss"] = _mean_loss(
                model, [_sequence(p, a, seq_len) for p, a in eval_set.qa], device
            )
        elif eval_set.text:
            metrics["loss"] = _mean_loss(model, [(w, [1] * len(w)) for w in eval_set.text], device)
            metrics["examples"] = float(len(eval_set.text))
        if eval_set.pairs:
            wins = 0
            for s in range(0, len(eval_set.pairs), BATCH):
                batch = _pair_batch(eval_set.pairs[s : s + BATCH], seq_len).to(device)
                chosen, rejected = pair_logprobs(model, batch)
                wins += int((chosen > rejected).sum())
            metrics["preferenceAccuracy"] = wins / len(eval_set.pairs)
    finally:
        model.train(was_training)
    return metrics


def _mean_loss(
    model: nn.Module, seqs: list[tuple[list[int], list[int]]], device: torch.device
) -> float:
    total, count = 0.0, 0
    for s in range(0, len(seqs), BATCH):
        batch = collate(seqs[s : s + BATCH]).to(device)
        logits = model(batch.inputs)
        total += float(
            F.cross_entropy(
                logits.flatten(0, 1).float(),
                batch.targets.flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
        )
        count += int((batch.targets != IGNORE).sum())
    return total / count if count else math.nan
