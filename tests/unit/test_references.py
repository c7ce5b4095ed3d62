"""What the documentation and the comments point at exists: a moved, renamed or never
written file leaves references behind that send a reader nowhere.

Checked in every text file of the repository: paths into the repository (they start
with one of its top-level folders, e.g. ``operator/kubetrain/core/api.py``), names of
Markdown files, and dotted names of kubetrain modules and their top-level definitions
(``kubetrain.core.api.parse_run``). Paths that .gitignore covers are outputs (e.g.
``bench/results/``) and need not exist; a path with a placeholder (``<run>``,
``{component}``, ``$VAR``) is a pattern, not a file.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
from functools import cache
from pathlib import Path

from kubetrain.core.api import GROUP

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kubetrain": ROOT / "operator" / "kubetrain",
    "kubetrain_trainer": ROOT / "trainer_image" / "kubetrain_trainer",
}
TEXT_SUFFIXES = {".md", ".py", ".sh", ".toml", ".tpl", ".txt", ".yaml", ".yml"}
TEXT_NAMES = {"Makefile", "Dockerfile", "run"}
# Generated text (golden Kubernetes objects, the CRDs, the pinned versions), and this
# file, whose examples are dangling on purpose.
SKIPPED = {
    "tests/unit/golden",
    "crds",
    "charts/kubetrain/crds",
    "requirements/constraints.txt",
    Path(__file__).relative_to(ROOT).as_posix(),
}
PLACEHOLDER = re.compile(r"[<>{}$*]")


@cache
def _gitignore_patterns() -> tuple[str, ...]:
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return tuple(line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#")


def _ignored(rel: str) -> bool:
    """Whether .gitignore covers ``rel`` or a folder above it."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix.split("/")[-1], pattern)
        for prefix in prefixes
        for pattern in _gitignore_patterns()
    )


def _text_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        # Hidden folders are tools' state (.git, .venv, caches), except the CI script's.
        dirs[:] = [
            d
            for d in sorted(dirs)
            if (d == ".ci" or d[0] != ".")
            and not _ignored(_rel(here / d))
            and _rel(here / d) not in SKIPPED
        ]
        for name in sorted(files):
            path = here / name
            if _rel(path) in SKIPPED or _ignored(_rel(path)):
                continue
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                found.append(path)
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def _path_pattern() -> re.Pattern[str]:
    tops = sorted(
        p.name for p in ROOT.iterdir() if p.is_dir() and p.name[0] != "." and not _ignored(p.name)
    )
    folder = "|".join(map(re.escape, tops))
    # Not preceded by a path or URL character: `https://host/tests/x` names no repo file.
    return re.compile(
        rf"(?<![\w./:@-])((?:{folder})/[\w./<>{{}}$*-]*|[\w-]+(?:\.[\w-]+)*\.md)(?![\w/-])"
    )


def dangling_paths(path: Path, text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for match in _path_pattern().finditer(line):
            ref = match.group(1).rstrip(".")
            if PLACEHOLDER.search(ref) or _ignored(ref):
                continue
            if (ROOT / ref).exists() or (path.parent / ref).exists():
                continue
            out.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
    return out


MODULE_REF = re.compile(r"(?<![\w./-])((?:kubetrain|kubetrain_trainer)(?:\.\w+)+)(?![\w/-])")


@cache
def _top_level_names(module: Path) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            for target in node.targets:
                if isinstance(target, ast.Tuple):
                    names.update(e.id for e in target.elts if isinstance(e, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a kubetrain package, module, or a top-level name of a
    module (what follows that name, e.g. a method, is not checked)."""
    first, *rest = dotted.split(".")
    where = PACKAGES[first]
    for i, part in enumerate(rest):
        if (where / part).is_dir():
            where = where / part
        elif (where / f"{part}.py").is_file():
            module = where / f"{part}.py"
            attrs = rest[i + 1 :]
            return not attrs or attrs[0] in _top_level_names(module)
        else:
            return part in _top_level_names(where / "__init__.py")
    return True


def dangling_modules(path: Path, text: str) -> list[str]:
    if path.suffix not in {".md", ".py"}:
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for match in MODULE_REF.finditer(line):
            name = match.group(1).rstrip(".")
            # The API group (kubetrain.dev/...) and file names are not modules.
            if name.startswith(GROUP) or name.rsplit(".", 1)[-1] in {"json", "yaml", "md"}:
                continue
            if not resolves(name):
                out.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    return out


def test_referenced_repository_files_exist() -> None:
    dangling = [ref for path in _text_files() for ref in dangling_paths(path, path.read_text())]
    assert not dangling, "references to files that are not in the repository:\n" + "\n".join(
        dangling
    )


def test_referenced_modules_and_names_exist() -> None:
    dangling = [ref for path in _text_files() for ref in dangling_modules(path, path.read_text())]
    assert not dangling, "references to kubetrain modules or names that do not exist:\n" + (
        "\n".join(dangling)
    )


def test_the_checks_catch_what_they_are_for() -> None:
    doc = ROOT / "operator" / "kubetrain" / "core" / "contract.py"
    text = (
        '# see DESIGN.md "Storage layout" and operator/kubetrain/accounting.py\n'
        "# kubetrain.plan, kubetrain.core.api.NoSuchModel, kubetrain.core.api.parse_run\n"
        "# fine: README.md, trainer_image/README.md, bench/results/x.json, tests/<tier>/\n"
        "# fine: kubetrain.dev/run, https://example.com/tests/nothing.md\n"
    )
    assert dangling_paths(doc, text) == [
        "operator/kubetrain/core/contract.py:1: DESIGN.md",
        "operator/kubetrain/core/contract.py:1: operator/kubetrain/accounting.py",
    ]
    assert dangling_modules(doc, text) == [
        "operator/kubetrain/core/contract.py:2: kubetrain.plan",
        "operator/kubetrain/core/contract.py:2: kubetrain.core.api.NoSuchModel",
    ]
