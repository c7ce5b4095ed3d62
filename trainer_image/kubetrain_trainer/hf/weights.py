"""Hugging Face model folders in and out: safetensors weights, config and tokenizer files.

In: ``config.json`` plus ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; tensors are mapped to the native model's names
(identity for the Llama family; GPT-2's prefix and transposed ``Conv1D`` weights),
converted to the requested dtype and assigned into a model built on the meta device,
so a model is never held twice in memory. Every missing or unexpected tensor is an
error that names it.

Out: the same layout, loadable by ``AutoModelForCausalLM.from_pretrained`` and vLLM:
``config.json`` (the source config passed through, with ``architectures`` and the dtype
set), safetensors (sharded with an index above ``max_shard_bytes``),
``generation_config.json`` and the tokenizer files, written into a temporary folder
that is renamed into place, so a reader sees the whole folder or none of it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kubetrain.core import store as kstore
from kubetrain.core.contract import S3Endpoint
from kubetrain.core.hf_config import ARCHITECTURES, ModelConfig, ModelFormatError, read_config
from kubetrain_trainer.hf.model import CausalLM, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# Every file a tokenizer may consist of; whichever the source has are copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# GPT-2's Conv1D layers store (in, out); nn.Linear holds (out, in).
_GPT2_TRANSPOSED = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)


def _transposed(cfg: ModelConfig, name: str) -> bool:
    return cfg.family == "gpt2" and name.endswith(_GPT2_TRANSPOSED)


def _ignored(cfg: ModelConfig, name: str) -> bool:
    """Tensors some checkpoints carry that are not weights: buffers older transformers
    saved (rotary frequencies, GPT-2's causal mask) and the tied output head's copy."""
    if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
        return True
    return cfg.tie_embeddings and name == "lm_head.weight"


def _native_name(cfg: ModelConfig, name: str) -> str:
    # The original GPT-2 checkpoints name tensors without the "transformer." prefix.
    if cfg.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return f"transformer.{name}"
    return name


# --------------------------------------------------------------------------- loading


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelFormatError(
                f"{index}: expected a JSON object with a weight_map of tensor -> file"
            ) from None
        files = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.exists()})
        if absent:
            raise ModelFormatError(f"{index} lists shards that are not in {folder}: {absent}")
        return files
    single = folder / SINGLE_FILE
    if not single.exists():
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.safetensors")
        )
        raise ModelFormatError(
            f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (found: {others or 'nothing'}); "
            "weights must be safetensors (convert .bin files with transformers' "
            "save_pretrained(safe_serialization=True))"
        )
    with safe_open(single, framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def read_state_dict(
    folder: str | Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The folder's tensors under the native model's names, in ``dtype``, on the CPU,
    checked against the architecture: every missing, unexpected or misshapen tensor is
    reported (by name) in one error."""
    expected = _expected_shapes(cfg)
    files = weight_files(folder)
    unexpected = sorted(
        n for n in files if _native_name(cfg, n) not in expected and not _ignored(cfg, n)
    )
    found = {_native_name(cfg, n) for n in files}
    missing = sorted(set(expected) - found)
    problems = []
    if missing:
        problems.append(f"missing tensors {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_some(unexpected)}")
    if problems:
        raise ModelFormatError(
            f"{folder}: the weights do not match config.json ({cfg.model_type}, "
            f"{cfg.num_layers} layers, tie_word_embeddings={cfg.tie_embeddings}): "
            + "; ".join(problems)
        )
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as fh:
            for name in names:
                native = _native_name(cfg, name)
                if native not in expected:
                    continue
                tensor = fh.get_tensor(name)
                if _transposed(cfg, native):
                    tensor = tensor.t()
                if tuple(tensor.shape) != expected[native]:
                    raise ModelFormatError(
                        f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {expected[native]}"
                    )
                out[native] = tensor.to(dtype).contiguous()
    return out


def _some(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def load_pretrained(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """The model in a Hugging Face folder, in ``dtype`` on ``device``, in eval mode.

    Built on the meta device and filled with the loaded tensors (``assign``), so the
    weights are allocated once.
    """
    cfg = read_config(folder)
    state = read_state_dict(folder, cfg, dtype)
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # read_state_dict checked names; this guards the mapping itself
        raise ModelFormatError(f"{folder}: no weights loaded for {_some(still_meta)}")
    return model.to(device).eval()


def wanted(name: str, *, weights: bool = True) -> bool:
    """Whether a file of a model folder is needed to train it: config, generation config,
    tokenizer and (with ``weights``) safetensors; not other formats' copies of the same
    weights (``*.bin``, ``original/``) that hub folders often carry as well."""
    if "/" in name:
        return False
    if name in ("config.json", GENERATION_CONFIG, *TOKENIZER_FILES):
        return True
    return weights and (name == INDEX_FILE or name.endswith(".safetensors"))


def local_folder(
    uri: str, scratch: str | Path, s3: S3Endpoint | None = None, *, weights: bool = True
) -> Path:
    """A local copy of the model folder at ``uri``: ``file://`` folders are used where
    they are; the files an ``s3://`` folder needs (:func:`wanted`) are downloaded into
    ``scratch`` (from ``s3``'s endpoint) under a temporary name that is renamed when the
    download is complete, so a ``scratch`` that exists is whole and is reused (by the
    other processes of a node, or after a restart)."""
    s3 = s3 or S3Endpoint()
    store = kstore.open_store(uri, endpoint=s3.endpoint, region=s3.region)
    if isinstance(store, kstore.FileStore):
        if not store.base.is_dir():
            raise FileNotFoundError(f"model.from {uri}: no such folder")
        return store.base
    dest = Path(scratch)
    if dest.is_dir():
        return dest
    keys = [k for k in store.list() if wanted(k, weights=weights)]
    if not keys:
        raise FileNotFoundError(f"model.from {uri}: no model files under that prefix")
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for key in keys:
            store.get_file(key, tmp / key)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():  # another process may have finished the same download
            raise
    return dest


# --------------------------------------------------------------------------- saving


def hf_state_dict(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Native tensors under transformers' names and layout, in ``dtype``, on the CPU."""
    out = {}
    for name, tensor in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from the embedding
        tensor = tensor.detach().to("cpu", dtype)
        if _transposed(cfg, name):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _output_dtype(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> torch.dtype:
    # The dtype the source was published in (a bfloat16 model stays bfloat16 and the
    # same size), else the dtype it was trained in.
    if cfg.dtype_name in DTYPES:
        return DTYPES[cfg.dtype_name]
    return next(iter(state.values())).dtype


def _output_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    config = dict(cfg.source)
    config["architectures"] = [ARCHITECTURES[cfg.model_type]]
    dtype_name = str(dtype).removeprefix("torch.")
    # transformers 5 reads "dtype", older readers "torch_dtype"; keep the key the source
    # used and always write the current one.
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    return config


def _generation_config(cfg: ModelConfig, source: Path | None) -> dict[str, Any]:
    if source is not None and (source / GENERATION_CONFIG).exists():
        return json.loads((source / GENERATION_CONFIG).read_text())
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: cfg.source[k] for k in keys if cfg.source.get(k) is not None}


def save_pretrained(
    cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    dest: str | Path,
    *,
    source: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face model folder at ``dest`` (replacing one that is there).

    ``state`` is the native model's full state dict (``model.state_dict()``; under FSDP
    the gathered full state dict). ``source`` is the folder the model was loaded from:
    its tokenizer files and generation config are copied. ``dtype`` defaults to the
    source's published dtype.
    """
    dest = Path(dest)
    dtype = dtype or _output_dtype(cfg, state)
    tensors = hf_state_dict(cfg, state, dtype)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        _write_weights(tmp, tensors, max_shard_bytes)
        _write_json(tmp / "config.json", _output_config(cfg, dtype))
        src = Path(source) if source is not None else None
        _write_json(tmp / GENERATION_CONFIG, _generation_config(cfg, src))
        for name in TOKENIZER_FILES:
            if src is not None and (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and removed
    after, so ``dest`` is at every moment either the old folder, absent, or the new one."""
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    aside = None
    if dest.exists():
        aside = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, aside)
    os.replace(tmp, dest)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
