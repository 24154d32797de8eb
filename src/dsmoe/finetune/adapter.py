"""LoRA adapters on disk: ``adapter_model.safetensors`` + ``adapter_config.json`` +
``dsmoe_adapter.json``.

Layout (PEFT's, so PEFT users recognise it):
  adapter_config.json   PEFT's LoraConfig fields only (peft_type "LORA", r, lora_alpha,
                        lora_dropout, target_modules, base_model_name_or_path, ...), so
                        PEFT loads it without an "unexpected keyword" warning
  dsmoe_adapter.json    dsmoe's own: the targets, the base config's architecture keys and
                        their sha256 fingerprint, a fingerprint of a few base weights, and
                        "not_read_by_peft": the parts (routed experts, router) that only
                        some readers apply, and which; with parameter targets "lora_r" and
                        "lora_alpha" (PEFT's r may differ, see the routed experts below).
                        Adapters written before this file kept the same object under
                        adapter_config.json's "dsmoe" key; both are read.
  adapter_model.safetensors  fp32 tensors under PEFT's names, HF module paths prefixed
                        with "base_model.model.":
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight  (dense)
    base_model.model.model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.lora_{A,B}.weight
  lora_A.weight is [r, in], lora_B.weight [out, r]; update = lora_alpha / r * B @ A.
  Routed experts (documented dsmoe choice) are stacked in memory ([E, r, in] /
  [E, out, r]) and stored in the layout the model family's reader expects:
  - deepseek_v2 / deepseek_v3: the way transformers' native DeepseekV2/V3ForCausalLM holds
    them, one stacked parameter per layer (gate_up_proj [E, 2F, D], down_proj [E, D, F]),
    which PEFT reaches through "target_parameters" (``peft_layout``). PEFT nests one
    wrapper per parameter, so with both targeted the inner one (gate_up) gets "base_layer":
      base_model.model.model.layers.{i}.mlp.experts[.base_layer].lora_A.weight [E*R, in]
      base_model.model.model.layers.{i}.mlp.experts[.base_layer].lora_B.weight [out, R*E]
    (PEFT's ParamWrapper order: expert e's A is rows e*R..(e+1)*R, its B column k*E + e).
    gate and up share one parameter: their adapters sit side by side in rank (R = 2r, B
    block-diagonal), so the update is exactly dsmoe's two. The router, the dense MLPs and
    the shared experts are parameter targets too (their weight; same keys and shapes as
    above, see ``PARAMETER_TARGET_TYPES`` for why), target_modules names the attention
    only. PEFT's parameter targets take one rank (a rank_pattern for a parameter works but
    makes PEFT warn that it was ignored), so with R = 2r every parameter target is stored
    at rank R with alpha 2 * alpha (the others padded with zero ranks: the same update), a
    rank_pattern keeps the attention at r, and dsmoe_adapter.json keeps the real r and
    alpha. Parameter targets allow no dropout: such adapters need lora_dropout 0.
  - deepseek (V1, no native class): per expert, as PEFT names them on DeepSeek's own
    modeling code, whose experts are a list of linear layers (the checkpoint layout):
      base_model.model.model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight
    PEFT on transformers' models finds no such modules; ``dsmoe finetune`` says so.
  Adapters written before the stacked layout (per expert for every family) still load.
  The router adapter is stored under its module's name:
    base_model.model.model.layers.{i}.mlp.gate.lora_A.weight [r, D], lora_B.weight [E, r]
  transformers' V2/V3 routers are a plain weight parameter (target "mlp.gate.weight"); no
  PEFT reader applies it on V1.
The directory is replaced as a whole when saved again (``checkpoint.directory``).

Loading checks the base before anything else: an adapter whose base config differs from
the model's is refused with the differing keys named; differing base weights (same
architecture, e.g. a chat vs a base checkpoint) only warn.

Shapes: E experts, r rank, R rank as PEFT stores it, D hidden, F expert width.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.checkpoint import keys
from dsmoe.checkpoint.directory import replaced_directory
from dsmoe.checkpoint.hf import hf_name
from dsmoe.config import MLA_MODEL_TYPES, ModelConfig
from dsmoe.finetune.lora import (ATTENTION_SITES, EXPERT_PROJECTIONS, LoRAExperts, LoRALinear,
                                 LoRASettings, apply_lora, lora_modules,
                                 parse_targets, router_lora)
from dsmoe.io import disk_errors, read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DSMOE_CONFIG = "dsmoe_adapter.json"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1
# Config keys that decide what a model computes; an adapter is only valid on a base that
# agrees on all of them.
ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_shared_experts",
    "n_routed_experts", "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace",
    "hidden_act", "attention_bias", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob",
    "routed_scaling_factor",
)


# --- base identity ------------------------------------------------------------------------
def base_config_summary(config: ModelConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ARCHITECTURE_KEYS}


def config_fingerprint(summary: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode("utf-8")).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the first 64 embedding rows and the final norm, rounded to bf16 (so the
    base loaded as bf16, fp32 or quantized gives the same value): cheap, and enough to
    tell two checkpoints of one architecture apart."""
    h = hashlib.sha256()
    for t in (model.embed_tokens.weight[:64], model.norm.weight):
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
                 .numpy().tobytes())
    return h.hexdigest()


