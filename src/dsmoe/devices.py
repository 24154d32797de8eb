"""Device names from the command line and configs (``cpu``, ``cuda``, ``cuda:N``) as torch
devices, checked once for every command and training loop: one message per mistake.

torch is imported inside the function, so argument parsing stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, *, quant: str | None = None) -> torch.device:
    """``--device`` as a torch device, or a ValueError that says what is wrong with it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (expected cpu, cuda or cuda:N)"
                         ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available here "
                             f"(torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) here")
        if quant is not None:
            raise ValueError(f"--quant {quant} uses dsmoe's CPU kernels; drop --quant to "
                             f"run on {name} (use --dtype bfloat16 there)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: dsmoe runs on cpu or cuda")
    return device
