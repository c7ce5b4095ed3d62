"""The records the trainer writes to a stage folder and everyone else reads, typed and
versioned: the progress record (``progress.json``), its history (``metrics.jsonl``, one
:class:`MetricsLine` per step) and a checkpoint's ``MANIFEST.json``. Where they live
is :mod:`kubetrain.core.layout`.

Versions. Every record carries ``format: "MAJOR.MINOR"``. A MINOR adds fields that
older readers may ignore; a MAJOR changes the meaning of existing ones. Readers accept
any MINOR of the MAJORs they know (unknown fields are dropped on read) and refuse any
other MAJOR with :class:`RecordFormatError`, which names the file, its version and the
versions this kubetrain reads. Records written before versioning have no ``format``
and read as "1.0". Checkpoint manifests had an integer ``format: 1`` from the start;
that integer was already their major version, so it reads as "1.0" too and every
checkpoint written so far stays loadable.

Damage. A torn or undecodable record is what an interrupted write leaves: a progress
record reads as absent (the next write replaces it), a metrics line is skipped, and a
manifest reads as absent, which means its checkpoint does not exist. A record that
decodes but does not fit its model is a bug, not an accident: it is logged and read
as absent.

On the wire the keys are camelCase, as in the API, in the models' field order (the
version first); fields without a value are left out.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
)

from kubetrain.core import layout
from kubetrain.core.api import wire_name
from kubetrain.core.store import ObjectStore

log = logging.getLogger("kubetrain.core.records")

# What a record without a ``format`` is.
UNVERSIONED = "1.0"
_VERSION = re.compile(r"^(\d+)\.(\d+)$")
# The trainer's lifecycle as progress records report it.
PHASES = ("running", "completed", "interrupted", "failed")


class RecordFormatError(ValueError):
    """A record in a format this kubetrain cannot read (the message says which file,
    which version, and which versions this kubetrain reads)."""


def _major(value: Any) -> int | None:
    """The MAJOR of a ``format`` value: "1.3" -> 1, the manifests' legacy 1 -> 1."""
    if value is None:
        return int(UNVERSIONED.split(".")[0])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _VERSION.match(value) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


def _finite(value: Any) -> float | None:
    """A finite real number as float, else None (not measured)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class _Record(BaseModel):
    """A versioned JSON record: ``to_json`` writes it, ``from_json`` reads it."""

    model_config = ConfigDict(alias_generator=wire_name, populate_by_name=True, extra="ignore")

    # The version this kubetrain writes, the MAJORs it reads, the file (for messages).
    FORMAT: ClassVar[str] = "1.0"
    READS: ClassVar[tuple[int, ...]] = (1,)
    FILE: ClassVar[str] = ""
    INDENT: ClassVar[int | None] = None

    format: str = Field(UNVERSIONED, description="MAJOR.MINOR of the record as read.")

    @field_validator("format", mode="before")
    @classmethod
    def _format_text(cls, value: Any) -> Any:
        # The manifests' legacy integer version 1 is "1.0".
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value}.0"
        return UNVERSIONED if value is None else value

    @field_serializer("format", when_used="json")
    def _written_format(self, _value: str) -> str:
        # Whoever writes a record writes it in the format it knows, whatever it read.
        return self.FORMAT

    @classmethod
    def check_format(cls, value: Any, source: str) -> None:
        """Refuse a record whose MAJOR this kubetrain does not read."""
        major = _major(value)
        if major is None or major not in cls.READS:
            reads = ", ".join(f"{m}.x" for m in cls.READS)
            raise RecordFormatError(
                f"{source}: {cls.FILE} format {value!r} cannot be read by this kubetrain "
                f"(it reads format {reads}); use the kubetrain that wrote it, or a newer one"
            )

    @classmethod
    def from_data(cls, data: Any, source: str) -> Self | None:
        """The record from decoded JSON; None when it is not one (see module doc)."""
        if not isinstance(data, dict):
            return None
        cls.check_format(data.get("format"), source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            log.warning("%s: not a valid %s, ignored: %s", source, cls.FILE, exc)
            return None

    @classmethod
    def from_json(cls, text: str, source: str) -> Self | None:
        """Parse a record; None when torn or invalid. ``source`` (a URI) names the file
        in errors. Raises RecordFormatError for a MAJOR this kubetrain does not read."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        return cls.from_data(data, source)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=self.INDENT)

    def updated(self, **fields: Any) -> Self:
        """A validated copy with ``fields`` (Python names) replaced."""
        unknown = sorted(set(fields) - set(type(self).model_fields))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no field {', '.join(unknown)} "
                f"(accepted: {', '.join(sorted(type(self).model_fields))})"
            )
        return type(self).model_validate({**self.model_dump(), **fields})


