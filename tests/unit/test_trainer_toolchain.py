"""torch.compile needs a compiler and Python's headers at run time; the trainer image has
neither. The trainer finds out before the first step and trains eagerly, saying so."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain_trainer import toolchain


@pytest.fixture
def header(tmp_path: Path) -> Path:
    path = tmp_path / "Python.h"
    path.write_text("")
    return path


def _which(*present: str):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize(
    ("device", "present", "environ", "ok"),
    [
        ("cpu", ("g++",), {}, True),
        ("cpu", ("gcc",), {}, False),  # inductor's CPU kernels are C++
        ("cpu", ("clang++",), {"CXX": "clang++"}, True),
        ("cpu", ("g++",), {"CXX": "icpx"}, False),  # $CXX is the only one inductor tries
        ("cuda", ("gcc",), {}, True),
        ("cuda", ("clang",), {}, True),
        ("cuda", ("g++",), {}, False),  # Triton's launcher is C, built with $CC/gcc/clang
        ("cuda", (), {"CC": "cc"}, False),
        ("cuda", ("cc",), {"CC": "cc"}, True),
        ("cpu", (), {}, False),
    ],
)
def test_a_compiler_is_found_where_torch_compile_looks_for_it(
    header: Path, device: str, present: tuple[str, ...], environ: dict[str, str], ok: bool
) -> None:
    missing = toolchain.missing(device, environ=environ, which=_which(*present), header=header)
    assert (missing is None) == ok, missing
    if missing is not None:
        assert missing.startswith(f"torch.compile on {device} needs a ")
        assert ("C++ compiler" in missing) == (device == "cpu"), missing


def test_without_pythons_headers_nothing_compiles(tmp_path: Path) -> None:
    missing = toolchain.missing(
        "cuda", environ={}, which=_which("gcc"), header=tmp_path / "absent" / "Python.h"
    )
    assert missing is not None and "Python's headers" in missing, missing
    assert str(tmp_path / "absent" / "Python.h") in missing


def test_the_image_lacks_both_and_says_which(tmp_path: Path) -> None:
    """What the trainer image reports: neither compiler nor headers."""
    missing = toolchain.missing("cpu", environ={}, which=_which(), header=tmp_path / "Python.h")
    assert missing is not None
    assert "a C++ compiler ($CXX, or g++) and Python's headers" in missing, missing


def test_an_unknown_device_type_names_the_accepted_ones(header: Path) -> None:
    with pytest.raises(ValueError, match=r"'mps' \(accepted: cpu, cuda\)"):
        toolchain.missing("mps", header=header)
