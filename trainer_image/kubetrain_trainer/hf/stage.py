"""A stage of a Hugging Face model: its architecture, tokenizer and weights, loaded for
the trainer (``kubetrain_trainer.train``), which otherwise trains it like the built-in
model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kubetrain.core import architecture
from kubetrain.core.api import ModelSpec
from kubetrain.core.contract import S3Endpoint
from kubetrain.core.hf_config import ModelConfig, ModelFormatError, read_config
from kubetrain_trainer import checkpoint as ckpt
from kubetrain_trainer.hf import source as hf_source
from kubetrain_trainer.hf.model import CausalLM, build_model
from kubetrain_trainer.hf.source import HFSource
from kubetrain_trainer.hf.tokenizer import HFTokenizer
from kubetrain_trainer.hf.weights import load_pretrained

log = logging.getLogger("kubetrain_trainer.hf.stage")


@dataclass(frozen=True)
class HFModel:
    """What a stage knows of its Hugging Face model besides the weights."""

    source: HFSource
    folder: Path  # local copy: config, tokenizer (and the safetensors when used)
    config: ModelConfig
    tokenizer: HFTokenizer


def prepare(
    init_uri: str,
    model: ModelSpec,
    s3: S3Endpoint,
    *,
    local_main: bool,
    wait: Callable[[], None],
) -> HFModel | None:
    """The Hugging Face model ``init_uri`` holds (None: a built-in checkpoint), on this
    node: the node's first process downloads it while the others ``wait``. The
    manifest's model fields must agree with its config.json."""
    found = hf_source.locate(init_uri, s3)
    if found is None:
        return None
    if local_main:
        hf_source.fetch(found, s3)
    wait()
    folder = hf_source.fetch(found, s3)
    config = read_config(folder)
    architecture.resolve(model, config, where=f"model.from {found.uri}")
    tokenizer = HFTokenizer.from_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(
            f"{found.uri}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
            f"vocab_size is {config.vocab_size}: they are not of the same model"
        )
    return HFModel(found, folder, config, tokenizer)


def load_weights(hf: HFModel, device: torch.device, s3: S3Endpoint) -> tuple[CausalLM, str]:
    """The model in float32 (the optimizer's master weights; autocast runs bf16 on GPUs)
    on ``device``, in training mode, and the URI its weights came from."""
    if hf.source.checkpoint_uri is None:
        model = load_pretrained(hf.folder, dtype=torch.float32, device=device)
        return model.train(), hf.source.uri
    state, where = ckpt.load_model_weights(hf.source.checkpoint_uri, map_location=device, s3=s3)
    with torch.device("meta"):
        model = build_model(hf.config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return _materialised(model, device), where


def _materialised(model: CausalLM, device: torch.device) -> CausalLM:
    """A model whose parameters were assigned from a state dict but whose buffers
    computed from the config (rotary frequencies, never in a state dict) are still on
    the meta device: they are allocated and recomputed."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.empty_like(buf, device=device), persistent=False)
    model.reset_buffers()
    return model.to(device).train()
