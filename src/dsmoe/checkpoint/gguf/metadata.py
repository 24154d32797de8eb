"""ModelConfig <-> the key/value metadata of llama.cpp's "deepseek" architecture.

Design choices:
- llama.cpp's keys (``deepseek.block_count``, ``deepseek.expert_count``, ...) are the source
  of truth: they are what llama.cpp runs with, so a file read here means what it means there.
- DeepSeekMoE V1 as llama.cpp runs it: softmax gate, top-k without renormalisation, no
  routed scaling (llama.cpp ignores ``expert_weights_scale`` for this architecture), MoE in
  every layer after ``leading_dense_block_count``, no tied embeddings unless ``output.weight``
  is absent, attention biases iff the file has them.
- dsmoe also writes its full HF config as ``dsmoe.hf_config`` (JSON), so settings llama.cpp
  has no key for (V2/V3 routing, ``moe_layer_freq``, dynamic RoPE scaling, ...) survive a
  round trip through dsmoe. llama.cpp ignores the key; ``llama_cpp_problems`` lists the
  settings it would run differently.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable

import gguf
import numpy as np

from dsmoe.config import ModelConfig

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK]  # "deepseek"
DSMOE_CONFIG_KEY = "dsmoe.hf_config"
_K = gguf.Keys
_MISSING = object()

Getter = Callable[..., Any]  # get(key, default=_MISSING) -> value; raises if missing w/o default


def _key(template: str) -> str:
    return template.format(arch=ARCH)


def llama_cpp_problems(config: ModelConfig) -> list[str]:
    """Settings of ``config`` that llama.cpp's "deepseek" architecture cannot reproduce."""
    c, problems = config, []
    if c.n_routed_experts is not None:
        if c.scoring_func != "softmax":
            problems.append(f"scoring_func={c.scoring_func!r} (llama.cpp uses softmax)")
        if c.topk_method != "greedy":
            problems.append(f"topk_method={c.topk_method!r} (llama.cpp picks a plain top-k)")
        if c.norm_topk_prob and c.num_experts_per_tok and c.num_experts_per_tok > 1:
            problems.append("norm_topk_prob=true (llama.cpp does not renormalise gate weights)")
        if c.routed_scaling_factor != 1.0:
            problems.append(f"routed_scaling_factor={c.routed_scaling_factor} (ignored)")
        if any(not c.is_moe_layer(i) for i in range(c.first_k_dense_replace,
                                                     c.num_hidden_layers)):
            problems.append(f"moe_layer_freq={c.moe_layer_freq} (llama.cpp makes every layer "
                            "after the leading dense ones a MoE layer)")
        if not c.n_shared_experts:
            problems.append("no shared experts (llama.cpp's deepseek expects them)")
    kind = (c.rope_scaling or {}).get("type", (c.rope_scaling or {}).get("rope_type"))
    if kind not in (None, "linear"):
        problems.append(f"rope_scaling type {kind!r} (llama.cpp's deepseek: none or linear)")
    return problems


def write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, *,
                   file_type: gguf.LlamaFileType, name: str = "dsmoe") -> None:
    """Add the architecture's keys (and ``dsmoe.hf_config``) to ``writer``."""
    c = config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_dimension_count(c.head_dim)
    scaling = c.rope_scaling or {}
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    else:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_vocab_size(c.vocab_size)
    moe = c.n_routed_experts is not None
    writer.add_leading_dense_block_count(c.first_k_dense_replace if moe else c.num_hidden_layers)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_count(c.n_routed_experts or 0)
    writer.add_expert_used_count((c.num_experts_per_tok or 0) if moe else 0)
    writer.add_expert_shared_count(c.n_shared_experts or 0)
    writer.add_expert_weights_scale(float(c.routed_scaling_factor))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(DSMOE_CONFIG_KEY, json.dumps(c.to_hf(), sort_keys=True))


