"""TrainConfig and the routing recipes of the three DeepSeek generations.

Design choices:
- A run is fully described by (TrainConfig, ModelConfig); both are written into every
  checkpoint so ``--resume`` needs nothing but the output directory.
- ``--routing v1|v2|v3`` maps to ModelConfig overrides derived from the preset's expert
  count (devices and groups must divide it), then ``--set key=value`` overrides win.
- ``--dense`` keeps the *active* FFN width: (shared + top-k) x expert width in one MLP.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from dsmoe.config import ModelConfig

ROUTINGS = ("v1", "v2", "v3")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything about a training run except the model's shape (which the preset gives)."""

    preset: str = "tiny"
    routing: str | None = None  # None: the preset's generation (v2/v3 for MLA presets, else v1)
    dense: bool = False
    overrides: tuple[str, ...] = ()  # ModelConfig ``key=value`` strings (--set)
    data: str | None = None  # None: the built-in corpus (Python's standard library)
    tokenizer: str | None = None  # reuse a tokenizer.json instead of training one
    out: str = "runs/train"
    cache_dir: str | None = None  # tokenizer + token caches; None: $DSMOE_CACHE or ~/.cache/dsmoe
    max_steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    dtype: str = "float32"  # autocast dtype for the forward pass
    compile: bool = False
    device: str = "cpu"  # cpu or cuda (under NCCL each rank takes its local GPU)
    activation_checkpointing: bool = False  # recompute each block in backward
    samples: int = 3  # text samples printed at the end

    def __post_init__(self) -> None:
        if self.routing is None:
            object.__setattr__(self, "routing", preset_routing(self.preset))
        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every",
                     "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, "
                             f"{self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return settings_from_dict(cls, data, "training")


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(settings).items()}


