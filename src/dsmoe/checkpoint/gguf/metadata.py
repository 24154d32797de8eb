"""ModelConfig <-> the key/value metadata of llama.cpp's "deepseek" and "deepseek2" files.

Design choices:
- llama.cpp's keys (``deepseek.block_count``, ``deepseek2.attention.kv_lora_rank``, ...)
  are the source of truth: they are what llama.cpp runs with, so a file read here means what
  it means there.
- Two architectures behind one table (``ARCHITECTURES``): V1 models (multi-head attention)
  are llama.cpp's "deepseek", MLA models (DeepSeek-V2/V2-Lite/V3) its "deepseek2"
  (``gguf/mla.py``). Each gives the keys it writes, the config fields its keys define
  (which win over ``dsmoe.hf_config``) and the defaults of a file without that key.
- DeepSeekMoE V1 as llama.cpp runs it: softmax gate, top-k without renormalisation, no
  routed scaling (llama.cpp ignores ``expert_weights_scale`` for this architecture), MoE in
  every layer after ``leading_dense_block_count``, no tied embeddings unless ``output.weight``
  is absent, attention biases iff the file has them.
- dsmoe also writes its full HF config as ``dsmoe.hf_config`` (JSON), so settings llama.cpp
  has no key for (V1 with V2/V3 routing, ``moe_layer_freq``, dynamic RoPE scaling, ...)
  survive a round trip through dsmoe. llama.cpp ignores the key; ``llama_cpp_problems``
  lists the settings it would run differently.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import gguf
import numpy as np

from dsmoe.config import ModelConfig

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK]  # "deepseek"
DSMOE_CONFIG_KEY = "dsmoe.hf_config"
_K = gguf.Keys
_MISSING = object()
MAX_CONTEXT = 1 << 24  # 16M positions: beyond every released model; bounds the KV cache size

Getter = Callable[..., Any]  # get(key, default=_MISSING) -> value; raises if missing w/o default


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture: what it writes, reads and cannot reproduce."""

    name: str
    write: Callable[[gguf.GGUFWriter, ModelConfig], None]  # the architecture's own keys
    # (meta, tensor shapes, common values) -> (values its keys define, defaults otherwise)
    read: Callable[..., tuple[dict[str, Any], dict[str, Any]]]
    problems: Callable[[ModelConfig], list[str]]


def architecture(config: ModelConfig) -> Architecture:
    """The llama.cpp architecture a dsmoe model is written as."""
    from dsmoe.checkpoint.gguf.mla import DEEPSEEK2

    return DEEPSEEK2 if config.attention_type == "mla" else DEEPSEEK


def llama_cpp_problems(config: ModelConfig) -> list[str]:
    """Settings of ``config`` that llama.cpp's architecture for it cannot reproduce."""
    c, problems = config, []
    if c.n_routed_experts is not None:
        if any(not c.is_moe_layer(i) for i in range(c.first_k_dense_replace,
                                                     c.num_hidden_layers)):
            problems.append(f"moe_layer_freq={c.moe_layer_freq} (llama.cpp makes every layer "
                            "after the leading dense ones a MoE layer)")
        if not c.n_shared_experts:
            problems.append("no shared experts (llama.cpp's deepseek expects them)")
    return architecture(c).problems(c) + problems


def _v1_problems(config: ModelConfig) -> list[str]:
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
    kind = (c.rope_scaling or {}).get("type", (c.rope_scaling or {}).get("rope_type"))
    if kind not in (None, "linear"):
        problems.append(f"rope_scaling type {kind!r} (llama.cpp's deepseek: none or linear)")
    return problems


