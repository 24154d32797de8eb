"""FP8 block-quantized checkpoints (DeepSeek-V3's published form), dequantized on load.

The format: ``config.json`` has ``quantization_config`` = {"quant_method": "fp8", "fmt":
"e4m3", "weight_block_size": [128, 128], ...}; every quantized weight ``X.weight`` [O, I] is
stored as float8 e4m3 beside ``X.weight_scale_inv`` [ceil(O/bo), ceil(I/bi)] fp32, one
scale per bo x bi block, and its value is ``weight * scale_inv`` blockwise (DeepSeek's
``weight_dequant``). Embeddings, norms, routers and lm_head stay bf16.

Design choices:
- dsmoe runs no FP8 kernels: each weight is dequantized to the requested dtype while the
  checkpoint is read, one row of blocks at a time (fp32 temporaries of bo rows only), so
  loading peaks at the dequantized weights plus one block row, like any other checkpoint.
- The model's config drops ``quantization_config``: the loaded model is not FP8 any more,
  and a ``save_pretrained`` of it must not claim to be.

Shapes: O output rows, I input columns, bo x bi the scale block.
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
DEFAULT_BLOCK = (128, 128)

T = TypeVar("T")


def block_size(config_extra: Mapping[str, Any]) -> tuple[int, int] | None:
    """(bo, bi) of an FP8 checkpoint's ``quantization_config``; None when it is not FP8."""
    qc = config_extra.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size", DEFAULT_BLOCK)
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size={block!r}: expected two "
                         "positive integers, e.g. [128, 128]")
    return int(block[0]), int(block[1])


def split_scales(stored: Mapping[str, T]) -> tuple[dict[str, T], dict[str, str]]:
    """(tensors without scales, weight name -> its scale's name). A scale whose weight is
    not stored stays with the tensors, for the caller's "unexpected tensor" check."""
    scales = {name[:-len(SCALE_SUFFIX)]: name for name in stored
              if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in stored}
    scale_names = set(scales.values())
    return {n: t for n, t in stored.items() if n not in scale_names}, scales


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """``weight [O, I]`` (fp8) times its per-block ``scale_inv [ceil(O/bo), ceil(I/bi)]``,
    in ``dtype``, one row of blocks at a time."""
    bo, bi = block
    O, I = weight.shape
    want = (-(-O // bo), -(-I // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv of a [{O}, {I}] weight has shape {list(scale_inv.shape)}; "
                         f"{bo}x{bi} blocks need {list(want)}")
    out = torch.empty(O, I, dtype=dtype)
    columns = scale_inv.float().repeat_interleave(bi, dim=1)[:, :I]  # [ceil(O/bo), I]
    for r in range(want[0]):
        rows = slice(r * bo, min((r + 1) * bo, O))
        out[rows] = (weight[rows].float() * columns[r]).to(dtype)
    return out


def apply_scales(tensors: dict[str, torch.Tensor], scales: Mapping[str, str],
                 block: tuple[int, int], dtype: torch.dtype) -> None:
    """In ``tensors`` (read with their scales, any names), replace every weight that has a
    scale by its dequantized value and drop the scale."""
    for weight_name, scale_name in scales.items():
        if weight_name in tensors:
            scale = tensors.pop(scale_name)
            try:
                tensors[weight_name] = dequantize(tensors[weight_name], scale, block, dtype)
            except ValueError as exc:
                raise ValueError(f"{weight_name}: {exc}") from None
