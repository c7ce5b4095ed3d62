"""What a TrainingRun trains, resolved: the built-in transformer's dimensions, or the
``config.json`` of a Hugging Face model given by ``model.from``.

The manifest's model fields are optional. Without ``from`` they default to the built-in
model's (:data:`kubetrain.core.api.BUILTIN_LAYERS` ...). With ``from`` a Hugging Face
folder, config.json decides and a field the manifest does give must agree with it: a
silently different model is worse than a refused manifest. With ``from`` a kubetrain
checkpoint of the built-in model, the fields describe it as before.

Where a Hugging Face model is: the folder ``model.from`` names (it has config.json), or
the ``hf/`` folder a kubetrain stage of such a model wrote (``from`` naming that stage's
folder, or a later stage starting from an earlier one); see :func:`hf_folder_key`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetrain.core import layout
from kubetrain.core.api import (
    BUILTIN_CONTEXT,
    BUILTIN_DIM,
    BUILTIN_HEADS,
    BUILTIN_LAYERS,
    BYTE_VOCAB_MIN,
    ModelSpec,
    TrainingRunSpec,
)
from kubetrain.core.hf_config import CONFIG_FILE, ModelConfig, parse_config
from kubetrain.core.store import ObjectStore, open_store


@dataclass(frozen=True)
class BuiltinModel:
    """The built-in transformer's dimensions (``kubetrain_trainer.model``)."""

    layers: int
    heads: int
    dim: int
    context_length: int
    vocab_size: int


Architecture = BuiltinModel | ModelConfig


class ArchitectureMismatch(ValueError):
    """The manifest's model fields contradict the config.json of ``model.from``."""


def builtin(model: ModelSpec) -> BuiltinModel:
    """The built-in model the fields describe, unset fields at their defaults."""
    return BuiltinModel(
        layers=model.layers or BUILTIN_LAYERS,
        heads=model.heads or BUILTIN_HEADS,
        dim=model.dim or BUILTIN_DIM,
        context_length=model.context_length or BUILTIN_CONTEXT,
        vocab_size=model.vocab_size or BYTE_VOCAB_MIN,
    )


def mismatches(model: ModelSpec, cfg: ModelConfig) -> list[str]:
    """``model.<field>=<given> ... config.json has <key>=<value>`` for every field the
    manifest gives that the config contradicts."""
    gpt2 = cfg.family == "gpt2"
    pairs = [
        ("layers", model.layers, "n_layer" if gpt2 else "num_hidden_layers", cfg.num_layers),
        ("heads", model.heads, "n_head" if gpt2 else "num_attention_heads", cfg.num_heads),
        ("dim", model.dim, "n_embd" if gpt2 else "hidden_size", cfg.hidden_size),
        (
            "contextLength",
            model.context_length,
            "n_positions" if gpt2 else "max_position_embeddings",
            cfg.max_positions,
        ),
        ("vocabSize", model.vocab_size, "vocab_size", cfg.vocab_size),
    ]
    return [
        f"model.{name}={given} but config.json has {key}={actual}"
        for name, given, key, actual in pairs
        if given is not None and given != actual
    ]


def resolve(model: ModelSpec, hf: ModelConfig | None, where: str = "model.from") -> Architecture:
    """The architecture a stage trains: ``hf`` (checked against the manifest's fields)
    when the model is a Hugging Face one, else the built-in model."""
    if hf is None:
        return builtin(model)
    problems = mismatches(model, hf)
    if problems:
        raise ArchitectureMismatch(
            f"{where}: " + "; ".join(problems) + " (accepted: leave these fields unset to take "
            "them from config.json, or give config.json's values)"
        )
    return hf


def hf_folder_key(store: ObjectStore) -> str | None:
    """For a store rooted where a model starts from: ``""`` when it is a Hugging Face
    folder, ``"hf"`` when it is a stage folder that exported one (complete: its
    manifest exists), None otherwise (a kubetrain checkpoint of the built-in model)."""
    if store.exists(CONFIG_FILE):
        return ""
    if store.exists(f"{layout.HF_EXPORT}/{layout.MANIFEST}"):
        return layout.HF_EXPORT
    return None


def read_hf_config(
    uri: str, *, endpoint: str | None = None, region: str | None = None
) -> ModelConfig | None:
    """The config.json of the Hugging Face model at ``uri`` (see :func:`hf_folder_key`);
    None when ``uri`` holds a kubetrain checkpoint instead. Store errors propagate."""
    return read_hf_config_from(open_store(uri, endpoint=endpoint, region=region))


def read_hf_config_from(store: ObjectStore) -> ModelConfig | None:
    """:func:`read_hf_config` of a store rooted where the model starts from."""
    key = hf_folder_key(store)
    if key is None:
        return None
    path = f"{key}/{CONFIG_FILE}" if key else CONFIG_FILE
    text = store.get_text(path)
    if text is None:  # removed between the two requests
        return None
    return parse_config(text, where=store.uri(path))


def of_run(
    spec: TrainingRunSpec, *, endpoint: str | None = None, region: str | None = None
) -> Architecture:
    """What a manifest trains, reading the config.json of a Hugging Face ``model.from``
    (from ``endpoint``, else the manifest's S3 endpoint). Raises ArchitectureMismatch,
    or the store's error when ``model.from`` cannot be read."""
    uri = spec.model.from_
    if uri is None:
        return builtin(spec.model)
    storage = spec.storage.s3
    endpoint = endpoint or (storage.endpoint if storage is not None else None)
    hf = read_hf_config(uri, endpoint=endpoint, region=region)
    return resolve(spec.model, hf, where=f"model.from {uri}")


def describe(arch: Architecture) -> str:
    """``llama, 2 layers, 4 heads, dim 64, context 128`` (what a person checks first)."""
    if isinstance(arch, ModelConfig):
        return (
            f"{arch.model_type}, {arch.num_layers} layers, {arch.num_heads} heads, "
            f"dim {arch.hidden_size}, context {arch.max_positions}"
        )
    return (
        f"{arch.layers} layers, {arch.heads} heads, dim {arch.dim}, context {arch.context_length}"
    )