# --- where PEFT finds the feed-forward adapters of DeepSeek-V2/V3 -------------------------
# transformers' native classes of these model types stack the routed experts and keep the
# router as a plain parameter, which PEFT reaches only through target_parameters. And since
# transformers 5, PEFT rewrites target_modules of these model types as if written for
# per-expert (transformers 4) models: every module named gate_proj / up_proj / down_proj
# becomes the stacked experts' parameter, so the dense MLPs' and shared experts' adapters
# would be dropped. They are therefore targeted by their weight parameter too (the same
# keys and shapes as a module target), and target_modules names the attention only.
PARAMETER_TARGET_TYPES = MLA_MODEL_TYPES
_GATE_UP, _DOWN, _ROUTER = "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"
_SHARED = tuple(f"mlp.shared_experts.{p}.weight" for p in EXPERT_PROJECTIONS)
# target_parameters entry -> the dsmoe targets it carries
_PARAMETER_TARGETS = {_GATE_UP: ("gate", "up"), _DOWN: ("down",), _ROUTER: ("router",),
                      **{f"mlp.{t}_proj.weight": (t,) for t in ("gate", "up", "down")},
                      **{name: ("shared",) for name in _SHARED}}


@dataclass(frozen=True)
class PeftLayout:
    """How an adapter's feed-forward tensors are stored (module docstring): ``parameters``
    PEFT's target_parameters (empty: module targets, routed experts per expert), ``rank``
    the rank they are stored at (r, or 2 r when gate and up share gate_up_proj)."""

    parameters: tuple[str, ...] = ()
    rank: int | None = None

    @property
    def stacked(self) -> bool:
        return bool(self.parameters)


def peft_layout(config: ModelConfig, settings: LoRASettings) -> PeftLayout:
    """The layout ``save_adapter`` writes for a model of ``config`` with ``settings``."""
    if config.model_type not in PARAMETER_TARGET_TYPES:
        return PeftLayout()
    targets, moe = settings.targets, bool(config.moe_layer_indices)
    dense = len(config.moe_layer_indices) < config.num_hidden_layers
    wanted = {_GATE_UP: moe and ("gate" in targets or "up" in targets),
              _DOWN: moe and "down" in targets, _ROUTER: moe and "router" in targets,
              **{f"mlp.{t}_proj.weight": dense and t in targets for t in ("gate", "up", "down")},
              **{name: moe and config.n_shared_experts > 0 and "shared" in targets
                 for name in _SHARED}}
    parameters = tuple(name for name, on in wanted.items() if on)
    if not parameters:
        return PeftLayout()
    return PeftLayout(parameters, _stacked_rank(parameters, settings))


