"""Greedy generation with the KV cache: the answers evaluation scores.

Prompts of different lengths share a batch by left padding: padding gets its own
document id, so real tokens never attend to it, and positions start at each prompt's
first real token, so every prompt is continued exactly as it would be alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kubetrain_trainer.hf.model import PAD_DOCUMENT, CausalLM, KVCache


@torch.no_grad()
def greedy_generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    pad_id: int = 0,
) -> list[list[int]]:
    """The most likely continuation of each prompt, up to ``max_new_tokens`` tokens or
    the first stop token (included)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    docs = torch.full((len(prompts), width), PAD_DOCUMENT, dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        ids[i, width - len(p) :] = torch.tensor(list(p))
        docs[i, width - len(p) :] = 0
    cache = KVCache(model.config.num_layers)
    logits = model(ids.to(device), document_ids=docs.to(device), cache=cache)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1).cpu()
        for i in range(len(prompts)):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        logits = model(nxt[:, None].to(device), cache=cache)
    return out
