"""LoRA for every projection of a DeepSeekMoE model, the stacked routed experts included.

Design choices:
- Applied from outside, by swapping modules (STYLE habit 1): ``apply_lora`` wraps the
  targeted layers in place and freezes every base tensor; the model code is untouched and
  ``merge_lora`` swaps the plain layers back with the low-rank update folded in.
- A linear layer W [out, in] becomes W x + s * B A dropout(x), with A [r, in], B [out, r],
  s = alpha / r; A starts random (PEFT's kaiming-uniform), B at zero, so an adapter starts
  as the identity change.
- Routed experts get one (A, B) pair per expert, stored stacked, A [E, r, in] and
  B [E, out, r], and run through the same grouped dispatch as the expert weights:
  ``grouped_linear`` on the expert-sorted rows with ``counts``, i.e. two more grouped
  matmuls per projection, never a Python loop over the experts.
- The router's logits are computed inside ``Router.forward`` from ``self.weight``, so its
  adapter is a parametrization of that weight: weight = W + s * B A (E x D, cheap), which
  leaves routing, bias balancing and the fp32 casts exactly as they are. It has no dropout.
- The base may be quantized (``dsmoe.quant``): adapters then wrap ``QuantLinear`` /
  ``QuantSwiGLUExperts`` and reach the input gradient through ``qlora``.
- Adapter weights are fp32 whatever the base dtype; inputs are cast to them and the
  update cast back to the layer's output dtype.

Targets (``--targets``):
  q, k, v, o      attention projections of every layer (MLA: q_proj or q_a/q_b_proj,
                  kv_a_proj_with_mqa, kv_b_proj, o_proj; see ``ATTENTION_SITES``)
  gate, up, down  the dense MLPs' projections and the routed experts' (stacked) ones
  shared          the shared experts' gate/up/down projections
  router          the MoE gate (routing logits)

Shapes: A assignments sorted by expert, D hidden, F expert width, E experts, r rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dsmoe.finetune.qlora import TrainableQuant, quant_grouped_linear, quant_linear
from dsmoe.mlp import SwiGLUMLP
from dsmoe.moe.experts import Experts, SwiGLUExperts
from dsmoe.moe.grouped_gemm import grouped_linear
from dsmoe.moe.layer import MoELayer
from dsmoe.moe.router import Router
from dsmoe.quant.experts import QuantSwiGLUExperts
from dsmoe.quant.linear import QuantLinear

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "router", "shared")
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # DeepSeek's SFT recipe
# The projections each attention target covers, whichever exist in the layer. MLA
# (DeepSeek-V2/V3) has no per-head k/v projections: "k" adapts the joint compression
# kv_a_proj_with_mqa (the latent and the shared rope key), "v" the up-projection kv_b_proj
# (every head's position-free key and its value), "q" q_proj or the low-rank q_a/q_b pair.
ATTENTION_SITES = {"q": ("q_proj", "q_a_proj", "q_b_proj"),
                   "k": ("k_proj", "kv_a_proj_with_mqa"), "v": ("v_proj", "kv_b_proj"),
                   "o": ("o_proj",)}
_FFN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """Rank, scale, dropout and targets of an adapter."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be an int >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"q,k,v" or a sequence -> known target names in canonical order (ValueError otherwise)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [t.strip() for t in items if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {','.join(TARGETS)}")
    if not names:
        raise ValueError(f"no LoRA targets given; choose from {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def _init_a(a: torch.Tensor) -> None:
    """PEFT's A init, kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), per matrix of
    a stack (``nn.init`` would take E * r as the fan-in of a 3-D tensor)."""
    bound = 1.0 / math.sqrt(a.shape[-1])
    nn.init.uniform_(a, -bound, bound)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()))
    return tensor.device


