"""`kubetrain estimate`: the arithmetic checked against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetrain.cli.main import main
from kubetrain.core.accounting import (
    ACCELERATORS,
    estimate_params_tokens,
    estimate_run,
    flops_per_token,
    parameter_count,
)
from kubetrain.core.api import ModelSpec, Pricing, parse_spec
from kubetrain.core.hf_config import flops_per_token as hf_flops
from kubetrain.core.hf_config import parameter_count as hf_parameter_count
from kubetrain.core.hf_config import read_config
from kubetrain.core.records import ProgressRecord, write_progress
from kubetrain.core.store import open_store

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
    assert "6.3e+24" in out and "6,319,515" in out
    # The --params path is plain 6·N·D and says so.
    assert "attention term" not in out.replace("no attention term", "")
    assert "Llama 3 70B" in out


def test_estimate_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate"]) == 2
    assert "--params" in capsys.readouterr().err
    assert main(["estimate", "--params", "7e9", "--tokens", "1e12", "--gpu", "tpu9"]) == 2
    err = capsys.readouterr().err
    assert "tpu9" in err and "h100" in err


def test_default_mfu_reproduces_published_runs() -> None:
    """Meta trained Llama 3 70B on 15T tokens in 6.4M H100-hours and Llama 2 70B on 2T
    tokens in 1.72M A100-hours: the calibrated defaults land within 5% of both."""
    llama3 = estimate_params_tokens(70e9, 15e12, gpu="h100")
    assert llama3.gpu_hours == pytest.approx(6.4e6, rel=0.05)
    llama2 = estimate_params_tokens(70e9, 2e12, gpu="a100")
    assert llama2.gpu_hours == pytest.approx(1_720_320, rel=0.10)
    for acc in ACCELERATORS.values():
        assert 0 < acc.mfu <= 1 and acc.mfu_source, acc.name


def test_dpo_counts_both_sequences_and_the_reference() -> None:
    stage = {
        "name": "dpo",
        "type": "dpo",
        "hyperparameters": {"maxSteps": 10, "batchSize": 4},
        "resources": {"gpusPerNode": 1, "gpuType": "a100"},
    }
    spec = parse_spec(
        {
            "model": {"layers": 2, "heads": 2, "dim": 64, "contextLength": 64, "from": "file:///m"},
            "stages": [stage],
        }
    )
    est = estimate_run(spec, mfu=0.5).stages[0]
    # 10 steps · 4 pairs · 2 sequences (chosen and rejected) · 64 tokens.
    assert est.tokens == 10 * 4 * 2 * 64
    # Per token: the policy's forward and backward, and the reference's forward (a third).
    assert est.flops == pytest.approx(est.tokens * (6 * 115264 + 98304) * 4 / 3)


def _hf_folder(tmp_path: Path, **overrides: object) -> Path:
    config = {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **overrides,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _hf_manifest(tmp_path: Path, folder: Path, model: dict[str, object]) -> Path:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "ft"},
        "spec": {
            "model": {"from": folder.as_uri(), **model},
            "stages": [{"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 5}}],
        },
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_hugging_face_model_is_estimated_from_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model").mkdir()
    folder = _hf_folder(tmp_path / "model")
    cfg = read_config(folder)
    spec = parse_spec(
        {"model": {"from": folder.as_uri()}, "stages": [{"name": "s", "type": "sft"}]}
    )
    est = estimate_run(spec, architecture=cfg)
    assert est.parameters == hf_parameter_count(cfg)
    # seqLen defaults to 1024 for a `from` model whose contextLength is not given.
    assert est.stages[0].tokens == 100 * 16 * 1024
    assert est.stages[0].flops == pytest.approx(est.stages[0].tokens * hf_flops(cfg, 1024))
    manifest = _hf_manifest(tmp_path, folder, {})
    assert main(["estimate", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert f"{est.parameters:,} parameters (llama, 3 layers" in out
    mismatch = _hf_manifest(tmp_path, folder, {"layers": 24, "dim": 64})
    assert main(["estimate", str(mismatch)]) == 2
    err = capsys.readouterr().err
    assert "model.layers=24 but config.json has num_hidden_layers=3" in err
    assert "dim" not in err.split("model.layers")[1]  # dim agrees: not reported


def test_the_estimate_uses_the_mfu_earlier_runs_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(tmp_path.as_uri())
    for run, mfu in (("a", 0.31), ("b", 0.35), ("c", 0.5)):
        record = ProgressRecord(phase="completed", mfu=mfu, accelerator="h100", step=1)
        write_progress(store, f"default/{run}/sft/progress.json", record)
    # Not counted: a stage that did not complete, another accelerator class.
    write_progress(
        store,
        "default/d/sft/progress.json",
        ProgressRecord(phase="failed", mfu=0.9, accelerator="h100"),
    )
    write_progress(
        store,
        "default/e/sft/progress.json",
        ProgressRecord(phase="completed", mfu=0.1, accelerator="a100"),
    )
    args = ["estimate", "--params", "7e9", "--tokens", "1e12", "--store", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MFU 35% on h100 (measured: median of 3 earlier stages in" in out
    est = estimate_params_tokens(7e9, 1e12, mfu=0.35)
    assert f"{est.gpu_hours:,.0f}" in out
    assert main([*args, "--mfu", "0.5"]) == 0
    assert "MFU 50% on h100 (given)" in capsys.readouterr().out


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
    forward = 2 * n + 4 * attention  # a third of it
    reference = forward
    # Sampling (a forward pass per token) and the sampling policy's log-probs, once
    # per rollout, shared by the 2 steps (iterations) that train on it.
    rollout = (forward + forward) / 2
    assert stage.tokens == tokens
    assert stage.flops == pytest.approx(tokens * (train + reference + rollout))


def test_params_and_tokens_say_how_the_model_is_split_and_how_many_gpus_it_needs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 70B model's 1.1 TB of training state: sharded, and on one H100 it cannot fit,
    so the estimate says how many it takes; an 8B one fits replicated on one H200."""
    assert main(["estimate", "--params", "70e9", "--tokens", "15e12"]) == 0
    out = capsys.readouterr().out
    assert "parallelism of pretrain: fsdp" in out
    assert "does not fit: needs at least 28 h100 GPUs, or cpuOffload" in out
    assert main(["estimate", "--params", "70e9", "--tokens", "15e12", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "sharded over 64 processes, 17.5 GB each" in out and "does not fit" not in out
    assert main(["estimate", "--params", "3e9", "--tokens", "1e11", "--gpu", "h200"]) == 0
    assert "parallelism of pretrain: ddp" in capsys.readouterr().out
