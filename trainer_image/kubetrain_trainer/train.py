"""The training loop of one stage: ``python -m kubetrain_trainer`` runs it from the
environment the operator (or ``kubetrain run --local``) sets (``kubetrain.core.contract``).

Lifecycle:
- start: read the stage config; join the process group when launched by torchrun
  (gloo on CPU, nccl on GPU); build the model; initialise it from KUBETRAIN_INIT_URI
  (weights only) and, for DPO, load the frozen reference from KUBETRAIN_REFERENCE_URI;
- resume: when this stage's folder has a complete checkpoint, continue from it exactly
  (model, optimizer, scheduler, data cursor, RNG, step, tokens, energy, wall time);
- every step: grad accumulation, clipping, AdamW, warm-up + schedule; rank 0 writes
  progress every ``logEvery`` steps, evaluates every ``evalEvery``, checkpoints every
  ``checkpointEvery``;
- SIGTERM/SIGINT (preemption, suspend, node drain): the current step finishes, a
  checkpoint is saved, progress says ``interrupted``, exit
  ``contract.EXIT_CHECKPOINTED_ON_SIGTERM`` (75), which the Job's podFailurePolicy
  ignores: a disruption never counts as a failure. That takes one step plus
  one checkpoint upload, so the pod's terminationGracePeriodSeconds must cover both
  (seconds for small models; size it to checkpoint bytes / store bandwidth for big ones);
- end: final evaluation, final checkpoint, FINAL pointer, progress ``completed``, exit 0
  (only then);
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kubetrain.core import accounting, contract
from kubetrain.core.api import Hyperparameters
from kubetrain.core.records import ProgressRecord, read_progress, write_progress
from kubetrain.core.store import StoreError, open_store
from kubetrain_trainer import checkpoint as ckpt
from kubetrain_trainer import signals as early_signals
from kubetrain_trainer.data import LMBatch, PairBatch, build_dataset
from kubetrain_trainer.energy import EnergyMeter, open_meter
from kubetrain_trainer.evaluation import evaluate
from kubetrain_trainer.launch import report_exit
from kubetrain_trainer.model import GPT, build_model
from kubetrain_trainer.objectives import dpo_step_loss, lm_loss
from kubetrain_trainer.telemetry import FOLDER, Telemetry, utc_now

log = logging.getLogger("kubetrain_trainer")

# Cosine and linear decay end at this fraction of the peak learning rate, not at zero:
# the last steps still learn something (as in nanoGPT and Chinchilla).
MIN_LR_RATIO = 0.1


class StageError(RuntimeError):
    """A problem the user can fix (message names the field or URI and what is expected)."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return Dist(rank, world, local_rank, local_world, device)


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
        fused=device.type == "cuda",
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
        self.seq_len = self.hp.seq_len or self.spec.context_length
        if self.seq_len > self.spec.context_length:
            raise StageError(
                f"hyperparameters.seqLen={self.seq_len} exceeds "
                f"model.contextLength={self.spec.context_length} "
                f"(accepted: at most {self.spec.context_length})"
            )
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
        self.model = build_model(self.spec).to(device)
        expected = accounting.parameter_count(self.spec)
        if self.model.num_parameters() != expected:
            raise StageError(
                f"model has {self.model.num_parameters()} parameters, accounting says {expected}"
            )
        self.init_source: str | None = None
        init_uri = environ.get(contract.ENV_INIT_URI)
        if init_uri:
            self.init_source = _load_weights(self.model, init_uri, "init", device, self.s3)
        self.reference: GPT | None = None
        if self.kind == "dpo":
            ref_uri = environ.get(contract.ENV_REFERENCE_URI) or init_uri
            self.reference = build_model(self.spec).to(device)
            if ref_uri:
                _load_weights(self.reference, ref_uri, "reference", device, self.s3)
            else:
                # Without a previous stage the reference is the (seeded) initial policy.
                self.reference.load_state_dict(self.model.state_dict())
            self.reference.eval().requires_grad_(False)

        self.data = build_dataset(
            self.kind,
            self.stage.data.source,
            seed=self.stage.data.seed,
            seq_len=self.seq_len,
            eval_examples=self.stage.data.eval_examples,
            s3=self.s3,
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
        self.matmul_params = expected - self.spec.context_length * self.spec.dim
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
        self.saved_step = -1
        self.eval: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.loss_value = float("nan")
        # The record a previous attempt left (rank 0 reads it when resuming).
        self.previous: ProgressRecord | None = None
        self.telemetry: Telemetry | None = None
        self.started = time.monotonic()
        self.window = _Window(self.started)

    # ------------------------------------------------------------------ state
    def resume(self) -> None:
        loaded = self.checkpointer.load_latest(map_location=self.d.device)
        if self.d.is_main:
            self.previous = read_progress(self.store, FOLDER.progress)
        if loaded is not None:
            s = loaded.state
            self.model.load_state_dict(s["model"])
            self.optimizer.load_state_dict(s["optimizer"])
            self.scheduler.load_state_dict(s["scheduler"])
            t = s["trainer"]
            self.step, self.cursor, self.tokens = t["step"], t["cursor"], t["tokens"]
            self.energy_base, self.wall_base = t["energyJoules"], t["wallSeconds"]
            self.eval = dict(t.get("eval", {}))
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

    def save(self) -> None:
        """Rank 0 writes a complete checkpoint of the current step."""
        if self.step == self.saved_step:
            return
        energy = self.energy_base + self._energy_total()
        if self.d.is_main:
            raw = self.model
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
            self.checkpoint_uri = self.checkpointer.save(
                self.step,
                {
                    "model": raw.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "trainer": trainer,
                },
                run=self.cfg.run,
                stage=self.stage.name,
            )
        self.saved_step = self.step

    # ------------------------------------------------------------------ steps
    def flops(self, batch: LMBatch | PairBatch) -> float:
        """Training FLOPs of one micro-batch (accounting's formula at its length)."""
        seq = (batch.inputs if isinstance(batch, LMBatch) else batch.chosen.inputs).shape[1]
        per_token = accounting.flops_per_token(self.spec, seq)
        if isinstance(batch, PairBatch):
            # The frozen reference adds a forward pass: 2 FLOPs per weight per token.
            per_token += 2.0 * self.matmul_params
        return per_token * batch.tokens

    def run(self, stop: StopRequest | None = None) -> int:
        """Train the stage to its end or to a stop request; the exit code."""
        stop = stop or StopRequest()
        self.resume()
        self.telemetry = self._open_telemetry()
        model, autocast = self._training_model()
        self.started = time.monotonic()
        self.window = _Window(self.started)
        self._log_start()
        self.publish("running")
        while self.step < self.total and not self._should_stop(stop):
            self._train_step(model, autocast)
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

    def _training_model(self) -> tuple[nn.Module, contextlib.AbstractContextManager[Any]]:
        """The model as the step runs it (DDP, compiled) and its autocast context."""
        d = self.d
        model: nn.Module = self.model
        if d.world > 1:
            model = DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        if self.hp.compile:
            model = torch.compile(model)
        autocast = (
            torch.autocast(d.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        return model, autocast

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
                "stage %s (%s): %d parameters, steps %d/%d, %s on %s, world %d",
                self.stage.name,
                self.kind,
                self.model.num_parameters(),
                self.step,
                self.total,
                self.precision,
                self.d.device,
                self.d.world,
            )

    def _train_step(
        self, model: nn.Module, autocast: contextlib.AbstractContextManager[Any]
    ) -> None:
        """One optimizer step over ``gradientAccumulation`` micro-batches per rank."""
        d, hp = self.d, self.hp
        ga, bsz = hp.gradient_accumulation, hp.batch_size
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, flops
        metric_sums: dict[str, float] = {}
        for micro in range(ga):
            batch = self.data.batch(self.cursor + d.rank * bsz, bsz).to(d.device)
            self.cursor += bsz * d.world
            sync = (
                model.no_sync()
                if isinstance(model, DistributedDataParallel) and micro < ga - 1
                else contextlib.nullcontext()
            )
            with sync:
                with autocast:
                    if isinstance(batch, PairBatch):
                        assert self.reference is not None
                        loss, m = dpo_step_loss(model, self.reference, batch, hp.beta)
                        for k, v in m.items():
                            metric_sums[k] = metric_sums.get(k, 0.0) + float(v) / ga
                    else:
                        loss = lm_loss(model, batch)
                (loss / ga).backward()
            stats += torch.tensor(
                [float(loss.detach()) / ga, batch.tokens, self.flops(batch)],
                dtype=torch.float64,
            )
        if hp.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), hp.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if d.world > 1:
            dist.all_reduce(stats)
            stats[0] /= d.world
        self.loss_value = float(stats[0])
        self.tokens += int(stats[1])
        self.window.tokens += float(stats[1])
        self.window.flops += float(stats[2])
        self.train_metrics = metric_sums
        if not math.isfinite(self.loss_value):
            raise StageError(
                f"loss became {self.loss_value} at step {self.step} (lower "
                "hyperparameters.learningRate or set gradClip)"
            )

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
            self.save()
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

    def _should_stop(self, stop: StopRequest) -> bool:
        flag = stop.signal is not None
        if self.d.world > 1:
            # Every rank must leave at the same step, whichever one got the signal.
            t = torch.tensor([1.0 if flag else 0.0], device=self.d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _energy_total(self) -> float:
        joules = self.energy.read()
        if self.d.world > 1:
            t = torch.tensor([joules], dtype=torch.float64, device=self.d.device)
            dist.all_reduce(t)
            joules = float(t.item())
        return joules

    def _evaluate(self) -> None:
        # Rank 0 evaluates (the replicas are identical); the others wait at the
        # next collective.
        if self.d.is_main:
            self.eval = evaluate(self.model, self.data.eval_set, self.seq_len, self.d.device)


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
