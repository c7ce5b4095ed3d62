"""Parallelism: the API field, the auto choice, FSDP2 wiring on one CPU process (what
would only break on GPUs: the mixed-precision dtypes, the process group's backends),
activation checkpointing, and sharded checkpoints' retries and failures."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError

from kubetrain.core import accounting, layout
from kubetrain.core.api import ActivationCheckpointing, ModelSpec, Parallelism, Stage
from kubetrain.core.store import FileStore
from kubetrain_trainer import parallel
from kubetrain_trainer.checkpoint import Checkpointer, CheckpointError, load_model_weights
from kubetrain_trainer.model import build_model
from kubetrain_trainer.sharded import ShardedCheckpointer
from kubetrain_trainer.train import process_group_backend

SPEC = ModelSpec(layers=2, heads=2, dim=32, contextLength=16)


def stage(**fields: Any) -> Stage:
    return Stage.model_validate({"name": "s", "type": "pretrain", **fields})


# --------------------------------------------------------------------------- API


def test_bad_parallelism_names_the_field_and_the_accepted_values() -> None:
    with pytest.raises(ValidationError) as err:
        stage(parallelism={"strategy": "zero3"})
    assert "parallelism.strategy" in str(err.value).replace("\n  ", ".")
    assert "'auto', 'ddp' or 'fsdp'" in str(err.value)
    with pytest.raises(ValidationError) as err:
        stage(parallelism={"activationCheckpointing": "some"})
    assert "'none', 'selective' or 'full'" in str(err.value)
    with pytest.raises(ValidationError, match="cpuOffload=true needs strategy fsdp or auto"):
        stage(parallelism={"strategy": "ddp", "cpuOffload": True})
    assert stage().parallelism == Parallelism()


def test_auto_shards_when_training_state_exceeds_half_a_gpu() -> None:
    gpus = {"gpusPerNode": 8, "gpuType": "h100"}
    small = accounting.choose_parallelism(stage(resources=gpus), 125_000_000)
    assert small.strategy == "ddp" and "2 GB" in small.reason and "80 GB" in small.reason
    big = accounting.choose_parallelism(stage(resources=gpus), 8_000_000_000)
    assert big.strategy == "fsdp" and "128 GB" in big.reason and "16 GB each" in big.reason
    assert accounting.choose_parallelism(stage(), 8_000_000_000).strategy == "ddp"  # CPU
    offload = stage(resources=gpus, parallelism={"cpuOffload": True})
    assert accounting.choose_parallelism(offload, 1000).strategy == "fsdp"
    forced = stage(resources=gpus, parallelism={"strategy": "fsdp"})
    assert str(accounting.choose_parallelism(forced, 1000)).startswith("fsdp: set in")


# --------------------------------------------------------------------------- FSDP on CPU


@pytest.fixture
def group() -> Iterator[None]:
    dist.init_process_group(
        process_group_backend(torch.device("cpu")), store=dist.HashStore(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _loss(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())


def test_bf16_fsdp_computes_in_bf16_and_keeps_fp32_shards_grads_and_adam(group: None) -> None:
    """The MixedPrecisionPolicy's dtypes, checked where a GPU run would use them."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    parallel.shard(model, Parallelism(strategy="fsdp"), "bf16", torch.device("cpu"))
    seen: list[torch.dtype] = []
    model.blocks[0].attn.register_forward_pre_hook(
        lambda m, _args: seen.append(next(m.parameters()).dtype)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 256, (2, 16))
    _loss(model, idx).backward()
    optimizer.step()
    assert seen == [torch.bfloat16]
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert parallel.clip_grad_norm(model.parameters(), 1.0) > 0


def test_process_groups_serve_the_cpu_tensors_that_offload_and_async_saves_reduce() -> None:
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "cpu:gloo"


@pytest.mark.parametrize("mode", [ActivationCheckpointing.selective, ActivationCheckpointing.full])
def test_activation_checkpointing_recomputes_the_same_gradients(
    mode: ActivationCheckpointing,
) -> None:
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (ActivationCheckpointing.none, mode):
        torch.manual_seed(0)
        model = build_model(SPEC)
        parallel.checkpoint_activations(model, m)
        _loss(model, idx).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-6), name


