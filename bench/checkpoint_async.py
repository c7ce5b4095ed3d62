"""Sharded (DCP) checkpoints on CPU against an S3 endpoint (moto's server on loopback):

1. training time blocked per checkpoint, background (async) save vs synchronous save,
   same model and store (goal: async blocked < 5% of the sync save);
2. sharded save and load throughput vs raw boto3 uploads/downloads of the same files
   (goal >= 0.9x);
3. training state per rank (parameters + gradients + AdamW moments, bytes held by each
   rank) and peak RSS, FSDP vs DDP, on 2 processes (gloo): sharded state falls ~1/world.

Interleaved repetitions, medians, written to ``bench/results/checkpoint_async.json``.
moto keeps objects in memory and is CPU-bound, so absolute MB/s say little about a
real S3; the ratios and the blocked fraction are the point.

    python bench/checkpoint_async.py [--reps 5] [--dim 256 --layers 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubetrain.core.api import Hyperparameters, ModelSpec, Parallelism
from kubetrain.core.records import read_manifest
from kubetrain.core.store import open_store
from kubetrain_trainer import parallel
from kubetrain_trainer.checkpoint import Checkpointer
from kubetrain_trainer.model import build_model
from kubetrain_trainer.sharded import ShardedCheckpointer
from kubetrain_trainer.train import build_optimizer
from tests.support.services import free_port, start_s3_server

RESULTS = Path(__file__).parent / "results"
MB = 1e6


def _trained(spec: ModelSpec, fsdp: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(spec)
    if fsdp:
        parallel.shard(model, Parallelism(strategy="fsdp"), "fp32", torch.device("cpu"))
    opt = build_optimizer(model, Hyperparameters(), torch.device("cpu"))
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()  # AdamW's moments now exist
    return model, opt


def checkpoint_bench(spec: ModelSpec, reps: int) -> dict[str, object]:
    dist.init_process_group("cpu:gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, opt = _trained(spec, fsdp=True)
    server = start_s3_server()
    try:
        for key, value in server.env().items():
            os.environ[key] = value
        bucket = server.create_bucket("bench")
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name=server.region)
        store = open_store(f"s3://{bucket}/ckpt", endpoint=server.endpoint, region=server.region)
        checkpointer = Checkpointer(store, keep=2 * reps + 2)
        sharded = ShardedCheckpointer(checkpointer, None, background=True)
        extras = {"scheduler": {}, "trainer": {"step": 0}}
        blocked, sync_s, save_mbs, raw_up, load_mbs, raw_down = [], [], [], [], [], []
        size = 0
        for rep in range(reps):
            t = time.perf_counter()
            sharded.save(2 * rep + 1, model, opt, extras, background=True)
            blocked.append(time.perf_counter() - t)
            sharded.wait()
            t = time.perf_counter()
            sharded.save(2 * rep + 2, model, opt, extras, background=False)
            sync_s.append(time.perf_counter() - t)
            key = checkpointer.folder.checkpoint(2 * rep + 2)
            manifest = read_manifest(store, checkpointer.folder.manifest(2 * rep + 2))
            assert manifest is not None
            size = manifest.total_bytes
            save_mbs.append(size / MB / sync_s[-1])
            with tempfile.TemporaryDirectory() as tmp:
                files = []
                for name in manifest.files:
                    path = Path(tmp, name.replace("/", "_"))
                    store.get_file(f"{key}/{name}", path)
                    files.append(path)
                t = time.perf_counter()
                for path in files:
                    client.upload_file(str(path), bucket, f"raw/{rep}/{path.name}")
                raw_up.append(size / MB / (time.perf_counter() - t))
                t = time.perf_counter()
                for path in files:
                    client.download_file(bucket, f"raw/{rep}/{path.name}", str(path) + ".raw")
                raw_down.append(size / MB / (time.perf_counter() - t))
            t = time.perf_counter()
            loaded = sharded.load_latest(model, opt)
            load_mbs.append(size / MB / (time.perf_counter() - t))
            assert loaded is not None and loaded.step == 2 * rep + 2
            print(
                f"rep {rep}: blocked {blocked[-1] * 1e3:.1f} ms vs sync {sync_s[-1] * 1e3:.0f} ms;"
                f" save {save_mbs[-1]:.0f} MB/s (raw {raw_up[-1]:.0f}), load {load_mbs[-1]:.0f}"
                f" MB/s (raw {raw_down[-1]:.0f})",
                file=sys.stderr,
            )
    finally:
        server.stop()
        dist.destroy_process_group()
    med = statistics.median
    return {
        "checkpointBytes": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "asyncBlockedSeconds": blocked,
        "syncSaveSeconds": sync_s,
        "asyncBlockedFractionOfSync": med(blocked) / med(sync_s),
        "saveMBps": save_mbs,
        "rawUploadMBps": raw_up,
        "loadMBps": load_mbs,
        "rawDownloadMBps": raw_down,
        "saveRatio": med(save_mbs) / med(raw_up),
        "loadRatio": med(load_mbs) / med(raw_down),
    }


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += local(v).numel() * v.element_size()
    return total


def memory_worker(rank: int, world: int, port: int, spec: ModelSpec, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("cpu:gloo", rank=rank, world_size=world)
    results = {}
    for strategy in ("ddp", "fsdp"):
        model, opt = _trained(spec, fsdp=strategy == "fsdp")
        results[strategy] = _state_bytes(model, opt)
        del model, opt
    results["peakRssBytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def memory_bench(spec: ModelSpec, world: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            memory_worker, args=(world, free_port(), spec, out), nprocs=world, start_method="spawn"
        )
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    ddp, fsdp = ranks[0]["ddp"], ranks[0]["fsdp"]
    return {
        "world": world,
        "ddpStateBytesPerRank": ddp,
        "fsdpStateBytesPerRank": [r["fsdp"] for r in ranks],
        "fsdpOverDdp": fsdp / ddp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = ModelSpec(layers=args.layers, heads=4, dim=args.dim, contextLength=64)
    result: dict[str, object] = {"bench": "checkpoint_async", "store": "s3 (moto, loopback)"}
    result |= checkpoint_bench(spec, args.reps)
    result["memory"] = [memory_bench(spec, w) for w in (2, 4)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_async.json").write_text(json.dumps(result, indent=1) + "\n")
    keys = ("checkpointBytes", "asyncBlockedFractionOfSync", "saveRatio", "loadRatio", "memory")
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
