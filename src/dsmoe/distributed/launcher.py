"""Processes: joining a process group (torchrun's env vars) and starting local ones.

Design choices:
- ``launch`` starts local processes the way torchrun would (same env vars), from a
  forkserver that imports torch once, so ``--nproc N`` and torchrun share one code path.
- Everything here is safe to call without a process group (one process: rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- process group lifecycle -----------------------------------------------------------------
def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group described by torchrun's env vars; returns (rank, world).
    Without them (a plain single process) nothing is initialised and (0, 1) comes back."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start "
                           "the processes with torchrun or dsmoe.distributed.launch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    """Leave the process group (safe to call when none was created)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one that logs and writes files."""
    return get_rank() == 0


def device() -> torch.device:
    """This process's device: its local GPU under NCCL, the CPU otherwise."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and caches the tokenizer), then the others
    (which find the caches). A collective; a no-op in one process."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


# --- launching local processes ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(local_rank: int, fn: Callable[..., Any], nproc: int, port: int,
           threads: int, results: str, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = fn(*args)
    # A file, not a queue: a large result in a pipe nobody reads until join would block.
    torch.save(result, Path(results) / f"rank{local_rank}.pt")


def launch(fn: Callable[..., Any], nproc: int, *args: Any, threads: int | None = None
           ) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes with torchrun's env vars set and
    return each rank's return value (in rank order). ``fn`` (a module-level function)
    calls ``init_distributed()`` itself, exactly as under torchrun. If any process fails,
    the others are stopped and ``torch.multiprocessing.ProcessRaisedException`` carries
    the child's traceback. ``threads``: intra-op threads per process (default: the cores
    shared out)."""
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    # The forkserver imports torch once; every later process is a cheap fork of it.
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: the first optimizer built in a process imports it (seconds).
    context.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed",
                                    "dsmoe.distributed"])
    with tempfile.TemporaryDirectory(prefix="dsmoe-launch-") as results, _patient_sigint():
        mp.start_processes(_child, args=(fn, nproc, _free_port(), threads, results, args),
                           nprocs=nproc, start_method="forkserver", join=True)
        return [torch.load(Path(results) / f"rank{r}.pt", weights_only=False)
                for r in range(nproc)]


@contextlib.contextmanager
def _patient_sigint() -> Iterator[None]:
    """Ctrl-C reaches the children too (same process group); they stop at a step boundary
    and save. So the launcher waits for them on the first Ctrl-C, and gives up only on a
    second one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def handle(signum: int, frame: object) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        print("interrupt: waiting for the ranks to finish their step (Ctrl-C again to "
              "abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
