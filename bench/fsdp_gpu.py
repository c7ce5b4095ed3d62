"""FSDP2 + torch.compile throughput of a ~1B Llama-shaped model in bf16 on one GPU:
tokens/s, MFU (6·N·tokens/s over the GPU's peak dense bf16 FLOP/s) and, when pynvml is
importable, joules per token from the board's energy counter. Needs CUDA; writes
``bench/results/fsdp_gpu.json``.

    python bench/fsdp_gpu.py [--steps 30 --warmup 5 --batch 4 --seq 2048 --peak-tflops 989]

The defaults (989 TFLOP/s) are the H100/H200 dense bf16 peak; pass another GPU's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from kubetrain.core.api import Parallelism
from kubetrain.core.hf_config import ModelConfig, parse_config
from kubetrain_trainer import parallel
from kubetrain_trainer.hf.model import build_model

RESULTS = Path(__file__).parent / "results"


def llama_1b() -> ModelConfig:
    """Llama 3.2 1B's shape (16 layers, width 2048, GQA 32/8, MLP 8192, 128k vocab)."""
    return parse_config(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 8192,
                "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True,
                "architectures": ["LlamaForCausalLM"],
                "torch_dtype": "bfloat16",
            }
        ),
        where="llama-1b",
    )


class Energy:
    """The GPU's cumulative energy counter (mJ) through NVML; None without pynvml."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:
            self.nvml = None

    def joules(self) -> float | None:
        if self.nvml is None:
            return None
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fsdp_gpu.py needs a CUDA GPU")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    cfg = llama_1b()
    torch.manual_seed(0)
    with device:
        model = build_model(cfg)
    model.reset_buffers()
    n_params = sum(p.numel() for p in model.parameters())
    parallel.shard(model, Parallelism(strategy="fsdp"), "bf16", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = model if args.no_compile else torch.compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = step_model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        parallel.clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    energy = Energy()
    j0 = energy.joules()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    j1 = energy.joules()
    trained = args.steps * args.batch * args.seq
    tps = trained / seconds
    mfu = 6 * n_params * tps / (args.peak_tflops * 1e12)
    result = {
        "bench": "fsdp_gpu",
        "gpu": torch.cuda.get_device_name(device),
        "parameters": n_params,
        "batch": args.batch,
        "seqLen": args.seq,
        "compile": not args.no_compile,
        "tokensPerSecond": tps,
        "mfu": mfu,
        "peakTFLOPs": args.peak_tflops,
        "joulesPerToken": None if j0 is None or j1 is None else (j1 - j0) / trained,
        "peakMemoryGB": torch.cuda.max_memory_allocated(device) / 1e9,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fsdp_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