# --------------------------------------------------------------------------- progress


def _measurements(value: Any) -> Any:
    """A name -> number map with the entries that are not finite numbers dropped (an
    evaluation that had nothing to measure reports NaN; it means "no value")."""
    if not isinstance(value, dict):
        return value
    return {str(k): f for k, v in value.items() if (f := _finite(v)) is not None}


class _StageSnapshot(_Record):
    """What the trainer reports about its stage at one moment (rank 0 writes it every
    ``logEvery`` steps and at evaluations, checkpoints and the end).

    1.1 added ``hfModel`` and ``accelerator``; 1.2 ``warnings``."""

    FORMAT: ClassVar[str] = "1.2"

    run: str | None = None
    namespace: str | None = None
    stage: str | None = None
    stage_type: str | None = None
    attempt: int = Field(0, ge=0, description="1 for the first start, +1 per resume.")
    phase: str | None = Field(None, description=f"One of {', '.join(PHASES)}.")
    message: str | None = Field(None, description="Why the stage failed.")
    warnings: list[str] | None = Field(
        None,
        description="What the stage does differently from what its spec asked, and why "
        "(e.g. compile: true where torch.compile cannot work).",
    )
    step: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=0)
    tokens: int = Field(0, ge=0)
    tokens_per_second: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    mfu: float | None = None
    accelerator: str | None = Field(
        None, description="The accelerator class MFU is measured against (gpuType, or cpu)."
    )
    eval: dict[str, float] = Field(default_factory=dict)
    train: dict[str, float] = Field(
        default_factory=dict,
        description="Diagnostics of the last step, by TRL's names: dpo's rewards/*; grpo's "
        "reward, reward_std, rewards/<function>, kl, clip_ratio, completion_length and "
        "frac_reward_zero_std.",
    )
    energy_joules: float = Field(0.0, ge=0, allow_inf_nan=False)
    energy_source: str | None = None
    power_watts: float | None = None
    wall_seconds: float = Field(0.0, ge=0, allow_inf_nan=False)
    checkpoint: str | None = Field(None, description="URI of the newest complete checkpoint.")
    hf_model: str | None = Field(
        None,
        description="URI of the stage's final model as a Hugging Face folder (written "
        "when a Hugging Face model's stage completes).",
    )
    init_from: str | None = Field(None, description="URI of the checkpoint it started from.")
    started_at: str | None = Field(None, description="ISO-8601 UTC, first attempt's start.")
    updated_at: str | None = Field(None, description="ISO-8601 UTC, when written.")

    @field_validator(
        "tokens_per_second", "loss", "learning_rate", "mfu", "power_watts", mode="before"
    )
    @classmethod
    def _measured(cls, value: Any) -> Any:
        # NaN and infinities mean "not measured" (JSON has no way to write them).
        return None if isinstance(value, float) and not math.isfinite(value) else value

    @field_validator("eval", "train", mode="before")
    @classmethod
    def _measured_map(cls, value: Any) -> Any:
        return _measurements(value)


class ProgressRecord(_StageSnapshot):
    """``progress.json``: the trainer's newest report on its stage."""

    FILE: ClassVar[str] = layout.PROGRESS


class MetricsLine(_StageSnapshot):
    """One line of ``metrics.jsonl``: the progress record as it was at one step. The
    two are versioned apart, so that either can change on its own."""

    FILE: ClassVar[str] = layout.METRICS

    @classmethod
    def of(cls, record: ProgressRecord) -> MetricsLine:
        return cls.model_validate(record.model_dump())