def _stacked_rank(parameters: Any, settings: LoRASettings) -> int:
    """PEFT's r for the parameter targets: 2 r when gate and up share gate_up_proj."""
    both = _GATE_UP in parameters and "gate" in settings.targets and "up" in settings.targets
    return settings.r * (2 if both else 1)


def check_peft_dropout(config: ModelConfig, settings: LoRASettings) -> None:
    """ValueError for dropout on an adapter that PEFT can only read through
    target_parameters (feed-forward targets of a DeepSeek-V2/V3 model)."""
    layout = peft_layout(config, settings)
    if layout.stacked and settings.dropout > 0:
        raise ValueError(
            f"lora dropout {settings.dropout:g} with LoRA on the feed-forward layers of a "
            f"{config.model_type} model: PEFT reaches transformers' stacked experts, routers "
            "and MLPs there through target_parameters, which require lora_dropout=0; use "
            "--lora-dropout 0, or only attention --targets (q,k,v,o)")


# --- config -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterConfig:
    settings: LoRASettings
    base_model: str  # base_model_name_or_path
    base_config: dict[str, Any] = field(default_factory=dict)  # ARCHITECTURE_KEYS values
    base_weights_fingerprint: str | None = None
    layout: PeftLayout = PeftLayout()

    def to_json(self) -> dict[str, Any]:
        s, layout = self.settings, self.layout
        regex = target_modules_regex(s.targets)
        if layout.stacked:  # the feed-forward layers are parameter targets
            attention = tuple(t for t in s.targets if t in ATTENTION_SITES)
            regex = target_modules_regex(attention) if attention else NO_MODULES
        rank = layout.rank or s.r
        data = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model, "revision": None,
            "r": rank, "lora_alpha": s.alpha * rank / s.r, "lora_dropout": s.dropout,
            "target_modules": regex, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {},
        }
        if layout.stacked:
            data["target_parameters"] = list(layout.parameters)
            if regex == NO_MODULES:  # PEFT's "no module targets" (a regex would warn)
                data["target_modules"] = []
            elif rank != s.r:  # the attention keeps rank r
                data["rank_pattern"], data["alpha_pattern"] = {regex: s.r}, {regex: s.alpha}
        return data

    def dsmoe_json(self, tensor_names: list[str]) -> dict[str, Any]:
        """``dsmoe_adapter.json``: what dsmoe needs beyond PEFT's fields, and which of the
        adapter's tensors PEFT leaves unread."""
        data = {
            "format_version": FORMAT_VERSION, "targets": list(self.settings.targets),
            "base_config": self.base_config,
            "base_config_fingerprint": config_fingerprint(self.base_config),
            "base_weights_fingerprint": self.base_weights_fingerprint,
            "expert_keys": ("stacked, PEFT target_parameters: model.layers.{i}.mlp.experts"
                            "[.base_layer].lora_{A,B}.weight ([E*R, in] / [out, R*E])"
                            if self.layout.stacked else
                            "per expert: model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj"
                            ".lora_{A,B}.weight ([r, in] / [out, r])"),
            "router_keys": "model.layers.{i}.mlp.gate.lora_{A,B}.weight ([r, D] / [E, r])",
            "not_read_by_peft": not_read_by_peft(tensor_names, self.layout),
        }
        if self.layout.stacked:
            data["lora_r"], data["lora_alpha"] = self.settings.r, self.settings.alpha
        return data

    @classmethod
    def from_json(cls, data: Any, source: str, tensor_names: list[str],
                  ours: Any = None) -> "AdapterConfig":
        """From adapter_config.json (``data``) and dsmoe_adapter.json (``ours``); adapters
        written before dsmoe_adapter.json keep dsmoe's section in ``data["dsmoe"]``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        if ours is None:
            ours = data.get("dsmoe") or {}
        if not isinstance(ours, dict):
            raise ValueError(f"{source}: dsmoe's section must be a JSON object")
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type {data.get('peft_type')!r} is not a LoRA adapter")
        for flag in ("use_dora", "use_rslora"):
            if data.get(flag):
                raise ValueError(f"{source}: {flag} adapters are not supported")
        version = ours.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{source}: adapter format_version {version!r} is not one this "
                             f"dsmoe understands (1 to {FORMAT_VERSION})")
        parameters = data.get("target_parameters") or []
        try:
            targets = ours.get("targets") or infer_targets(tensor_names, parameters)
            settings = LoRASettings(r=int(ours.get("lora_r", data["r"])),
                                    alpha=float(ours.get("lora_alpha", data["lora_alpha"])),
                                    dropout=float(data.get("lora_dropout", 0.0)),
                                    targets=tuple(targets))
            layout = PeftLayout(tuple(parameters), int(data["r"])) if parameters else PeftLayout()
        except KeyError as exc:
            raise ValueError(f"{source}: missing key {exc}") from None
        config = cls(settings, str(data.get("base_model_name_or_path") or ""),
                     dict(ours.get("base_config") or {}), ours.get("base_weights_fingerprint"),
                     layout)
        if layout.stacked and layout.rank != _stacked_rank(parameters, settings):
            raise ValueError(f"{source}: r {layout.rank} does not hold dsmoe's rank-{settings.r} "
                             f"adapters of {', '.join(parameters)} (gate and up of gate_up_proj "
                             "take r each); merge it with PEFT instead")
        expected = config.to_json()
        for pattern in ("rank_pattern", "alpha_pattern"):  # only the ones dsmoe writes
            if _norm(data.get(pattern) or {}) != _norm(expected[pattern]):
                raise ValueError(f"{source}: per-module {pattern} is not supported")
        return config


NO_MODULES = r"$^"  # target_modules that matches no module


def target_modules_regex(targets: tuple[str, ...]) -> str:
    """PEFT's ``target_modules`` as a regex (PEFT full-matches it against module names of
    the HF model), naming exactly the linear layers these targets cover."""
    attn = [name for t in ("q", "k", "v", "o") if t in targets for name in ATTENTION_SITES[t]]
    ffn = [f"{t}_proj" for t in ("gate", "up", "down") if t in targets]
    alternatives = []
    if attn:
        alternatives.append(rf"self_attn\.({'|'.join(attn)})")
    if ffn:
        alternatives.append(rf"mlp\.(experts\.\d+\.)?({'|'.join(ffn)})")
    if "shared" in targets:
        alternatives.append(r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)")
    if not alternatives:  # router only: nothing PEFT could wrap as a module
        return NO_MODULES
    return rf"model\.layers\.\d+\.({'|'.join(alternatives)})"


_KEY = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(?P<path>.+)\.lora_[AB]\.weight$")


def infer_targets(tensor_names: list[str], parameters: list[str] | tuple[str, ...] = ()
                  ) -> tuple[str, ...]:
    """The targets a PEFT adapter without a "dsmoe" section covers, from its tensor names
    and its target_parameters."""
    found: set[str] = set()
    for parameter in parameters:
        if parameter not in _PARAMETER_TARGETS:
            raise ValueError(f"adapter target_parameters entry {parameter!r} is not one dsmoe "
                             f"reads ({', '.join(_PARAMETER_TARGETS)})")
        found.update(_PARAMETER_TARGETS[parameter])
    for name in tensor_names:
        match = _KEY.match(name)
        if not match:
            raise ValueError(f"adapter tensor {name!r} is not a LoRA weight of a model layer")
        path = match["path"]
        if path.startswith("self_attn."):
            module = path.removeprefix("self_attn.")
            found.update(t for t, names in ATTENTION_SITES.items() if module in names)
        elif path.startswith("mlp.shared_experts."):
            found.add("shared")
        elif path == "mlp.gate":
            found.add("router")
        elif not path.startswith("mlp.experts") or not parameters:
            found.add(path.rsplit(".", 1)[-1].removesuffix("_proj"))
    return parse_targets(tuple(found))


# PEFT wraps linear modules by name, and reaches plain parameters only when the adapter
# names them in target_parameters (what the stacked layout does). In the per-expert layout
# transformers' own DeepSeek-V2/V3 models have no experts.{e}.gate_proj module, and no
# DeepSeek model has a linear router, so PEFT drops these keys without a warning.
_PEFT_UNREAD = {
    "routed experts": (re.compile(r"\.mlp\.experts\.\d+\."),
                       "read by dsmoe, DeepSeek's own modeling code (trust_remote_code) and "
                       "llama.cpp; PEFT on transformers' DeepSeek-V2/V3 models drops them"),
    "router": (re.compile(r"\.mlp\.gate\.lora_[AB]\."),
               "read by dsmoe and llama.cpp; PEFT drops them on this model family"),
}


def not_read_by_peft(tensor_names: list[str], layout: PeftLayout = PeftLayout()
                     ) -> dict[str, str]:
    """Adapter parts (routed experts, router) that only some readers apply -> who does.
    The stacked layout is read whole by PEFT."""
    if layout.stacked:
        return {}
    return {part: readers for part, (pattern, readers) in _PEFT_UNREAD.items()
            if any(pattern.search(name) for name in tensor_names)}


def peft_note(directory: str | os.PathLike) -> str | None:
    """A line for ``dsmoe finetune``'s output naming the adapter parts PEFT leaves unread
    (from dsmoe_adapter.json); None when PEFT reads all of it."""
    path = Path(directory) / DSMOE_CONFIG
    data = read_json(path) if path.is_file() else None
    unread = data.get("not_read_by_peft") if isinstance(data, dict) else None
    if not unread or not isinstance(unread, dict):
        return None
    parts = "; ".join(f"{part} LoRA: {readers}" for part, readers in unread.items())
    return (f"note: not every reader applies this whole adapter ({parts}); `dsmoe merge` "
            "bakes all of it into a model any DeepSeekMoE loader reads")


# --- tensors ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One adapter tensor on disk: its PEFT key and shape, how to read it from the model
    and how to write a loaded tensor back (which checks what the model cannot hold)."""

    key: str
    shape: tuple[int, ...]
    get: Callable[[], torch.Tensor]
    put: Callable[[torch.Tensor], None]


