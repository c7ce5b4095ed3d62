"""Sharded checkpoints: every rank writes its own shards (``torch.distributed.checkpoint``)
straight to the stage folder's store, with no gather on rank 0, optionally while
training goes on.

The protocol is :mod:`kubetrain_trainer.checkpoint`'s, with more writers:
1. the state is copied to host memory (the only part training waits for when saving
   in the background); rank 0 clears the checkpoint's folder of an abandoned attempt;
2. DCP writes each rank's shards of the model and of the optimizer state into a local
   staging folder (``model/__<rank>_0.distcp``, ``optim/...``; rank 0 also the
   ``.metadata`` of each and ``scheduler.pt`` and ``trainer.pt``: the data cursor, RNG
   and counters, as in a DDP checkpoint);
3. each rank uploads its own files (each retried :data:`UPLOAD_ATTEMPTS` times) and
   reports their sizes and sha256 to rank 0 (``all_gather_object`` on the gloo group);
4. rank 0 writes ``MANIFEST.json`` (layout ``dcp``) only when every rank's files are
   up, then ``LATEST``, then prunes. A rank that failed or died leaves a folder without
   a manifest, which no reader loads: resume takes the previous complete checkpoint.

Loading reads the manifest, then each rank downloads (and verifies against the
manifest) only the files that hold the parts of the state it needs, whatever the world
size that wrote them: DCP reshards. One save is in flight at a time; a failed
background save raises :class:`~kubetrain_trainer.checkpoint.CheckpointError` at the
next save or wait, as a failed synchronous save would.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from kubetrain.core import layout
from kubetrain.core.records import (
    CheckpointManifest,
    FileEntry,
    read_manifest,
    write_manifest,
    write_pointer,
)
from kubetrain.core.store import ObjectStore
from kubetrain_trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    Loaded,
    StoreReader,
    load_files,
    sha256_of,
)

log = logging.getLogger("kubetrain_trainer.sharded")

PARTS = ("model", "optim")
# The small, rank-0 files of a sharded checkpoint (torch.save, as in a DDP one).
EXTRAS = ("scheduler", "trainer")
UPLOAD_ATTEMPTS = 3
RETRY_SECONDS = 1.0
UPLOAD_THREADS = 8
LATEST_NOTE = "LATEST still names the previous complete checkpoint"


def _upload_one(store: ObjectStore, key: str, path: Path) -> None:
    """``put_file`` with retries: a transient S3 error costs a warning, not the save."""
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            store.put_file(key, path)
            return
        except Exception as exc:
            if attempt == UPLOAD_ATTEMPTS:
                raise CheckpointError(
                    f"upload of {store.uri(key)} failed {UPLOAD_ATTEMPTS} times: {exc}"
                ) from exc
            log.warning(
                "upload of %s failed (attempt %d/%d), retrying: %s",
                store.uri(key),
                attempt,
                UPLOAD_ATTEMPTS,
                exc,
            )
            time.sleep(RETRY_SECONDS * attempt)


def _upload_entry(store: ObjectStore, key: str, path: Path) -> FileEntry:
    """Hash ``path`` and upload it to ``key``: in an upload thread, so hashing one file
    overlaps the transfer of the others."""
    entry = FileEntry(size=path.stat().st_size, sha256=sha256_of(path))
    _upload_one(store, key, path)
    return entry


class Uploads:
    """The files of one rank's checkpoint, uploaded by a pool of threads as soon as each
    part is written (the model's shards travel while the optimizer's are serialised);
    :meth:`entries` waits for all of them and raises the first failure. Leaving the
    ``with`` block waits for the uploads in flight, so the staging folder can go."""

    def __init__(self, store: ObjectStore, key: str, root: Path):
        self.store, self.key, self.root = store, key, root
        self.pool = ThreadPoolExecutor(max_workers=UPLOAD_THREADS)
        self.futures: dict[str, Future[FileEntry]] = {}

    def add(self, folder: Path) -> None:
        """Start uploading every file under ``folder`` (inside the root) not yet started."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(self.root).as_posix()
            if name not in self.futures:
                self.futures[name] = self.pool.submit(
                    _upload_entry, self.store, f"{self.key}/{name}", path
                )

    def entries(self) -> dict[str, FileEntry]:
        return {name: future.result() for name, future in self.futures.items()}

    def __enter__(self) -> Uploads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Pending:
    step: int
    thread: threading.Thread | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class ShardedCheckpointer:
    """Saves and loads one stage's sharded checkpoints (see the module docstring).

    ``group``: a gloo group of every rank for the checkpoint's collectives (None in a
    single process); saves in the background use it from their thread, so the training
    loop must not use it while :meth:`busy`."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        group: Any,
        *,
        background: bool,
        staging: Path | None = None,
    ):
        self.checkpointer = checkpointer
        self.store = checkpointer.store
        self.folder = checkpointer.folder
        self.group = group
        self.background = background
        self.staging = staging
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        # On GPUs, pinned host buffers reused from one save to the next (the next staging
        # overwrites them only after the previous save finished with them); on CPU a
        # fresh copy each time (pinning needs CUDA).
        self.stager = BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available())
        self.pending: _Pending | None = None
        self.saved_uri: str | None = None  # newest checkpoint known complete

    # ------------------------------------------------------------------ save
    @property
    def busy(self) -> bool:
        return self.pending is not None and not self.pending.done.is_set()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extras: Mapping[str, Any] | None,
        *,
        background: bool | None = None,
        run: str | None = None,
        stage: str | None = None,
    ) -> str | None:
        """Save the state of ``step`` (``extras``: rank 0's ``scheduler`` and ``trainer``
        states). In the background: returns once the state is copied to host memory.
        Returns the URI of the newest checkpoint known complete."""
        self.wait()
        in_background = self.background if background is None else background
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if in_background:
            state = self.stager.stage(state)
        pending = _Pending(step)

        def write() -> None:
            try:
                self._write(step, state, dict(extras or {}), run=run, stage=stage)
            except BaseException as exc:
                pending.error = exc
            finally:
                pending.done.set()

        self.pending = pending
        if in_background:
            pending.thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
            pending.thread.start()
        else:
            write()
            self.wait()
        return self.saved_uri

    def wait(self) -> str | None:
        """Wait for the save in flight; raise CheckpointError if it failed. The URI of the
        newest complete checkpoint."""
        pending, self.pending = self.pending, None
        if pending is None:
            return self.saved_uri
        pending.done.wait()
        if pending.error is not None:
            raise CheckpointError(
                f"checkpoint of step {pending.step} was not saved ({LATEST_NOTE}): {pending.error}"
            ) from pending.error
        return self.saved_uri

    def _write(
        self,
        step: int,
        state: dict[str, Any],
        extras: dict[str, Any],
        *,
        run: str | None,
        stage: str | None,
    ) -> None:
        key = self.folder.checkpoint(step)
        if self.rank == 0:
            # An abandoned attempt at the same step must not mix its files with this one;
            # DCP's first collective below keeps every rank's uploads after this.
            self.store.delete_prefix(key + "/")
        tmp = Path(tempfile.mkdtemp(prefix=f"kubetrain-dcp-{self.rank}-", dir=self.staging))
        try:
            with Uploads(self.store, key, tmp) as uploads:
                for part in PARTS:
                    dcp.save(
                        {part: state[part]},
                        storage_writer=dcp.FileSystemWriter(tmp / part),
                        process_group=self.group,
                        no_dist=not self.distributed,
                    )
                    uploads.add(tmp / part)
                for name, obj in extras.items():
                    torch.save(obj, tmp / f"{name}.pt")
                uploads.add(tmp)
                error: str | None = None
                entries: dict[str, FileEntry] = {}
                try:
                    entries = uploads.entries()
                except Exception as exc:
                    error = f"rank {self.rank}: {exc}"
                    log.error("checkpoint step %d: %s", step, error)
            reports = self._gather((entries, error))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        errors = [e for _, e in reports if e]
        if errors:
            raise CheckpointError("; ".join(errors))
        if self.rank == 0:
            files: dict[str, FileEntry] = {}
            for e, _ in reports:
                files.update(e)
            manifest = CheckpointManifest(
                files=dict(sorted(files.items())),
                step=step,
                run=run,
                stage=stage,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                layout="dcp",
                world_size=self.world,
            )
            write_manifest(self.store, f"{key}/{layout.MANIFEST}", manifest)
            write_pointer(self.store, self.folder.latest, step)
            self.checkpointer.prune(keep_step=step)
        self.saved_uri = self.store.uri(key)

    def _gather(self, obj: Any) -> list[Any]:
        if not self.distributed or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # ------------------------------------------------------------------ load
    def newest_layout(self) -> str | None:
        """The layout of the newest complete checkpoint (None: there is none)."""
        complete, _ = self.checkpointer.steps()
        for step in complete:
            manifest = read_manifest(
                self.store, f"{self.folder.checkpoint(step)}/{layout.MANIFEST}"
            )
            if manifest is not None:
                return manifest.layout
        return None

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Loaded | None:
        """Load the newest checkpoint that verifies on every rank into ``model`` and
        ``optimizer`` (sharded or not; either layout); its scheduler and trainer states
        in the returned ``state``. None when there is none."""
        complete: list[int] = self.checkpointer.steps()[0] if self.rank == 0 else []
        if self.distributed and self.world > 1:
            box = [complete]
            dist.broadcast_object_list(box, src=0, group=self.group)
            complete = box[0]
        for step in complete:
            key = self.folder.checkpoint(step)
            error = None
            state: dict[str, Any] = {}
            try:
                state = self._load(key, model, optimizer)
            except (CheckpointError, dcp.api.CheckpointException) as exc:
                error = str(exc).splitlines()[0]
            errors = [e for e in self._gather(error) if e]
            if errors:
                log.warning("skipping checkpoint %s: %s", self.store.uri(key), errors[0])
                continue
            return Loaded(key, self.store.uri(key), step, state)
        return None

    def _load(self, key: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        manifest = read_manifest(self.store, f"{key}/{layout.MANIFEST}")
        if manifest is None:
            raise CheckpointError(f"{self.store.uri(key)} has no complete {layout.MANIFEST}")
        if manifest.layout == "torch":
            return self._load_full(key, model, optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with tempfile.TemporaryDirectory(
            prefix=f"kubetrain-dcp-{self.rank}-", dir=self.staging
        ) as tmp:
            for part, sd in (("model", model_sd), ("optim", optim_sd)):
                dcp.load(
                    {part: sd},
                    storage_reader=StoreReader(self.store, key, part, manifest, Path(tmp) / part),
                    process_group=self.group,
                    no_dist=not self.distributed,
                )
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return load_files(self.store, key, names=EXTRAS)

    def _load_full(
        self, key: str, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """A checkpoint rank 0 wrote whole (layout ``torch``, e.g. by DDP) into a sharded
        model: the optimizer's state, keyed there by parameter index, is re-keyed by name."""
        state = load_files(self.store, key)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        names = {id(p): n for n, p in model.named_parameters()}
        saved = state["optimizer"]
        by_index: dict[int, str] = {}
        groups = []
        for old, now in zip(saved["param_groups"], optimizer.param_groups, strict=True):
            fqns = [names[id(p)] for p in now["params"]]
            by_index.update(zip(old["params"], fqns, strict=True))
            groups.append({**old, "params": fqns})
        optim: dict[str, Any] = {
            "state": {by_index[i]: s for i, s in saved["state"].items()},
            "param_groups": groups,
        }
        set_optimizer_state_dict(model, optimizer, optim, options=options)
        return {name: state[name] for name in EXTRAS}