def write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, *,
                   file_type: gguf.LlamaFileType, name: str = "dsmoe") -> None:
    """Add the architecture's keys (and ``dsmoe.hf_config``) to ``writer``, whose
    architecture is ``architecture(config).name``."""
    c = config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(c.vocab_size)
    moe = c.n_routed_experts is not None
    writer.add_leading_dense_block_count(c.first_k_dense_replace if moe else c.num_hidden_layers)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_count(c.n_routed_experts or 0)
    writer.add_expert_used_count((c.num_experts_per_tok or 0) if moe else 0)
    writer.add_expert_shared_count(c.n_shared_experts or 0)
    writer.add_expert_weights_scale(float(c.routed_scaling_factor))
    architecture(c).write(writer, c)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # the file holds no multi-token-prediction layer (the writer skips it), and MLA's rope
    # rows in llama.cpp's pair order (names.py)
    stored = c.replace(num_nextn_predict_layers=0).to_hf()
    if c.attention_type == "mla":
        stored["rope_interleave"] = True
    writer.add_string(DSMOE_CONFIG_KEY, json.dumps(stored, sort_keys=True))


def _write_v1(writer: gguf.GGUFWriter, c: ModelConfig) -> None:
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    scaling = c.rope_scaling or {}
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    else:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


class _Metadata:
    """Typed, bounded reads of one file's metadata: a value of the wrong type, or a size the
    file's tensors cannot back, fails with one line naming the file, the key and the value."""

    def __init__(self, get: Getter, tensor_shapes: Mapping[str, tuple[int, ...]],
                 source: str) -> None:
        self.get, self.source, self.arch = get, source, ARCH
        self.shapes = tensor_shapes
        self.n_tensors = len(tensor_shapes)
        # Any real size (vocabulary, width, expert count) is some tensor's dimension.
        self.largest_dim = max((max(s, default=0) for s in tensor_shapes.values()), default=0)

    def key(self, template: str) -> str:
        """``template`` ("{arch}.block_count") for this file's architecture."""
        return template.format(arch=self.arch)

    def fail(self, key: str, value: Any, why: str) -> ValueError:
        return ValueError(f"{self.source}: metadata {key} = {_short(value)} {why}")

    def number(self, key: str, default: Any = _MISSING, *, integer: bool) -> Any:
        value = self.get(key) if default is _MISSING else self.get(key, default)
        if value is None:
            return value
        value = _scalar(value, key, self.source)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(key, value, f"must be {'an integer' if integer else 'a number'}, "
                            f"not {type(value).__name__}")
        if not integer and not math.isfinite(value):
            raise self.fail(key, value, "must be a finite number")
        return value

    def decimal(self, template: str, default: Any = _MISSING) -> Any:
        """A float key of this architecture, as the decimal the writer meant."""
        value = self.number(self.key(template), default, integer=False)
        return None if value is None else _decimal(value)

    def flag(self, template: str, default: bool) -> bool:
        key = self.key(template)
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, value, f"must be a boolean, not {type(value).__name__}")
        return value

    def size(self, key: str, default: Any = _MISSING) -> Any:
        """A width or count: checked against the file before anything is sized by it."""
        value = self.number(self.key(key), default, integer=True)
        if value is not None and not 0 <= value <= self.largest_dim:
            raise self.fail(self.key(key), value, "is larger than any tensor dimension in the "
                            f"file ({self.largest_dim}): the metadata is corrupt or hostile")
        return value

    def blocks(self) -> int:
        key = self.key(_K.LLM.BLOCK_COUNT)
        value = self.number(key, integer=True)
        if not 0 < value <= self.n_tensors:  # every block has tensors of its own
            raise self.fail(key, value, f"but the file has only {self.n_tensors} tensors")
        return value

    def text(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, value, f"must be a string, not {type(value).__name__}")
        return value


