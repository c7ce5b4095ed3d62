"""Reading a TrainingRun manifest file, for the command line and the local runner."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetrain.core.api import ManifestError, TrainingRun, parse_run
from kubetrain.core.errors import UserError


def load_manifest(path: str) -> TrainingRun:
    """Read and validate a TrainingRun manifest file (the first TrainingRun document)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "TrainingRun"]
    if not runs:
        raise UserError(f"{path}: no document with kind: TrainingRun")
    try:
        return parse_run(runs[0])
    except ManifestError as exc:
        raise UserError(f"{path}: invalid TrainingRun:\n  " + "\n  ".join(exc.errors)) from None
