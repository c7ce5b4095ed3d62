"""One optimizer step of the real Trainer, in this process, on data whose target counts
the test chooses: the loss normalisation, what happens to masked and diverging steps,
DDP's no_sync under torch.compile, and where collective tensors are made."""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kubetrain.core import contract
from kubetrain.core.api import ModelSpec, TrainingRunSpec
from kubetrain.core.contract import StageConfig
from kubetrain_trainer import evaluation, toolchain, train
from kubetrain_trainer.data import IGNORE, ArithmeticSFT, Dataset, EvalSet, LMBatch
from kubetrain_trainer.model import build_model
from kubetrain_trainer.train import Dist, StageError, Trainer

torch.set_num_threads(1)

MODEL = {"layers": 1, "heads": 2, "dim": 16, "contextLength": 16}
SEQ = 12


class Targets(Dataset):
    """Sample ``i``: random ids, and targets on ``counts[i % len(counts)]`` positions
    (0: a prompt that fills the sequence, nothing to learn)."""

    def __init__(self, counts: list[int]):
        self.counts = counts
        self.eval_set = EvalSet()

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 256, (SEQ + 1,), generator=gen)
        targets = torch.full((SEQ,), IGNORE)
        n = self.counts[i % len(self.counts)]
        if n:
            targets[-n:] = ids[1:][-n:]
        return ids[:-1], targets

    def batch(self, start: int, size: int) -> LMBatch:
        rows = [self.sample(start + j) for j in range(size)]
        return LMBatch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))


def make_trainer(tmp_path: Path, d: Dist | None = None, **hyperparameters: Any) -> Trainer:
    spec = TrainingRunSpec.model_validate(
        {
            "model": MODEL,
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "hyperparameters": {"maxSteps": 2, "learningRate": 1e-2, **hyperparameters},
                }
            ],
        }
    )
    config = StageConfig(run="step", model=spec.model, stage=spec.stages[0])
    env = {
        contract.ENV_STAGE_CONFIG: config.model_dump_json(by_alias=True, exclude_none=True),
        contract.ENV_CHECKPOINT_URI: (tmp_path / "stage").as_uri(),
        contract.ENV_POWER_WATTS: "10",
    }
    return Trainer(env, d or Dist(0, 1, 0, 1, torch.device("cpu")))


def one_step(trainer: Trainer, data: Dataset) -> dict[str, torch.Tensor]:
    """Run a step; the gradients the optimizer was about to apply."""
    trainer.data = data
    seen: dict[str, torch.Tensor] = {}

    def record(*_: Any) -> None:
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        seen.update({n: g.clone() for n, g in grads.items() if g is not None})

    trainer.optimizer.register_step_pre_hook(record)
    trainer._train_step(trainer._training_model())
    return seen


def test_the_loss_is_the_mean_over_the_steps_target_tokens(tmp_path: Path) -> None:
    """Micro-batches with 1 and 11 target tokens: the step's loss and gradient are the
    mean over all 12 tokens whether they come in one micro-batch or in two; a mean of
    the two micro-batches' means would weigh the lone token as much as the other 11."""
    data = Targets([1, 1, 11, 11])
    whole = make_trainer(tmp_path / "a", batchSize=4, gradientAccumulation=1)
    grads_whole = one_step(whole, data)
    split = make_trainer(tmp_path / "b", batchSize=2, gradientAccumulation=2)
    grads_split = one_step(split, data)
    assert split.loss_value == pytest.approx(whole.loss_value, rel=1e-6)
    for name, g in grads_whole.items():
        assert torch.allclose(grads_split[name], g, rtol=1e-5, atol=1e-7), name


