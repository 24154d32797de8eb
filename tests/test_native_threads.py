"""One thread pool: dsmoe's native kernels run their OpenMP regions on the runtime torch
loaded (its bundled libgomp), so ``torch.set_num_threads`` configures both and no second
pool of threads spins beside torch's (see ``native._openmp_flags``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsmoe import native


def _mapped_gomp() -> set[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in maps
            if line.count(" ") >= 5 and "/libgomp" in line}


def test_the_kernels_run_on_torchs_openmp_runtime():
    runtime = native.torch_openmp_runtime()
    if native.library() is None or runtime is None or not native.openmp_max_threads():
        pytest.skip("no native kernels with OpenMP, or torch without a libgomp, here")
    before = torch.get_num_threads()
    try:
        for n in (1, 3):  # 3: not this machine's core count, which a second runtime reports
            torch.set_num_threads(n)
            assert native.openmp_max_threads() == n
    finally:
        torch.set_num_threads(before)
    assert _mapped_gomp() == {str(runtime)}


def test_the_build_links_the_runtime_it_is_given():
    wheel = Path("/site/torch.libs/libgomp-a34b3233.so.1")  # a hashed, wheel-bundled name
    first = native._openmp_flags(wheel)[0]
    assert str(wheel) in first and f"-Wl,-rpath,{wheel.parent}" in first
    assert "-Wl,--as-needed" in first  # the driver's own -lgomp must not load a second one
    assert native._openmp_flags(None) == [["-fopenmp"], []]
