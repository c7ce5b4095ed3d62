"""Size, FLOPs, GPU-time, energy, cost and carbon: before a run (estimates) and during
it (accrued). Pure arithmetic, no I/O, so the CLI, the operator and the local runner
agree on every number.

Conventions (stated so anyone can redo the arithmetic by hand):
- A Hugging Face model's parameters and FLOPs come from its config.json
  (:mod:`kubetrain.core.hf_config`, by the same rules as below).
- Parameters of the built-in model (``kubetrain_trainer.model``): tied token embedding
  V·d, learned positions C·d, per block two RMSNorm weights (2d), attention q,k,v,o
  without biases (4d²) and an MLP of width 4d without biases (8d²), a final norm (d).
- Training FLOPs per token = 6·N_matmul + 12·L·d·T (forward + backward): N_matmul
  counts every weight used in a matrix multiply, the tied embedding included because it
  is the output projection, position embeddings excluded (a lookup is free); the second
  term is attention's QKᵀ and AV over a sequence of T tokens (as in nanoGPT and
  torchtitan). A forward pass alone costs a third of that (2·N_matmul + 4·L·d·T).
- DPO runs the policy forward and backward over the chosen and the rejected sequence
  (both count as tokens) and the frozen reference forward over both. grpo runs the
  reference forward too, and samples its completions with a KV cache (a forward pass per
  token, shared by the ``iterations`` steps that reuse them, plus then a forward pass for
  the sampling policy's log-probs). A grpo step trains batchSize × generations sequences
  per process and micro-batch; estimates take every sequence at its longest (seqLen), as
  for the other stages.
- GPU-hours = FLOPs / (peak dense bf16 FLOP/s × MFU) / 3600. The MFU is calibrated per
  accelerator class against published runs (:data:`ACCELERATORS` names each source), or
  taken from what earlier runs measured.
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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from kubetrain.core import hf_config
from kubetrain.core.api import (
    FROM_MODEL_SEQ_LEN,
    ModelSpec,
    ParallelStrategy,
    Pricing,
    Resources,
    Stage,
    StageType,
    TrainingRunSpec,
)
from kubetrain.core.architecture import Architecture, builtin

JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (fp32 for "cpu")
    watts: float  # board power under training load
    usd_per_hour: float  # on-demand list price, order of magnitude
    mfu: float  # model FLOPs utilisation a long run reaches, by 6·N·D (see mfu_source)
    mfu_source: str  # where ``mfu`` comes from, printed beside every estimate that uses it
    memory_gb: float = 0.0  # memory per device (GB, 1e9 bytes); 0: host memory, no limit


# MFU by 6·N·D from published GPU-hours (GPU-hours × peak = the FLOPs the hardware could
# have done; 6·N·D = what the model needed). Such totals include restarts, evaluation and
# stragglers, which is what an estimate of a real run should include too.
_LLAMA3_H100 = (
    "Meta's Llama 3 70B: 6.4M H100-80GB hours for 15T tokens (Llama 3 model card, 2024) "
    "= 28% at 6·N·D"
)
_LLAMA2_A100 = (
    "Meta's Llama 2 7B and 70B: 184,320 and 1,720,320 A100-80GB hours for 2T tokens "
    "(Llama 2 paper, table 2) = 41% and 43% at 6·N·D"
)

# Public list figures; the chart's values override the prices per cluster.
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in [
        Accelerator(
            "b200",
            2250e12,
            1000.0,
            6.00,
            0.28,
            "no published pretraining run yet; the H100 calibration (" + _LLAMA3_H100 + ")",
            memory_gb=180,
        ),
        Accelerator(
            "h200",
            989e12,
            700.0,
            3.50,
            0.28,
            "no published pretraining run; same dense peak as the H100, whose calibration "
            "applies (" + _LLAMA3_H100 + ")",
            memory_gb=141,
        ),
        Accelerator("h100", 989e12, 700.0, 2.50, 0.28, _LLAMA3_H100, memory_gb=80),
        Accelerator("a100", 312e12, 400.0, 1.80, 0.40, _LLAMA2_A100, memory_gb=80),
        Accelerator(
            "l40s",
            362e12,
            350.0,
            1.00,
            0.25,
            "no published pretraining run; assumed below the SXM parts (PCIe, no NVLink)",
            memory_gb=48,
        ),
        Accelerator(
            "l4",
            121e12,
            72.0,
            0.60,
            0.25,
            "no published pretraining run; assumed below the SXM parts (PCIe, no NVLink)",
            memory_gb=24,
        ),
        # A CPU "device" for stages with gpusPerNode 0 (local runs, tiny demos); its peak
        # is a nominal figure, so its MFU is too.
        Accelerator(
            "cpu",
            0.5e12,
            65.0,
            0.0,
            0.03,
            "measured: kubetrain's demo, examples/tiny-run.yaml, 2-4% of this nominal peak "
            "on a shared 2-core machine",
        ),
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


# Training state per parameter with AdamW: fp32 weights (4 bytes), gradients (4) and
# the two moments (8). bf16 autocast keeps fp32 master weights, so it is the same.
TRAINING_BYTES_PER_PARAM = 16
# The share of a GPU's memory that state may take under DDP: the rest is for
# activations, the CUDA context, NCCL buffers and the allocator's fragmentation.
DDP_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class ParallelismChoice:
    """What ``parallelism.strategy`` resolves to for a stage, and why (in status, in
    ``kubetrain estimate`` and in the trainer's log)."""

    strategy: str  # "ddp" or "fsdp"
    reason: str

    def __str__(self) -> str:
        return f"{self.strategy}: {self.reason}"


def choose_parallelism(stage: Stage, parameters: int) -> ParallelismChoice:
    """Resolve ``stage.parallelism.strategy`` for a model of ``parameters``: ``auto``
    shards (FSDP) when weights, gradients and AdamW state (~16 bytes per parameter) take
    more than half of one GPU's memory, and replicates (DDP) otherwise."""
    par, res = stage.parallelism, stage.resources
    if par.strategy != ParallelStrategy.auto:
        return ParallelismChoice(par.strategy.value, "set in the stage's parallelism.strategy")
    if par.cpu_offload:
        return ParallelismChoice("fsdp", "parallelism.cpuOffload needs sharded (FSDP) state")
    acc = accelerator(res.gpu_type, res.gpus_per_node * res.nodes)
    return auto_parallelism(parameters, acc, res.processes * res.nodes)


def auto_parallelism(parameters: float, acc: Accelerator, processes: int) -> ParallelismChoice:
    """What ``auto`` picks for ``parameters`` on ``processes`` accelerators ``acc``, and,
    when even sharded state does not fit, how many it would take."""
    state_gb = TRAINING_BYTES_PER_PARAM * parameters / 1e9
    if not acc.memory_gb:
        return ParallelismChoice(
            "ddp", f"on CPU: {state_gb:.3g} GB of training state in host memory, no GPU to fit"
        )
    budget = acc.memory_gb * DDP_MEMORY_SHARE
    need = f"{state_gb:.3g} GB of weights, gradients and AdamW state (16 B/param)"
    if state_gb <= budget:
        return ParallelismChoice(
            "ddp", f"{need} fit in half of one {acc.name}'s {acc.memory_gb:g} GB: replicated"
        )
    reason = (
        f"{need} exceed half of one {acc.name}'s {acc.memory_gb:g} GB: sharded over "
        f"{processes} processes, {state_gb / processes:.3g} GB each"
    )
    if state_gb / processes > budget:
        # The same share as DDP's: the rest of each GPU is for activations and buffers.
        fewest = math.ceil(state_gb / budget)
        reason += f"; does not fit: needs at least {fewest:,} {acc.name} GPUs, or cpuOffload"
    return ParallelismChoice("fsdp", reason)


def _arch(model: ModelSpec | Architecture) -> Architecture:
    return builtin(model) if isinstance(model, ModelSpec) else model


def parameter_count(model: ModelSpec | Architecture) -> int:
    """Parameters of the model (must equal the trainer's numel). A ModelSpec stands for
    the built-in model it describes; pass the ``config.json`` (a
    :class:`~kubetrain.core.hf_config.ModelConfig`) for a Hugging Face one."""
    arch = _arch(model)
    if isinstance(arch, hf_config.ModelConfig):
        return hf_config.parameter_count(arch)
    d, L = arch.dim, arch.layers
    embeddings = arch.vocab_size * d + arch.context_length * d
    per_block = 12 * d * d + 2 * d
    return embeddings + L * per_block + d


def flops_per_token(model: ModelSpec | Architecture, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token, see the module docstring."""
    arch = _arch(model)
    if isinstance(arch, hf_config.ModelConfig):
        return hf_config.flops_per_token(arch, seq_len or arch.max_positions)
    t = seq_len or arch.context_length
    n_matmul = parameter_count(arch) - arch.context_length * arch.dim
    return 6.0 * n_matmul + 12.0 * arch.layers * arch.dim * t


def stage_flops_per_token(
    arch: Architecture | ModelSpec, seq_len: int, stage_type: str, iterations: int = 1
) -> float:
    """FLOPs per trained token of a stage: the policy's forward and backward, plus the
    frozen reference's forward for dpo and grpo (a forward pass is a third of the
    former), plus for grpo sampling with a KV cache (a forward pass per token) and, when
    ``iterations`` > 1, the sampling policy's log-probs: once per batch of completions,
    so shared by the ``iterations`` steps that train on it."""
    train = flops_per_token(arch, seq_len)
    forward = train / 3.0
    if stage_type == StageType.dpo.value:
        return train + forward
    if stage_type == StageType.grpo.value:
        rollout = forward + (forward if iterations > 1 else 0.0)
        return train + forward + rollout / iterations
    return train


def seq_len(stage: Stage, model: ModelSpec) -> int:
    """The stage's training sequence length: seqLen, else model.contextLength, else the
    built-in model's context, or for a ``from`` model :data:`FROM_MODEL_SEQ_LEN`."""
    return stage.hyperparameters.seq_len or model.context_limit or FROM_MODEL_SEQ_LEN


def sequences_per_example(stage: Stage) -> int:
    """Sequences the model trains per example: DPO the chosen and the rejected one, grpo
    the ``generations`` completions of its prompt (its batchSize counts prompts)."""
    if stage.type == StageType.dpo:
        return 2
    if stage.type == StageType.grpo:
        return stage.grpo_settings.generations
    return 1


def tokens_per_step(stage: Stage, model: ModelSpec) -> int:
    """Tokens one optimizer step runs through the model, over all processes (for DPO,
    the chosen and the rejected sequences both, for grpo every completion, as the trainer
    counts them)."""
    hp, res = stage.hyperparameters, stage.resources
    examples = hp.batch_size * hp.gradient_accumulation * res.processes * res.nodes
    return examples * sequences_per_example(stage) * seq_len(stage, model)


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
    mfu: float
    mfu_source: str
    parallelism: ParallelismChoice | None = None


@dataclass(frozen=True)
class RunEstimate:
    parameters: int
    stages: list[StageEstimate]

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


@dataclass(frozen=True)
class MeasuredMFU:
    """MFU that earlier stages on one accelerator class reached (their progress records)."""

    mfu: float
    stages: int
    where: str

    @property
    def source(self) -> str:
        return f"measured: median of {self.stages} earlier stages in {self.where}"


def _check_mfu(mfu: float | None) -> None:
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} (accepted: 0 < mfu <= 1)")