def test_a_micro_batch_without_targets_adds_nothing(tmp_path: Path) -> None:
    """A prompt that fills seqLen leaves a micro-batch with no target: it must neither
    turn the step's loss into NaN nor stop the weights from learning the other one."""
    data = Targets([0, 0, 5, 7])
    trainer = make_trainer(tmp_path / "a", batchSize=2, gradientAccumulation=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    one_step(trainer, data)
    assert math.isfinite(trainer.loss_value)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    alone = make_trainer(tmp_path / "b", batchSize=2, gradientAccumulation=1)
    alone.cursor = 2  # the second micro-batch on its own
    one_step(alone, data)
    assert trainer.loss_value == pytest.approx(alone.loss_value, rel=1e-6)


def test_a_step_without_any_target_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = make_trainer(tmp_path, batchSize=2, gradientAccumulation=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="kubetrain_trainer"):
        one_step(trainer, Targets([0]))
    assert trainer.step == 1 and math.isnan(trainer.loss_value)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert "no target token" in caplog.text and "raise hyperparameters.seqLen" in caplog.text


def test_a_diverged_step_fails_before_the_weights_change(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, batchSize=2)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(math.inf)  # the loss becomes inf/NaN
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(StageError, match="before the update") as err:
        one_step(trainer, Targets([5]))
    assert "learningRate" in str(err.value)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"


@pytest.fixture
def process_group() -> Iterator[None]:
    dist.init_process_group(
        train.process_group_backend(torch.device("cpu")),
        store=dist.HashStore(),
        rank=0,
        world_size=1,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_compiled_ddp_all_reduces_once_per_step(
    tmp_path: Path, process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile wraps the DDP module; gradient accumulation must still skip the
    all-reduce of every micro-batch but the last (no_sync of the DDP inside)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compile_(m, backend="eager"))
    monkeypatch.setattr(toolchain, "missing", lambda _device: None)  # eager: none needed
    # World 2 as far as the trainer knows, so it wraps DDP; the group has one process.
    d = Dist(0, 2, 0, 2, torch.device("cpu"))
    trainer = make_trainer(tmp_path, d=d, batchSize=2, gradientAccumulation=4, compile=True)
    trainer.data = Targets([3, 5])
    step_model = trainer._training_model()
    assert step_model.ddp is not None and step_model.module is not step_model.ddp
    buckets = []

    # No annotations: DDP checks the hook's signature at run time, and this module's
    # are strings (from __future__ import annotations).
    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        buckets.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    step_model.ddp.register_comm_hook(None, counting_hook)
    trainer._train_step(step_model)
    per_backward = len(set(buckets))
    assert len(buckets) == per_backward, f"{len(buckets)} all-reduces for 4 micro-batches"


def test_compile_without_a_toolchain_trains_eagerly_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """compile: true where torch.compile cannot build its kernels (the trainer image has
    no compiler): the step runs the model uncompiled, instead of failing the stage at its
    first step, and the log and every progress record say why."""
    reason = "torch.compile on cpu needs a C++ compiler ($CXX, or g++) at run time"
    monkeypatch.setattr(toolchain, "missing", lambda device: reason if device == "cpu" else None)
    monkeypatch.setattr(torch, "compile", lambda m: pytest.fail("torch.compile was called"))
    trainer = make_trainer(tmp_path, compile=True)
    trainer.telemetry = trainer._open_telemetry()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        step_model = trainer._training_model()
    assert step_model.module is trainer.model
    expected = f"compile: true ignored, training eagerly: {reason}"
    assert expected in caplog.text
    trainer.publish("running")
    record = trainer.telemetry.last
    assert record is not None and record.warnings == [expected], record


def test_tensors_for_collectives_are_made_on_the_trainers_device() -> None:
    """Under NCCL a collective on a CPU tensor crashes the first step, and a CPU test
    cannot catch that at run time (every tensor is a CPU tensor there). So the code is
    checked: in the trainer, tensors are only made in Dist.all_reduce, on its device."""
    source = Path(train.__file__).read_text()
    makers = {"tensor", "zeros", "ones", "full", "empty", "arange", "as_tensor"}
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in makers
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords)
        ):
            bad.append(f"line {node.lineno}: torch.{node.func.attr}(...) without device=")
    assert not bad, bad
    assert train.process_group_backend(torch.device("cpu")) == "cpu:gloo"
    assert train.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"


def test_every_rank_evaluates_its_share_and_the_sums_make_the_whole() -> None:
    """Evaluation is sharded across ranks (none waits in a collective while rank 0
    evaluates alone); the summed shares give exactly the single-process metrics."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(layers=1, heads=2, dim=16, contextLength=32))
    eval_set = ArithmeticSFT(0, 32, 11).eval_set
    device = torch.device("cpu")
    whole = evaluation.evaluate(model, eval_set, 32, device)
    shares = [evaluation.evaluate_sums(model, eval_set, 32, device, r, 3) for r in range(3)]
    summed = {k: sum(s[k] for s in shares) for k in evaluation.SUMS}
    assert [s["answered"] for s in shares] == [4, 4, 3]
    combined = evaluation.metrics(summed)
    assert combined.keys() == whole.keys() == {"accuracy", "examples", "loss", "preferenceAccuracy"}
    for key, value in whole.items():
        assert combined[key] == pytest.approx(value, rel=1e-6), key
