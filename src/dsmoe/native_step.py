"""The plan of a whole-model native decode step (csrc/decode_step.c): built once per decoder.

Why: the per-module CPU decode path calls one native op per module, and at one token per
sequence its Python and ctypes overhead (~83 calls and ~60 aten ops per layer, ~3.5 ms per
token of the 2B shape) does not shrink with threads while the kernels do. The plan
gathers every pointer and shape the step needs into ctypes structures, so a step is one
call (``native.decode_step``).

Design choices:
- Which models qualify is decided here, from the modules themselves, by the same tests
  their own decode paths make (``decode_operand``, ``decode_operands``,
  ``Router.native_decode``, the experts' kinds): a model the step cannot run exactly as
  the modules would gets a reason (``unsupported_reason``) and the eager decoder.
- Exact module types, not subclasses: a subclass (LoRA, a custom attention) may change
  what forward computes, which the plan would silently skip.
- The plan holds the tensors it points at (``Plan.keep``): replacing a model's weights
  cannot leave it dangling, and ``Plan.addresses`` tells the decoder to rebuild.
- RoPE's cos/sin come from a table of every cache position computed once by the model's
  own ``rotary`` (no length-dependent scaling), in the activations' dtype. YaRN (V2/V3)
  qualifies: its frequencies and its softmax correction are fixed by the config, only
  dynamic NTK (``_LENGTH_DEPENDENT``) changes with the length.
- MLA (V2 / V2-Lite / V3) runs the per-module path's calls: the query and latent
  projections, then ``native.mla_decode``'s one call. The absorbed form reads kv_b_proj's
  float weight; a quantized kv_b_proj is dequantized once here, where the module path
  dequantizes it every step (the same values).

Shapes: B rows, D hidden, L layers, S_max cache slots, d head dim, V vocabulary; MLA: H
heads, n / r nope / rope dims, v value dim, C latent rank.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.linear import DECODE_STEP_MAX_ROWS, Linear
from dsmoe.mlp import SwiGLUMLP
from dsmoe.model.attention import Attention
from dsmoe.model.block import Block
from dsmoe.model.cache import KVCache, LatentCache
from dsmoe.model.mla import MultiHeadLatentAttention
from dsmoe.model.norm import RMSNorm
from dsmoe.model.rope import _LENGTH_DEPENDENT, ROTARY_LAYOUTS
from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.moe.layer import LocalDispatcher, MoELayer
from dsmoe.moe.router import Router
from dsmoe.quant.experts import QuantSwiGLUExperts
from dsmoe.quant.linear import QuantLinear

if TYPE_CHECKING:
    from dsmoe.model import Transformer

_FLOAT_KIND = {torch.float32: 0, torch.bfloat16: 1}


class Unsupported(Exception):
    """Why a model's decode step cannot be the one native call (its message)."""


@dataclass
class Plan:
    model: native.StepModel
    layers: ctypes.Array
    keep: list = field(default_factory=list)  # every tensor the structures point at
    addresses: tuple = ()  # the model's tensors' data_ptrs when built
    versions: tuple = ()  # the in-place versions of what the plan holds copies of


def model_addresses(model: "Transformer") -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def _copied_versions(model: "Transformer") -> tuple[int, ...]:
    """The in-place version counters of the tensors the plan copies rather than points at:
    a quantized kv_b_proj's, which it holds dequantized (``load_state_dict`` writes into
    the same storage, so the addresses alone would not tell)."""
    return tuple(t._version for block in model.layers
                 if type(getattr(block, "self_attn", None)) is MultiHeadLatentAttention
                 and type(block.self_attn.kv_b_proj) is QuantLinear
                 for t in itertools.chain(block.self_attn.kv_b_proj.parameters(),
                                          block.self_attn.kv_b_proj.buffers()))


def stale(model: "Transformer", plan: Plan) -> bool:
    """Whether ``plan`` no longer describes ``model``: a tensor moved, or one the plan copied
    changed in place."""
    return (model_addresses(model) != plan.addresses
            or _copied_versions(model) != plan.versions)


