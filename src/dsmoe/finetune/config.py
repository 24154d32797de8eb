"""FinetuneConfig: everything about a finetuning run, validated once.

Design choices:
- Field names shared with ``TrainConfig`` (lr, warmup_steps, max_steps, min_lr_ratio,
  weight_decay, beta1, beta2, grad_clip, ...) mean the same, so the training loop's
  ``lr_at`` and ``build_optimizer`` serve both.
- ``lr`` and ``max_steps`` may be left unset: ``resolve`` fills them (a LoRA or a full
  finetuning learning rate; ``epochs`` over the training rows) and the resolved config
  is what checkpoints carry, so ``--resume`` needs only the run directory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dsmoe.finetune.lora import DEFAULT_TARGETS, LoRASettings, parse_targets
from dsmoe.train.config import settings_from_dict, settings_to_dict

QUANTS = ("int8", "int4")
DTYPES = ("float32", "bfloat16")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    model: str  # base: HF directory or .gguf
    data: str  # jsonl rows
    out: str = "runs/finetune"
    val_data: str | None = None  # separate validation rows; else val_fraction of data
    val_fraction: float = 0.1
    tokenizer: str | None = None  # default: the model directory's
    full: bool = False  # full finetuning instead of LoRA
    freeze_router: bool = False  # --full: keep the routers (and V3 balancing bias) fixed
    freeze_experts: bool = False  # --full: keep the routed experts fixed
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    quant: str | None = None  # QLoRA: quantize the frozen base to int8 / int4
    dtype: str = "float32"  # dtype of the (float parts of the) base model
    device: str = "cpu"  # cpu or cuda (under NCCL each rank takes its local GPU)
    max_seq_len: int = 1024
    packing: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_batch_size: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if self.quant is not None and self.quant not in QUANTS:
            raise ValueError(f"--quant must be one of {QUANTS}, got {self.quant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and self.quant:
            raise ValueError(f"--quant {self.quant} runs on dsmoe's CPU kernels; it cannot be "
                             "combined with --device cuda (use --dtype bfloat16 there)")
        if self.full and self.quant:
            raise ValueError("--quant freezes a quantized base for LoRA; it cannot be combined "
                             "with --full")
        if not self.full and (self.freeze_router or self.freeze_experts):
            raise ValueError("--freeze-router/--freeze-experts apply to --full finetuning "
                             "(LoRA freezes every base weight; choose LoRA --targets instead)")
        for name in ("max_seq_len", "batch_size", "grad_accum", "log_every", "eval_every",
                     "eval_batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")
        if not self.full:
            self.lora_settings()  # validates r, alpha, dropout

    @property
    def method(self) -> str:
        return "full" if self.full else "lora"

    def lora_settings(self) -> LoRASettings:
        return LoRASettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            targets=self.targets)

    def resolve(self, batches_per_epoch: int) -> "FinetuneConfig":
        """Fill ``lr`` and ``max_steps`` (``epochs`` x optimizer steps per epoch)."""
        steps = self.max_steps or max(1, math.ceil(self.epochs * batches_per_epoch /
                                                   self.grad_accum))
        return dataclasses.replace(self, max_steps=steps,
                                   lr=self.lr if self.lr is not None else DEFAULT_LR[self.method])

    def to_dict(self) -> dict[str, Any]:
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        return settings_from_dict(cls, data, "finetuning")
