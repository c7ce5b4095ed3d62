"""The store's layout: where a run's stages keep what they write (trainer_image/README.md,
"What a stage writes"). Every module builds its keys here, so moving a file moves it
everywhere.

    <root>/<namespace>/<run>/<stage>/
        progress.json                  the trainer's newest ProgressRecord
        metrics.jsonl                  its history, one MetricsLine per step
        LATEST                         text: checkpoints/step-000100 (newest complete)
        FINAL                          text: the stage's result, written when it completes
        checkpoints/step-000100/
            model.pt, optimizer.pt, ...
            MANIFEST.json              written last: without it the checkpoint does not exist
        hf/                            a Hugging Face model's final weights as a Hugging
            config.json, *.safetensors,  Face folder (transformers and vLLM load it),
            tokenizer files, ...         written before FINAL
            MANIFEST.json              written last, as in a checkpoint

Pure key arithmetic, no I/O: the typed records and their readers are
:mod:`kubetrain.core.records`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
LATEST = "LATEST"
FINAL = "FINAL"
CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
HF_EXPORT = "hf"
# Zero-padded so that keys sort by step.
CHECKPOINT_DIR = "step-{step:06d}"
_CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


def run_folder(namespace: str, run: str) -> str:
    """``<namespace>/<run>``: the key of a run's folder under the store root."""
    return f"{namespace}/{run}"


def checkpoint_path(step: int) -> str:
    """``checkpoints/step-000100``: a checkpoint relative to its stage folder (what the
    LATEST and FINAL pointers hold)."""
    return f"{CHECKPOINTS}/{CHECKPOINT_DIR.format(step=step)}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (``step-000100`` -> 100), else None."""
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class StageLayout:
    """The keys of one stage folder in a store.

    ``folder`` is the stage folder's key relative to the store's root: use
    :meth:`of` for a store rooted at the run store (the operator, the local runner, the
    report), and ``StageLayout()`` for a store rooted at the stage folder itself (the
    trainer, which is handed the folder's URI).
    """

    folder: str = ""

    @classmethod
    def of(cls, namespace: str, run: str, stage: str) -> StageLayout:
        return cls(f"{run_folder(namespace, run)}/{stage}")

    def key(self, name: str) -> str:
        """``name`` (a path relative to the stage folder) as a key of the store."""
        return f"{self.folder}/{name}" if self.folder else name

    def uri(self, store_root: str) -> str:
        """The stage folder's URI under ``store_root`` (what the trainer is handed)."""
        return f"{store_root.rstrip('/')}/{self.folder}" if self.folder else store_root

    @property
    def progress(self) -> str:
        return self.key(PROGRESS)

    @property
    def metrics(self) -> str:
        return self.key(METRICS)

    @property
    def latest(self) -> str:
        return self.key(LATEST)

    @property
    def final(self) -> str:
        return self.key(FINAL)

    @property
    def checkpoints(self) -> str:
        """The prefix every checkpoint key starts with."""
        return self.key(f"{CHECKPOINTS}/")

    def checkpoint(self, step: int) -> str:
        """The checkpoint folder of ``step`` (no trailing slash)."""
        return self.key(checkpoint_path(step))

    def manifest(self, step: int) -> str:
        return self.key(f"{checkpoint_path(step)}/{MANIFEST}")

    @property
    def hf_export(self) -> str:
        """The stage's Hugging Face model folder (no trailing slash)."""
        return self.key(HF_EXPORT)
