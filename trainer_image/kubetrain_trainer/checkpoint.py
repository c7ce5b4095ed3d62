"""Checkpoints in a stage folder, through kubetrain.core.store (same code for s3:// and file://).

Protocol (the stage folder's layout: trainer_image/README.md, "What a stage writes"):
1. the files of ``checkpoints/step-000100/`` are uploaded (torch.save to a temporary
   file, then ``put_file``, so large files go multipart on S3);
2. ``MANIFEST.json`` (a :class:`kubetrain.core.records.CheckpointManifest`: every file's
   size and sha256) is written LAST: a folder without it, or with a torn one, is an
   interrupted save and does not exist for any reader;
3. the ``LATEST`` pointer (text: ``checkpoints/step-000100``) is updated; ``FINAL``
   likewise when the stage completes;
4. complete checkpoints beyond ``keepCheckpoints`` are deleted, oldest first.

Loading verifies sizes and hashes; a checkpoint that does not match its manifest is
skipped (with a warning) in favour of the previous complete one.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner

from kubetrain.core import contract, layout
from kubetrain.core.hf_config import ModelConfig
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import (
    CheckpointManifest,
    FileEntry,
    read_manifest,
    resolve_checkpoint,
    write_manifest,
    write_pointer,
)
from kubetrain.core.store import ObjectStore, open_store
from kubetrain_trainer.hf import weights

log = logging.getLogger("kubetrain_trainer.checkpoint")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is required (message says where and why)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest."""


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """A write-only file that hashes what passes through it: the manifest's sha256
    without reading a multi-GB file a second time."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


@dataclass(frozen=True)
class Loaded:
    key: str  # relative to the store it came from, e.g. checkpoints/step-000100
    uri: str
    step: int
    state: dict[str, Any]  # file name (without .pt) -> the object saved


def save_files(
    store: ObjectStore,
    key: str,
    payloads: dict[str, Any],
    *,
    step: int | None = None,
    run: str | None = None,
    stage: str | None = None,
) -> int:
    """Write ``payloads`` (name -> object for torch.save) as ``<key>/<name>.pt`` and then
    the manifest (which also records ``step``, ``run`` and ``stage``). Returns the bytes
    written."""
    # A previous, abandoned attempt at the same step (e.g. a corrupt checkpoint that was
    # skipped) must not mix its files with this one.
    store.delete_prefix(key + "/")
    with (
        tempfile.TemporaryDirectory(prefix="kubetrain-ckpt-") as tmp,
        ThreadPoolExecutor(max_workers=max(1, len(payloads))) as pool,
    ):
        entries: dict[str, FileEntry] = {}
        uploads = []
        for name, obj in payloads.items():
            path = Path(tmp) / f"{name}.pt"
            with open(path, "wb") as fh:
                out = _HashingWriter(fh)
                torch.save(obj, cast(BinaryIO, out))
            entries[path.name] = FileEntry(size=out.size, sha256=out.sha256.hexdigest())
            # Each file uploads as soon as it is written, while the next one serialises
            # (boto3 clients are thread-safe; one stream per file rarely fills the link).
            uploads.append(pool.submit(store.put_file, f"{key}/{path.name}", path))
        for upload in uploads:
            upload.result()
    manifest = CheckpointManifest(
        files=entries,
        step=step,
        run=run,
        stage=stage,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_manifest(store, f"{key}/{layout.MANIFEST}", manifest)
    return manifest.total_bytes


def export_hf(
    store: ObjectStore,
    key: str,
    cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    *,
    source: Path | None,
    step: int | None = None,
    run: str | None = None,
    stage: str | None = None,
) -> str:
    """Write a model as a Hugging Face folder at ``key`` (``hf/`` of a stage folder):
    safetensors in the model's published dtype, config.json, generation config and the
    tokenizer files of ``source``, so transformers and vLLM load it as it is. As with
    checkpoints, ``MANIFEST.json`` is written last: a folder without it is an
    interrupted export and nobody starts from it. Returns the folder's URI."""
    store.delete_prefix(key + "/")
    with tempfile.TemporaryDirectory(prefix="kubetrain-hf-") as tmp:
        folder = weights.save_pretrained(cfg, state, Path(tmp) / "hf", source=source)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        entries = {p.name: FileEntry(size=p.stat().st_size, sha256=sha256_of(p)) for p in files}
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
            for upload in [pool.submit(store.put_file, f"{key}/{p.name}", p) for p in files]:
                upload.result()
    manifest = CheckpointManifest(
        files=entries,
        step=step,
        run=run,
        stage=stage,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_manifest(store, f"{key}/{layout.MANIFEST}", manifest)
    return store.uri(key)


def load_files(
    store: ObjectStore,
    key: str,
    names: tuple[str, ...] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Verify and load the files of the checkpoint at ``key`` ('' = the store root).

    ``names`` limits loading to some files (e.g. only ``model`` to initialise a stage).
    Raises CheckpointError when there is no manifest, CorruptCheckpoint on a mismatch,
    RecordFormatError for a manifest of a format this kubetrain does not read.
    """
    prefix = f"{key}/" if key else ""
    manifest = read_manifest(store, f"{prefix}{layout.MANIFEST}")
    if manifest is None:
        raise CheckpointError(f"{store.uri(key)} has no complete {layout.MANIFEST}")
    files = {
        f: e for f, e in manifest.files.items() if names is None or f.removesuffix(".pt") in names
    }
    if names is not None and len(files) < len(names):
        raise CheckpointError(f"{store.uri(key)} lacks {', '.join(names)}")
    with tempfile.TemporaryDirectory(prefix="kubetrain-ckpt-") as tmp:

        def fetch(item: tuple[str, FileEntry]) -> tuple[str, Path]:
            fname, entry = item
            path = Path(tmp) / fname
            try:
                store.get_file(f"{prefix}{fname}", path)
            except FileNotFoundError:
                raise CorruptCheckpoint(f"{store.uri(prefix + fname)} is missing") from None
            size = path.stat().st_size
            if size != entry.size or sha256_of(path) != entry.sha256:
                raise CorruptCheckpoint(
                    f"{store.uri(prefix + fname)} does not match "
                    f"{layout.MANIFEST} (size {size}, "
                    f"expected {entry.size}; or sha256 differs)"
                )
            return fname, path

        with ThreadPoolExecutor(max_workers=max(1, len(files))) as pool:
            fetched = list(pool.map(fetch, files.items()))
        return {
            fname.removesuffix(".pt"): torch.load(
                path, map_location=map_location, weights_only=True
            )
            for fname, path in fetched
        }


class Checkpointer:
    """Saves and finds the checkpoints of one stage folder (``store`` is rooted at it)."""

    def __init__(self, store: ObjectStore, keep: int = 2):
        self.store = store
        self.keep = keep
        self.folder = StageLayout()

    def steps(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) checkpoint steps, newest first."""
        has_manifest: dict[int, bool] = {}
        prefix = self.folder.checkpoints
        for k in self.store.list(prefix):
            parts = k[len(prefix) :].split("/")
            if len(parts) < 2 or (step := layout.checkpoint_step(parts[0])) is None:
                continue
            has_manifest[step] = has_manifest.get(step, False) or parts[1] == layout.MANIFEST
        complete = sorted((s for s, ok in has_manifest.items() if ok), reverse=True)
        incomplete = sorted((s for s, ok in has_manifest.items() if not ok), reverse=True)
        return complete, incomplete

    def save(
        self,
        step: int,
        payloads: dict[str, Any],
        *,
        run: str | None = None,
        stage: str | None = None,
    ) -> str:
        """Write a complete checkpoint, move LATEST to it, prune old ones; its URI."""
        key = self.folder.checkpoint(step)
        save_files(self.store, key, payloads, step=step, run=run, stage=stage)
        write_pointer(self.store, self.folder.latest, step)
        self.prune(keep_step=step)
        return self.store.uri(key)

    def mark_final(self, step: int) -> None:
        """Point FINAL at the (complete) checkpoint of ``step``: the stage's result."""
        write_pointer(self.store, self.folder.final, step)

    def prune(self, keep_step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older partial saves."""
        complete, incomplete = self.steps()
        for step in complete[self.keep :]:
            if step != keep_step:
                self._delete(step)
        for step in incomplete:
            if step < keep_step:
                self._delete(step)

    def discard_after(self, step: int) -> None:
        """Delete checkpoints newer than ``step`` (found unusable when resuming), so the
        pointers and the retention count never consider them again."""
        complete, incomplete = self.steps()
        for s in complete + incomplete:
            if s > step:
                self._delete(s)
        if step > 0:
            write_pointer(self.store, self.folder.latest, step)

    def _delete(self, step: int) -> None:
        self.store.delete_prefix(self.folder.checkpoint(step) + "/")

    def load_latest(self, map_location: str | torch.device = "cpu") -> Loaded | None:
        """The newest checkpoint that verifies, or None when there is none."""
        complete, _ = self.steps()
        for step in complete:
            key = self.folder.checkpoint(step)
            try:
                state = load_files(self.store, key, map_location=map_location)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", self.store.uri(key), exc)
                continue
            return Loaded(key, self.store.uri(key), step, state)
        return None


class StoreReader(dcp.FileSystemReader):
    """DCP's file reader over a local folder that fetches, on first need, the files of
    one part (``model`` or ``optim``) of a checkpoint in the store, each verified
    against the manifest: a rank downloads only what its shards need."""

    def __init__(
        self, store: ObjectStore, key: str, part: str, manifest: CheckpointManifest, local: Path
    ):
        local.mkdir(parents=True, exist_ok=True)
        super().__init__(local)
        self.store, self.key, self.part, self.manifest = store, key, part, manifest
        self.local = local

    def _fetch(self, name: str) -> None:
        target = self.local / name
        if target.exists():
            return
        rel = f"{self.part}/{name}"
        where = f"{self.key}/{rel}" if self.key else rel
        entry = self.manifest.files.get(rel)
        uri = self.store.uri(where)
        if entry is None:
            raise CorruptCheckpoint(f"{uri} is not in {layout.MANIFEST}")
        partial = target.with_suffix(target.suffix + ".part")
        try:
            self.store.get_file(where, partial)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{uri} is missing") from None
        if partial.stat().st_size != entry.size or sha256_of(partial) != entry.sha256:
            raise CorruptCheckpoint(f"{uri} does not match {layout.MANIFEST} (size or sha256)")
        partial.rename(target)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        self._fetch(".metadata")
        return super().read_metadata(*args, **kwargs)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        needed = sorted(
            {self.storage_data[item.storage_index].relative_path for item in plan.items}
        )
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(needed)))) as pool:
            list(pool.map(self._fetch, needed))
        return super().read_data(plan, planner)


def load_model_state(
    store: ObjectStore, key: str, manifest: CheckpointManifest
) -> dict[str, torch.Tensor]:
    """The whole model of a sharded checkpoint, in this process alone (to initialise the
    next stage or a reference model): tensors allocated from DCP's metadata and filled
    from the ``model`` part, whatever world size wrote it."""
    with tempfile.TemporaryDirectory(prefix="kubetrain-dcp-init-") as tmp:
        reader = StoreReader(store, key, "model", manifest, Path(tmp))
        metadata = reader.read_metadata()
        prefix = "model."
        model: dict[str, torch.Tensor] = {
            fqn[len(prefix) :]: torch.empty(md.size, dtype=md.properties.dtype)
            for fqn, md in metadata.state_dict_metadata.items()
            if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)
        }
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def load_model_weights(
    uri: str,
    map_location: str | torch.device = "cpu",
    *,
    s3: contract.S3Endpoint | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Model weights from a checkpoint folder or a stage folder (its FINAL, else LATEST
    pointer), and the URI of the checkpoint they came from (``s3``: where an ``s3://``
    URI's store is; None: AWS)."""
    s3 = s3 or contract.S3Endpoint()
    store = open_store(uri, endpoint=s3.endpoint, region=s3.region)
    key = resolve_checkpoint(store)
    if key is None:
        raise CheckpointError(
            f"{uri} holds no complete checkpoint (no {layout.MANIFEST}, "
            f"{layout.FINAL} or {layout.LATEST}); expected a stage "
            "folder that finished or a checkpoint folder"
        )
    manifest = read_manifest(store, f"{key}/{layout.MANIFEST}" if key else layout.MANIFEST)
    if manifest is not None and manifest.layout == "dcp":
        weights = load_model_state(store, key, manifest)
        return {k: v.to(map_location) for k, v in weights.items()}, store.uri(key)
    state = load_files(store, key, names=("model",), map_location=map_location)
    return state["model"], store.uri(key)
