"""Throughput of the full trainer (progress records, checkpoints, scheduler, clipping)
against a bare PyTorch loop over the same model and batches.

Interleaved repetitions (bare, trainer, bare, trainer, ...) so drifting machine load hits
both alike; medians and their ratio (goal: trainer / bare >= 0.95) go to
``bench/results/trainer_overhead.json``. Numbers, not pass/fail.

    python bench/trainer_overhead.py [--steps 60] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from kubetrain.core import contract
from kubetrain.core.accounting import tokens_per_step
from kubetrain.core.api import ModelSpec, Stage
from kubetrain.core.contract import StageConfig
from kubetrain_trainer.data import ArithmeticPretrain
from kubetrain_trainer.model import build_model
from kubetrain_trainer.objectives import lm_loss
from kubetrain_trainer.train import Trainer, init_distributed

RESULTS = Path(__file__).parent / "results"


def stage(steps: int, batch: int, log_every: int, checkpoint_every: int) -> Stage:
    return Stage.model_validate(
        {
            "name": "bench",
            "type": "pretrain",
            "checkpointEvery": checkpoint_every,
            "data": {"evalExamples": 0},
            "hyperparameters": {
                "maxSteps": steps,
                "batchSize": batch,
                "logEvery": log_every,
                "learningRate": 1e-3,
                "gradClip": 1.0,
            },
        }
    )


def bare(spec: ModelSpec, st: Stage) -> float:
    """Seconds for the steps: data, forward, backward, clipping, AdamW, nothing else
    (the same optimisation math as the trainer, without its bookkeeping)."""
    hp = st.hyperparameters
    torch.manual_seed(0)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, betas=(0.9, 0.95))
    data = ArithmeticPretrain(0, spec.context_length, 0)
    start = time.perf_counter()
    for step in range(hp.max_steps or 0):
        loss = lm_loss(model, data.batch(step * hp.batch_size, hp.batch_size))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer(spec: ModelSpec, st: Stage) -> float:
    """Seconds for Trainer.run(): the same steps plus progress, checkpoints, FINAL."""
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as tmp:
        cfg = StageConfig(run="bench", namespace="bench", model=spec, stage=st)
        env = {
            contract.ENV_STAGE_CONFIG: cfg.model_dump_json(by_alias=True),
            contract.ENV_CHECKPOINT_URI: Path(tmp, "stage").as_uri(),
            contract.ENV_METRICS_PORT: "0",
            "OMP_NUM_THREADS": "1",
        }
        t = Trainer(env, init_distributed(env))
        start = time.perf_counter()
        t.run()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(layers=2, heads=4, dim=args.dim, contextLength=64)
    # Progress every 10 steps, a checkpoint every 50: denser than real runs.
    st = stage(args.steps, args.batch, log_every=10, checkpoint_every=50)
    tokens = tokens_per_step(st, spec) * args.steps
    bare_tps, trainer_tps = [], []
    bare(spec, stage(5, args.batch, 10, 50))  # warm-up: allocator, kernels
    for rep in range(args.reps):
        bare_tps.append(tokens / bare(spec, st))
        trainer_tps.append(tokens / trainer(spec, st))
        print(
            f"rep {rep}: bare {bare_tps[-1]:.0f} tok/s, trainer {trainer_tps[-1]:.0f} tok/s",
            file=sys.stderr,
        )
    result = {
        "bench": "trainer_overhead",
        "model": spec.model_dump(by_alias=True, exclude_none=True),
        "steps": args.steps,
        "batchSize": args.batch,
        "tokensPerRep": tokens,
        "logEvery": 10,
        "checkpointEvery": 50,
        "store": "file://",
        "threads": args.threads,
        "bareTokensPerSecond": bare_tps,
        "trainerTokensPerSecond": trainer_tps,
        "bareMedian": statistics.median(bare_tps),
        "trainerMedian": statistics.median(trainer_tps),
        "ratio": statistics.median(trainer_tps) / statistics.median(bare_tps),
        "goalRatio": 0.95,
        "device": "cpu",
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trainer_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("bareMedian", "trainerMedian", "ratio")}))


if __name__ == "__main__":
    main()
