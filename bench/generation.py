"""Generation throughput with the KV cache against recomputing the whole sequence for
every new token, same model, same prompts, same batch.

Both decode greedily and never stop early (no stop token), so both produce exactly
``batch x new`` tokens; interleaved repetitions (cached, uncached, cached, ...) so that
drifting machine load hits both alike. Medians of generated tokens per second, for the
built-in model and a Llama-architecture model of kubetrain_trainer.hf of similar size,
go to ``bench/results/generation.json``. Numbers, not pass/fail.

    python bench/generation.py [--batch 32] [--prompt 16] [--new 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from kubetrain.core.api import ModelSpec
from kubetrain.core.hf_config import from_hf_config
from kubetrain_trainer.hf.model import build_model as build_hf
from kubetrain_trainer.model import build_model
from kubetrain_trainer.sampling import sample, sample_without_cache

RESULTS = Path(__file__).parent / "results"


def models(dim: int, layers: int, context: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    builtin = build_model(ModelSpec(layers=layers, heads=4, dim=dim, context_length=context))
    llama = build_hf(
        from_hf_config(
            {
                "model_type": "llama",
                "vocab_size": 260,
                "hidden_size": dim,
                "intermediate_size": 4 * dim,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": context,
            }
        )
    )
    llama.reset_parameters()
    return {"builtin": builtin.eval(), "llama": llama.eval()}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (args.batch, args.prompt), generator=g).tolist()
    tokens = args.batch * args.new
    results = {}
    for name, model in models(args.dim, args.layers, args.prompt + args.new).items():

        def cached(model: nn.Module = model) -> object:
            return sample(
                model, prompts, temperature=0, max_new_tokens=args.new, stop_ids=set(), pad_id=0
            )

        def uncached(model: nn.Module = model) -> object:
            return sample_without_cache(
                model, prompts, max_new_tokens=args.new, stop_ids=set(), pad_id=0
            )

        cached()  # warm-up: allocator, kernels
        with_cache, without = [], []
        for rep in range(args.reps):
            with_cache.append(tokens / timed(cached))
            without.append(tokens / timed(uncached))
            print(
                f"{name} rep {rep}: KV cache {with_cache[-1]:.0f} tok/s, "
                f"without {without[-1]:.0f} tok/s",
                file=sys.stderr,
            )
        results[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "cachedTokensPerSecond": with_cache,
            "uncachedTokensPerSecond": without,
            "cachedMedian": statistics.median(with_cache),
            "uncachedMedian": statistics.median(without),
            "speedup": statistics.median(with_cache) / statistics.median(without),
        }
    result = {
        "bench": "generation",
        "batch": args.batch,
        "promptTokens": args.prompt,
        "newTokens": args.new,
        "dim": args.dim,
        "layers": args.layers,
        "threads": args.threads,
        "decoding": "greedy, no early stop",
        "models": results,
        "loadAverage": os.getloadavg(),
        "device": "cpu",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({n: round(r["speedup"], 2) for n, r in results.items()}))


if __name__ == "__main__":
    main()
