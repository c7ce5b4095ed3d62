"""Sampling with the KV cache: the same tokens as recomputing the whole sequence, for
the built-in model and the Hugging Face families, batched prompts continued as alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kubetrain.core.api import ModelSpec
from kubetrain.core.hf_config import from_hf_config
from kubetrain_trainer.hf.model import KVCache
from kubetrain_trainer.hf.model import build_model as build_hf
from kubetrain_trainer.model import build_model
from kubetrain_trainer.sampling import next_tokens, sample, sample_without_cache

torch.set_num_threads(1)

HF_SMALL = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _builtin() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(layers=2, heads=4, dim=32, context_length=32))


def _hf(config: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_hf(from_hf_config(config))
    # Large weights: random models with std 0.02 would repeat one token for ever.
    model.reset_parameters(std=0.5)
    return model


MODELS = {
    "builtin": _builtin,
    "llama": lambda: _hf({"model_type": "llama", **HF_SMALL}),
    "qwen2": lambda: _hf({"model_type": "qwen2", **HF_SMALL, "tie_word_embeddings": True}),
    "gpt2": lambda: _hf(
        {
            "model_type": "gpt2",
            "vocab_size": 97,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 64,
        }
    ),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_greedy_equals_recomputing_each_prompt_alone(name: str) -> None:
    model = MODELS[name]()
    got = sample(model, PROMPTS, temperature=0, max_new_tokens=8, stop_ids=set(), pad_id=0)
    alone = [
        sample_without_cache(model, [p], max_new_tokens=8, stop_ids=set(), pad_id=0)[0]
        for p in PROMPTS
    ]
    assert got.tokens == alone
    assert all(len(t) == 8 for t in got.tokens) and not any(got.stopped)


def test_the_builtin_model_continues_a_cache_exactly() -> None:
    model = _builtin()
    x = torch.randint(0, 256, (2, 12))
    cache = KVCache(2)
    with torch.no_grad():
        whole = model(x)
        first = model(x[:, :7], cache=cache)
        rest = model(x[:, 7:], cache=cache)
    assert (torch.cat((first, rest), dim=1) - whole).abs().max().item() <= 1e-5


def test_a_completion_ends_with_its_stop_token_and_the_others_go_on() -> None:
    model = MODELS["llama"]()
    full = sample(model, PROMPTS, temperature=0, max_new_tokens=8, stop_ids=set(), pad_id=0)
    stop = full.tokens[1][2]
    got = sample(model, PROMPTS, temperature=0, max_new_tokens=8, stop_ids={stop}, pad_id=0)
    for row, whole, stopped in zip(got.tokens, full.tokens, got.stopped, strict=True):
        if stop in whole:
            assert row == whole[: whole.index(stop) + 1] and stopped
        else:
            assert row == whole and not stopped


def test_generations_are_prompt_major_and_reproducible_from_the_generator() -> None:
    model = _builtin()

    def draw(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return sample(
            model, PROMPTS, generations=3, max_new_tokens=6, stop_ids=set(), pad_id=256, generator=g
        ).tokens

    first = draw(1)
    assert len(first) == 9
    assert first == draw(1)
    assert first != draw(2)


def test_the_context_limits_how_far_the_builtin_model_samples() -> None:
    model = _builtin()  # context 32
    got = sample(model, [[1] * 30], temperature=0, max_new_tokens=10, stop_ids=set(), pad_id=0)
    assert len(got.tokens[0]) == 2
    with pytest.raises(ValueError, match="no room to generate"):
        sample(model, [[1] * 32], temperature=0, max_new_tokens=1, stop_ids=set(), pad_id=0)


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    # Renormalised over the kept tokens: 0.5 / 0.8 of the draws are token 0.
    assert abs(float((drawn == 0).float().mean()) - 0.625) < 0.05
    assert next_tokens(logits[:1], temperature=0.0, top_p=1.0, generator=None).tolist() == [0]