def _op(module: nn.Module, dtype: torch.dtype, keep: list, name: str) -> native.StepOp:
    """A projection as the step takes it: a ``Linear`` of the activations' dtype or a
    ``QuantLinear`` in dsmoe's own layout, with its bias in the activations' dtype."""
    if type(module) is Linear:
        if module.weight.dtype != dtype or not module.weight.is_contiguous():
            raise Unsupported(f"{name}: a {module.weight.dtype} weight in {dtype} activations "
                              "or input-major storage")
        op = native.Operand(module.weight)
    elif type(module) is QuantLinear:
        op = module.decode_operand()
        if op is None:
            raise Unsupported(f"{name}: int4 in torch's packed layout")
    else:
        raise Unsupported(f"{name} is a {type(module).__name__}, not Linear or QuantLinear")
    bias = module.bias  # as the modules' own decode paths: a bias of the activations' dtype
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        raise Unsupported(f"{name}: a {bias.dtype} bias in {dtype} activations")
    keep.extend(t for t in op[:3] if t is not None)
    N, K = module.out_features, module.in_features
    return native.StepOp(native._EXPERT_KINDS[op.weight.dtype], op.group_size, N, K,
                         op.weight.data_ptr(), *map(native._ptr, (op.scale, op.zero, bias)))


def _norm(norm: nn.Module, dtype: torch.dtype, name: str) -> tuple[int, float]:
    if type(norm) is not RMSNorm or norm.weight.dtype != dtype or not norm.weight.is_contiguous():
        raise Unsupported(f"{name} is not an RMSNorm with a {dtype} weight")
    return norm.weight.data_ptr(), norm.eps


def _swiglu(mlp: nn.Module, layer: native.StepLayer, x: torch.Tensor, name: str) -> None:
    """A dense SwiGLU (the FFN or the shared experts) into ``layer``'s shared fields."""
    if type(mlp) is not SwiGLUMLP or (ops := mlp.decode_operands(x)) is None:
        raise Unsupported(f"{name} is not a silu SwiGLUMLP of one native weight kind")
    try:
        layer.skind, pointers, layer.Fs = native._shared_args(ops, x.shape[-1])
    except ValueError as exc:
        raise Unsupported(f"{name}: {exc}") from None
    layer.sgroup, layer.shared[:] = ops[0].group_size, list(pointers)


def _router(gate: nn.Module, layer: native.StepLayer, name: str) -> None:
    """The router's native routing call's arguments into ``layer``. Whether that call
    takes these settings is asked of it, on one zero row: its checks stay in one place."""
    if (type(gate) is not Router or not gate.native_decode or gate.select is not gate._own_select
            or gate.weight.dtype not in _FLOAT_KIND):
        raise Unsupported(f"{name}.gate: routing the native step cannot run (a replaced "
                          "selection, or native routing switched off)")
    rank, groups, keep = gate.grouping
    bias = gate.e_score_correction_bias
    settings = dict(sigmoid=gate.sigmoid, bias=bias, group_rank=rank, groups=groups,
                    keep_groups=keep)
    probe = torch.zeros(1, gate.weight.shape[1], dtype=gate.weight.dtype)
    if native.router_decode(probe, gate.weight, gate.top_k, gate.renormalize, gate.scaling,
                            **settings) is None:
        raise Unsupported(f"{name}.gate: routing settings the native call does not take")
    layer.routing, layer.gate, layer.bias = 0, gate.weight.data_ptr(), native._ptr(bias)
    layer.gate_bf16 = gate.weight.dtype == torch.bfloat16
    layer.E, layer.top_k, layer.renorm, layer.scaling = (gate.num_experts, gate.top_k,
                                                         gate.renormalize, gate.scaling)
    layer.sigmoid, layer.method = gate.sigmoid, native.ROUTE_GROUP_RANKS[rank]
    layer.groups, layer.keep = (groups, keep) if rank else (1, 1)