def chosen_mfu(
    acc: Accelerator, mfu: float | None, measured: Mapping[str, MeasuredMFU] | None
) -> tuple[float, str]:
    """The MFU an estimate assumes on ``acc`` and why: the one given, else what earlier
    runs measured on that class, else the calibrated default."""
    if mfu is not None:
        return mfu, "given"
    if measured and acc.name in measured:
        return measured[acc.name].mfu, measured[acc.name].source
    return acc.mfu, acc.mfu_source


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
    mfu_source: str = "given",
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
        name,
        acc.name,
        gpus,
        steps,
        tokens,
        flops,
        gpu_hours,
        wall_hours,
        facility_kwh,
        cost,
        co2,
        mfu,
        mfu_source,
    )


def estimate_run(
    spec: TrainingRunSpec,
    mfu: float | None = None,
    price_table: dict[str, float] | None = None,
    *,
    architecture: Architecture | None = None,
    measured: Mapping[str, MeasuredMFU] | None = None,
) -> RunEstimate:
    """Per-stage and total estimate of a manifest, before anything runs.

    ``architecture``: what the run trains (the config.json of a Hugging Face
    ``model.from``; None: the built-in model the manifest describes). ``mfu``: assume
    this MFU everywhere; None: per accelerator class, ``measured`` by earlier runs where
    there are some, else the calibrated default (:data:`ACCELERATORS`)."""
    _check_mfu(mfu)
    arch = architecture or builtin(spec.model)
    parameters = parameter_count(arch)
    out = []
    for stage in spec.stages:
        res = stage.resources
        gpus = res.gpus_per_node * res.nodes
        acc = accelerator(res.gpu_type, gpus)
        steps = total_steps(stage, spec.model)
        tokens = steps * tokens_per_step(stage, spec.model)
        per_token = stage_flops_per_token(
            arch,
            seq_len(stage, spec.model),
            stage.type.value,
            stage.grpo_settings.iterations,
        )
        stage_mfu, source = chosen_mfu(acc, mfu, measured)
        compute = estimate_compute(
            name=stage.name,
            flops=per_token * tokens,
            tokens=tokens,
            steps=steps,
            acc=acc,
            gpus=gpus,
            pricing=spec.pricing,
            mfu=stage_mfu,
            mfu_source=source,
            price_table=price_table,
        )
        out.append(replace(compute, parallelism=choose_parallelism(stage, parameters)))
    return RunEstimate(parameters, out)


def estimate_params_tokens(
    params: float,
    tokens: float,
    gpu: str = DEFAULT_GPU,
    mfu: float | None = None,
    pricing: Pricing | None = None,
    gpus: int = 1,
    measured: Mapping[str, MeasuredMFU] | None = None,
) -> RunEstimate:
    """Without a manifest: 6·N·D for N parameters and D tokens (no attention term: that
    needs the model's shape; as in the scaling-law literature and the MFU calibration),
    on ``gpus`` accelerators of type ``gpu``."""
    if params <= 0 or tokens <= 0:
        raise ValueError(f"params={params:g} tokens={tokens:g} (accepted: both > 0)")
    _check_mfu(mfu)
    acc = accelerator(gpu)
    stage_mfu, source = chosen_mfu(acc, mfu, measured)
    est = estimate_compute(
        name="pretrain",
        flops=6.0 * params * tokens,
        tokens=int(tokens),
        steps=0,
        acc=acc,
        gpus=gpus,
        pricing=pricing or Pricing(),
        mfu=stage_mfu,
        mfu_source=source,
    )
    return RunEstimate(int(params), [replace(est, parallelism=auto_parallelism(params, acc, gpus))])


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
