"""quantize_model: swap a model's linear layers and experts for quantized ones, from outside.

The model code knows nothing about quantization (STYLE habit 1): this walks the module tree
and replaces
  nn.Linear (attention q/k/v/o, dense MLP, shared experts, lm_head)  -> QuantLinear
  SwiGLUExperts (routed experts, stacked)                            -> QuantSwiGLUExperts
and leaves the router, the norms and the embedding in floating point (routing decisions
are sensitive and the router is tiny; an embedding is a lookup, not a matmul).

Choices:
- ``lm_head`` is quantized with ``lm_head_bits`` (8 by default, also under ``bits=4``,
  as llama.cpp keeps its output matrix at higher precision), and not at all when tied to
  the embedding (quantizing it would add a copy, not save memory).
- Works on a model built on ``meta``: the swapped-in modules are empty shells of the right
  shapes, filled later by ``load_float_tensors`` (streaming quantization from a float
  checkpoint) or by ``dsmoe.quant.checkpoint.load_quantized``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn

from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.quant.experts import QuantSwiGLUExperts
from dsmoe.quant.linear import QuantLinear
from dsmoe.quant.matrix import BITS, QuantMatrix


@dataclass(frozen=True)
class QuantConfig:
    """How a model was quantized; stored as ``quantization_config`` in config.json."""

    bits: int = 8
    group_size: int = 128  # int4 only: inputs per (scale, zero) group
    lm_head_bits: int = 8
    symmetric: bool = False  # int4 only: no zeros (llama.cpp's Q4_0 form, from Q4_0 GGUFs)
    quant_method: str = "dsmoe"
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.lm_head_bits not in BITS:
            raise ValueError(f"lm_head_bits must be 8 or 4, got {self.lm_head_bits!r}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {self.group_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "QuantConfig":
        if data.get("quant_method") != "dsmoe":
            raise ValueError(f"quantization_config.quant_method {data.get('quant_method')!r} is "
                             "not a dsmoe quantization")
        if data.get("format_version", 1) != 1:
            raise ValueError(f"quantization format_version {data['format_version']} is newer "
                             "than this dsmoe understands (1)")
        known = {"bits", "group_size", "lm_head_bits", "quant_method", "format_version",
                 "symmetric"}
        return cls(**{k: v for k, v in data.items() if k in known})


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 128, *,
                   lm_head_bits: int = 8, symmetric: bool = False) -> nn.Module:
    """Replace ``model``'s linear layers and routed experts in place (see module docstring);
    returns the model, with ``model.quant_config`` set."""
    qc = QuantConfig(bits=bits, group_size=group_size, lm_head_bits=lm_head_bits,
                     symmetric=symmetric)
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    hidden_act = getattr(config, "hidden_act", "silu")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear):
                if full == "lm_head" and tied:
                    continue
                child_bits = qc.lm_head_bits if full == "lm_head" else qc.bits
                new: nn.Module = QuantLinear.from_linear(child, bits=child_bits,
                                                         group_size=qc.group_size,
                                                         symmetric=qc.symmetric)
            elif isinstance(child, SwiGLUExperts):
                new = QuantSwiGLUExperts.from_experts(child, bits=qc.bits,
                                                      group_size=qc.group_size,
                                                      hidden_act=hidden_act,
                                                      symmetric=qc.symmetric)
            else:
                continue
            setattr(module, child_name, new)
    model.quant_config = qc
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantMatrix]:
    """Name -> QuantMatrix of every quantized matrix (QuantLinear or expert stack)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMatrix)}


@torch.no_grad()
def load_float_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], *,
                       dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """Fill a (meta-built, quantized) model from float tensors under dsmoe's native names:
    weights of quantized matrices are quantized on the spot, everything else is cast to
    ``dtype`` (buffers keep theirs) and assigned. Call once per group (e.g. per layer) to
    stream a checkpoint without holding its float weights."""
    matrices = quantized_modules(model)
    plain: dict[str, torch.Tensor] = {}
    declared = {k: v.dtype for k, v in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and owner in matrices:  # QuantLinear.weight
            matrices[owner].set_float(tensor.to(device))
        elif name in matrices:  # experts.gate_up_proj / experts.down_proj
            matrices[name].set_float(tensor.to(device))
        elif name in declared:
            want = dtype if name in params else declared[name]
            plain[name] = tensor.to(device=device, dtype=want)
        else:
            raise ValueError(f"tensor {name} does not belong to the model")
    if plain:
        model.load_state_dict(plain, strict=False, assign=True)
