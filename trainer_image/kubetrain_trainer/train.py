"""The training loop of one stage: ``python -m kubetrain_trainer`` runs it from the
environment the operator (or ``kubetrain run --local``) sets (``kubetrain.core.contract``).

Lifecycle:
- start: read the stage config; join the process group when launched by torchrun
  (gloo on CPU, nccl on GPU, each serving only that device type, so a tensor on the
  wrong device fails on a CPU test as it would on GPUs); build the model; initialise it
  from KUBETRAIN_INIT_URI (weights only; a Hugging Face model also brings its
  architecture and tokenizer, see ``kubetrain_trainer.hf.source``) and, for DPO and
  GRPO, load the frozen reference from KUBETRAIN_REFERENCE_URI;
- resume: when this stage's folder has a complete checkpoint, continue from it exactly
  (model, optimizer, scheduler, data cursor, RNG, step, tokens, energy, wall time, and a
  grpo stage's completions between two rollouts);
- every step: grad accumulation, the loss normalised by the step's target tokens
  over all micro-batches and ranks (``kubetrain_trainer.objectives``; a grpo step
  samples and scores its completions first and normalises as TRL does,
  ``kubetrain_trainer.grpo``), a check that it is finite before the weights change,
  clipping, AdamW, warm-up + schedule; progress every ``logEvery`` steps, evaluation
  every ``evalEvery`` (every rank evaluates its share of the held-out set), a checkpoint
  every ``checkpointEvery`` (rank 0 writes it while the others wait on a barrier whose
  timeout is sized for uploads, :data:`UPLOAD_TIMEOUT`, not the collectives'
  :data:`COLLECTIVE_TIMEOUT`);
- SIGTERM/SIGINT (preemption, suspend, node drain): the current step finishes, a
  checkpoint is saved, progress says ``interrupted``, exit
  ``contract.EXIT_CHECKPOINTED_ON_SIGTERM`` (75), which the Job's podFailurePolicy
  ignores: a disruption never counts as a failure. That takes one step plus
  one checkpoint upload, so the pod's terminationGracePeriodSeconds must cover both
  (seconds for small models; size it to checkpoint bytes / store bandwidth for big ones);
- end: final evaluation, final checkpoint, for a Hugging Face model the same weights as
  a Hugging Face folder (``hf/``), FINAL pointer, progress ``completed``, exit 0 (only
  then);
- error: progress ``failed`` (best effort), one line on stderr, exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kubetrain.core import accounting, architecture, contract
from kubetrain.core.api import REFERENCE_STAGE_TYPES, Hyperparameters, StageType
from kubetrain.core.hf_config import ModelConfig
from kubetrain.core.records import ProgressRecord, read_progress, write_progress
from kubetrain.core.store import StoreError, open_store
from kubetrain_trainer import checkpoint as ckpt
from kubetrain_trainer import evaluation, parallel, toolchain
from kubetrain_trainer import signals as early_signals
from kubetrain_trainer.data import (
    Dataset,
    EvalSet,
    LMBatch,
    PackedBatch,
    PairBatch,
    PromptBatch,
    build_dataset,
)
from kubetrain_trainer.energy import EnergyMeter, open_meter
from kubetrain_trainer.grpo import (
    BYTE_CODEC,
    GRPOLearner,
    Rollout,
    RolloutStats,
    hf_codec,
    rollout_metrics,
)
from kubetrain_trainer.hf import datasets as hf_datasets
from kubetrain_trainer.hf import evaluation as hf_evaluation
from kubetrain_trainer.hf import stage as hf_stage
from kubetrain_trainer.hf.model import CausalLM
from kubetrain_trainer.launch import report_exit
from kubetrain_trainer.model import GPT, build_model
from kubetrain_trainer.objectives import DPO_METRICS, dpo_step_loss, lm_loss_sum, loss_items
from kubetrain_trainer.parallel import StepModel
from kubetrain_trainer.rewards import RewardSet
from kubetrain_trainer.sharded import ShardedCheckpointer
from kubetrain_trainer.telemetry import FOLDER, Telemetry, utc_now

log = logging.getLogger("kubetrain_trainer")

# Cosine and linear decay end at this fraction of the peak learning rate, not at zero:
# the last steps still learn something (as in nanoGPT and Chinchilla).
MIN_LR_RATIO = 0.1
# How long a collective of the training loop may wait for the slowest rank before the
# stage fails: generous for a first step that compiles, short enough that a hung rank
# does not hold a node of GPUs for hours.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long the other ranks wait while rank 0 alone writes a checkpoint or the Hugging
# Face export (optimizer state included: ~16 bytes per parameter, e.g. over 1 TB for a
# 70B model at 1 GB/s is 18 minutes); they wait on a separate gloo barrier, so no NCCL
# collective is pending meanwhile.
UPLOAD_TIMEOUT = timedelta(hours=6)


class StageError(RuntimeError):
    """A problem the user can fix (message names the field or URI and what is expected)."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    # A gloo group for waiting on rank 0's uploads (None in a single process).
    wait_group: Any = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait_for_uploads(self) -> None:
        """Every rank waits here until rank 0 has written what it writes alone."""
        if self.world > 1:
            dist.barrier(group=self.wait_group)

    def all_reduce(self, values: Sequence[float], op: Any = None) -> list[float]:
        """``values`` summed (or reduced by ``op``) over all ranks. The one place the
        trainer builds a tensor for a collective: on the trainer's device, which is the
        only device type the process group's backend serves."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]


def init_distributed(environ: Mapping[str, str]) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_* in the
    environment); a single process needs none."""
    world = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Processes of one node share its cores; oversubscription slows every rank.
        if "OMP_NUM_THREADS" not in environ:
            cores = (
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else (os.cpu_count() or 1)
            )
            torch.set_num_threads(max(1, cores // max(local_world, 1)))
    wait_group = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(
                process_group_backend(device),
                device_id=device if device.type == "cuda" else None,
                timeout=COLLECTIVE_TIMEOUT,
            )
        wait_group = dist.new_group(backend="gloo", timeout=UPLOAD_TIMEOUT)
    return Dist(rank, world, local_rank, local_world, device, wait_group)


def process_group_backend(device: torch.device) -> str:
    """The process group's backend, one per device type: on CPU gloo, told to serve
    only CPU tensors; on GPUs NCCL for CUDA tensors and gloo for the CPU tensors that
    FSDP's CPU offload and sharded checkpoints reduce (an asynchronous DCP save
    refuses a group without a CPU backend)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"


@dataclass
class _Window:
    """Tokens and FLOPs since the last progress record: its throughput and MFU."""

    started: float
    tokens: float = 0.0
    flops: float = 0.0


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop acts on it between steps."""

    def __init__(self) -> None:
        # A signal that arrived while the trainer was starting up counts too.
        self.signal: int | None = early_signals.pending[0] if early_signals.pending else None
        if self.signal is not None:
            log.warning(
                "received %s while starting: stopping after the first step, with a checkpoint",
                signal.Signals(self.signal).name,
            )
        for sig in early_signals.STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            log.warning(
                "received %s: finishing the step, then checkpointing", signal.Signals(signum).name
            )
        self.signal = signum


def lr_factor(hp: Hyperparameters, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier at a step: linear warm-up, then the schedule."""
    warmup = min(hp.warmup_steps, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if hp.schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if hp.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * decay

    return factor


def build_optimizer(
    model: nn.Module, hp: Hyperparameters, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm weights are gains, not features)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=hp.learning_rate,
        betas=(0.9, 0.95),
        fused=device.type == "cuda" and all(p.device.type == "cuda" for p in model.parameters()),
    )


def _load_weights(
    model: GPT, uri: str, what: str, device: torch.device, s3: contract.S3Endpoint
) -> str:
    state, source = ckpt.load_model_weights(uri, map_location=device, s3=s3)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise StageError(
            f"{what} {uri}: its weights do not fit spec.model (layers, heads, "
            f"dim, contextLength, vocabSize must match the checkpoint): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return source


class Trainer:
    def __init__(self, environ: Mapping[str, str], dist_info: Dist):
        self.env = environ
        self.d = dist_info
        cfg = contract.read_stage_config(environ)
        self.cfg = cfg
        self.stage, self.spec = cfg.stage, cfg.model
        self.hp = self.stage.hyperparameters
        self.kind = self.stage.type.value
        self.total = accounting.total_steps(self.stage, self.spec)
        folder = environ.get(contract.ENV_CHECKPOINT_URI)
        if not folder:
            raise StageError(
                f"{contract.ENV_CHECKPOINT_URI} is not set (the stage folder "
                "for checkpoints and progress)"
            )
        self.s3 = contract.s3_endpoint(environ)
        self.store = open_store(folder, endpoint=self.s3.endpoint, region=self.s3.region)
        self.checkpointer = ckpt.Checkpointer(self.store, self.stage.keep_checkpoints)

        device = self.d.device
        self.precision = self.hp.precision
        if self.precision == "auto":
            self.precision = "bf16" if device.type == "cuda" else "fp32"

        torch.manual_seed(self.hp.seed)
        init_uri = environ.get(contract.ENV_INIT_URI)
        self.hf: hf_stage.HFModel | None = None
        if init_uri:
            self.hf = hf_stage.prepare(
                init_uri,
                self.spec,
                self.s3,
                local_main=self.d.local_rank == 0,
                wait=self.d.wait_for_uploads,
            )
        self.model: GPT | CausalLM
        self.reference: GPT | CausalLM | None = None
        self.init_source: str | None = None
        if self.hf is not None:
            self._init_hf(self.hf)
        else:
            self._init_builtin(init_uri)
        self.seq_len = self._seq_len()
        self.data = self._build_data()
        self.learner = self._grpo_learner()
        # The completions a grpo step trains on, kept for grpo.iterations steps.
        self.rollouts: list[Rollout] = []
        self.rollout_metrics: dict[str, float] = {}
        self.rollout_tokens = 0.0
        self.parallel = self._parallelize()
        self.sharded = ShardedCheckpointer(
            self.checkpointer,
            self.d.wait_group,
            background=self.stage.parallelism.async_checkpoint,
        )
        self.optimizer = build_optimizer(self.model, self.hp, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.hp, self.total)
        )

        # FLOPs: accounting's formula, so MFU here and the estimate agree.
        res = self.stage.resources
        gpus = res.gpus_per_node * res.nodes
        acc = accounting.accelerator(res.gpu_type, gpus)
        devices = self.d.world if device.type == "cuda" else res.nodes
        self.peak_flops = acc.peak_flops * max(devices, 1)
        self.accelerator = acc.name
        self.energy: EnergyMeter = open_meter(
            cuda_index=device.index if device.type == "cuda" else None,
            local_rank=self.d.local_rank,
            default_watts=acc.watts,
            environ=dict(environ),
        )

        self.step = 0
        self.cursor = 0
        self.tokens = 0
        self.energy_base = 0.0
        self.wall_base = 0.0
        self.checkpoint_uri: str | None = None
        self.hf_model_uri: str | None = None
        self.saved_step = -1
        self.eval: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.loss_value = float("nan")
        # The record a previous attempt left (rank 0 reads it when resuming).
        self.previous: ProgressRecord | None = None
        self.telemetry: Telemetry | None = None
        self.started = time.monotonic()
        self.window = _Window(self.started)

    # ------------------------------------------------------------------ model and data
    @property
    def arch(self) -> architecture.Architecture:
        """What is trained, for FLOPs and limits: the built-in model or a config.json."""
        return self.hf.config if self.hf is not None else architecture.builtin(self.spec)

    def _init_builtin(self, init_uri: str | None) -> None:
        """The built-in model, from random weights or a kubetrain checkpoint; for DPO and
        GRPO the frozen reference."""
        device = self.d.device
        self.model = build_model(self.spec).to(device)
        expected = accounting.parameter_count(self.spec)
        if self.model.num_parameters() != expected:
            raise StageError(
                f"model has {self.model.num_parameters()} parameters, accounting says {expected}"
            )
        if init_uri:
            self.init_source = _load_weights(self.model, init_uri, "init", device, self.s3)
        if self.stage.type in REFERENCE_STAGE_TYPES:
            ref_uri = self.env.get(contract.ENV_REFERENCE_URI) or init_uri
            self.reference = build_model(self.spec).to(device)
            if ref_uri:
                _load_weights(self.reference, ref_uri, "reference", device, self.s3)
            else:
                # Without a previous stage the reference is the (seeded) initial policy.
                self.reference.load_state_dict(self.model.state_dict())
            self.reference.eval().requires_grad_(False)

    def _init_hf(self, hf: hf_stage.HFModel) -> None:
        """A Hugging Face model's weights; for DPO and GRPO the frozen reference, which is
        the model the stage starts from (KUBETRAIN_REFERENCE_URI names the same folder)."""
        self.model, self.init_source = hf_stage.load_weights(hf, self.d.device, self.s3)
        if self.model.num_parameters() != accounting.parameter_count(hf.config):
            raise StageError(
                f"model has {self.model.num_parameters()} parameters, accounting says "
                f"{accounting.parameter_count(hf.config)}"
            )
        if self.stage.type in REFERENCE_STAGE_TYPES:
            reference, _ = hf_stage.load_weights(hf, self.d.device, self.s3)
            self.reference = reference.eval().requires_grad_(False)

    def _seq_len(self) -> int:
        """The training sequence length, checked against what the model can attend over."""
        seq = accounting.seq_len(self.stage, self.spec)
        arch = self.arch
        limit = arch.max_positions if isinstance(arch, ModelConfig) else arch.context_length
        if seq > limit:
            given = "" if self.hp.seq_len else " (its default)"
            where = "config.json's max_position_embeddings" if self.hf else "model.contextLength"
            raise StageError(
                f"hyperparameters.seqLen={seq}{given} exceeds {where}={limit} "
                f"(accepted: at most {limit})"
            )
        return seq

    def _build_data(self) -> Dataset:
        data = self.stage.data
        if self.hf is None:
            return build_dataset(
                self.kind,
                data.source,
                seed=data.seed,
                seq_len=self.seq_len,
                eval_examples=data.eval_examples,
                s3=self.s3,
            )
        return hf_datasets.build_dataset(
            self.kind,
            data.source,
            self.hf.tokenizer,
            seed=data.seed,
            seq_len=self.seq_len,
            eval_examples=data.eval_examples,
            s3=self.s3,
        )

    def _grpo_learner(self) -> GRPOLearner | None:
        """A grpo stage's rollouts and loss, with the model's tokenizer (None: another
        stage type)."""
        if self.stage.type != StageType.grpo:
            return None
        assert self.reference is not None
        settings = self.stage.grpo_settings
        return GRPOLearner(
            settings,
            beta=self.hp.beta,
            rewards=RewardSet.from_spec(settings.rewards),
            reference=self.reference,
            seq_len=self.seq_len,
            codec=hf_codec(self.hf.tokenizer) if self.hf is not None else BYTE_CODEC,
        )

    def _parallelize(self) -> accounting.ParallelismChoice:
        """Resolve the stage's parallelism; recompute activations and shard (FSDP2) as
        it says, before the optimizer is built over the model's parameters."""
        par = self.stage.parallelism
        choice = accounting.choose_parallelism(self.stage, self.model.num_parameters())
        parallel.checkpoint_activations(self.model, par.activation_checkpointing)
        if choice.strategy == "fsdp":
            parallel.ensure_process_group(process_group_backend(self.d.device))
            parallel.shard(self.model, par, self.precision, self.d.device)
        return choice

    @property
    def fsdp(self) -> bool:
        return self.parallel.strategy == "fsdp"

    def _gathered(self) -> contextlib.AbstractContextManager[Any]:
        """Whole weights on every rank while it evaluates or samples on its own."""
        return parallel.gathered(self.model) if self.fsdp else contextlib.nullcontext()

    # ------------------------------------------------------------------ state
    def _load_checkpoint(self) -> ckpt.Loaded | None:
        """The newest complete checkpoint; a sharded one (or any, into a sharded model)
        is loaded into the model and optimizer here and only the rest returned."""
        if self.fsdp or self.sharded.newest_layout() == "dcp":
            return self.sharded.load_latest(self.model, self.optimizer)
        return self.checkpointer.load_latest(map_location=self.d.device)

    def resume(self) -> None:
        loaded = self._load_checkpoint()
        if self.d.is_main:
            self.previous = read_progress(self.store, FOLDER.progress)
        if loaded is not None:
            s = loaded.state
            if "model" in s:
                self.model.load_state_dict(s["model"])
                self.optimizer.load_state_dict(s["optimizer"])
            self.scheduler.load_state_dict(s["scheduler"])
            t = s["trainer"]
            self.step, self.cursor, self.tokens = t["step"], t["cursor"], t["tokens"]
            self.energy_base, self.wall_base = t["energyJoules"], t["wallSeconds"]
            self.eval = dict(t.get("eval", {}))
            self._restore_rollouts(t.get("grpo"))
            torch.set_rng_state(t["rng"]["torch"])
            if self.d.device.type == "cuda" and t["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(t["rng"]["cuda"], self.d.device)
            self.checkpoint_uri, self.saved_step = loaded.uri, loaded.step
            if self.d.is_main:
                self.checkpointer.discard_after(loaded.step)
            log.info("resumed from %s at step %d", loaded.uri, loaded.step)
        if self.previous is not None:
            # Energy and time spent after the last checkpoint were really spent: continue
            # from the newer of the two records.
            self.energy_base = max(self.energy_base, self.previous.energy_joules)
            self.wall_base = max(self.wall_base, self.previous.wall_seconds)

    def save(self, background: bool = False) -> None:
        """A complete checkpoint of the current step: DDP's written by rank 0, FSDP's by
        every rank (``background``: uploaded while training goes on, when the stage's
        parallelism.asyncCheckpoint allows)."""
        if self.step == self.saved_step:
            if self.fsdp and not background:
                # This step's checkpoint may still be uploading: it must be complete.
                self.checkpoint_uri = self.sharded.wait()
            return
        energy = self.energy_base + self._energy_total()
        if self.fsdp:
            self.checkpoint_uri = self.sharded.save(
                self.step,
                self.model,
                self.optimizer,
                self._small_state(energy) if self.d.is_main else None,
                background=background and self.sharded.background,
                run=self.cfg.run,
                stage=self.stage.name,
            )
            self.saved_step = self.step
            return
        if self.d.is_main:
            self.checkpoint_uri = self.checkpointer.save(
                self.step,
                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
                | self._small_state(energy),
                run=self.cfg.run,
                stage=self.stage.name,
            )
        self.d.wait_for_uploads()
        self.saved_step = self.step

    def _small_state(self, energy: float) -> dict[str, Any]:
        """What rank 0 saves besides the weights and optimizer: the schedule, and the
        data cursor, RNG and counters that make a resumed stage continue exactly."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
        trainer = {
            "step": self.step,
            "cursor": self.cursor,
            "tokens": self.tokens,
            "energyJoules": energy,
            "wallSeconds": self.wall(),
            "rng": rng,
            "eval": self.eval,
            "totalSteps": self.total,
            "stageType": self.kind,
        }
        if self.learner is not None and self.step % self.learner.settings.iterations:
            # Between two rollouts: the next steps train on these completions.
            trainer["grpo"] = {
                "rollouts": [r.state() for r in self.rollouts],
                "tokensPerProcess": self.rollout_tokens,
                "metrics": self.rollout_metrics,
            }
        return {"scheduler": self.scheduler.state_dict(), "trainer": trainer}

    # ------------------------------------------------------------------ steps
    def flops(self, seq: int, tokens: float) -> float:
        """Training FLOPs of ``tokens`` in sequences of ``seq`` (accounting's formula,
        the DPO and GRPO reference's forward and GRPO's sampling included), so MFU here
        and the estimate agree."""
        iterations = self.stage.grpo_settings.iterations
        return accounting.stage_flops_per_token(self.arch, seq, self.kind, iterations) * tokens

    def run(self, stop: StopRequest | None = None) -> int:
        """Train the stage to its end or to a stop request; the exit code."""
        stop = stop or StopRequest()
        self.resume()
        self.telemetry = self._open_telemetry()
        step_model = self._training_model()
        self.started = time.monotonic()
        self.window = _Window(self.started)
        self._log_start()
        self.publish("running")
        step = self._grpo_step if self.learner is not None else self._train_step
        while self.step < self.total and not self._should_stop(stop):
            step(step_model)
            self._after_step()
        if self.step < self.total:
            self._interrupted()
            return contract.EXIT_CHECKPOINTED_ON_SIGTERM
        self._completed()
        return 0

    def _open_telemetry(self) -> Telemetry:
        """Progress records continue the previous attempt's (attempt count, start)."""
        prev = self.previous
        telemetry = Telemetry(
            self.store,
            enabled=self.d.is_main,
            metrics_port=int(self.env.get(contract.ENV_METRICS_PORT, "0") or 0),
            serve_metrics=self.d.local_rank == 0,
            base=ProgressRecord(
                run=self.cfg.run,
                namespace=self.cfg.namespace,
                stage=self.stage.name,
                stage_type=self.kind,
                total_steps=self.total,
                attempt=(prev.attempt if prev is not None else 0) + 1,
                started_at=(prev.started_at if prev is not None else None) or utc_now(),
            ),
        )
        if self.d.is_main:
            telemetry.restore_history(self.step)
        return telemetry

    def _training_model(self) -> StepModel:
        """The model as the step runs it (DDP, then compiled) and its autocast context."""
        d = self.d
        module: nn.Module = self.model
        ddp = None
        if d.world > 1 and not self.fsdp:
            ddp = DistributedDataParallel(
                module, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
            module = ddp
        if self.hp.compile:
            missing = toolchain.missing(d.device.type)
            if missing is None:
                module = torch.compile(module)  # type: ignore[assignment]
            else:
                self._warn(f"compile: true ignored, training eagerly: {missing}")
        autocast = (
            torch.autocast(d.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        return StepModel(module, ddp, autocast)

    def _warn(self, message: str) -> None:
        """A warning for the log (rank 0) and every progress record after it."""
        assert self.telemetry is not None, "_warn() before run() opened the telemetry"
        if self.d.is_main:
            log.warning("%s", message)
        self.telemetry.warn(message)

    def wall(self) -> float:
        """Wall seconds of the stage over all attempts."""
        return self.wall_base + time.monotonic() - self.started

    def publish(self, phase: str) -> None:
        """Write a progress record. Called on every rank at the same steps: the energy
        sum is a collective."""
        assert self.telemetry is not None, "publish() before run() opened the telemetry"
        w, now = self.window, time.monotonic()
        dt = max(now - w.started, 1e-9)
        last = self.telemetry.last
        # A record with no step since the previous one (eval, end) repeats the last
        # throughput rather than reporting none.
        tps = w.tokens / dt if w.tokens else (last.tokens_per_second if last else None)
        mfu = w.flops / dt / self.peak_flops if w.flops else (last.mfu if last else None)
        self.telemetry.write(
            step=self.step,
            tokens=self.tokens,
            tokens_per_second=tps,
            loss=None if math.isnan(self.loss_value) else self.loss_value,
            eval=self.eval,
            energy_joules=self.energy_base + self._energy_total(),
            energy_source=self.energy.source,
            power_watts=self.energy.power_watts,
            mfu=mfu,
            checkpoint=self.checkpoint_uri,
            hf_model=self.hf_model_uri,
            accelerator=self.accelerator,
            phase=phase,
            wall_seconds=self.wall(),
            train=self.train_metrics,
            learning_rate=self.scheduler.get_last_lr()[0],
            init_from=self.init_source,
        )
        self.window = _Window(now)

    def _log_start(self) -> None:
        if self.d.is_main:
            log.info(
                "stage %s (%s): %d parameters, steps %d/%d, %s on %s, world %d, %s",
                self.stage.name,
                self.kind,
                self.model.num_parameters(),
                self.step,
                self.total,
                self.precision,
                self.d.device,
                self.d.world,
                self.parallel,
            )

    def _objective(
        self, module: nn.Module, batch: LMBatch | PackedBatch | PairBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage's loss of one micro-batch, summed over what :func:`loss_items`
        counts, and its diagnostics (summed likewise)."""
        if isinstance(batch, PairBatch):
            assert self.reference is not None
            return dpo_step_loss(module, self.reference, batch, self.hp.beta)
        return lm_loss_sum(module, batch), {}

    def _train_step(self, sm: StepModel) -> None:
        """One optimizer step over ``gradientAccumulation`` micro-batches per rank.

        The loss is normalised by the target tokens (DPO: pairs) of the whole step, all
        micro-batches of all ranks, counted before the first backward; the weights
        change only when the step's loss and gradient norm are finite."""
        d, hp = self.d, self.hp
        ga, bsz = hp.gradient_accumulation, hp.batch_size
        batches: list[LMBatch | PackedBatch | PairBatch] = []
        for _ in range(ga):
            batch = self.data.batch(self.cursor + d.rank * bsz, bsz)
            assert not isinstance(batch, PromptBatch), "grpo stages step in _grpo_step"
            batches.append(batch)
            self.cursor += bsz * d.world
        (items,) = d.all_reduce([float(sum(loss_items(b) for b in batches))])
        # DDP averages gradients over the ranks: × world makes that the global sum.
        scale = d.world / max(items, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        metric_sums = dict.fromkeys(DPO_METRICS, 0.0) if self.kind == "dpo" else {}
        tokens = flops = 0.0
        for micro, batch in enumerate(batches):
            batch = batch.to(d.device)
            with sm.sync(last=micro == ga - 1):
                with sm.autocast:
                    loss, m = self._objective(sm.module, batch)
                (loss * scale).backward()
            loss_sum += loss.detach()
            for k, v in m.items():
                metric_sums[k] += float(v)
            tokens += batch.tokens
            seq = (batch.chosen if isinstance(batch, PairBatch) else batch).inputs.shape[1]
            flops += self.flops(seq, batch.tokens)
        total, tokens, flops, *metrics = d.all_reduce(
            [float(loss_sum), tokens, flops, *metric_sums.values()]
        )
        self.step += 1
        self.tokens += int(tokens)
        self.window.tokens += tokens
        self.window.flops += flops
        self._apply_update(total, items)
        means = (v / max(items, 1.0) for v in metrics)
        self.train_metrics = dict(zip(metric_sums, means, strict=True))

    def _apply_update(self, loss_sum: float, items: float) -> None:
        """Step the optimizer, unless the step has nothing to learn from (no target
        token anywhere: skipped with a warning) or went non-finite (the stage fails
        before the weights change)."""
        hp = self.hp
        if not items:
            # No gradients: the optimizer steps over nothing, the schedule moves on.
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()
            self.scheduler.step()
            self.loss_value = float("nan")
            if self.d.is_main:
                log.warning(
                    "step %d: no target token in any micro-batch (every prompt fills "
                    "seqLen=%d): no update; raise hyperparameters.seqLen",
                    self.step,
                    self.seq_len,
                )
            return
        self.loss_value = loss_sum / items
        norm = parallel.clip_grad_norm(
            self.model.parameters(), hp.grad_clip if hp.grad_clip > 0 else math.inf
        )
        if not math.isfinite(self.loss_value) or not math.isfinite(float(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = (
                f"loss {self.loss_value}"
                if not math.isfinite(self.loss_value)
                else (f"gradient norm {float(norm)}")
            )
            raise StageError(
                f"{what} at step {self.step}, before the update (weights unchanged): "
                "training diverged; lower hyperparameters.learningRate, set gradClip, "
                "or train in precision fp32"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _grpo_step(self, sm: StepModel) -> None:
        """One optimizer step of a grpo stage: every ``grpo.iterations`` steps sample and
        score new completions, then the clipped policy-gradient loss over them, one
        micro-batch of completions at a time. The loss comes normalised as TRL's
        (``grpo.lossType``, see ``kubetrain_trainer.grpo``): over the step's completion
        tokens of all ranks (``dapo``) or per completion (``grpo``), and DDP's average
        over the ranks completes it."""
        assert self.learner is not None
        d, iterations = self.d, self.learner.settings.iterations
        if self.step % iterations == 0 or not self.rollouts:
            self._roll_out(sm.autocast)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        tokens = flops = kl = clipped = completion_tokens = 0.0
        for micro, rollout in enumerate(self.rollouts):
            with sm.sync(last=micro == len(self.rollouts) - 1):
                with sm.autocast:
                    loss, m = self.learner.loss(
                        sm.module,
                        rollout,
                        accumulation=len(self.rollouts),
                        tokens_per_process=self.rollout_tokens,
                    )
                loss.backward()
            loss_sum += loss.detach()
            tokens += rollout.tokens
            flops += self.flops(rollout.inputs.shape[1], rollout.tokens)
            kl += float(m.get("kl", 0.0))
            clipped += float(m["clip_ratio"])
            completion_tokens += float(m["tokens"])
        total, tokens, flops, kl, clipped, completion_tokens = d.all_reduce(
            [float(loss_sum), tokens, flops, kl, clipped, completion_tokens]
        )
        self.step += 1
        self.tokens += int(tokens)
        self.window.tokens += tokens
        self.window.flops += flops
        # Each rank's loss is its share of the global mean: their sum over world is it.
        self._apply_update(total, float(d.world))
        completion_tokens = max(completion_tokens, 1.0)
        self.train_metrics = {
            **self.rollout_metrics,
            "kl": kl / completion_tokens,
            "clip_ratio": clipped / completion_tokens,
        }

    def _roll_out(self, autocast: contextlib.AbstractContextManager[Any]) -> None:
        """Sample and score this rank's prompts of every micro-batch of the step."""
        assert self.learner is not None
        d, bsz = self.d, self.hp.batch_size
        # Seeded by the step, not carried in the RNG state: a resumed stage samples the
        # same completions at the same step.
        generator = torch.Generator(device=d.device)
        generator.manual_seed(zlib.crc32(f"grpo:{self.hp.seed}:{self.step}:{d.rank}".encode()))
        self.rollouts, stats = [], RolloutStats()
        for _ in range(self.hp.gradient_accumulation):
            batch = self.data.batch(self.cursor + d.rank * bsz, bsz)
            assert isinstance(batch, PromptBatch)
            self.cursor += bsz * d.world
            with self._gathered():
                rollout, s = self.learner.roll_out(self.model, batch, generator, autocast)
            self.rollouts.append(rollout)
            stats.add(s)
        (tokens,) = d.all_reduce([float(sum(r.completion_tokens for r in self.rollouts))])
        if d.world > 1:
            gathered: list[RolloutStats | None] = [None] * d.world
            dist.all_gather_object(gathered, stats)
            stats = RolloutStats()
            for other in gathered:
                assert other is not None
                stats.add(other)
        self.rollout_tokens = tokens / d.world
        self.rollout_metrics = rollout_metrics(stats)

    def _restore_rollouts(self, state: dict[str, Any] | None) -> None:
        """The completions a checkpoint taken between two rollouts was training on."""
        if not state:
            return
        self.rollouts = [Rollout.from_state(r, self.d.device) for r in state["rollouts"]]
        self.rollout_tokens = float(state["tokensPerProcess"])
        self.rollout_metrics = dict(state.get("metrics", {}))

    def _after_step(self) -> None:
        """Evaluate, checkpoint and publish on their schedules (the last step's are done
        by ``_completed``)."""
        hp = self.hp
        last = self.step == self.total
        evaluated = saved = False
        if hp.eval_every and self.step % hp.eval_every == 0 and not last:
            self._evaluate()
            evaluated = True
        if self.step % self.stage.checkpoint_every == 0 and not last:
            self.save(background=True)
            saved = True
        if self.step % hp.log_every == 0 or evaluated or saved:
            self.publish("running")
        if self.d.is_main and (self.step % hp.log_every == 0 or evaluated):
            log.info(
                "step %d/%d loss %.4f%s",
                self.step,
                self.total,
                self.loss_value,
                f" eval {self.eval}" if evaluated else "",
            )

    def _interrupted(self) -> None:
        self.save()
        self.publish("interrupted")
        if self.d.is_main:
            log.warning(
                "interrupted at step %d/%d; checkpoint %s",
                self.step,
                self.total,
                self.checkpoint_uri,
            )

    def _completed(self) -> None:
        self._evaluate()
        self.save()
        self._export_hf()
        if self.d.is_main:
            self.checkpointer.mark_final(self.step)
        self.publish("completed")
        if self.d.is_main:
            log.info(
                "completed %d steps: eval %s, checkpoint %s",
                self.step,
                self.eval,
                self.checkpoint_uri,
            )
        if self.d.world > 1:
            dist.barrier()

    def _export_hf(self) -> None:
        """A Hugging Face model's final weights also as a Hugging Face folder (``hf/``),
        before FINAL: a completed stage always has it."""
        if self.hf is None:
            return
        # Sharded: every rank sends its shards, rank 0 gets the whole model in host memory.
        state = parallel.full_state_dict(self.model) if self.fsdp else self.model.state_dict()
        if self.d.is_main:
            self.hf_model_uri = ckpt.export_hf(
                self.store,
                FOLDER.hf_export,
                self.hf.config,
                state,
                source=self.hf.folder,
                step=self.step,
                run=self.cfg.run,
                stage=self.stage.name,
            )
            log.info("Hugging Face model: %s", self.hf_model_uri)
        self.d.wait_for_uploads()

    def _should_stop(self, stop: StopRequest) -> bool:
        # Every rank must leave at the same step, whichever one got the signal.
        (flag,) = self.d.all_reduce([1.0 if stop.signal is not None else 0.0], op=dist.ReduceOp.MAX)
        return bool(flag)

    def _energy_total(self) -> float:
        (joules,) = self.d.all_reduce([self.energy.read()])
        return joules

    def _evaluate(self) -> None:
        """Every rank evaluates its share of the held-out set; the sums are reduced."""
        with self._gathered():
            sums = self._evaluation_sums()
        totals = self.d.all_reduce([sums[k] for k in evaluation.SUMS])
        self.eval = evaluation.metrics(dict(zip(evaluation.SUMS, totals, strict=True)))

    def _evaluation_sums(self) -> dict[str, float]:
        d = self.d
        if self.hf is not None:
            assert isinstance(self.model, CausalLM) and not isinstance(self.data.eval_set, EvalSet)
            return hf_evaluation.evaluate_sums(
                self.model,
                self.data.eval_set,
                self.hf.tokenizer,
                self.seq_len,
                d.device,
                d.rank,
                d.world,
            )
        assert isinstance(self.model, GPT) and isinstance(self.data.eval_set, EvalSet)
        return evaluation.evaluate_sums(
            self.model, self.data.eval_set, self.seq_len, d.device, d.rank, d.world
        )


EXPECTED_ERRORS = (StageError, ckpt.CheckpointError, StoreError, FileNotFoundError, ValueError)


def main(environ: Mapping[str, str] | None = None) -> int:
    """Run the stage the environment describes; the process exit code (under torchrun
    also left for the launcher, which makes it the pod's)."""
    env = os.environ if environ is None else environ
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    trainer: Trainer | None = None
    # Handlers first: a preemption during start-up (loading a big init checkpoint)
    # must still end in a clean, checkpointed exit.
    stop = StopRequest()
    try:
        d = init_distributed(env)
        trainer = Trainer(env, d)
        return report_exit(trainer.run(stop), env)
    except Exception as exc:
        if not isinstance(exc, EXPECTED_ERRORS):
            traceback.print_exc()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _report_failure(trainer, reason, env)
        print(f"kubetrain-trainer: error: {reason}", file=sys.stderr, flush=True)
        return report_exit(1, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _report_failure(trainer: Trainer | None, reason: str, environ: Mapping[str, str]) -> None:
    """Best effort: tell the progress reader why the stage failed."""
    telemetry = trainer.telemetry if trainer is not None else None
    with contextlib.suppress(Exception):
        if telemetry is not None and trainer is not None:
            if trainer.d.is_main:
                telemetry.fail(reason)
        elif environ.get("RANK", "0") == "0" and environ.get(contract.ENV_CHECKPOINT_URI):
            # Failed before training started (bad init URI, unreadable data): keep the
            # previous record's numbers, if any, and mark it failed.
            s3 = contract.s3_endpoint(environ)
            store = open_store(
                environ[contract.ENV_CHECKPOINT_URI], endpoint=s3.endpoint, region=s3.region
            )
            record = read_progress(store, FOLDER.progress) or ProgressRecord()
            write_progress(
                store,
                FOLDER.progress,
                record.updated(phase="failed", message=reason, updated_at=utc_now()),
            )