def test_an_hf_model_shards_by_its_blocks_and_evaluates_gathered(
    group: None, tmp_path: Path
) -> None:
    from kubetrain_trainer.hf.weights import load_pretrained
    from tests.support.hfmodels import tiny_llama

    tiny_llama(tmp_path / "m", seed=0)
    model = load_pretrained(tmp_path / "m", dtype=torch.float32, device=torch.device("cpu"))
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected = model(idx)
    parallel.checkpoint_activations(model, ActivationCheckpointing.selective)
    parallel.shard(model, Parallelism(strategy="fsdp"), "fp32", torch.device("cpu"))
    with torch.no_grad(), parallel.gathered(model):
        first, second = model(idx), model(idx[:1])
    assert torch.allclose(first, expected, atol=1e-5) and second.shape[0] == 1
    whole = parallel.full_state_dict(model)
    assert set(whole) >= {"lm_head.weight", "model.layers.0.mlp.up_proj.weight"}


# --------------------------------------------------------------------------- checkpoints


class FlakyStore(FileStore):
    """Fails the first ``failures`` uploads."""

    def __init__(self, root: Path, failures: int):
        super().__init__(root.as_uri())
        self.failures = failures

    def put_file(self, key: str, path: Any) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("connection reset by peer")
        super().put_file(key, path)


def _save(store: FileStore, background: bool) -> tuple[ShardedCheckpointer, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(SPEC)
    optimizer = torch.optim.AdamW(model.parameters())
    sharded = ShardedCheckpointer(Checkpointer(store), None, background=background)
    sharded.save(1, model, optimizer, {"scheduler": {}, "trainer": {"step": 1}})
    return sharded, model


def test_a_failed_upload_is_retried_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kubetrain_trainer.sharded.RETRY_SECONDS", 0.0)
    store = FlakyStore(tmp_path, failures=2)
    with caplog.at_level(logging.WARNING, logger="kubetrain_trainer.sharded"):
        sharded, model = _save(store, background=True)
        assert sharded.wait() == store.uri("checkpoints/step-000001")
    assert "failed (attempt 1/3), retrying: connection reset" in caplog.text
    loaded, _ = load_model_weights(store.uri())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_an_upload_that_keeps_failing_is_reported_and_latest_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kubetrain_trainer.sharded.RETRY_SECONDS", 0.0)
    store = FileStore(tmp_path.as_uri())
    _save(store, background=False)  # step 1, complete
    flaky = FlakyStore(tmp_path, failures=10**6)
    sharded = ShardedCheckpointer(Checkpointer(flaky), None, background=True)
    model = build_model(SPEC)
    sharded.save(2, model, torch.optim.AdamW(model.parameters()), {"trainer": {}})
    with pytest.raises(CheckpointError, match=r"step 2 was not saved .*LATEST still names"):
        sharded.wait()
    assert store.get_text(layout.LATEST) == "checkpoints/step-000001"
    assert not store.exists(f"checkpoints/step-000002/{layout.MANIFEST}")


def test_a_rank_killed_mid_save_leaves_latest_on_the_previous_checkpoint(tmp_path: Path) -> None:
    """Rank 1 dies after uploading part of its shards of step 2: rank 0 reports the save
    failed, no manifest makes step 2 exist, LATEST names step 1 and loading gives step 1."""
    import torch.multiprocessing as mp

    from tests.support import fsdp_workers
    from tests.support.services import free_port

    store_dir, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(
        fsdp_workers.die_mid_save,
        args=(2, free_port(), store_dir.as_uri(), str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    for p in ctx.processes:
        p.join(timeout=120)
    assert [p.exitcode for p in ctx.processes] == [0, 9]
    result = (out / "result.txt").read_text()
    assert result.startswith("failed: checkpoint of step 2 was not saved"), result
    store = FileStore(store_dir.as_uri())
    assert store.get_text(layout.LATEST) == "checkpoints/step-000001"
    assert any(store.list("checkpoints/step-000002/"))  # the partial upload is there...
    assert not store.exists(f"checkpoints/step-000002/{layout.MANIFEST}")  # ...but not loadable
    loaded, uri = load_model_weights(store.uri())
    assert uri.endswith("checkpoints/step-000001")
    expected = torch.load(out / "step1.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