# --- linear layers ------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """base_layer(x) + s * B A dropout(x) for a (possibly quantized) linear layer."""

    def __init__(self, base_layer: nn.Linear | QuantLinear, r: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = _device_of(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # [out, r]
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_a(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        base = self.base_layer
        out = quant_linear(base, x) if isinstance(base, QuantLinear) else base(x)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # [..., r]
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B A [out, in] (fp32): what merging adds to the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)


# --- routed experts -----------------------------------------------------------------------
class StackedLoRA(nn.Module):
    """One low-rank pair per expert: A [E, r, in], B [E, out, r]; rows sorted by expert."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, r: int,
                 alpha: float, dropout: float = 0.0, device: torch.device | None = None) -> None:
        super().__init__()
        E = n_experts
        self.lora_A = nn.Parameter(torch.empty(E, r, in_features, device=device))  # [E, r, in]
        self.lora_B = nn.Parameter(torch.zeros(E, out_features, r, device=device))  # [E, out, r]
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_a(self.lora_A)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """s * B_e A_e x for each row x [A, in] of expert e -> [A, out] (fp32)."""
        grouped = None if self._aligned() else False
        h = grouped_linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A, counts,
                           use_grouped_mm=grouped)  # [A, r]
        return grouped_linear(h, self.lora_B, counts, use_grouped_mm=grouped) * self.scaling

    def _aligned(self) -> bool:
        """NOTE: ``torch._grouped_mm`` rejects row strides that are not a multiple of 16
        bytes (also on CPU), e.g. rank 2 in fp32; such ranks take the per-expert GEMM path."""
        E, r, n_in = self.lora_A.shape
        size = self.lora_A.element_size()
        return all(d * size % 16 == 0 for d in (r, n_in, self.lora_B.shape[1]))

    def delta_weight(self) -> torch.Tensor:
        """s * B_e A_e for every expert: [E, out, in] (fp32)."""
        return self.scaling * torch.bmm(self.lora_B, self.lora_A)


class LoRAExperts(Experts):
    """Stacked SwiGLU experts plus per-expert adapters on some of gate / up / down.

    forward(x_sorted [A, D], counts [E]) -- the contract of ``SwiGLUExperts``:
      1. gate_up = base gate_up(x) [A, 2F]; add the gate / up adapters to their halves
      2. h = act(gate) * up [A, F]
      3. out = base down(h) [A, D] + the down adapter
    With no adapter at all it is the base experts made differentiable (quantized base).
    """

    def __init__(self, base_layer: SwiGLUExperts | QuantSwiGLUExperts, projections: tuple[str, ...],
                 r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts, self.expert_size = base_layer.num_experts, base_layer.expert_size
        self.act = base_layer.act
        E, F_ = self.num_experts, self.expert_size
        D = _hidden_size(base_layer)
        device = _device_of(base_layer)
        shapes = {"gate_proj": (D, F_), "up_proj": (D, F_), "down_proj": (F_, D)}
        self.projections = tuple(p for p in EXPERT_PROJECTIONS if p in projections)
        for name in EXPERT_PROJECTIONS:
            pair = (StackedLoRA(E, *shapes[name], r, alpha, dropout, device)
                    if name in self.projections else None)
            setattr(self, name, pair)

    def _base(self, which: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.base_layer, which)
        if isinstance(weight, torch.Tensor):
            return grouped_linear(x, weight, counts)
        return quant_grouped_linear(weight, x, counts)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # [A, D]
        gate, up = self._base("gate_up_proj", x, counts).chunk(2, dim=-1)  # [A, F] x2
        if self.gate_proj is not None:
            gate = gate + self.gate_proj(x, counts).to(gate.dtype)
        if self.up_proj is not None:
            up = up + self.up_proj(x, counts).to(up.dtype)
        h = self.act(gate) * up  # [A, F]
        out = self._base("down_proj", h, counts)  # [A, D]
        if self.down_proj is not None:
            out = out + self.down_proj(h, counts).to(out.dtype)
        return out


def _hidden_size(experts: SwiGLUExperts | QuantSwiGLUExperts) -> int:
    w = experts.down_proj
    return w.shape[1] if isinstance(w, torch.Tensor) else w.out_features


# --- router -------------------------------------------------------------------------------
class RouterLoRA(nn.Module):
    """Parametrization of ``Router.weight`` [E, D]: W + s * B A, A [r, D], B [E, r]."""

    def __init__(self, n_experts: int, hidden_size: int, r: int, alpha: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, hidden_size, device=device))  # [r, D]
        self.lora_B = nn.Parameter(torch.zeros(n_experts, r, device=device))  # [E, r]
        self.scaling = alpha / r
        _init_a(self.lora_A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # [E, D]
        return weight + self.delta_weight().to(weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


def router_lora(router: Router) -> RouterLoRA | None:
    """The adapter parametrizing ``router.weight``, if any."""
    if not parametrize.is_parametrized(router, "weight"):
        return None
    found = [p for p in router.parametrizations.weight if isinstance(p, RouterLoRA)]
    return found[0] if found else None


# --- applying, listing, merging -----------------------------------------------------------
def _sites(model: nn.Module, targets: tuple[str, ...]) -> dict[str, list[tuple[str, nn.Module,
                                                                             str]]]:
    """target -> [(parent path, parent module, child attribute)] it covers in ``model``."""
    sites: dict[str, list[tuple[str, nn.Module, str]]] = {t: [] for t in targets}
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}"
        for target, attrs in ATTENTION_SITES.items():
            if target in sites:
                sites[target] += [(f"{prefix}.self_attn", block.self_attn, attr)
                                  for attr in attrs if attr in block.self_attn._modules]
        mlp = block.mlp
        if isinstance(mlp, MoELayer):
            for target in _FFN:
                if target in sites:
                    sites[target].append((f"{prefix}.mlp", mlp, "experts"))
            if "router" in sites:
                sites["router"].append((f"{prefix}.mlp", mlp, "gate"))
            if "shared" in sites and mlp.shared_experts is not None:
                for attr in _FFN.values():
                    sites["shared"].append((f"{prefix}.mlp.shared_experts", mlp.shared_experts,
                                            attr))
        elif isinstance(mlp, SwiGLUMLP):
            for target, attr in _FFN.items():
                if target in sites:
                    sites[target].append((f"{prefix}.mlp", mlp, attr))
    return sites


def apply_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Freeze ``model`` and wrap its targeted layers with adapters, in place.

    Returns the wrapped modules' names. Raises ValueError for a target this model does not
    have (``router``/``shared`` on a model without MoE layers or shared experts) and for a
    model that already carries adapters."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge or reload it first")
    sites = _sites(model, settings.targets)
    missing = [t for t, found in sites.items() if not found]
    if missing:
        why = {"router": "it has no MoE layers", "shared": "it has no shared experts"}
        raise ValueError("LoRA target(s) not in this model: " + "; ".join(
            f"{t!r} ({why.get(t, 'no such module')})" for t in missing))
    for p in model.parameters():
        p.requires_grad_(False)
    r, alpha, dropout = settings.r, settings.alpha, settings.dropout
    wrapped: list[str] = []
    expert_projections: dict[int, tuple[str, ...]] = {}
    for target, found in sites.items():
        for path, parent, attr in found:
            child = getattr(parent, attr)
            if attr == "experts":  # collect gate/up/down per MoE layer, wrap once below
                key = id(parent)
                expert_projections[key] = expert_projections.get(key, ()) + (_FFN[target],)
                continue
            if attr == "gate" and isinstance(child, Router):
                E, D = child.weight.shape
                parametrize.register_parametrization(
                    child, "weight", RouterLoRA(E, D, r, alpha, child.weight.device))
            elif isinstance(child, (nn.Linear, QuantLinear)):
                setattr(parent, attr, LoRALinear(child, r, alpha, dropout))
            else:
                raise ValueError(f"cannot put LoRA on {path}.{attr}: unsupported module "
                                 f"{type(child).__name__}")
            wrapped.append(f"{path}.{attr}")
    for i, block in enumerate(model.layers):
        projections = expert_projections.get(id(block.mlp))
        if projections is None:
            continue
        experts = block.mlp.experts
        if not isinstance(experts, (SwiGLUExperts, QuantSwiGLUExperts)):
            raise ValueError(f"cannot put LoRA on layers.{i}.mlp.experts: unsupported module "
                             f"{type(experts).__name__}")
        block.mlp.experts = LoRAExperts(experts, projections, r, alpha, dropout)
        wrapped.append(f"layers.{i}.mlp.experts")
    model.lora_settings = settings
    return sorted(wrapped, key=_natural_key)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def make_quant_trainable(model: nn.Module) -> int:
    """Let gradients pass through the quantized modules that carry no adapter (wrapping
    ``QuantLinear`` in ``TrainableQuant`` and ``QuantSwiGLUExperts`` in adapter-less
    ``LoRAExperts``); returns how many were wrapped. Call after ``apply_lora``."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, (LoRALinear, LoRAExperts, TrainableQuant)):
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                setattr(module, name, TrainableQuant(child))
            elif isinstance(child, QuantSwiGLUExperts):
                setattr(module, name, LoRAExperts(child, (), r=1, alpha=1.0))
            else:
                continue
            count += 1
    return count


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> adapter-carrying module (LoRALinear, LoRAExperts with pairs, parametrized
    Router), in model order."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or (isinstance(module, LoRAExperts)
                                              and module.projections):
            found[name] = module
        elif isinstance(module, Router) and router_lora(module) is not None:
            found[name] = module
    return found


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> adapter parameter (``lora_A`` / ``lora_B``) of every adapter in ``model``."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in
            ("lora_A", "lora_B")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its (float) base weight and put the plain modules back, in
    place; returns ``model``. Wrappers without adapters (``TrainableQuant``) are removed
    too. A quantized base cannot be merged (rounding would lose the update): load the base
    in float first."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base_layer
                if isinstance(base, QuantLinear):
                    raise ValueError("cannot merge an adapter into a quantized base; load "
                                     "the base model in float to merge")
                base.weight += child.delta_weight().to(base.weight.dtype)
                setattr(module, name, base)
            elif isinstance(child, LoRAExperts):
                base = child.base_layer
                if child.projections and isinstance(base, QuantSwiGLUExperts):
                    raise ValueError("cannot merge an adapter into quantized experts; load "
                                     "the base model in float to merge")
                F_ = child.expert_size
                for proj, rows in (("gate_proj", slice(0, F_)), ("up_proj", slice(F_, None))):
                    pair = getattr(child, proj)
                    if pair is not None:
                        base.gate_up_proj[:, rows] += pair.delta_weight().to(
                            base.gate_up_proj.dtype)
                if child.down_proj is not None:
                    base.down_proj += child.down_proj.delta_weight().to(base.down_proj.dtype)
                setattr(module, name, base)
            elif isinstance(child, TrainableQuant):
                setattr(module, name, child.base_layer)
    for module in model.modules():
        if isinstance(module, Router) and router_lora(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model