def _entries(model: nn.Module, layout: PeftLayout) -> Iterator[_Entry]:
    """Every adapter tensor of ``model``, in ``layout`` (module docstring)."""
    for name, module in lora_modules(model).items():
        prefix = PEFT_PREFIX + hf_name(name)
        if isinstance(module, LoRAExperts):
            yield from (_stacked_experts(prefix, module, layout.rank) if layout.stacked
                        else _per_expert(prefix, module))
            continue
        pair = module if isinstance(module, LoRALinear) else router_lora(module)
        if layout.stacked and ".self_attn." not in prefix:
            # a 2-D parameter target (MLP, shared expert, router): [r, in] / [out, r] as the
            # one "expert" of a ParamWrapper, padded to PEFT's rank
            a, b = pair.lora_A.detach()[None], pair.lora_B.detach()[None]
            yield from _Fused(prefix, [(a, b, slice(None), slice(0, a.shape[1]))],
                              layout.rank).entries()
            continue
        for ab in ("A", "B"):
            param = getattr(pair, f"lora_{ab}")
            yield _Entry(f"{prefix}.lora_{ab}.weight", tuple(param.shape), param.detach,
                         param.detach().copy_)


def _per_expert(prefix: str, module: LoRAExperts) -> Iterator[_Entry]:
    """experts.{e}.{proj}.lora_{A,B}.weight: [r, in] / [out, r] per expert."""
    for proj in module.projections:
        pair = getattr(module, proj)
        for e in range(module.num_experts):
            for ab in ("A", "B"):
                view = getattr(pair, f"lora_{ab}").detach()[e]
                yield _Entry(f"{prefix}.{e}.{proj}.lora_{ab}.weight", tuple(view.shape),
                             lambda v=view: v, view.copy_)


