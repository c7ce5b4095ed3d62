"""The native Hugging Face model families against transformers' own forward.

Every model here is tiny, random and built from a config in the test (nothing is
downloaded). All parameters, norms and biases included, are randomised so that a
weight in the wrong place cannot hide behind an initial value of 0 or 1.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from kubetrain.core.hf_config import (
    ModelFormatError,
    flops_per_token,
    from_hf_config,
    parameter_count,
)
from kubetrain_trainer.hf.examples import TokenizedExample
from kubetrain_trainer.hf.model import CausalLM, KVCache, build_model
from kubetrain_trainer.hf.packing import pack_rows
from kubetrain_trainer.hf.weights import load_pretrained
from kubetrain_trainer.sampling import sample

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 97
TOLERANCE = 1e-4
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
GPT2_SMALL = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}

# name -> (transformers config class, kwargs, sequence length used for parity)
FAMILIES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama2": ("LlamaConfig", {**SMALL, "num_key_value_heads": 4}, 12),
    "llama3-rope-llama3-tied-gqa": (
        "LlamaConfig",
        {
            **SMALL,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        12,
    ),
    "llama-rope-linear-biases": (
        "LlamaConfig",
        {
            **SMALL,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
        12,
    ),
    "llama-rope-dynamic-past-context": (
        "LlamaConfig",
        {
            **SMALL,
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
        24,
    ),
    "llama-rope-yarn": (
        "LlamaConfig",
        {
            **SMALL,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        20,
    ),
    "mistral-sliding-window": ("MistralConfig", {**SMALL, "sliding_window": 5}, 16),
    "qwen2-bias-tied": ("Qwen2Config", {**SMALL, "tie_word_embeddings": True}, 12),
    "qwen2-sliding-window-layers": (
        "Qwen2Config",
        {**SMALL, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        14,
    ),
    "qwen3-qk-norm-head-dim": ("Qwen3Config", {**SMALL, "head_dim": 16}, 12),
    "gpt2-tied": ("GPT2Config", GPT2_SMALL, 12),
    "gpt2-untied-layer-scaled": (
        "GPT2Config",
        {**GPT2_SMALL, "tie_word_embeddings": False, "scale_attn_by_inverse_layer_idx": True},
        12,
    ),
}


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            # Norm weights around 1, everything else around 0, none exactly either.
            p.copy_(noise + 1.0 if p.dim() == 1 and ("norm" in name or "ln" in name) else noise)


def reference(name: str) -> transformers.PreTrainedModel:
    """The family's transformers model with random weights, in eval mode."""
    cls, kwargs, _ = FAMILIES[name]
    cfg = getattr(transformers, cls)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    _randomise(model)
    return model.eval()


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[transformers.PreTrainedModel, CausalLM]]:
    """Each family: (transformers' model, the native model loaded from its save)."""
    out = {}
    for name in FAMILIES:
        ref = reference(name)
        with tempfile.TemporaryDirectory() as d:
            ref.save_pretrained(d)
            out[name] = (ref, load_pretrained(d))
    return out


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_equal_transformers_forward(loaded: dict, name: str) -> None:
    ref, model = loaded[name]
    x = tokens(2, FAMILIES[name][2])
    with torch.no_grad():
        expected = ref(x).logits
        got = model(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_parameter_count_from_config_equals_the_models(loaded: dict, name: str) -> None:
    ref, model = loaded[name]
    # Tied embeddings are one tensor, counted once, as transformers counts them too.
    assert parameter_count(model.config) == model.num_parameters() == ref.num_parameters()


@pytest.mark.parametrize(
    "name",
    [
        "llama3-rope-llama3-tied-gqa",
        "mistral-sliding-window",
        "qwen3-qk-norm-head-dim",
        "gpt2-tied",
    ],
)
def test_each_packed_document_gets_the_logits_it_gets_alone(loaded: dict, name: str) -> None:
    ref, model = loaded[name]
    docs = [tokens(1, n, seed=n)[0].tolist() for n in (7, 5, 9)]
    row = [TokenizedExample(d, [True] * len(d)) for d in docs]
    # Two rows: the three documents with padding after them, and one of them alone.
    batch = pack_rows([row, row[1:2]], seq_len=24, pad_id=0)
    with torch.no_grad():
        packed = model(batch.inputs, batch.position_ids, batch.document_ids)
        at = 0
        for d in docs:
            alone = ref(torch.tensor([d])).logits[0]
            assert (packed[0, at : at + len(d)] - alone).abs().max().item() <= TOLERANCE
            at += len(d)
        alone = ref(torch.tensor([docs[1]])).logits[0]
        assert (packed[1, : len(docs[1])] - alone).abs().max().item() <= TOLERANCE


def _recompute(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def greedy(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
) -> list[list[int]]:
    """Greedy continuations by the trainer's KV-cache sampler."""
    return sample(
        model, prompts, temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=0
    ).tokens


@pytest.mark.parametrize(
    "name",
    ["llama3-rope-llama3-tied-gqa", "mistral-sliding-window", "qwen2-bias-tied", "gpt2-tied"],
)
def test_kv_cache_generation_equals_full_recompute(loaded: dict, name: str) -> None:
    _, model = loaded[name]
    prompts = [tokens(1, 6, seed=3)[0].tolist(), tokens(1, 3, seed=4)[0].tolist()]
    # Batched with left padding, each prompt continues as it does alone.
    got = greedy(model, prompts, max_new_tokens=6)
    assert got == [_recompute(model, p, 6) for p in prompts]


def test_generation_stops_at_a_stop_token(loaded: dict) -> None:
    _, model = loaded["qwen2-bias-tied"]
    prompt = tokens(1, 5, seed=5)[0].tolist()
    full = _recompute(model, prompt, 6)
    got = greedy(model, [prompt], max_new_tokens=6, stop_ids=frozenset({full[2]}))
    assert got == [full[: full.index(full[2]) + 1]]


def test_kv_cache_continuation_equals_one_forward(loaded: dict) -> None:
    _, model = loaded["mistral-sliding-window"]
    x = tokens(2, 14)
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        whole = model(x)
        first = model(x[:, :9], cache=cache)
        rest = model(x[:, 9:], cache=cache)
    assert (torch.cat((first, rest), dim=1) - whole).abs().max().item() <= TOLERANCE


def _config(**overrides: Any) -> dict[str, Any]:
    return {"model_type": "mistral", **SMALL, **overrides}


def test_compiles_as_one_graph_with_packing_windows_and_dynamic_rope() -> None:
    cfg = from_hf_config(
        _config(
            sliding_window=4,
            max_position_embeddings=8,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.reset_parameters()
    x = tokens(2, 12)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for kwargs in ({}, {"document_ids": docs}):
            assert (compiled(x, **kwargs) - model(x, **kwargs)).abs().max().item() <= TOLERANCE


def test_fsdp2_shards_each_block_and_keeps_the_forward(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = from_hf_config(
        {"model_type": "qwen3", **SMALL, "head_dim": 16, "tie_word_embeddings": True}
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.reset_parameters()
    x = tokens(2, 10)
    expected = model(x).detach()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        got = model(x)
        got.sum().backward()
        assert (got.detach() - expected).abs().max().item() <= TOLERANCE
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_flops_count_matmul_weights_and_the_attended_length() -> None:
    full = from_hf_config(_config(sliding_window=None))
    windowed = from_hf_config(_config(sliding_window=16))
    gpt2 = from_hf_config({"model_type": "gpt2", **GPT2_SMALL})
    d, layers = 32, 2
    # Untied: the input embedding is a lookup, the output head a matmul.
    matmul = parameter_count(full) - VOCAB * d
    assert flops_per_token(full, 64) == 6 * matmul + 12 * d * layers * 64
    # A window caps how far back each token attends.
    assert flops_per_token(windowed, 64) == 6 * matmul + 12 * d * layers * 16
    # Tied: the one matrix is the head; learned positions are a lookup.
    assert flops_per_token(gpt2, 64) == 6 * (parameter_count(gpt2) - 64 * d) + 12 * d * layers * 64


def test_a_meta_device_model_materialised_in_place_gives_the_same_logits(loaded: dict) -> None:
    # FSDP's way to build big models: on the meta device, then to_empty() and load.
    _, model = loaded["llama3-rope-llama3-tied-gqa"]
    with torch.device("meta"):
        fresh = build_model(model.config)
    fresh.to_empty(device="cpu")
    fresh.reset_buffers()
    fresh.load_state_dict(model.state_dict())
    x = tokens(1, 10)
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max().item() <= TOLERANCE


def test_transformers_4_config_files_read_like_transformers_5_ones() -> None:
    rope = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    old = _config(model_type="llama", rope_theta=500000.0, rope_scaling={"type": "llama3", **rope})
    new = _config(
        model_type="llama",
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **rope},
    )
    assert from_hf_config(old) == from_hf_config(new)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model_type": "bert"}, "model_type='bert' is not supported (accepted: llama, mistral"),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope_parameters.rope_type='longrope' is not supported (accepted: default, linear",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        ({"hidden_act": "mish"}, "hidden_act='mish' is not supported (accepted: silu"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
        ({"hidden_size": None}, "missing hidden_size"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoints"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
            "original_max_position_embeddings is required",
        ),
    ],
)
def test_unsupported_configs_name_the_key_and_what_is_accepted(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelFormatError, match=r"config\.json") as err:
        from_hf_config(_config(**overrides))
    assert message in str(err.value)