def read_config(get: Getter, tensor_shapes: Mapping[str, tuple[int, ...]],
                source: str) -> ModelConfig:
    """The ModelConfig a "deepseek" or "deepseek2" GGUF describes. ``get(key[, default])``
    reads metadata; ``tensor_shapes`` (name -> dims) tells tied embeddings and attention
    biases apart and bounds every size the metadata claims."""
    from dsmoe.checkpoint.gguf.mla import DEEPSEEK2

    meta = _Metadata(get, tensor_shapes, source)
    meta.arch = meta.text(_K.General.ARCHITECTURE)
    known = {a.name: a for a in (DEEPSEEK, DEEPSEEK2)}
    if meta.arch not in known:
        raise ValueError(f"{source}: GGUF architecture {meta.arch!r} is not supported; dsmoe "
                         "reads llama.cpp's 'deepseek' (DeepSeekMoE V1) and 'deepseek2' "
                         "(DeepSeek-V2/V2-Lite/V3) architectures")
    values, defaults = known[meta.arch].read(meta, tensor_shapes, _common_values(meta))
    stored = meta.text(DSMOE_CONFIG_KEY)
    hf = None if stored is None else _stored_hf_config(meta, stored)
    try:
        if hf is not None:
            for key, value in values.items():  # llama.cpp's keys win: llama.cpp runs them
                if not _same_value(hf.get(key), value):
                    hf[key] = value
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = ModelConfig.from_hf(hf)
        else:
            values.setdefault("bos_token_id", None)
            values.setdefault("eos_token_id", None)
            config = ModelConfig(**values, **defaults, torch_dtype="float32")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: the metadata describes an invalid model: {exc}") from exc
    _check_model_size(config, tensor_shapes, source)
    return config


def _common_values(meta: _Metadata) -> dict[str, Any]:
    """ModelConfig fields from the keys both architectures share, type- and bounds-checked."""
    values: dict[str, Any] = dict(
        num_hidden_layers=meta.blocks(),
        hidden_size=meta.size(_K.LLM.EMBEDDING_LENGTH),
        num_attention_heads=meta.size(_K.Attention.HEAD_COUNT),
        max_position_embeddings=_context_length(meta),
        rms_norm_eps=meta.decimal(_K.Attention.LAYERNORM_RMS_EPS, 1e-6),
        rope_theta=meta.decimal(_K.Rope.FREQ_BASE, 10000.0),
        tie_word_embeddings="output.weight" not in meta.shapes,
    )
    vocab = meta.size(_K.LLM.VOCAB_SIZE, None)
    if vocab is None:  # older converters: the token list's length is the vocabulary
        tokens = meta.get(_K.Tokenizer.LIST, None)
        vocab = len(tokens) if isinstance(tokens, list) else None
    if vocab is not None:
        values["vocab_size"] = vocab
    n_experts = meta.size(_K.LLM.EXPERT_COUNT, 0) or None
    values["n_routed_experts"] = n_experts
    if n_experts is not None:
        values.update(
            num_experts_per_tok=meta.size(_K.LLM.EXPERT_USED_COUNT),
            n_shared_experts=meta.size(_K.LLM.EXPERT_SHARED_COUNT, 0),
            moe_intermediate_size=meta.size(_K.LLM.EXPERT_FEED_FORWARD_LENGTH),
            first_k_dense_replace=meta.size(_K.LLM.LEADING_DENSE_BLOCK_COUNT, 0))
    if n_experts is None or values["first_k_dense_replace"] > 0:
        values["intermediate_size"] = meta.size(_K.LLM.FEED_FORWARD_LENGTH)
    else:
        values["intermediate_size"] = meta.size(_K.LLM.FEED_FORWARD_LENGTH,
                                                values["moe_intermediate_size"])
    for key, name in ((_K.Tokenizer.BOS_ID, "bos_token_id"), (_K.Tokenizer.EOS_ID, "eos_token_id")):
        token_id = meta.number(key, None, integer=True)
        if token_id is not None and not 0 <= token_id < values.get("vocab_size", token_id + 1):
            raise meta.fail(key, token_id, f"is outside the vocabulary ({vocab} tokens)")
        if token_id is not None:
            values[name] = token_id
    return values


