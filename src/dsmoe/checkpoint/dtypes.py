"""The one table of dtype names: what users type, and what safetensors headers store."""

from __future__ import annotations

import torch

# Model dtypes a checkpoint can be loaded into; names users may spell them with.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
# safetensors' dtype names (headers) of the tensors dsmoe reads or writes.
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS.items()}
# Stored dtypes a float checkpoint may hold (a model loads them cast to its dtype).
FLOAT_STORED: dict[str, torch.dtype] = {k: v for k, v in SAFETENSORS.items()
                                        if v.is_floating_point}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A supported model dtype from a torch dtype or a name like "bf16"; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    elif dtype in DTYPES.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}: load as float32, bfloat16 or float16")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> "bfloat16" (config.json's ``torch_dtype``)."""
    return str(dtype).removeprefix("torch.")
