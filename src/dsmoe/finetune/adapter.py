"""LoRA adapters on disk: ``adapter_model.safetensors`` + ``adapter_config.json`` +
``dsmoe_adapter.json``.

Layout (PEFT's, so PEFT users recognise it):
  adapter_config.json   PEFT's LoraConfig fields only (peft_type "LORA", r, lora_alpha,
                        lora_dropout, target_modules, base_model_name_or_path, ...), so
                        PEFT loads it without an "unexpected keyword" warning
  dsmoe_adapter.json    dsmoe's own: the targets, the base config's architecture keys and
                        their sha256 fingerprint, a fingerprint of a few base weights, and
                        "not_read_by_peft": the parts (routed experts, router) that only
                        some readers apply, and which. Adapters written before this file
                        kept the same object under adapter_config.json's "dsmoe" key; both
                        are read.
  adapter_model.safetensors  fp32 tensors under PEFT's names, HF module paths prefixed
                        with "base_model.model.":
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight  (dense)
    base_model.model.model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.lora_{A,B}.weight
  lora_A.weight is [r, in], lora_B.weight [out, r]; update = lora_alpha / r * B @ A.
  Routed experts (documented dsmoe choice): stacked in memory ([E, r, in] / [E, out, r]),
  stored per expert exactly as PEFT names them on DeepSeek's own modeling code, whose
  experts are a list of linear layers (the checkpoint layout: experts are per expert on
  disk, stacked in memory, see ``checkpoint.keys``):
    base_model.model.model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight
  transformers' native DeepSeek-V2/V3 models fuse their experts, so PEFT drops these keys
  there (silently); ``dsmoe finetune`` says so when it writes such an adapter.
  The router adapter has no PEFT equivalent (HF's MoEGate is not a linear layer), so it is
  left out of "target_modules" and stored under its module's name:
    base_model.model.model.layers.{i}.mlp.gate.lora_A.weight [r, D], lora_B.weight [E, r]
The directory is replaced as a whole when saved again (``checkpoint.directory``).

Loading checks the base before anything else: an adapter whose base config differs from
the model's is refused with the differing keys named; differing base weights (same
architecture, e.g. a chat vs a base checkpoint) only warn.

Shapes: E experts, r rank, D hidden.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.checkpoint import keys
from dsmoe.checkpoint.directory import replaced_directory
from dsmoe.checkpoint.hf import hf_name
from dsmoe.config import ModelConfig
from dsmoe.finetune.lora import (ATTENTION_SITES, EXPERT_PROJECTIONS, LoRAExperts, LoRALinear,
                                 LoRASettings, apply_lora, lora_modules, parse_targets,
                                 router_lora)
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


# --- config -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterConfig:
    settings: LoRASettings
    base_model: str  # base_model_name_or_path
    base_config: dict[str, Any] = field(default_factory=dict)  # ARCHITECTURE_KEYS values
    base_weights_fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model, "revision": None,
            "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
            "target_modules": target_modules_regex(s.targets), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {},
        }

    def dsmoe_json(self, tensor_names: list[str]) -> dict[str, Any]:
        """``dsmoe_adapter.json``: what dsmoe needs beyond PEFT's fields, and which of the
        adapter's tensors PEFT leaves unread."""
        return {
            "format_version": FORMAT_VERSION, "targets": list(self.settings.targets),
            "base_config": self.base_config,
            "base_config_fingerprint": config_fingerprint(self.base_config),
            "base_weights_fingerprint": self.base_weights_fingerprint,
            "expert_keys": "per expert: model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj"
                           ".lora_{A,B}.weight ([r, in] / [out, r])",
            "router_keys": "model.layers.{i}.mlp.gate.lora_{A,B}.weight ([r, D] / [E, r])",
            "not_read_by_peft": not_read_by_peft(tensor_names),
        }

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
        for pattern in ("rank_pattern", "alpha_pattern"):
            if data.get(pattern):
                raise ValueError(f"{source}: per-module {pattern} is not supported")
        version = ours.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{source}: adapter format_version {version!r} is not one this "
                             f"dsmoe understands (1 to {FORMAT_VERSION})")
        try:
            targets = ours.get("targets") or infer_targets(tensor_names)
            settings = LoRASettings(r=int(data["r"]), alpha=float(data["lora_alpha"]),
                                    dropout=float(data.get("lora_dropout", 0.0)),
                                    targets=tuple(targets))
        except KeyError as exc:
            raise ValueError(f"{source}: missing key {exc}") from None
        return cls(settings, str(data.get("base_model_name_or_path") or ""),
                   dict(ours.get("base_config") or {}), ours.get("base_weights_fingerprint"))


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
    if not alternatives:  # router only: nothing PEFT could wrap
        return r"$^"
    return rf"model\.layers\.\d+\.({'|'.join(alternatives)})"


