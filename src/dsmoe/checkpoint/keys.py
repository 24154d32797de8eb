"""Two-way mapping between HF DeepSeek tensor names and dsmoe's in-memory layout.

HF stores each routed expert separately (``...experts.{e}.{gate,up,down}_proj.weight``,
[F, D] / [D, F]); dsmoe stacks them into ``...experts.gate_up_proj [E, 2F, D]`` (gate rows
first, then up) and ``...experts.down_proj [E, D, F]``. Every other key is the same on
both sides. The mapping works on any prefix, so one MoE layer and a whole model share it.

DeepSeek-V2/V3 checkpoints use the same names (MLA's projections are module names too;
V3 adds ``gate.e_score_correction_bias``). V3 also stores its multi-token-prediction
module(s) as extra layers ``model.layers.{L .. L + num_nextn_predict_layers - 1}.*`` after the
L decoder layers; dsmoe does not run them, and ``split_mtp`` sets them aside by name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping

import torch
from torch import nn

_HF_EXPERT = re.compile(r"^(?P<prefix>.*)experts\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"^(?P<prefix>.*)experts\.(?P<name>gate_up_proj|down_proj)$")
# Checkpointed tensors that are buffers, not parameters (V3's routing bias: fp32, set by the
# balancing rule, not by gradients); parameter counts leave them out.
BUFFER_SUFFIXES = (".e_score_correction_bias",)
_LAYER = re.compile(r"^(?:model\.)?layers\.(?P<i>\d+)\.")  # HF or dsmoe name


def layer_group(name: str) -> str:
    """The group a tensor is converted and loaded with: ``"layers.3."`` for any tensor of
    layer 3 (HF or dsmoe name), ``""`` for the embedding, final norm and output."""
    match = _LAYER.match(name)
    return f"layers.{match['i']}." if match else ""


def split_mtp(names: Iterable[str], num_hidden_layers: int, num_nextn_predict_layers: int
              ) -> tuple[list[str], list[str]]:
    """(decoder tensors, multi-token-prediction tensors) of HF checkpoint ``names``: the
    latter are those of layers L .. L + num_nextn_predict_layers - 1. Layers past those are
    left with the decoder tensors, for the caller's "unexpected tensor" check."""
    kept, mtp = [], []
    for name in names:
        match = _LAYER.match(name)
        is_mtp = match is not None and \
            num_hidden_layers <= int(match["i"]) < num_hidden_layers + num_nextn_predict_layers
        (mtp if is_mtp else kept).append(name)
    return kept, mtp


def moe_from_hf(state_dict: Mapping[str, torch.Tensor], n_experts: int | None = None
                ) -> dict[str, torch.Tensor]:
    """HF names -> dsmoe names: stack per-expert tensors; pass everything else through."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in state_dict.items():
        match = _HF_EXPERT.match(key)
        if match:
            experts[match["prefix"]][match["proj"]][int(match["e"])] = value
        else:
            out[key] = value
    for prefix, projs in experts.items():
        E = n_experts if n_experts is not None else 1 + max(max(p) for p in projs.values())
        missing = [f"{prefix}experts.{e}.{proj}_proj.weight" for proj in ("gate", "up", "down")
                   for e in range(E) if e not in projs.get(proj, {})]
        if missing:
            raise ValueError(f"missing {len(missing)} expert tensor(s), e.g. {', '.join(missing[:4])}")
        extra = [f"{prefix}experts.{e}.{proj}_proj.weight" for proj, per in projs.items()
                 for e in per if e >= E]
        if extra:
            raise ValueError(f"unexpected expert tensor(s) beyond {E} experts: {', '.join(extra[:4])}")
        gate, up, down = projs["gate"], projs["up"], projs["down"]
        out[f"{prefix}experts.gate_up_proj"] = torch.stack(
            [torch.cat([gate[e], up[e]], dim=0) for e in range(E)])
        out[f"{prefix}experts.down_proj"] = torch.stack([down[e] for e in range(E)])
    return out


def expert_slot(name: str) -> tuple[str, int, int]:
    """Where the per-expert tensor ``name`` (dsmoe or HF naming) lands in ``moe_from_hf``'s
    stacks: (stacked name, part, parts) -- ``gate_up_proj`` holds each expert's gate rows
    (part 0) then its up rows (part 1) of 2; ``down_proj`` is part 0 of 1."""
    match = _HF_EXPERT.match(name)
    if match is None:
        raise ValueError(f"{name} is not a per-expert weight")
    if match["proj"] == "down":
        return f"{match['prefix']}experts.down_proj", 0, 1
    return f"{match['prefix']}experts.gate_up_proj", int(match["proj"] == "up"), 2


def moe_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dsmoe names -> HF names: split stacked experts into contiguous per-expert tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _STACKED.match(key)
        if not match:
            out[key] = value
            continue
        prefix = match["prefix"]
        if match["name"] == "gate_up_proj":
            F = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}experts.{e}.gate_proj.weight"] = value[e, :F].clone()
                out[f"{prefix}experts.{e}.up_proj.weight"] = value[e, F:].clone()
        else:
            for e in range(value.shape[0]):
                out[f"{prefix}experts.{e}.down_proj.weight"] = value[e].clone()
    return out


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming missing, unexpected and misshapen tensors (a few of each)."""
    check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()}, state_dict)


def check_shapes(expected: Mapping[str, tuple[int, ...]],
                 state_dict: Mapping[str, torch.Tensor]) -> None:
    """``check_state_dict`` against a name -> shape map (e.g. HF names of a module)."""
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (expected {list(expected[k])}, found {list(state_dict[k].shape)})"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise ValueError("state dict does not match the model: " + "; ".join(problems))