def settings_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """The inverse of ``settings_to_dict``; unknown names raise a ``ValueError``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings: {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# What a resumed run may change: how long it runs (and so the lr schedule's length), how
# often it logs, evaluates and saves, and where caches live. Everything else shapes the
# model, the data or the optimisation, which a checkpoint cannot be continued under.
RESUMABLE = frozenset({"max_steps", "epochs", "log_every", "eval_every", "eval_batches",
                       "eval_batch_size", "checkpoint_every", "keep_checkpoints", "cache_dir",
                       "compile", "samples", "device", "activation_checkpointing"})
_PATHS = frozenset({"data", "tokenizer", "model", "val_data"})


def _flag(name: str) -> str:
    return "--set" if name == "overrides" else "--" + name.replace("_", "-")


def _same(name: str, a: Any, b: Any) -> bool:
    if name in _PATHS and a is not None and b is not None:
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


def resumed_settings(saved: Any, asked: Any, given: frozenset[str] | None, *,
                     also: frozenset[str] = frozenset()) -> tuple[Any, list[str]]:
    """The settings a resumed run continues under: ``saved`` (from its checkpoint) with the
    ``RESUMABLE`` (and ``also``) changes of ``asked``. ``given``: the fields the user set
    (None: every field of ``asked``); any other change raises a ``ValueError`` naming the
    flag. Returns the settings and one line per change made."""
    names = [f.name for f in dataclasses.fields(saved) if f.name != "out"]
    changes, lines = {}, []
    for name in names if given is None else [n for n in names if n in given]:
        old, new = getattr(saved, name), getattr(asked, name)
        if _same(name, old, new):
            continue
        if name not in RESUMABLE | also:
            raise ValueError(f"--resume: {_flag(name)} was {old!r} when this run started, "
                             f"now {new!r}; a resumed run keeps its model, data and "
                             "optimizer settings (drop the flag, or start a new run with "
                             "another --out)")
        changes[name] = new
        lines.append(f"resume: {name} {old!r} -> {new!r}")
    return dataclasses.replace(saved, **changes), lines


def _devices_for(n_experts: int, top_k: int, devices: int | None = None) -> tuple[int, int]:
    """Devices D (the EP ranks when given, else simulated: a divisor of E, >= 2 experts
    each) and a limit M < D that still leaves room for top-k experts."""
    for devices in ((devices,) if devices else (8, 4, 2)):
        if n_experts % devices == 0 and n_experts // devices >= 2:
            per_device = n_experts // devices
            limit = max(devices // 2, math.ceil(top_k / per_device))
            return devices, min(limit, devices)
    return 1, 1


def preset_routing(preset: str) -> str:
    """The routing recipe a preset trains with by default: its own generation's (a
    DeepSeek-V2 / V3 preset keeps V2 / V3 routing), V1 for everything else."""
    from dsmoe.presets import PRESETS

    model_type = PRESETS.get(preset, {}).get("model_type", "deepseek")
    return {"deepseek_v2": "v2", "deepseek_v3": "v3"}.get(model_type, "v1")


def routing_overrides(routing: str, base: ModelConfig, devices: int | None = None
                      ) -> dict[str, Any]:
    """ModelConfig changes that select a DeepSeek generation's routing and balancing;
    ``devices``: the EP size when the devices are real ranks."""
    E, K = base.n_routed_experts, base.num_experts_per_tok
    if E is None:
        return {}
    devices, limit = _devices_for(E, K, devices)
    if routing == "v1":  # softmax top-K, expert- and device-level balance losses
        return dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                    aux_loss_alpha=0.01, seq_aux=False, n_devices=devices,
                    device_balance_alpha=0.05 if devices > 1 else 0.0)
    if routing == "v2":  # + device-limited routing, communication balance, token dropping
        return dict(scoring_func="softmax", norm_topk_prob=False, seq_aux=False,
                    topk_method="device_limited" if devices > 1 else "greedy",
                    n_devices=devices, max_devices_per_token=limit, aux_loss_alpha=0.003,
                    device_balance_alpha=0.05 if devices > 1 else 0.0,
                    comm_balance_alpha=0.02 if devices > 1 else 0.0,
                    drop_tokens=True, capacity_factor=1.0)
    # v3: sigmoid gates, aux-loss-free bias balancing, tiny sequence-wise loss, groups.
    # DeepSeek-V3 used a bias speed of 0.001 over trillions of tokens; runs of a few hundred
    # steps need 0.01 to balance (tiny preset: max/mean load 1.3 by step 150 vs 3.9).
    groups = devices if devices > 1 and E // devices >= 2 else 1
    keep = max(1, min(groups, max(groups // 2, math.ceil(K / max(E // groups, 1)))))
    return dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=groups,
                topk_group=keep, norm_topk_prob=True, bias_update_speed=0.01,
                aux_loss_alpha=0.0001, seq_aux=True)


def build_model_config(cfg: TrainConfig, vocab_size: int, devices: int | None = None
                       ) -> ModelConfig:
    """preset -> routing recipe -> dense swap -> ``--set`` overrides -> tokenizer's vocab."""
    return requested_model_config(cfg, devices).replace(vocab_size=vocab_size)


def vocab_size_asked(cfg: TrainConfig) -> bool:
    """Whether ``--set`` names vocab_size (which the tokenizer's then overrides)."""
    return any(item.partition("=")[0].strip() == "vocab_size" for item in cfg.overrides)


def requested_model_config(cfg: TrainConfig, devices: int | None = None) -> ModelConfig:
    """The model the settings ask for, before the tokenizer fixes the vocabulary."""
    base = ModelConfig.preset(cfg.preset)
    model_cfg = base.replace(**routing_overrides(cfg.routing, base, devices))
    if cfg.dense and base.n_routed_experts is not None:
        active = (base.n_shared_experts or 0) + base.num_experts_per_tok
        model_cfg = model_cfg.replace(
            n_routed_experts=None, intermediate_size=active * base.moe_intermediate_size)
    if cfg.overrides:
        model_cfg = model_cfg.override(list(cfg.overrides))
    return model_cfg