_KEY = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(?P<path>.+)\.lora_[AB]\.weight$")


def infer_targets(tensor_names: list[str]) -> tuple[str, ...]:
    """The targets a PEFT adapter without a "dsmoe" section covers, from its tensor names."""
    found: set[str] = set()
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
        else:
            found.add(path.rsplit(".", 1)[-1].removesuffix("_proj"))
    return parse_targets(tuple(found))


# PEFT wraps linear modules by name. transformers' own DeepSeek-V2/V3 models fuse the routed
# experts into one parameter (no experts.{e}.gate_proj module), and no DeepSeek model has a
# linear router, so PEFT drops these keys when it loads the adapter, without a warning.
_PEFT_UNREAD = {
    "routed experts": (re.compile(r"\.mlp\.experts\.\d+\."),
                       "read by dsmoe, DeepSeek's own modeling code (trust_remote_code) and "
                       "llama.cpp; PEFT on transformers' DeepSeek-V2/V3 models drops them"),
    "router": (re.compile(r"\.mlp\.gate\.lora_[AB]\."),
               "read by dsmoe and llama.cpp; PEFT drops them on every DeepSeek model"),
}


def not_read_by_peft(tensor_names: list[str]) -> dict[str, str]:
    """Adapter parts (routed experts, router) that only some readers apply -> who does."""
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
def _entries(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, int | None]]:
    """(PEFT key, parameter, expert index or None) for every adapter tensor of ``model``."""
    for name, module in lora_modules(model).items():
        prefix = PEFT_PREFIX + hf_name(name)
        if isinstance(module, LoRALinear):
            pairs = [(prefix, module)]
        elif isinstance(module, LoRAExperts):
            for proj in EXPERT_PROJECTIONS:
                pair = getattr(module, proj)
                if pair is None:
                    continue
                for e in range(module.num_experts):
                    for ab in ("A", "B"):
                        yield (f"{prefix}.{e}.{proj}.lora_{ab}.weight",
                               getattr(pair, f"lora_{ab}"), e)
            continue
        else:  # a parametrized router
            pairs = [(prefix, router_lora(module))]
        for key, holder in pairs:
            for ab in ("A", "B"):
                yield f"{key}.lora_{ab}.weight", getattr(holder, f"lora_{ab}"), None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> contiguous CPU tensor of every adapter weight in ``model``."""
    out = {}
    for key, param, e in _entries(model):
        tensor = param.detach() if e is None else param.detach()[e]
        out[key] = tensor.to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model: str) -> Path:
    """Write the adapter of ``model`` (which ``apply_lora`` prepared) to ``directory``,
    replacing an earlier adapter there as a whole (``checkpoint.directory``)."""
    settings = getattr(model, "lora_settings", None)
    if settings is None or not lora_modules(model):
        raise ValueError("the model has no LoRA adapter to save")
    directory = Path(directory)
    config = AdapterConfig(settings, base_model, base_config_summary(model.config),
                           weights_fingerprint(model))
    tensors = adapter_state_dict(model)
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
    entries = list(_entries(model))
    expected = {key: tuple(p.shape[1:] if e is not None else p.shape) for key, p, e in entries}
    try:
        keys.check_shapes(expected, tensors)
    except ValueError as exc:
        raise ValueError(f"adapter {source}: {exc}") from None
    with torch.no_grad():
        for key, param, e in entries:
            value = tensors[key].to(device=param.device, dtype=param.dtype)
            (param if e is None else param[e]).copy_(value)
    return config