def _stacked_experts(prefix: str, module: LoRAExperts, rank: int) -> Iterator[_Entry]:
    """transformers' gate_up_proj (gate rows then up rows, the pairs side by side in rank)
    and down_proj, PEFT's nesting deciding which key gets ".base_layer"."""
    F_ = module.expert_size
    pairs = {proj: (getattr(module, proj).lora_A.detach(), getattr(module, proj).lora_B.detach())
             for proj in module.projections}  # A [E, r, in], B [E, out, r]
    halves = [(pairs[proj], rows) for proj, rows in
              (("gate_proj", slice(0, F_)), ("up_proj", slice(F_, 2 * F_))) if proj in pairs]
    if halves:
        r = halves[0][0][0].shape[1]
        inner = ".base_layer" if "down_proj" in pairs else ""
        pieces = [(a, b, rows, slice(k * r, (k + 1) * r))
                  for k, ((a, b), rows) in enumerate(halves)]
        yield from _Fused(prefix + inner, pieces, rank, out=2 * F_).entries()
    if "down_proj" in pairs:
        a, b = pairs["down_proj"]
        yield from _Fused(prefix, [(a, b, slice(None), slice(0, a.shape[1]))], rank).entries()


class _Fused:
    """Adapter pairs laid into one PEFT ParamWrapper of rank R: ``pieces`` are
    (A [E, r, in], B [E, out_k, r], the output rows and the rank slice the pair fills);
    everything else is zero. On disk A [E*R, in] (expert e: rows e*R..) and B [out, R*E]
    (column k*E + e), the reshapes PEFT's ParamWrapper reads them with."""

    def __init__(self, key: str, pieces: list[tuple[torch.Tensor, torch.Tensor, slice, slice]],
                 rank: int, out: int | None = None) -> None:
        self.key, self.pieces, self.rank = key, pieces, rank
        a, b = pieces[0][0], pieces[0][1]
        self.experts, self.n_in = a.shape[0], a.shape[2]
        self.n_out = out if out is not None else b.shape[1]

    def _a(self) -> torch.Tensor:  # [E*R, in]
        full = self.pieces[0][0].new_zeros(self.experts, self.rank, self.n_in)
        for a, _, _, ranks in self.pieces:
            full[:, ranks] = a.detach()
        return full.reshape(-1, self.n_in)

    def _b(self) -> torch.Tensor:  # [out, R*E]
        full = self.pieces[0][1].new_zeros(self.experts, self.n_out, self.rank)
        for _, b, rows, ranks in self.pieces:
            full[:, rows, ranks] = b.detach()
        return full.permute(1, 2, 0).reshape(self.n_out, -1)

    def _put(self, which: str, value: torch.Tensor) -> None:
        E, R = self.experts, self.rank
        full = (value.reshape(E, R, self.n_in) if which == "A"
                else value.reshape(self.n_out, R, E).permute(2, 0, 1))
        for a, b, rows, ranks in self.pieces:  # detached views of the parameters
            if which == "A":
                a.copy_(full[:, ranks])
            else:
                b.copy_(full[:, rows, ranks])
        again = self._a() if which == "A" else self._b()
        if not torch.equal(again, value.to(again.device, again.dtype)):
            raise ValueError(f"{self.key}.lora_{which}.weight: non-zero entries outside the "
                             "blocks dsmoe's adapters fill (gate and up adapted together, or "
                             "a rank above the adapter's r); merge it with PEFT instead")

    def entries(self) -> Iterator[_Entry]:
        shapes = {"A": (self.experts * self.rank, self.n_in),
                  "B": (self.n_out, self.rank * self.experts)}
        for ab, get in (("A", self._a), ("B", self._b)):
            yield _Entry(f"{self.key}.lora_{ab}.weight", shapes[ab], get,
                         lambda value, ab=ab: self._put(ab, value))


