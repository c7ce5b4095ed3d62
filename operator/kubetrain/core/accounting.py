"""Size, FLOPs, GPU-time, energy, cost and carbon: before a run (estimates) and during
it (accrued). Pure arithmetic, no I/O, so the CLI, the operator and the local runner
agree on every number.

Conventions (stated so anyone can redo the arithmetic by hand):
- Parameters of the built-in model (``kubetrain_trainer.model``): tied token embedding
  V·d, learned positions C·d, per block two RMSNorm weights (2d), attention q,k,v,o
  without biases (4d²) and an MLP of width 4d without biases (8d²), a final norm (d).
- Training FLOPs per token = 6·N_matmul + 12·L·d·T (forward + backward): N_matmul
  counts every weight used in a matrix multiply, the tied embedding included because it
  is the output projection, position embeddings excluded (a lookup is free); the second
  term is attention's QKᵀ and AV over a sequence of T tokens (as in nanoGPT and
  torchtitan).
- dpo adds the frozen reference's forward pass (2·N_matmul per token); grpo adds it too,
  and sampling its completions with a KV cache (a forward pass, 2·N_matmul + 4·L·d·T
  per token, shared by the ``iterations`` steps that reuse them). A grpo step trains
  batchSize × generations sequences per process and micro-batch; estimates take every
  sequence at its longest (seqLen), as for the other stages.
- GPU-hours = FLOPs / (peak dense bf16 FLOP/s × MFU) / 3600.
- Energy (IT) = GPU-hours × board power; facility energy = IT × PUE.
- Cost = GPU-hours × price per GPU-hour + facility kWh × energy price.
- CO2 = facility kWh × grid carbon intensity.

What a stage has spent is priced by one function, :func:`stage_cost`, wherever it ran.
Only the GPU-seconds are counted differently, each by what its runner can observe:
- on a cluster (``kubetrain.operator.progress``) they are what the cluster allocated:
  GPUs per pod × the seconds each pod held them, attempts and restarts included, so
  time spent pulling images or waiting on a checkpoint upload is billed as it is by a
  cloud;
- in a local run (``kubetrain.local.runner``) they are :func:`wall_gpu_seconds`: the
  stage's GPUs × the trainer's own wall seconds (no pods to observe; 0 on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from kubetrain.core.api import ModelSpec, Pricing, Resources, Stage, TrainingRunSpec

JOULES_PER_KWH = 3.6e6
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (fp32 for "cpu")
    watts: float  # board power under training load
    usd_per_hour: float  # on-demand list price, order of magnitude


# Public list figures; the chart's values override the prices per cluster.
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in [
        Accelerator("b200", 2250e12, 1000.0, 6.00),
        Accelerator("h200", 989e12, 700.0, 3.50),
        Accelerator("h100", 989e12, 700.0, 2.50),
        Accelerator("a100", 312e12, 400.0, 1.80),
        Accelerator("l40s", 362e12, 350.0, 1.00),
        Accelerator("l4", 121e12, 72.0, 0.60),
        # A CPU "device" for stages with gpusPerNode 0 (local runs, tiny demos).
        Accelerator("cpu", 0.5e12, 65.0, 0.0),
    ]
}
DEFAULT_GPU = "h100"


def accelerator(name: str | None, gpus: int = 1) -> Accelerator:
    """The accelerator a stage runs on: its gpuType, ``cpu`` without GPUs."""
    if gpus == 0:
        return ACCELERATORS["cpu"]
    key = (name or DEFAULT_GPU).lower()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown gpu type {name!r} (accepted: {', '.join(sorted(ACCELERATORS))})")
    return ACCELERATORS[key]


def parameter_count(model: ModelSpec) -> int:
    """Parameters of the built-in transformer (must equal the trainer's numel)."""
    d, L = model.dim, model.layers
    embeddings = model.vocab_size * d + model.context_length * d
    per_block = 12 * d * d + 2 * d
    return embeddings + L * per_block + d


def flops_per_token(model: ModelSpec, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token, see the module docstring."""
    t = seq_len or model.context_length
    n_matmul = parameter_count(model) - model.context_length * model.dim
    return 6.0 * n_matmul + 12.0 * model.layers * model.dim * t


def generation_flops_per_token(model: ModelSpec, seq_len: int | None = None) -> float:
    """Forward FLOPs per token of sampling with a KV cache (every token of prompt and
    completion passes the model once): 2·N_matmul + 4·L·d·T."""
    t = seq_len or model.context_length
    n_matmul = parameter_count(model) - model.context_length * model.dim
    return 2.0 * n_matmul + 4.0 * model.layers * model.dim * t


def grpo_flops_per_token(model: ModelSpec, seq_len: int | None, iterations: int) -> float:
    """FLOPs per trained token of a grpo step: the policy's forward and backward, the
    frozen reference's forward (2·N_matmul), and, once per batch of completions and so
    shared by its ``iterations`` steps, sampling it (:func:`generation_flops_per_token`)
    plus, when ``iterations`` > 1, a forward pass for the sampling policy's log-probs."""
    n_matmul = parameter_count(model) - model.context_length * model.dim
    rollout = generation_flops_per_token(model, seq_len)
    if iterations > 1:
        rollout += 2.0 * n_matmul
    return flops_per_token(model, seq_len) + 2.0 * n_matmul + rollout / iterations


def sequences_per_micro_batch(stage: Stage) -> int:
    """Sequences one process trains per micro-batch: batchSize, times the completions
    per prompt for grpo (its batchSize counts prompts)."""
    hp = stage.hyperparameters
    if stage.type.value == "grpo":
        return hp.batch_size * stage.grpo_settings.generations
    return hp.batch_size


def tokens_per_step(stage: Stage, model: ModelSpec) -> int:
    """Tokens consumed by one optimizer step over all processes."""
    hp, res = stage.hyperparameters, stage.resources
    seq = hp.seq_len or model.context_length
    return (
        sequences_per_micro_batch(stage)
        * hp.gradient_accumulation
        * res.processes
        * res.nodes
        * seq
    )


DEFAULT_STEPS = 100


def total_steps(stage: Stage, model: ModelSpec) -> int:
    """Optimizer steps the stage will take (maxSteps, or tokens converted, or 100)."""
    hp = stage.hyperparameters
    if hp.max_steps is not None:
        return hp.max_steps
    if hp.tokens is not None:
        return max(1, math.ceil(hp.tokens / tokens_per_step(stage, model)))
    return DEFAULT_STEPS


def gpu_hour_price(
    pricing: Pricing, acc: Accelerator, price_table: dict[str, float] | None = None
) -> float:
    """Price of one device-hour: the manifest's, the operator's table, or the default."""
    if pricing.gpu_hour_usd is not None:
        return pricing.gpu_hour_usd
    if price_table and acc.name in price_table:
        return price_table[acc.name]
    return acc.usd_per_hour


def accrue(
    gpu_seconds: float, energy_joules: float, pricing: Pricing, gpu_hour_usd: float
) -> tuple[float, float]:
    """Cost in USD and grams CO2 for GPU time and IT energy already spent."""
    facility_kwh = energy_joules / JOULES_PER_KWH * pricing.pue
    cost = gpu_seconds / 3600.0 * gpu_hour_usd + facility_kwh * pricing.energy_usd_per_kwh
    co2 = facility_kwh * pricing.carbon_grams_per_kwh
    return cost, co2


class Spent(NamedTuple):
    """What GPU time and energy cost: dollars and grams CO2."""

    usd: float
    co2_grams: float


def stage_cost(
    gpu_seconds: float,
    energy_joules: float,
    resources: Resources,
    pricing: Pricing,
    price_table: dict[str, float] | None = None,
) -> Spent:
    """Cost and CO2 of a stage's GPU-seconds and IT energy (joules), priced by its
    gpuType: ``pricing.gpuHourUSD``, else ``price_table`` (the operator's), else the
    list price. The one place spending is priced (see the module docstring for how
    each runner counts GPU-seconds)."""
    acc = accelerator(resources.gpu_type, resources.gpus_per_node)
    price = gpu_hour_price(pricing, acc, price_table)
    return Spent(*accrue(gpu_seconds, energy_joules, pricing, price))


def wall_gpu_seconds(resources: Resources, wall_seconds: float) -> float:
    """A local run's GPU-seconds: every GPU of the stage for the trainer's wall time."""
    return resources.gpus_per_node * resources.nodes * wall_seconds


@dataclass(frozen=True)
class StageEstimate:
    name: str
    accelerator: str
    gpus: int
    steps: int
    tokens: int
    flops: float
    gpu_hours: float
    wall_hours: float
    energy_kwh: float  # facility energy (× PUE)
    cost_usd: float
    co2_grams: float


@dataclass(frozen=True)
class RunEstimate:
    parameters: int
    stages: list[StageEstimate]
    mfu: float

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def energy_kwh(self) -> float:
        return sum(s.energy_kwh for s in self.stages)

    @property
    def cost_usd(self) -> float:
        return sum(s.cost_usd for s in self.stages)

    @property
    def co2_grams(self) -> float:
        return sum(s.co2_grams for s in self.stages)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)


def estimate_compute(
    *,
    name: str,
    flops: float,
    tokens: int,
    steps: int,
    acc: Accelerator,
    gpus: int,
    pricing: Pricing,
    mfu: float,
    price_table: dict[str, float] | None = None,
) -> StageEstimate:
    """Turn a FLOP count into GPU-hours, wall time, energy, cost and CO2."""
    device_count = max(gpus, 1)
    gpu_hours = flops / (acc.peak_flops * mfu) / 3600.0
    wall_hours = gpu_hours / device_count
    it_joules = gpu_hours * 3600.0 * acc.watts
    facility_kwh = it_joules / JOULES_PER_KWH * pricing.pue
    billable_gpu_seconds = gpu_hours * 3600.0 if gpus else 0.0
    cost, co2 = accrue(
        billable_gpu_seconds, it_joules, pricing, gpu_hour_price(pricing, acc, price_table)
    )
    return StageEstimate(
        name, acc.name, gpus, steps, tokens, flops, gpu_hours, wall_hours, facility_kwh, cost, co2
    )


def estimate_run(
    spec: TrainingRunSpec, mfu: float = DEFAULT_MFU, price_table: dict[str, float] | None = None
) -> RunEstimate:
    """Per-stage and total estimate of a manifest, before anything runs."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} (accepted: 0 < mfu <= 1)")
    out = []
    for stage in spec.stages:
        res = stage.resources
        gpus = res.gpus_per_node * res.nodes
        acc = accelerator(res.gpu_type, gpus)
        steps = total_steps(stage, spec.model)
        tokens = steps * tokens_per_step(stage, spec.model)
        seq = stage.hyperparameters.seq_len or spec.model.context_length
        per_token = flops_per_token(spec.model, seq)
        if stage.type.value == "dpo":
            # Policy forward+backward on chosen and rejected (tokens counts both), plus a
            # forward pass of the frozen reference: 2 more FLOPs per parameter per token.
            per_token += 2.0 * (
                parameter_count(spec.model) - spec.model.context_length * spec.model.dim
            )
        elif stage.type.value == "grpo":
            per_token = grpo_flops_per_token(spec.model, seq, stage.grpo_settings.iterations)
        out.append(
            estimate_compute(
                name=stage.name,
                flops=per_token * tokens,
                tokens=tokens,
                steps=steps,
                acc=acc,
                gpus=gpus,
                pricing=spec.pricing,
                mfu=mfu,
                price_table=price_table,
            )
        )
    return RunEstimate(parameter_count(spec.model), out, mfu)


def estimate_params_tokens(
    params: float,
    tokens: float,
    gpu: str = DEFAULT_GPU,
    mfu: float = DEFAULT_MFU,
    pricing: Pricing | None = None,
    gpus: int = 1,
) -> RunEstimate:
    """Without a manifest: 6·N·D for N parameters and D tokens (attention term ignored,
    as in the scaling-law literature), on ``gpus`` accelerators of type ``gpu``."""
    if params <= 0 or tokens <= 0:
        raise ValueError(f"params={params:g} tokens={tokens:g} (accepted: both > 0)")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} (accepted: 0 < mfu <= 1)")
    acc = accelerator(gpu)
    est = estimate_compute(
        name="pretrain",
        flops=6.0 * params * tokens,
        tokens=int(tokens),
        steps=0,
        acc=acc,
        gpus=gpus,
        pricing=pricing or Pricing(),
        mfu=mfu,
    )
    return RunEstimate(int(params), [est], mfu)


def human(x: float, unit: str = "") -> str:
    """1.23e24 -> '1.23e+24', 4200 -> '4,200', with an optional unit."""
    if x == 0:
        s = "0"
    elif abs(x) >= 1e7 or abs(x) < 1e-3:
        s = f"{x:.3g}"
    elif abs(x) >= 100:
        s = f"{x:,.0f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()