def read_progress(store: ObjectStore, key: str) -> ProgressRecord | None:
    """The progress record at ``key``; None when there is none or it is torn."""
    text = store.get_text(key)
    return None if text is None else ProgressRecord.from_json(text, store.uri(key))


def write_progress(store: ObjectStore, key: str, record: ProgressRecord) -> None:
    store.put_bytes(key, record.to_json().encode())


def parse_metrics(text: str, source: str) -> list[MetricsLine]:
    """The lines of a ``metrics.jsonl``, in file order; torn lines are skipped (the
    trainer may have been killed mid-write)."""
    lines = []
    for raw in text.splitlines():
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            continue
        line = MetricsLine.from_data(data, source)
        if line is not None:
            lines.append(line)
    return lines


def read_metrics(store: ObjectStore, key: str) -> list[MetricsLine]:
    """The history at ``key``; empty when there is none."""
    return parse_metrics(store.get_text(key) or "", store.uri(key))


def write_metrics(store: ObjectStore, key: str, lines: Iterable[MetricsLine]) -> None:
    """Write the whole history (objects cannot be appended to on S3)."""
    store.put_bytes(key, "".join(line.to_json() + "\n" for line in lines).encode())


# --------------------------------------------------------------------------- checkpoints


class FileEntry(BaseModel):
    """One file of a checkpoint, as its manifest lists it."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    size: int = Field(..., ge=0, alias="bytes")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


class CheckpointManifest(_Record):
    """``MANIFEST.json``: written last, so a checkpoint folder without one (or with a
    torn one) is an interrupted save and does not exist for any reader."""

    FILE: ClassVar[str] = layout.MANIFEST
    INDENT: ClassVar[int | None] = 1
    # 1.1: ``layout`` and ``worldSize`` (sharded checkpoints); 1.0 manifests read as
    # layout "torch".
    FORMAT: ClassVar[str] = "1.1"

    files: dict[str, FileEntry] = Field(
        ..., description="File name (relative to the checkpoint folder) -> size and sha256."
    )
    step: int | None = Field(None, ge=0)
    run: str | None = None
    stage: str | None = None
    created_at: str | None = Field(None, description="ISO-8601 UTC.")
    layout: Literal["torch", "dcp"] = Field(
        "torch",
        description="`torch`: one torch.save file per part (model.pt, optimizer.pt, ...), "
        "written by rank 0; `dcp`: torch.distributed.checkpoint shards of every rank in "
        "model/ and optim/, plus scheduler.pt and trainer.pt.",
    )
    world_size: int | None = Field(
        None, ge=1, description="Processes that wrote a `dcp` checkpoint (any may read it)."
    )

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())


def read_manifest(store: ObjectStore, key: str) -> CheckpointManifest | None:
    """The manifest at ``key``; None when the checkpoint is incomplete."""
    text = store.get_text(key)
    return None if text is None else CheckpointManifest.from_json(text, store.uri(key))


def write_manifest(store: ObjectStore, key: str, manifest: CheckpointManifest) -> None:
    store.put_bytes(key, manifest.to_json().encode())


# --------------------------------------------------------------------------- pointers


def read_pointer(store: ObjectStore, key: str) -> str | None:
    """The checkpoint a LATEST or FINAL pointer names (relative to its stage folder)."""
    text = store.get_text(key)
    return text.strip() if text and text.strip() else None


def write_pointer(store: ObjectStore, key: str, step: int) -> None:
    """Point LATEST or FINAL (``key``) at the checkpoint of ``step``."""
    store.put_bytes(key, layout.checkpoint_path(step).encode())


def resolve_checkpoint(store: ObjectStore) -> str | None:
    """For a store rooted at a stage folder: the checkpoint its FINAL (else LATEST)
    pointer names; for one rooted at a checkpoint folder (it has a manifest): ''.
    None when there is nothing complete."""
    if store.exists(layout.MANIFEST):
        return ""
    for pointer in (layout.FINAL, layout.LATEST):
        if target := read_pointer(store, pointer):
            return target
    return None
