"""Held-out evaluation of a Hugging Face model: the built-in model's metrics
(:mod:`kubetrain_trainer.evaluation`), on token ids from the model's own tokenizer.

- ``loss``: mean cross-entropy on the held-out examples' trained tokens;
- ``accuracy``: the greedy answer to each prompt (KV-cache generation until a stop
  token, ``kubetrain_trainer.sampling``), decoded, equals the reference completion
  (special tokens dropped, whitespace stripped);
- ``preferenceAccuracy``: the chosen response is more likely than the rejected one.
"""

from __future__ import annotations

import torch

from kubetrain_trainer.evaluation import BATCH, SUMS
from kubetrain_trainer.hf.examples import HeldOut, answer_split
from kubetrain_trainer.hf.model import CausalLM
from kubetrain_trainer.hf.packing import pad_batch, pair_batch
from kubetrain_trainer.hf.tokenizer import HFTokenizer
from kubetrain_trainer.objectives import lm_loss_sum, loss_items, pair_logprobs
from kubetrain_trainer.sampling import sample

# Generation is capped: exact match on answers longer than this says little anyway.
MAX_ANSWER_TOKENS = 256


@torch.no_grad()
def evaluate_sums(
    model: CausalLM,
    held: HeldOut,
    tok: HFTokenizer,
    seq_len: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """The evaluation sums (``kubetrain_trainer.evaluation.SUMS``) over this rank's share
    of ``held``."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(SUMS, 0.0)
    examples, pairs = held.examples[rank::world], held.pairs[rank::world]
    try:
        for s in range(0, len(examples), BATCH):
            batch = pad_batch(examples[s : s + BATCH], seq_len, tok.pad_id).to(device)
            sums["loss_sum"] += float(lm_loss_sum(model, batch))
            sums["loss_tokens"] += loss_items(batch)
        if held.generate:
            sums["answered"], sums["hits"] = _exact_match(model, examples, tok, seq_len)
        else:
            sums["texts"] = len(examples)
        for s in range(0, len(pairs), BATCH):
            pb = pair_batch(pairs[s : s + BATCH], seq_len, tok.pad_id).to(device)
            chosen, rejected = pair_logprobs(model, pb)
            sums["wins"] += int((chosen > rejected).sum())
        sums["pairs"] = len(pairs)
    finally:
        model.train(was_training)
    return sums


def _exact_match(
    model: CausalLM, examples: list, tok: HFTokenizer, seq_len: int
) -> tuple[int, int]:
    """(answered, hits) of greedy answers to the examples' prompts."""
    asked = [answer_split(ex) for ex in examples]
    asked = [(p, a) for p, a in asked if p and a and len(p) < seq_len]
    hits = 0
    for s in range(0, len(asked), BATCH):
        chunk = asked[s : s + BATCH]
        longest = min(max(len(a) for _, a in chunk), MAX_ANSWER_TOKENS)
        got = sample(
            model,
            [p for p, _ in chunk],
            temperature=0.0,
            max_new_tokens=longest + 1,
            stop_ids=tok.stop_ids,
            pad_id=tok.pad_id,
        )
        for (_, answer), ids in zip(chunk, got.tokens, strict=True):
            hits += tok.decode(ids).strip() == tok.decode(answer).strip()
    return len(asked), hits
