"""llama.cpp's "deepseek2" architecture: DeepSeek-V2 / V2-Lite / V3 (MLA) metadata.

What llama.cpp (llama-cpp-python 0.3.36's vendored copy: ``convert_hf_to_gguf.py``'s
DeepseekV2Model, ``src/models/deepseek2.cpp``) writes and reads, and so what dsmoe does:
- MLA sizes: ``attention.q_lora_rank`` (0 or absent: a full ``attn_q``, V2-Lite),
  ``attention.kv_lora_rank`` (C), ``rope.dimension_count`` (r, the decoupled rope part).
  Head sizes come twice: ``key_length_mla`` = n + r and ``value_length_mla`` = v are the
  per-head sizes, while ``key_length`` = C + r, ``value_length`` = C and
  ``head_count_kv`` = 1 describe the latent cache llama.cpp attends against (MQA).
  Files without the ``_mla`` keys are older converters': ``key_length`` = n + r,
  ``value_length`` = v and a whole ``attn_kv_b`` (llama.cpp then attends expanded).
- Routing: ``expert_gating_func`` (1 softmax, 2 sigmoid; absent means softmax),
  ``expert_weights_norm`` (norm_topk_prob), ``expert_weights_scale``
  (routed_scaling_factor), ``expert_group_count`` / ``expert_group_used_count`` and a
  ``exp_probs_b.bias`` tensor per MoE layer (V3's correction bias). llama.cpp ranks
  groups by the sum of their top-2 scores (V3's noaux_tc rule) whatever the method.
- YaRN: ``rope.scaling.type`` yarn, ``factor``, ``original_context_length``,
  ``yarn_beta_fast``/``slow``, and ``yarn_log_multiplier`` = 0.1 * mscale_all_dim (llama.cpp
  divides by 0.1 again and assumes mscale == mscale_all_dim).
- RoPE in pairs (llama.cpp's NORM type, DeepSeek's checkpoints' order); a model in halves
  (``rope_interleave: false``) is written with its rope rows reordered (``names.py``).
- Every layer past ``leading_dense_block_count`` is MoE; V3's multi-token-prediction layer
  is not written (llama.cpp's converter skips it too).
"""

from __future__ import annotations

from typing import Any, Mapping

import gguf

from dsmoe.checkpoint.gguf.metadata import Architecture, _Metadata
from dsmoe.config import ModelConfig

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]  # "deepseek2"
_K = gguf.Keys
_GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX,
           "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
_YARN_LOG_MUL = 0.1  # llama.cpp's converter stores 0.1 * mscale_all_dim


def _grouped(c: ModelConfig) -> bool:
    """Whether routing really restricts tokens to some expert groups."""
    return (c.topk_method in ("group_limited_greedy", "noaux_tc") and c.n_group > 1
            and c.topk_group < c.n_group)


def _write(writer: gguf.GGUFWriter, c: ModelConfig) -> None:
    C, r = c.kv_lora_rank, c.qk_rope_head_dim
    writer.add_head_count_kv(1)  # the latent is one key/value "head" shared by all heads
    writer.add_q_lora_rank(c.q_lora_rank or 0)
    writer.add_kv_lora_rank(C)
    writer.add_key_length(C + r)
    writer.add_value_length(C)
    writer.add_key_length_mla(c.qk_nope_head_dim + r)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(r)
    if c.n_routed_experts is not None:
        writer.add_expert_gating_func(_GATING[c.scoring_func])
        writer.add_expert_weights_norm(bool(c.norm_topk_prob))
        if _grouped(c):
            writer.add_expert_group_count(c.n_group)
            writer.add_expert_group_used_count(c.topk_group)
    _write_rope_scaling(writer, c.rope_scaling or {})


def _write_rope_scaling(writer: gguf.GGUFWriter, scaling: Mapping[str, Any]) -> None:
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        if scaling.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(scaling["beta_fast"]))
        if scaling.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(scaling["beta_slow"]))
        if scaling.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(_YARN_LOG_MUL * float(scaling["mscale_all_dim"]))
    else:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _problems(c: ModelConfig) -> list[str]:
    problems = []
    if c.n_routed_experts is not None:
        if c.topk_method == "device_limited":
            problems.append("topk_method='device_limited' (llama.cpp picks a plain top-k)")
        elif c.topk_method == "group_limited_greedy" and _grouped(c):
            problems.append("topk_method='group_limited_greedy' (llama.cpp ranks groups by "
                            "their top-2 sum, V3's rule, not by their best expert)")
    scaling = c.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in (None, "linear", "yarn"):
        problems.append(f"rope_scaling type {kind!r} (llama.cpp's deepseek2: none, linear "
                        "or yarn)")
    if kind == "yarn" and (scaling.get("mscale") or 1.0) != (scaling.get("mscale_all_dim")
                                                               or 1.0):
        problems.append("yarn mscale != mscale_all_dim (llama.cpp assumes they are equal)")
    if scaling.get("attention_factor") is not None:
        problems.append("yarn attention_factor (llama.cpp's deepseek2 derives its own)")
    return problems