def _experts(moe: MoELayer, layer: native.StepLayer, dtype: torch.dtype, name: str) -> None:
    """The router and the routed experts of a MoE layer into ``layer``."""
    gate, experts = moe.gate, moe.experts
    if type(moe.dispatcher) is not LocalDispatcher:
        raise Unsupported(f"{name}: experts outside this process ({type(moe.dispatcher).__name__})")
    _router(gate, layer, name)
    if experts.act is not F.silu:
        raise Unsupported(f"{name}.experts: an activation other than silu")
    if type(experts) is SwiGLUExperts:
        gu, dn = experts.gate_up_proj, experts.down_proj
        if {gu.dtype, dn.dtype} != {dtype} or not (gu.is_contiguous() and dn.is_contiguous()):
            raise Unsupported(f"{name}.experts: {gu.dtype} weights in {dtype} activations")
        layer.ekind, layer.egroup = _FLOAT_KIND[dtype], 0
        layer.gate_up, layer.down = gu.data_ptr(), dn.data_ptr()
        layer.F = gu.shape[1] // 2
    elif type(experts) is QuantSwiGLUExperts:
        gu, dn = experts.gate_up_proj, experts.down_proj
        if gu.packed or (gu.bits, gu.group_size) != (dn.bits, dn.group_size):
            raise Unsupported(f"{name}.experts: int4 in torch's packed layout or mixed kinds")
        layer.ekind, layer.egroup = (2, 0) if gu.bits == 8 else (3, gu.group_size)
        layer.gate_up, layer.down = gu.qweight.data_ptr(), dn.qweight.data_ptr()
        layer.gu_scale, layer.dn_scale = gu.scale.data_ptr(), dn.scale.data_ptr()
        if gu.bits == 4 and not gu.symmetric:
            layer.gu_zero, layer.dn_zero = gu.zero.data_ptr(), dn.zero.data_ptr()
        layer.F = experts.expert_size
    else:
        raise Unsupported(f"{name}.experts is a {type(experts).__name__}")


def _mha(attn: Attention, layer: native.StepLayer, cache: KVCache | None, dtype: torch.dtype,
         keep: list, name: str, i: int) -> None:
    for proj in ("q", "k", "v", "o"):
        setattr(layer, proj, _op(getattr(attn, f"{proj}_proj"), dtype, keep, f"{name}.{proj}_proj"))
    if cache is not None:
        layer.keys, layer.values = cache.keys[i].data_ptr(), cache.values[i].data_ptr()


def _kv_b_weight(module: nn.Module, dtype: torch.dtype, keep: list, name: str,
                 check_only: bool) -> int:
    """kv_b_proj's weight [H*(n+v), C] as the absorbed form reads it: a Linear's own, or a
    QuantLinear's dequantized once (the module path: every step, to the same values; a
    later in-place change of its tensors makes the plan stale, see ``stale``). A check-only
    build (no cache) does not dequantize: it would only be thrown away."""
    if type(module) is Linear:
        weight = module.weight
    elif type(module) is QuantLinear:
        if check_only:
            return 0
        weight = module.dequantize(dtype).contiguous()
    else:  # e.g. LoRA: its adapter adds to the output, which only the expanded form honours
        raise Unsupported(f"{name} is a {type(module).__name__}; the absorbed MLA step needs "
                          "a plain Linear or QuantLinear weight")
    if weight.dtype != dtype or not weight.is_contiguous():
        raise Unsupported(f"{name}: a {weight.dtype} weight in {dtype} activations")
    keep.append(weight)
    return weight.data_ptr()


