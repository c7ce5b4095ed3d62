"""Workers for multi-process checkpoint tests (spawned by torch.multiprocessing, so
module-level functions)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kubetrain.core.api import ModelSpec, Parallelism
from kubetrain.core.store import FileStore
from kubetrain_trainer import parallel
from kubetrain_trainer.checkpoint import Checkpointer, CheckpointError
from kubetrain_trainer.model import build_model
from kubetrain_trainer.sharded import ShardedCheckpointer

SPEC = ModelSpec(layers=2, heads=2, dim=32, contextLength=16)


class DyingStore(FileStore):
    """Kills this process (as a node failure would) after ``uploads`` more uploads."""

    def __init__(self, root: str, uploads: int):
        super().__init__(root)
        self.uploads = uploads

    def put_file(self, key: str, path: Any) -> None:
        if self.uploads == 0:
            os._exit(9)
        self.uploads -= 1
        super().put_file(key, path)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()


def die_mid_save(rank: int, world: int, port: int, root: str, out: str) -> None:
    """Step, save step 1, step, save step 2 in the background: rank 1 dies after
    uploading one of its files of step 2. Rank 0 writes what it saw to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cpu:gloo", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = build_model(SPEC)
    parallel.shard(model, Parallelism(strategy="fsdp"), "fp32", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    store = FileStore(root)
    sharded = ShardedCheckpointer(Checkpointer(store), group, background=True)
    extras = {"scheduler": {}, "trainer": {"step": 1}} if rank == 0 else None
    _step(model, optimizer)
    sharded.save(1, model, optimizer, extras)
    sharded.wait()
    full = parallel.full_state_dict(model)
    if rank == 0:
        torch.save(full, Path(out) / "step1.pt")
    _step(model, optimizer)
    if rank == 1:
        sharded.store = sharded.checkpointer.store = DyingStore(root, uploads=1)
    sharded.save(2, model, optimizer, extras)
    try:
        sharded.wait()
        result = "saved"
    except CheckpointError as exc:
        result = f"failed: {exc}"
    if rank == 0:
        (Path(out) / "result.txt").write_text(result)
    os._exit(0)
