"""SFT throughput of kubetrain's trainer against TRL's SFTTrainer: the same Llama-shaped
model (about 30M parameters, random, made here), the same prompt/completion rows, batch
size, sequence length and optimizer, on the CPU, side by side in one process.

Throughput is *real* tokens per second: the tokens of the examples trained on, padding
excluded, over steady-state optimizer steps (the first step of each run is a warm-up and
is not timed). kubetrain packs examples into full rows (no compute on padding); TRL's
default pads each batch to its longest example; TRL with ``packing=True`` packs too.
Repetitions interleave the three (TRL, TRL packed, kubetrain, ...) so drifting machine
load hits all alike; medians and ratios go to ``bench/results/sft_vs_trl.json``.

    python bench/sft_vs_trl.py [--steps 8] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support

import torch
import transformers

from kubetrain.core import contract
from kubetrain.core.api import TrainingRunSpec
from kubetrain.core.contract import StageConfig
from kubetrain_trainer.train import Dist, Trainer
from tests.support.hfmodels import tiny_llama

RESULTS = Path(__file__).parent / "results"
# Llama-shaped, ~30M parameters: 6 layers of width 448, SwiGLU 1216, untied 16k vocab.
MODEL = {
    "hidden_size": 448,
    "intermediate_size": 1216,
    "num_hidden_layers": 6,
    "num_attention_heads": 7,
    "num_key_value_heads": 7,
    "vocab_size": 16384,
    "max_position_embeddings": 1024,
}
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "an", "el", "is", "um"]


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion rows of varied length, as chat data is (8..50 and 8..80 words:
    about 30..170 and 30..270 tokens)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(
            "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(lo, hi))
        )

    # The completion starts with a space: the words do not merge across the boundary,
    # so both tokenize prompt + completion identically.
    return [{"prompt": text(8, 50), "completion": " " + text(8, 80)} for _ in range(n)]


def kubetrain_tps(model: Path, data: Path, args: argparse.Namespace, tmp: Path) -> float:
    """Real tokens per second of the trainer's own optimizer step (data, forward,
    backward, loss normalisation, clipping, AdamW) over ``args.steps`` steps."""
    spec = TrainingRunSpec.model_validate(
        {
            "model": {"from": model.as_uri()},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "data": {"source": data.as_uri(), "evalExamples": 0},
                    "hyperparameters": {
                        "maxSteps": args.steps + 1,
                        "batchSize": args.batch,
                        "seqLen": args.seq_len,
                        "learningRate": 1e-4,
                        "schedule": "constant",
                        "gradClip": 1.0,
                        "precision": "fp32",
                    },
                }
            ],
        }
    )
    config = StageConfig(run="bench", model=spec.model, stage=spec.stages[0])
    env = {
        contract.ENV_STAGE_CONFIG: config.model_dump_json(by_alias=True, exclude_none=True),
        contract.ENV_CHECKPOINT_URI: (tmp / "stage").as_uri(),
        contract.ENV_INIT_URI: model.as_uri(),
        contract.ENV_POWER_WATTS: "65",
    }
    trainer = Trainer(env, Dist(0, 1, 0, 1, torch.device("cpu")))
    step_model = trainer._training_model()
    trainer._train_step(step_model)  # warm-up
    tokens, start = trainer.tokens, time.perf_counter()
    for _ in range(args.steps):
        trainer._train_step(step_model)
    return (trainer.tokens - tokens) / (time.perf_counter() - start)


class _Timer(transformers.TrainerCallback):
    """Wall time from the end of the first (warm-up) step to the end of the last."""

    def __init__(self) -> None:
        self.started = self.ended = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1:
            self.started = time.perf_counter()
        self.ended = time.perf_counter()


def trl_tps(
    model: Path, data: list[dict[str, str]], args: argparse.Namespace, tmp: Path, packing: bool
) -> float:
    """Real tokens per second of SFTTrainer.train() over the same timed steps."""
    import datasets
    import trl

    counted: list[int] = []
    config = trl.SFTConfig(
        output_dir=str(tmp / "trl"),
        max_length=args.seq_len,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        max_grad_norm=1.0,
        weight_decay=0.0,
        completion_only_loss=True,
        packing=packing,
        # SFTConfig turns activation checkpointing on by default; kubetrain does not
        # recompute activations, so neither does the reference here.
        gradient_checkpointing=False,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(model),
        args=config,
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=transformers.AutoTokenizer.from_pretrained(model),
    )
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        mask = batch.get("attention_mask")
        if mask is None:  # padding-free packing: one row, every position real
            counted.append(int(batch["input_ids"].numel()))
        else:
            counted.append(int(mask.sum()))
        return batch

    trainer.data_collator = counting
    timer = _Timer()
    trainer.add_callback(timer)
    trainer.train()
    # The batches of the timed steps: the first was the warm-up.
    return sum(counted[1 : args.steps + 1]) / (timer.ended - timer.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # A base model (no chat template): both train on prompt + completion + EOS.
        model = tiny_llama(tmp / "model", template=None, seed=0, **MODEL)
        params = sum(p.numel() for p in model.parameters())
        data = rows(args.examples)
        data_file = tmp / "sft.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in data))
        results: dict[str, list[float]] = {"trl": [], "trlPacked": [], "kubetrain": []}
        for rep in range(args.reps):
            run = tmp / f"rep{rep}"
            results["trl"].append(trl_tps(tmp / "model", data, args, run, packing=False))
            results["trlPacked"].append(trl_tps(tmp / "model", data, args, run, packing=True))
            results["kubetrain"].append(kubetrain_tps(tmp / "model", data_file, args, run))
            print(
                f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in results.items()),
                file=sys.stderr,
            )
    medians = {k: statistics.median(v) for k, v in results.items()}
    result = {
        "bench": "sft_vs_trl",
        "model": {"type": "llama", **MODEL, "parameters": params},
        "examples": args.examples,
        "batchSize": args.batch,
        "seqLen": args.seq_len,
        "timedSteps": args.steps,
        "threads": args.threads,
        "tokensPerSecond": results,
        "medians": medians,
        "ratio": medians["kubetrain"] / medians["trl"],
        "ratioVsTrlPacked": medians["kubetrain"] / medians["trlPacked"],
        "goalRatio": 1.0,
        "moonshotRatio": 1.5,
        "device": "cpu",
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sft_vs_trl.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("medians", "ratio", "ratioVsTrlPacked")}))


if __name__ == "__main__":
    main()