def _read(meta: _Metadata, tensor_shapes: Mapping[str, Any], values: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """MLA sizes, routing and RoPE from deepseek2 keys; the model type and the routing
    method (which llama.cpp has no key for) as defaults for files without dsmoe's config."""
    values.update(_mla_sizes(meta), num_key_value_heads=values["num_attention_heads"],
                  attention_bias=False)
    scaling = _read_rope_scaling(meta)
    if scaling is not None:
        values["rope_scaling"] = scaling
    biased = any(name.endswith("exp_probs_b.bias") for name in tensor_shapes)
    if values["n_routed_experts"] is not None:
        gating = meta.number(meta.key(_K.LLM.EXPERT_GATING_FUNC), 1, integer=True)
        names = {int(v): k for k, v in _GATING.items()}
        if gating not in names:
            raise meta.fail(meta.key(_K.LLM.EXPERT_GATING_FUNC), gating,
                            "is not a gating function dsmoe knows (1 softmax, 2 sigmoid)")
        values.update(scoring_func=names[gating],
                      norm_topk_prob=meta.flag(_K.LLM.EXPERT_WEIGHTS_NORM, False),
                      routed_scaling_factor=meta.decimal(_K.LLM.EXPERT_WEIGHTS_SCALE, 0.0)
                      or 1.0)
        groups = meta.size(_K.LLM.EXPERT_GROUP_COUNT, 0)
        if groups > 1:
            values.update(n_group=groups, topk_group=meta.size(_K.LLM.EXPERT_GROUP_USED_COUNT))
    v3 = biased or values.get("scoring_func") == "sigmoid"
    method = ("noaux_tc" if biased else
              "group_limited_greedy" if values.get("n_group", 1) > 1 else "greedy")
    return values, dict(model_type="deepseek_v3" if v3 else "deepseek_v2", topk_method=method, moe_layer_freq=1)


def _mla_sizes(meta: _Metadata) -> dict[str, Any]:
    rope = meta.size(_K.Rope.DIMENSION_COUNT)
    key_mla = meta.size(_K.Attention.KEY_LENGTH_MLA, None)
    if key_mla is None:  # older converters: the per-head sizes under the plain keys
        key_name, value_name = _K.Attention.KEY_LENGTH, _K.Attention.VALUE_LENGTH
    else:
        key_name, value_name = _K.Attention.KEY_LENGTH_MLA, _K.Attention.VALUE_LENGTH_MLA
    key_length = meta.size(key_name)
    if key_length <= rope:
        raise meta.fail(meta.key(key_name), key_length, "must exceed "
                        f"{meta.key(_K.Rope.DIMENSION_COUNT)} = {rope} (qk_nope_head_dim = "
                        "the difference)")
    return dict(q_lora_rank=meta.size(_K.Attention.Q_LORA_RANK, 0) or None,
                kv_lora_rank=meta.size(_K.Attention.KV_LORA_RANK),
                qk_rope_head_dim=rope, qk_nope_head_dim=key_length - rope,
                v_head_dim=meta.size(value_name))


def _read_rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    kind = meta.text(meta.key(_K.Rope.SCALING_TYPE), "none")
    if kind in ("none", None):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{meta.source}: rope scaling type {kind!r} is not supported (dsmoe "
                         "reads none, linear or yarn from llama.cpp's deepseek2 metadata)")
    scaling: dict[str, Any] = {"type": kind, "factor": meta.decimal(_K.Rope.SCALING_FACTOR)}
    if kind == "linear":
        return scaling
    scaling["original_max_position_embeddings"] = meta.number(
        meta.key(_K.Rope.SCALING_ORIG_CTX_LEN), integer=True)
    for name, key in (("beta_fast", _K.Rope.SCALING_YARN_BETA_FAST),
                      ("beta_slow", _K.Rope.SCALING_YARN_BETA_SLOW)):
        value = meta.decimal(key, None)
        if value is not None:
            scaling[name] = value
    log_mul = meta.decimal(_K.Rope.SCALING_YARN_LOG_MUL, None)
    if log_mul:  # llama.cpp's assumption: mscale == mscale_all_dim
        mscale = float(f"{log_mul / _YARN_LOG_MUL:.6g}")
        scaling.update(mscale=mscale, mscale_all_dim=mscale)
    return scaling


DEEPSEEK2 = Architecture(ARCH, _write, _read, _problems)