def _read_v1(meta: _Metadata, tensor_shapes: Mapping[str, Any], values: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """V1's attention and RoPE keys; V1 routing as llama.cpp runs it when dsmoe's config is
    absent."""
    heads = values["num_attention_heads"]
    values.update(num_key_value_heads=meta.size(_K.Attention.HEAD_COUNT_KV, heads),
                  attention_bias="blk.0.attn_q.bias" in tensor_shapes)
    scaling_type = meta.text(meta.key(_K.Rope.SCALING_TYPE), "none")
    if scaling_type == "linear":
        values["rope_scaling"] = {"type": "linear",
                                  "factor": meta.decimal(_K.Rope.SCALING_FACTOR)}
    elif scaling_type not in ("none", None):
        raise ValueError(f"{meta.source}: rope scaling type {scaling_type!r} is not supported "
                         "(dsmoe reads none or linear from llama.cpp's deepseek metadata)")
    head_dim = values["hidden_size"] // heads if heads else 0
    key = meta.key(_K.Rope.DIMENSION_COUNT)
    rope_dim = meta.number(key, head_dim, integer=True)
    if rope_dim != head_dim:
        raise ValueError(f"{meta.source}: {key}={rope_dim} but head_dim = embedding_length / "
                         f"head_count = {head_dim}; dsmoe rotates whole heads only")
    return values, dict(norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
                        moe_layer_freq=1, routed_scaling_factor=1.0)


DEEPSEEK = Architecture(ARCH, _write_v1, _read_v1, _v1_problems)


def _check_model_size(config: ModelConfig, tensor_shapes: Mapping[str, tuple[int, ...]],
                      source: str) -> None:
    """Sizes that each pass alone can still multiply into an absurd model (4096 experts of a
    real width); the tensors' element count is what the file really holds, so a config
    claiming far more is refused before per-expert names or shapes are built for it."""
    from dsmoe.params import count_parameters

    implied = count_parameters(config).total
    held = sum(math.prod(shape) for shape in tensor_shapes.values())
    if implied > 2 * held + (1 << 20):  # slack: the metadata decides, check_tensors reports
        raise ValueError(f"{source}: the metadata describes a model of {implied} parameters, "
                         f"but the file's tensors hold {held}: corrupt or hostile metadata")


def _context_length(meta: _Metadata) -> int:
    """Generation sizes its KV cache by the context: a claim beyond any real model's is
    refused rather than trusted."""
    key = meta.key(_K.LLM.CONTEXT_LENGTH)
    value = meta.number(key, 4096, integer=True)
    if not 0 < value <= MAX_CONTEXT:
        raise meta.fail(key, value, f"must lie in [1, {MAX_CONTEXT}]")
    return value


def _stored_hf_config(meta: _Metadata, stored: str) -> dict[str, Any]:
    try:
        hf = json.loads(stored)
    except json.JSONDecodeError as exc:
        raise meta.fail(DSMOE_CONFIG_KEY, stored, f"is not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise meta.fail(DSMOE_CONFIG_KEY, stored,
                        f"must be a JSON object (an HF config), not a JSON {type(hf).__name__}")
    return hf


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _decimal(value: Any) -> float:
    """A float32 from the file as the shortest decimal that rounds to it: 1e-6 is stored as
    9.99999997e-07 and comes back as 1e-06, the value the writer meant."""
    return float(str(np.float32(value)))


def _same_value(stored: Any, value: Any) -> bool:
    """Whether the stored HF config already says what the metadata says: floats compared
    at float32 (GGUF's precision), dicts (rope_scaling) key by key, the stored dict's extra
    keys (what llama.cpp has no key for) kept."""
    if isinstance(stored, dict) and isinstance(value, dict):
        return all(_same_value(stored.get(k, stored.get("rope_type") if k == "type" else None),
                               v) for k, v in value.items())
    return _same_float32(stored, value)


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
        if not value or any(v != value[0] for v in value):
            raise ValueError(f"{source}: {key} varies per layer ({_short(value)}); "
                             "dsmoe needs the same value for every layer")
        return value[0]
    return value
