"""The repository's Dockerfile, parsed just enough for tests to compare its stages with the
objects that run them."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, arguments with single spaces), continuation
    lines joined; the instructions before the first FROM under ``""``."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword == "FROM":
            current = args.split(" AS ")[1].strip()
            out[current] = []
        out[current].append((keyword, " ".join(args.split())))
    return out


def instruction(stage: str, keyword: str, path: Path = DOCKERFILE) -> list[str]:
    """Arguments of every ``keyword`` instruction of ``stage``."""
    return [args for kw, args in stages(path)[stage] if kw == keyword]