def adapter_state_dict(model: nn.Module, layout: PeftLayout | None = None
                       ) -> dict[str, torch.Tensor]:
    """PEFT key -> contiguous CPU tensor of every adapter weight in ``model``, in
    ``layout`` (default: the one ``save_adapter`` writes for the model)."""
    if layout is None:
        layout = peft_layout(model.config, model.lora_settings)
    return {entry.key: entry.get().to("cpu").contiguous() for entry in _entries(model, layout)}


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model: str) -> Path:
    """Write the adapter of ``model`` (which ``apply_lora`` prepared) to ``directory``,
    replacing an earlier adapter there as a whole (``checkpoint.directory``)."""
    settings = getattr(model, "lora_settings", None)
    if settings is None or not lora_modules(model):
        raise ValueError("the model has no LoRA adapter to save")
    directory = Path(directory)
    check_peft_dropout(model.config, settings)
    layout = peft_layout(model.config, settings)
    config = AdapterConfig(settings, base_model, base_config_summary(model.config),
                           weights_fingerprint(model), layout)
    tensors = adapter_state_dict(model, layout)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with replaced_directory(directory, _adapter_files) as tmp, \
            disk_errors(directory, lambda: size):
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, data in ((DSMOE_CONFIG, config.dsmoe_json(sorted(tensors))),
                           (ADAPTER_CONFIG, config.to_json())):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return directory


