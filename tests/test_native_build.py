"""The native kernels must build and load wherever a C compiler exists.

Every test of a native path is marked ``needs_native`` and skips when ``native.library()``
is None, which is right on a machine without a compiler and wrong anywhere else: a source
that no longer links (e.g. a C file calling a function another one renamed) would turn
hundreds of tests into skips and leave the suite green with the fast paths gone, as
happened once while two branches landed. This test fails instead, naming the error."""

from __future__ import annotations

import ctypes
import os
import shutil
from importlib import resources

import pytest

from dsmoe import native


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def test_the_native_library_builds_and_loads_where_a_compiler_exists(tmp_path):
    if not native.enabled():
        pytest.skip(f"the native kernels are switched off ({native._ENV_SWITCH}=0)")
    if _compiler() is None:
        pytest.skip("no C compiler here: the torch fallbacks are what runs")
    if native.library() is not None:
        return
    # Rebuild into a scratch directory to show why (the cached failure only warned).
    sources = {name: resources.files("dsmoe").joinpath("csrc", name).read_bytes()
               for name in native.SOURCES + native.HEADERS}
    target = tmp_path / "probe.so"
    try:
        native._build(sources, target)
        ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as exc:
        pytest.fail(f"the native library does not build or load: {exc}")
    pytest.fail("native.library() is None although the sources build and load here")


def test_every_source_file_is_part_of_the_library():
    """A C file or header in csrc/ that SOURCES / HEADERS leave out would never be
    compiled (or would be missing from the build directory and the cache key)."""
    on_disk = {p.name for p in resources.files("dsmoe").joinpath("csrc").iterdir()}
    assert {n for n in on_disk if n.endswith(".c")} == set(native.SOURCES)
    assert {n for n in on_disk if n.endswith(".h")} == set(native.HEADERS)
