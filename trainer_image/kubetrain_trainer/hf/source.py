"""Where a stage's Hugging Face model comes from, and getting it onto this node.

A stage starts from ``KUBETRAIN_INIT_URI``: ``model.from`` for the first stage, the
previous stage's folder after that (``kubetrain.core.contract.init_uri``). That URI is
a Hugging Face model when :func:`kubetrain.core.architecture.hf_folder_key` says so:

- a Hugging Face folder (``model.from``): architecture, tokenizer and weights from it;
- a stage folder whose stage exported ``hf/`` (a later stage of the same run, or a
  ``model.from`` naming another run's stage): architecture and tokenizer from ``hf/``,
  weights from the stage's final checkpoint, which holds them at training precision
  (the export is in the model's published dtype, often bfloat16).

Anything else is a kubetrain checkpoint of the built-in model (``None`` here).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubetrain.core.architecture import hf_folder_key
from kubetrain.core.contract import S3Endpoint
from kubetrain.core.store import open_store
from kubetrain_trainer.hf import weights


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face model to start from."""

    uri: str  # the Hugging Face folder (config.json, tokenizer, maybe safetensors)
    # A stage folder whose final checkpoint holds the weights; None: the safetensors.
    checkpoint_uri: str | None = None

    @property
    def weights_in_folder(self) -> bool:
        return self.checkpoint_uri is None


def locate(init_uri: str, s3: S3Endpoint) -> HFSource | None:
    """The Hugging Face model ``init_uri`` holds, or None (a built-in checkpoint)."""
    key = hf_folder_key(open_store(init_uri, endpoint=s3.endpoint, region=s3.region))
    if key is None:
        return None
    if not key:
        return HFSource(init_uri)
    return HFSource(f"{init_uri.rstrip('/')}/{key}", checkpoint_uri=init_uri)


def scratch_folder(uri: str, root: str | None = None) -> Path:
    """Where this node keeps its copy of the model at ``uri``: one folder per URI, so
    the node's processes share one download and a restarted pod reuses it."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(root or tempfile.gettempdir()) / f"kubetrain-model-{digest}"


def fetch(source: HFSource, s3: S3Endpoint) -> Path:
    """A local copy of the source's folder (only config and tokenizer files when the
    weights come from a checkpoint)."""
    return weights.local_folder(
        source.uri, scratch_folder(source.uri), s3, weights=source.weights_in_folder
    )
