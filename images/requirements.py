"""Print the requirements of kubetrain's distribution with some of its extras, one per line,
from pyproject.toml: what an image installs (with the constraints file) before it copies
kubetrain's own code.

    python3 images/requirements.py pyproject.toml trainer

A self-reference such as ``kubetrain[operator,trainer]`` (the ``dev`` extra) is expanded
into those extras' requirements, so that the output names only third-party packages.
Standard library only: it runs in the image's build stage before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_SELF = re.compile(r"^\s*(?P<name>[A-Za-z0-9._-]+)\s*\[(?P<extras>[^\]]*)\]\s*$")


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The distribution's dependencies plus those of ``extras``, in order, without
    duplicates; an unknown extra is an error naming the known ones."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name = project["name"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(requirement: str) -> None:
        match = _SELF.match(requirement)
        if match and match["name"] == name:
            for extra in match["extras"].split(","):
                expand(extra.strip())
        elif requirement not in out:
            out.append(requirement)

    def expand(extra: str) -> None:
        if extra in seen_extras:
            return
        if extra not in optional:
            known = ", ".join(sorted(optional))
            raise SystemExit(f"{pyproject}: no extra {extra!r} in {name} (known: {known})")
        seen_extras.add(extra)
        for requirement in optional[extra]:
            add(requirement)

    for requirement in project.get("dependencies", []):
        add(requirement)
    for extra in extras:
        expand(extra)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: {Path(sys.argv[0]).name} PYPROJECT EXTRA...", file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[0]), argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
