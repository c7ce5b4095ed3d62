"""How a stage's processes share the model: DDP (a replica per process) or FSDP2
(``torch.distributed.fsdp.fully_shard``: parameters, gradients and AdamW state sharded
over the processes), and which activations the backward pass recomputes.

FSDP2 shards every transformer block (``model.blocks`` of the built-in model and of
every Hugging Face family) and then the root (embeddings, final norm, tied head), so
one block's parameters are gathered at a time. With ``precision`` bf16 the gathered
parameters are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``); the
sharded parameters and the optimizer stay fp32. The strategy ``auto`` resolves in
:func:`kubetrain.core.accounting.choose_parallelism`, the same function the estimate
and the status use.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from kubetrain.core.api import ActivationCheckpointing, Parallelism

# What selective activation checkpointing keeps: the outputs of the matmuls and of
# attention (the expensive ops); norms, activations, residual adds and rotary
# embeddings are recomputed in the backward pass (cheap, and most of the memory).
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


@dataclass
class StepModel:
    """The model as a training step runs it: ``module`` (DDP and/or compiled) and the
    DDP wrapper inside it, whose ``no_sync`` skips the gradient all-reduce of every
    micro-batch but the last. (torch.compile wraps the DDP module, so ``module`` is not
    itself the DDP instance.) FSDP reduce-scatters every micro-batch's gradients: keeping
    them unsharded until the last would cost the memory that sharding saves."""

    module: nn.Module
    ddp: DistributedDataParallel | None
    autocast: contextlib.AbstractContextManager[Any]

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the units of sharding and of recomputation."""
    found = getattr(model, "blocks", None)
    if not isinstance(found, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList to shard")
    return list(found)


def _selective_policy(_ctx: Any, op: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(model: nn.Module, mode: ActivationCheckpointing) -> None:
    """Recompute each block's activations in the backward pass (``full``: all of them;
    ``selective``: all but matmul and attention outputs). The block's ``forward`` is
    replaced in place, so parameter names and checkpoints are unchanged; FSDP's hooks
    sit on the block's ``__call__``, outside the recomputed region."""
    if mode == ActivationCheckpointing.none:
        return
    for block in blocks(model):
        forward = block.forward
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if mode == ActivationCheckpointing.selective:
            kwargs["context_fn"] = functools.partial(
                create_selective_checkpoint_contexts, _selective_policy
            )

        def recomputed(*args: Any, _forward: Any = forward, _kw: Any = kwargs, **kw: Any) -> Any:
            # Sampling with a KV cache (grpo rollouts, evaluation) runs without grad:
            # nothing to recompute, and the cache must be written once.
            if not torch.is_grad_enabled():
                return _forward(*args, **kw)
            return checkpoint(_forward, *args, **_kw, **kw)

        block.forward = recomputed


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: blocks compute with bf16 parameters, gradients are reduced and kept in
    fp32 (summing bf16 over many ranks loses bits the optimizer needs)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: nn.Module, par: Parallelism, precision: str, device: torch.device) -> None:
    """FSDP2 in place: every block, then the root. Call before building the optimizer
    (its parameters become the shards)."""
    kwargs: dict[str, Any] = {"mp_policy": mixed_precision(precision)}
    if par.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in blocks(model):
        fully_shard(block, **kwargs)
    # The root keeps its parameters gathered after forward: the backward starts with
    # them (tied head), so resharding would only gather them again at once.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def ensure_process_group(backend: str) -> None:
    """FSDP needs a process group even for one process (e.g. one GPU with CPU offload)."""
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Whole parameters on every rank for the duration (evaluation, sampling): each
    rank then runs as many forward passes as its share needs, with no collective per
    pass that the other ranks would have to match. Costs one gathered copy of the
    weights (in the compute dtype), not gradients or optimizer state."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm; the norm before clipping. Sharded (DTensor)
    gradients give a partial norm per rank: it is reduced over the ranks first."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, in host memory (the other ranks get an
    empty dict); a collective: every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
