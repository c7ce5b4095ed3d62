"""Whether ``torch.compile`` can work here: it builds native code when a step first runs.

TorchInductor compiles its CPU kernels with a C++ compiler (``$CXX``, else ``g++``), and
on CUDA Triton compiles a small C launcher per kernel signature with a C compiler
(``$CC``, else ``gcc``, else ``clang``); both include ``Python.h``. The trainer image
ships neither a compiler nor Python's headers (attack surface, and weight that eager
training never uses), so there a stage with ``compile: true`` would load its model and
data and then fail at its first step. :func:`missing` says so up front; the trainer
then trains eagerly, with a warning in its log and its progress record.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path

# What each device's torch.compile backend runs, in the order it looks for it: the
# environment variable that overrides the search, then the commands it tries.
COMPILERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("CXX", ("g++",)),
    "cuda": ("CC", ("gcc", "clang")),
}


def python_header() -> Path:
    """Where the compiled kernels expect ``Python.h``."""
    return Path(sysconfig.get_paths(scheme="posix_prefix")["include"]) / "Python.h"


def missing(
    device_type: str,
    *,
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    header: Path | None = None,
) -> str | None:
    """None when ``torch.compile`` can build its kernels for ``device_type`` (``cpu`` or
    ``cuda``); otherwise what is missing, in words for a user's log."""
    if device_type not in COMPILERS:
        accepted = ", ".join(COMPILERS)
        raise ValueError(f"device type {device_type!r} (accepted: {accepted})")
    variable, commands = COMPILERS[device_type]
    names = [environ[variable]] if environ.get(variable) else list(commands)
    lacks = []
    if not any(which(name) for name in names):
        kind = "C++" if device_type == "cpu" else "C"
        lacks.append(f"a {kind} compiler (${variable}, or {' or '.join(commands)})")
    header = header or python_header()
    if not header.exists():
        lacks.append(f"Python's headers ({header})")
    if not lacks:
        return None
    return f"torch.compile on {device_type} needs {' and '.join(lacks)} at run time"