def _adapter_files(directory: Path) -> set[str]:
    return {ADAPTER_WEIGHTS, ADAPTER_CONFIG, DSMOE_CONFIG}


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/adapter`` (a finetune run directory)."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    raise FileNotFoundError(f"{path} holds no {ADAPTER_CONFIG} (an adapter directory, or a "
                            "finetune run directory with adapter/)")


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    directory = find_adapter_dir(path)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(weights, framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{weights}: cannot read its tensors: {exc}") from exc
    data = read_json(directory / ADAPTER_CONFIG)
    ours = read_json(directory / DSMOE_CONFIG) if (directory / DSMOE_CONFIG).is_file() else None
    return AdapterConfig.from_json(data, str(directory / ADAPTER_CONFIG), sorted(tensors),
                                   ours), tensors


def check_base(config: AdapterConfig, model: nn.Module, source: str) -> None:
    """Refuse an adapter made for another architecture; warn about other base weights."""
    here = base_config_summary(model.config)
    if config.base_config:
        differ = [f"{k} {config.base_config.get(k)!r} there, {here[k]!r} here"
                  for k in ARCHITECTURE_KEYS
                  if k in config.base_config and _norm(config.base_config[k]) != _norm(here[k])]
        if differ:
            raise ValueError(f"adapter {source} was made for another base model "
                             f"({config.base_model or 'unnamed'}): " + "; ".join(differ))
    if config.base_weights_fingerprint and \
            config.base_weights_fingerprint != weights_fingerprint(model):
        warnings.warn(f"adapter {source} was trained on different base weights "
                      f"({config.base_model or 'unnamed'}); applying it anyway", stacklevel=3)


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples vs lists, ints vs floats as JSON sees them


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterConfig:
    """Apply the adapter at ``path`` to ``model`` (unmerged), in place; returns its config.
    Errors name a base mismatch, and missing, unexpected or misshapen adapter tensors."""
    config, tensors = read_adapter(path)
    source = str(find_adapter_dir(path))
    check_base(config, model, source)
    apply_lora(model, config.settings)
    # the layout the file has (adapters written before the stacked layout are per expert)
    entries = list(_entries(model, config.layout))
    try:
        keys.check_shapes({entry.key: entry.shape for entry in entries}, tensors)
        for entry in entries:
            entry.put(tensors[entry.key])
    except ValueError as exc:
        raise ValueError(f"adapter {source}: {exc}") from None
    return config
