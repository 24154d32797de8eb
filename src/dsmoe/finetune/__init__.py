"""Finetuning DeepSeekMoE models: LoRA (experts included), QLoRA, full SFT, adapters.

    apply_lora(model, LoRASettings(r=8, targets=...))  adapters on a frozen base, in place
    merge_lora(model)                                  fold them into the base weights
    save_adapter(model, dir) / load_adapter(model, dir)  PEFT-layout adapter directories
    finetune(FinetuneConfig(model=..., data=...))      what ``dsmoe finetune`` runs

Modules: ``lora`` (adapter modules), ``qlora`` (gradients through quantized weights),
``adapter`` (files), ``sft_data`` (jsonl -> masked token batches), ``config``, ``loop``.
"""

from dsmoe.finetune.adapter import load_adapter, read_adapter, save_adapter
from dsmoe.finetune.lora import (TARGETS, LoRASettings, apply_lora, lora_parameters,
                                 merge_lora)

__all__ = ["LoRASettings", "TARGETS", "apply_lora", "load_adapter", "lora_parameters",
           "merge_lora", "read_adapter", "save_adapter"]