def read_config(get: Getter, tensor_names: set[str], source: str) -> ModelConfig:
    """The ModelConfig a "deepseek" GGUF describes. ``get(key[, default])`` reads metadata;
    ``tensor_names`` tells tied embeddings and attention biases apart."""
    arch = get(_K.General.ARCHITECTURE, None)
    if arch != ARCH:
        hint = (" (DeepSeek-V2/V3: dsmoe runs their MLA attention from HF directories, but "
                "does not read llama.cpp's MLA GGUF layout yet)"
                if arch in ("deepseek2", "deepseek3", "deepseek32") else "")
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; dsmoe reads "
                         f"llama.cpp's {ARCH!r} architecture (DeepSeekMoE){hint}")
    heads = _scalar(get(_key(_K.Attention.HEAD_COUNT)), _key(_K.Attention.HEAD_COUNT), source)
    values: dict[str, Any] = dict(
        num_hidden_layers=get(_key(_K.LLM.BLOCK_COUNT)),
        hidden_size=get(_key(_K.LLM.EMBEDDING_LENGTH)),
        num_attention_heads=heads,
        num_key_value_heads=_scalar(get(_key(_K.Attention.HEAD_COUNT_KV), heads),
                                    _key(_K.Attention.HEAD_COUNT_KV), source),
        max_position_embeddings=get(_key(_K.LLM.CONTEXT_LENGTH), 4096),
        rms_norm_eps=_decimal(get(_key(_K.Attention.LAYERNORM_RMS_EPS), 1e-6)),
        rope_theta=_decimal(get(_key(_K.Rope.FREQ_BASE), 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )
    vocab = get(_key(_K.LLM.VOCAB_SIZE), None)
    if vocab is None:  # older converters: the token list's length is the vocabulary
        tokens = get(_K.Tokenizer.LIST, None)
        vocab = len(tokens) if tokens is not None else None
    if vocab is not None:
        values["vocab_size"] = vocab
    n_experts = get(_key(_K.LLM.EXPERT_COUNT), 0) or None
    values["n_routed_experts"] = n_experts
    if n_experts is not None:
        values.update(
            num_experts_per_tok=get(_key(_K.LLM.EXPERT_USED_COUNT)),
            n_shared_experts=get(_key(_K.LLM.EXPERT_SHARED_COUNT), 0),
            moe_intermediate_size=get(_key(_K.LLM.EXPERT_FEED_FORWARD_LENGTH)),
            first_k_dense_replace=get(_key(_K.LLM.LEADING_DENSE_BLOCK_COUNT), 0))
    if n_experts is None or values["first_k_dense_replace"] > 0:
        values["intermediate_size"] = get(_key(_K.LLM.FEED_FORWARD_LENGTH))
    else:
        values["intermediate_size"] = get(_key(_K.LLM.FEED_FORWARD_LENGTH),
                                          values["moe_intermediate_size"])
    scaling_type = get(_key(_K.Rope.SCALING_TYPE), "none")
    if scaling_type == "linear":
        values["rope_scaling"] = {"type": "linear",
                                  "factor": _decimal(get(_key(_K.Rope.SCALING_FACTOR)))}
    elif scaling_type not in ("none", None):
        raise ValueError(f"{source}: rope scaling type {scaling_type!r} is not supported "
                         "(dsmoe reads none or linear from llama.cpp metadata)")
    for key, name in ((_K.Tokenizer.BOS_ID, "bos_token_id"), (_K.Tokenizer.EOS_ID, "eos_token_id")):
        token_id = get(key, None)
        if token_id is not None:
            values[name] = token_id

    stored = get(DSMOE_CONFIG_KEY, None)
    try:
        if stored is not None:
            hf = json.loads(stored)
            for key, value in values.items():  # llama.cpp's keys win: llama.cpp runs them
                if not _same_float32(hf.get(key), value):
                    hf[key] = value
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = ModelConfig.from_hf(hf)
        else:
            values.setdefault("bos_token_id", None)
            values.setdefault("eos_token_id", None)
            config = ModelConfig(**values, norm_topk_prob=False, scoring_func="softmax",
                                 topk_method="greedy", moe_layer_freq=1,
                                 routed_scaling_factor=1.0, torch_dtype="float32")
    except ValueError as exc:
        raise ValueError(f"{source}: the metadata describes an invalid model: {exc}") from exc
    rope_dim = get(_key(_K.Rope.DIMENSION_COUNT), config.head_dim)
    if rope_dim != config.head_dim:
        raise ValueError(f"{source}: {_key(_K.Rope.DIMENSION_COUNT)}={rope_dim} but head_dim = "
                         f"embedding_length / head_count = {config.head_dim}; dsmoe rotates "
                         "whole heads only")
    return config


def _decimal(value: Any) -> float:
    """A float32 from the file as the shortest decimal that rounds to it: 1e-6 is stored as
    9.99999997e-07 and comes back as 1e-06, the value the writer meant."""
    return float(str(np.float32(value)))


def _same_float32(stored: Any, value: Any) -> bool:
    """GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07. A stored exact
    value that rounds to the metadata's float32 is the same value."""
    if isinstance(stored, bool) or isinstance(value, bool) or not isinstance(
            stored, (int, float)) or not isinstance(value, float):
        return stored == value
    return float(np.float32(stored)) == float(np.float32(value))


def _scalar(value: Any, key: str, source: str) -> Any:
    """Some architectures store per-layer arrays; DeepSeekMoE needs one value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{source}: {key} varies per layer ({value}); "
                             "dsmoe needs the same value for every layer")
        return value[0]
    return value