def _mla(attn: MultiHeadLatentAttention, layer: native.StepLayer, cache: LatentCache | None,
         dtype: torch.dtype, keep: list, name: str, i: int) -> None:
    """MLA's projections, norms and absorbed-form settings into ``layer`` (see mla.py)."""
    if hasattr(attn, "q_proj"):
        layer.q = _op(attn.q_proj, dtype, keep, f"{name}.q_proj")
    else:
        layer.q_a = _op(attn.q_a_proj, dtype, keep, f"{name}.q_a_proj")
        layer.q_norm, layer.q_eps = _norm(attn.q_a_layernorm, dtype, f"{name}.q_a_layernorm")
        layer.q = _op(attn.q_b_proj, dtype, keep, f"{name}.q_b_proj")
    layer.k = _op(attn.kv_a_proj_with_mqa, dtype, keep, f"{name}.kv_a_proj_with_mqa")
    layer.kv_norm, layer.kv_eps = _norm(attn.kv_a_layernorm, dtype, f"{name}.kv_a_layernorm")
    layer.kv_b = _kv_b_weight(attn.kv_b_proj, dtype, keep, f"{name}.kv_b_proj", cache is None)
    layer.o = _op(attn.o_proj, dtype, keep, f"{name}.o_proj")
    if attn.rotate not in (ROTARY_LAYOUTS["interleaved"], ROTARY_LAYOUTS["half"]):
        raise Unsupported(f"{name}.rotate is neither RoPE layout of model/rope.py")
    layer.interleaved = attn.rotate is ROTARY_LAYOUTS["interleaved"]
    layer.mla_scale = attn.scale
    if cache is not None:
        layer.latents = cache.latents[i].data_ptr()


def _mla_shape(attn: "MultiHeadLatentAttention | native.StepModel") -> tuple[int, ...]:
    if isinstance(attn, native.StepModel):
        return attn.H, attn.n, attn.r, attn.v, attn.C
    return attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_rank


def _layer(block: nn.Module, plan: native.StepModel, cache: KVCache | LatentCache | None,
           x: torch.Tensor, keep: list, i: int) -> native.StepLayer:
    name = f"layers.{i}"
    attn = block.self_attn if type(block) is Block else None
    if type(attn) not in (Attention, MultiHeadLatentAttention):
        raise Unsupported(f"{name}: not a Block with multi-head (MHA) or latent (MLA) attention")
    layer = native.StepLayer()
    layer.in_norm, layer.in_eps = _norm(block.input_layernorm, x.dtype, f"{name}.input_layernorm")
    layer.post_norm, layer.post_eps = _norm(block.post_attention_layernorm, x.dtype,
                                            f"{name}.post_attention_layernorm")
    mla = type(attn) is MultiHeadLatentAttention
    if mla != (plan.mla == 1) or (mla and _mla_shape(attn) != _mla_shape(plan)):
        raise Unsupported(f"{name}.self_attn: not the config's attention or widths")
    (_mla if mla else _mha)(attn, layer, cache, x.dtype, keep, f"{name}.self_attn", i)
    layer.routing, layer.skind = -1, -1
    if type(block.mlp) is MoELayer:
        _experts(block.mlp, layer, x.dtype, f"{name}.mlp")
        if block.mlp.shared_experts is not None:
            _swiglu(block.mlp.shared_experts, layer, x, f"{name}.mlp.shared_experts")
    else:
        _swiglu(block.mlp, layer, x, f"{name}.mlp")
    return layer


def _attention_shape(plan: native.StepModel, cfg) -> None:  # cfg: a ModelConfig
    """The attention's widths: MHA's heads and head dim, or MLA's (mla 1)."""
    plan.H, plan.Hkv, plan.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.attention_type == "mla":
        plan.mla, plan.Q = 1, cfg.q_lora_rank or 0
        plan.n, plan.r, plan.v, plan.C = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                          cfg.v_head_dim, cfg.kv_lora_rank)


