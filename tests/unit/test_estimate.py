"""`kubetrain estimate`: the arithmetic checked against a hand computation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain.cli.main import main
from kubetrain.core.accounting import (
    estimate_params_tokens,
    estimate_run,
    flops_per_token,
    parameter_count,
)
from kubetrain.core.api import ModelSpec, Pricing, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def test_parameter_count_by_hand() -> None:
    # d=64, L=2, V=260, C=64: embeddings 260·64 + 64·64 = 20736; blocks 2·(12·4096 + 128)
    # = 98560; final norm 64.
    assert parameter_count(ModelSpec(layers=2, heads=2, dim=64, context_length=64)) == 119360


def test_flops_per_token_by_hand() -> None:
    m = ModelSpec(layers=2, heads=2, dim=64, context_length=64)
    # 6·(119360 − 64·64) + 12·2·64·64 = 6·115264 + 98304
    assert flops_per_token(m) == 6 * 115264 + 98304


def test_frontier_pretraining_by_hand() -> None:
    """70B parameters on 15T tokens on H100s at 40% MFU."""
    est = estimate_params_tokens(
        70e9,
        15e12,
        gpu="h100",
        mfu=0.4,
        pricing=Pricing(energy_usd_per_kwh=0.1, pue=1.2, carbon_grams_per_kwh=400),
    )
    flops = 6 * 70e9 * 15e12  # 6.3e24
    gpu_hours = flops / (989e12 * 0.4) / 3600  # ≈ 4.42 million
    kwh = gpu_hours * 0.7 * 1.2  # 700 W boards, PUE 1.2
    assert est.flops == pytest.approx(6.3e24)
    assert est.gpu_hours == pytest.approx(gpu_hours)
    assert est.gpu_hours == pytest.approx(4.4237e6, rel=1e-3)
    assert est.energy_kwh == pytest.approx(kwh)
    assert est.cost_usd == pytest.approx(gpu_hours * 2.50 + kwh * 0.1)
    assert est.co2_grams == pytest.approx(kwh * 400)


def test_manifest_estimate_by_hand() -> None:
    spec = parse_spec(
        {
            "model": {"layers": 2, "heads": 2, "dim": 64, "contextLength": 64},
            "stages": [
                {
                    "name": "pre",
                    "type": "pretrain",
                    "hyperparameters": {"maxSteps": 10, "batchSize": 4},
                    "resources": {"gpusPerNode": 8, "nodes": 2, "gpuType": "a100"},
                }
            ],
            "pricing": {"gpuHourUSD": 2.0, "pue": 1.0, "carbonGramsPerKWh": 100},
        }
    )
    est = estimate_run(spec, mfu=0.5)
    stage = est.stages[0]
    tokens = 10 * 4 * 8 * 2 * 64  # steps · batch · processes · nodes · seq
    flops = tokens * (6 * 115264 + 98304)
    gpu_hours = flops / (312e12 * 0.5) / 3600
    assert stage.tokens == tokens and stage.gpus == 16
    assert stage.flops == pytest.approx(flops)
    assert stage.gpu_hours == pytest.approx(gpu_hours)
    assert stage.wall_hours == pytest.approx(gpu_hours / 16)
    assert stage.cost_usd == pytest.approx(gpu_hours * 2.0)
    assert stage.co2_grams == pytest.approx(gpu_hours * 0.4 * 100)


def test_tokens_convert_to_steps() -> None:
    spec = parse_spec(
        {
            "stages": [
                {
                    "name": "s",
                    "type": "pretrain",
                    "hyperparameters": {"tokens": 10_000, "batchSize": 8},
                }
            ]
        }
    )
    # 8 sequences · 64 tokens = 512 tokens per step -> ceil(10000 / 512) = 20 steps
    assert estimate_run(spec).stages[0].steps == 20


def test_estimate_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(ROOT / "examples" / "tiny-run.yaml")]) == 0
    out = capsys.readouterr().out
    for word in ("pretrain", "sft", "dpo", "total", "GPU-hours", "CO2"):
        assert word in out
    assert main(["estimate", "--params", "70e9", "--tokens", "15e12", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "6.3e+24" in out and "4,423,660" in out


def test_estimate_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate"]) == 2
    assert "--params" in capsys.readouterr().err
    assert main(["estimate", "--params", "7e9", "--tokens", "1e12", "--gpu", "tpu9"]) == 2
    err = capsys.readouterr().err
    assert "tpu9" in err and "h100" in err


def test_grpo_estimate_counts_sampling_and_the_reference_by_hand() -> None:
    spec = parse_spec(
        {
            "model": {"layers": 2, "heads": 2, "dim": 64, "contextLength": 64},
            "stages": [
                {"name": "sft", "type": "sft"},
                {
                    "name": "rl",
                    "type": "grpo",
                    "hyperparameters": {"maxSteps": 10, "batchSize": 4, "seqLen": 32},
                    "grpo": {"generations": 8, "iterations": 2},
                },
            ],
        }
    )
    stage = estimate_run(spec).stages[1]
    tokens = 10 * 4 * 8 * 32  # steps · prompts · generations · seq
    n, attention = 115264, 2 * 64 * 32  # matmul weights; L·d·T
    train = 6 * n + 12 * attention  # policy forward and backward
    reference = 2 * n
    # Sampling (a forward pass per token) and the sampling policy's log-probs, once
    # per rollout, shared by the 2 steps (iterations) that train on it.
    rollout = (2 * n + 4 * attention + 2 * n) / 2
    assert stage.tokens == tokens
    assert stage.flops == pytest.approx(tokens * (train + reference + rollout))