def _check_model(model: "Transformer", batch_size: int) -> torch.dtype:
    """The activations' dtype of a model the step may run, else ``Unsupported``."""
    embed = model.embed_tokens.weight
    if embed.device.type != "cpu":
        raise Unsupported(f"the native step runs on CPU (this model is on {embed.device.type})")
    if native.library() is None:
        raise Unsupported("the native kernels are unavailable (DSMOE_NATIVE_KERNELS=0 or no "
                          "C compiler)")
    if not 0 < batch_size <= DECODE_STEP_MAX_ROWS:
        raise Unsupported(f"batch size {batch_size} is over {DECODE_STEP_MAX_ROWS} rows")
    if model.training:
        raise Unsupported("the model is in training mode")
    hooked = next((name or "the model" for name, module in model.named_modules()
                   if module._forward_hooks or module._forward_pre_hooks), None)
    if hooked is not None:  # e.g. benchmarks/generate.py's routing recorder
        raise Unsupported(f"{hooked} has forward hooks, which the native step would skip")
    if model.rotary.kind in _LENGTH_DEPENDENT:
        raise Unsupported(f"rope_scaling {model.rotary.kind!r} depends on the sequence length")
    if embed.dtype not in _FLOAT_KIND or type(model.embed_tokens) is not nn.Embedding:
        raise Unsupported(f"a {embed.dtype} embedding (the step takes fp32 or bf16 activations)")
    if not embed.is_contiguous():  # the step copies rows out of it by offset
        raise Unsupported("the embedding table is not contiguous")
    if model.lm_head.out_features != embed.shape[0]:
        raise Unsupported(f"lm_head has {model.lm_head.out_features} outputs for "
                          f"{embed.shape[0]} embedding rows")
    return embed.dtype


def unsupported_reason(model: "Transformer", batch_size: int = 1) -> str | None:
    """Why this model's CPU decode step cannot be one native call, or None if it can."""
    try:
        build_plan(model, None, batch_size)
    except Unsupported as exc:
        return str(exc)
    return None


@torch.no_grad()
def build_plan(model: "Transformer", cache: KVCache | LatentCache | None, batch_size: int
               ) -> Plan:
    """The step's structures for ``model`` decoding ``batch_size`` rows into ``cache``
    (None: only the checks); raises ``Unsupported`` (naming the module) where the step
    cannot run the model."""
    dtype = _check_model(model, batch_size)
    B, S_max = batch_size, 1 if cache is None else cache.max_seq_len
    x = torch.empty(B, 1, model.config.hidden_size, dtype=dtype)  # what decode_operands tests
    keep: list = [*model.parameters(), *model.buffers()]
    plan = native.StepModel()
    _attention_shape(plan, model.config)
    layers = (native.StepLayer * len(model.layers))(
        *(_layer(block, plan, cache, x, keep, i) for i, block in enumerate(model.layers)))
    cfg, embed = model.config, model.embed_tokens.weight
    plan.n_layers, plan.B, plan.D, plan.S_max, plan.V = len(layers), B, cfg.hidden_size, S_max, embed.shape[0]
    plan.bf16 = dtype == torch.bfloat16
    plan.max_E = max([layer.E for layer in layers] + [1])
    plan.max_K = max([layer.top_k for layer in layers] + [1])
    plan.attn_scale = cfg.head_dim ** -0.5
    plan.embed = embed.data_ptr()
    plan.final_norm, plan.final_eps = _norm(model.norm, dtype, "norm")
    plan.head = _op(model.lm_head, dtype, keep, "lm_head")
    if cache is not None:
        stores = (cache.latents,) if isinstance(cache, LatentCache) else (cache.keys, cache.values)
        if stores[0].dtype != dtype:  # the module path would take torch's ops
            raise Unsupported(f"a {stores[0].dtype} cache for {dtype} activations")
        cos, sin = (t.contiguous() for t in model.rotary(  # [1, S_max, d] (MLA: r)
            torch.arange(S_max).view(1, S_max), S_max, dtype))
        keep += [cos, sin, *stores]
        plan.cos, plan.sin = cos.data_ptr(), sin.data_ptr()
    plan.layers = ctypes.cast(layers, ctypes.POINTER(native.StepLayer))
    return Plan(plan, layers, keep, model_addresses(model), _copied_versions(model))
