"""ModelConfig: one frozen, validated description of a DeepSeekMoE model.

Design choices:
- Field names are the HF DeepSeek config keys (``config.json`` of deepseek-moe-16b), so
  ``from_hf``/``to_hf`` are near-identity maps and the 16B config round-trips unchanged.
- The V2/V3 routing knobs (device-limited routing, capacity, aux-loss-free bias, ...)
  live beside them with defaults that reproduce V1 behaviour, and are written back to
  HF dicts only when set, so V1 checkpoints stay byte-for-byte V1.
- Validation happens once, in ``__post_init__``; every error names the key, its value
  and the fix. Unknown keys from HF dicts are kept in ``extra`` and reported, never lost.
- The attention kind is derived, not a flag: ``kv_lora_rank`` set means Multi-head Latent
  Attention (DeepSeek-V2/V3, ``model_type`` "deepseek_v2"/"deepseek_v3"), unset means V1's
  multi-head attention. Dicts of those model types get transformers' defaults for missing
  MLA keys, and ``to_hf`` always writes the keys transformers' V2/V3 configs default
  differently from dsmoe (``q_lora_rank`` null, ``n_group`` ...), so what dsmoe saves loads
  the same in transformers.
- ``MoEConfig`` is the part one MoE layer needs (sizes, routing, balance), exposed as
  ``ModelConfig.moe``: a lone layer (``MoELayer``, the ``MixtureOfExperts`` facade, expert
  parallelism) validates only that part, so a V2/V3 dict whose attention keys do not fit
  together still builds its MoE block, as transformers' does. Both classes declare those
  keys once, in ``_MoEKeys``, so their names and defaults cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "device_limited", "noaux_tc")
HIDDEN_ACTS = ("silu", "gelu", "relu")
# "yarn": DeepSeek-V2/V3 checkpoints ship it (frequencies and softmax scale in model/rope.py).
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")
ATTENTION_TYPES = ("mha", "mla")

# Keys of the real deepseek-moe-16b config.json: always written by ``to_hf``.
_CORE_HF_KEYS = (
    "architectures", "attention_bias", "attention_dropout", "auto_map", "bos_token_id",
    "eos_token_id", "first_k_dense_replace", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "model_type",
    "moe_intermediate_size", "moe_layer_freq", "n_routed_experts", "n_shared_experts",
    "norm_topk_prob", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers",
    "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta",
    "scoring_func", "tie_word_embeddings", "torch_dtype", "transformers_version",
    "use_cache", "vocab_size",
)

# Keys that DeepSeek-V2/V3 and transformers write beside dsmoe's fields (derived head sizes,
# MLA's ``rope_interleave`` and FP8's ``quantization_config``, read from ``extra`` where
# used; generic PretrainedConfig fields): kept in ``extra`` silently.
_KNOWN_UNUSED_KEYS = frozenset({
    "qk_head_dim", "head_dim", "rope_interleave", "num_mtp_layers", "quantization_config",
    "ep_size", "mlp_bias", "output_router_logits", "id2label",
    "label2id", "return_dict", "output_hidden_states", "output_attentions", "dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "_name_or_path",
    "tokenizer_class", "num_experts", "num_local_experts", "router_aux_loss_coef",
})

DEEPSEEK_MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# The causal-LM class each model_type's checkpoints name in config.json's "architectures"
# (what a config built without one gets, so a V2 model is never saved as V1's class).
CAUSAL_LM_CLASSES = {"deepseek": "DeepseekForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                     "deepseek_v3": "DeepseekV3ForCausalLM"}

# transformers' DeepseekV2Config / DeepseekV3Config defaults for MLA keys a dict leaves out.
_MLA_DEFAULTS = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128)
# Written by ``to_hf`` for every V2/V3 config: transformers' defaults for them differ from
# dsmoe's (V3: n_group 8, routed_scaling_factor 2.5, one MTP layer; V2: q_lora_rank 1536).
_V2_V3_HF_KEYS = (*_MLA_DEFAULTS, "n_group", "topk_group", "topk_method",
                  "routed_scaling_factor", "num_nextn_predict_layers")


@dataclass(frozen=True, kw_only=True)
class _MoEKeys:
    """The config keys of one MoE layer, shared by ``MoEConfig`` and ``ModelConfig`` (which
    inherit them): HF DeepSeek (V1) keys first, then the V2/V3 routing and balancing keys.
    Defaults = one layer of deepseek-moe-16b."""

    # --- sizes and activation (HF DeepSeek V1 keys) -------------------------------------
    hidden_size: int = 2048
    moe_intermediate_size: int = 1408
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # --- routing and balance (HF DeepSeek V1 keys) --------------------------------------
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # --- V2 / V3 routing and balancing ------------------------------------------------
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    device_balance_alpha: float = 0.0
    comm_balance_alpha: float = 0.0
    n_devices: int = 1
    max_devices_per_token: int | None = None
    capacity_factor: float = 1.0
    drop_tokens: bool = False
    bias_update_speed: float = 0.0
    z_loss_alpha: float = 0.0

    @property
    def group_size(self) -> int:
        """Experts per routing group (group-limited routing) or per device."""
        n = self.n_devices if self.topk_method == "device_limited" else self.n_group
        return (self.n_routed_experts or 0) // n

    @property
    def max_devices(self) -> int:
        """M: at most this many devices per token (defaults to all of them)."""
        return self.max_devices_per_token or self.n_devices

    @property
    def uses_bias_balancing(self) -> bool:
        """V3's aux-loss-free balancing: a per-expert bias picks experts, not weights."""
        return self.topk_method == "noaux_tc"


MOE_KEYS = tuple(f.name for f in dataclasses.fields(_MoEKeys))


@dataclass(frozen=True, kw_only=True)
class MoEConfig(_MoEKeys):
    """What one MoE layer needs: sizes, routing and balance (``ModelConfig.moe``).

    Same key names and defaults as ``ModelConfig``; ``n_routed_experts`` and
    ``num_experts_per_tok`` must be set (a dense model has no MoE layer)."""

    def __post_init__(self) -> None:
        _validate_routing(self)
        _validate_moe(self)

    def replace(self, **changes: Any) -> "MoEConfig":
        """A validated copy with ``changes``; unknown names raise ``ValueError``."""
        _check_field_names(changes, MoEConfig)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "MoEConfig":
        """The MoE part of an HF DeepSeek V1/V2/V3 config dict. The other keys (attention,
        vocabulary, layers) are neither read nor validated."""
        hf = ModelConfig._normalized_hf(hf)
        return cls(**{k: v for k, v in hf.items() if k in MOE_KEYS})


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_MoEKeys):
    """Every HF DeepSeek config key plus the V2/V3 routing keys. Defaults = deepseek-moe-16b.
    The MoE layer's keys (sizes, routing, balance) are inherited from ``_MoEKeys``."""

    # --- HF DeepSeek (V1) keys -------------------------------------------------------
    vocab_size: int = 102400
    intermediate_size: int = 10944
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- DeepSeek-V2/V3 Multi-head Latent Attention (kv_lora_rank None: V1's MHA) -------
    q_lora_rank: int | None = None  # None: a full q_proj (V2-Lite); else q_a -> norm -> q_b
    kv_lora_rank: int | None = None  # C: the latent each token caches (plus its rope key)
    qk_nope_head_dim: int | None = None  # per-head query/key part without position
    qk_rope_head_dim: int | None = None  # per-head query part, and the shared key, with RoPE
    v_head_dim: int | None = None
    num_nextn_predict_layers: int = 0  # V3's multi-token-prediction layers (not run here)
    # --- HF bookkeeping keys ---------------------------------------------------------
    model_type: str = "deepseek"
    architectures: tuple[str, ...] | None = None  # None: the class of ``model_type``
    auto_map: dict[str, str] | None = None
    torch_dtype: str | None = "bfloat16"
    transformers_version: str | None = None
    # --- not config values: unknown HF keys, and which keys an HF dict spelled out ----
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    hf_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.architectures, list):
            object.__setattr__(self, "architectures", tuple(self.architectures))
        if self.architectures is None and self.model_type in CAUSAL_LM_CLASSES:
            object.__setattr__(self, "architectures", (CAUSAL_LM_CLASSES[self.model_type],))
        _validate(self)

    # --- derived values ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_type(self) -> str:
        """"mla" (DeepSeek-V2/V3 latent attention) or "mha" (V1), a key of ATTENTION_TYPES."""
        return "mla" if self.kv_lora_rank is not None else "mha"

    @property
    def rope_head_dim(self) -> int:
        """Dimensions RoPE rotates per head: MLA's decoupled ``qk_rope_head_dim``, else all."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    @cached_property
    def moe(self) -> MoEConfig | None:
        """The MoE layers' config (``None`` for a dense model), built and validated once."""
        if self.n_routed_experts is None:
            return None
        return MoEConfig(**{k: getattr(self, k) for k in MOE_KEYS})

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE past the first dense layers, every ``moe_layer_freq``."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def unknown_keys(self) -> tuple[str, ...]:
        """Keys from an HF dict that dsmoe keeps but does not understand."""
        return tuple(k for k in self.extra if k not in _KNOWN_UNUSED_KEYS)

    # --- construction -----------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with ``changes``; unknown names raise ``ValueError``."""
        _check_field_names(changes, ModelConfig)
        return dataclasses.replace(self, **changes)

    def override(self, assignments: Mapping[str, str] | list[str]) -> "ModelConfig":
        """Apply ``key=value`` strings (the CLI's ``--set``), parsing values by field type."""
        if not isinstance(assignments, Mapping):
            pairs = {}
            for item in assignments:
                if "=" not in item:
                    raise ValueError(f"--set expects key=value, got {item!r}")
                key, value = item.split("=", 1)
                pairs[key.strip()] = value.strip()
            assignments = pairs
        _check_field_names(assignments, ModelConfig)
        return self.replace(**{k: _parse_value(k, v) for k, v in assignments.items()})

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A named configuration: ``tiny`` for tests and demos, the paper's sizes otherwise."""
        from dsmoe.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    # --- HF dict conversion ---------------------------------------------------------
    @staticmethod
    def _normalized_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of an HF DeepSeek dict in dsmoe's spelling: transformers 5's
        ``rope_parameters``, V3's implied routing, ``None`` groups."""
        if not isinstance(hf, Mapping):
            raise ValueError(f"from_hf expects a dict, got {type(hf).__name__}")
        hf = copy.deepcopy(dict(hf))
        model_type = hf.get("model_type", "deepseek")
        if model_type not in DEEPSEEK_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a DeepSeekMoE config; "
                f"expected one of {DEEPSEEK_MODEL_TYPES}"
            )
        rope_parameters = hf.pop("rope_parameters", None)
        if isinstance(rope_parameters, Mapping):
            hf.setdefault("rope_theta", rope_parameters.get("rope_theta", 10000.0))
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default" and "rope_scaling" not in hf:
                # keep every scaling parameter (YaRN's beta_fast, mscale, ...), not just factor
                hf["rope_scaling"] = {"type": rope_type, "factor": 1.0, **{
                    k: v for k, v in rope_parameters.items()
                    if k not in ("rope_type", "type", "rope_theta")}}
        if model_type in MLA_MODEL_TYPES:
            for key, default in _MLA_DEFAULTS.items():
                hf.setdefault(key, default)
        if model_type == "deepseek_v3":
            hf.setdefault("num_nextn_predict_layers", 1)  # transformers' V3 default
            hf.setdefault("scoring_func", "sigmoid")
            hf.setdefault("topk_method", "noaux_tc")
        for key in ("n_group", "topk_group"):  # transformers writes None for "no groups"
            if key in hf and hf[key] is None:
                hf[key] = 1
        if hf.get("topk_method") == "noaux_tc" and "seq_aux" not in hf:
            hf["seq_aux"] = True
        return hf

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, warn_unknown: bool = True) -> "ModelConfig":
        """Read an HF config dict of DeepSeek V1 (``deepseek``), V2 or V3.

        V2/V3 dicts get transformers' defaults for the MLA keys they leave out. Keys dsmoe
        does not know are kept in ``extra`` and reported.
        """
        given = tuple(hf) if isinstance(hf, Mapping) else ()
        hf = cls._normalized_hf(hf)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "hf_keys"}
        kwargs = {k: v for k, v in hf.items() if k in names}
        extra = {k: v for k, v in hf.items() if k not in names}
        if "architectures" in kwargs and kwargs["architectures"] is None:
            kwargs["architectures"] = ()
        cfg = cls(**kwargs, extra=extra, hf_keys=given)
        if warn_unknown and cfg.unknown_keys:
            warnings.warn(
                f"config keys not used by dsmoe (kept as they are): {', '.join(cfg.unknown_keys)}",
                stacklevel=2,
            )
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict: the 16B keys, every key the source spelled out, every
        non-default routing key, and the unknown keys kept from ``from_hf``."""
        out: dict[str, Any] = {}
        always = _CORE_HF_KEYS + (_V2_V3_HF_KEYS if self.model_type in MLA_MODEL_TYPES else ())
        for f in dataclasses.fields(self):
            if f.name in ("extra", "hf_keys"):
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.name in always or f.name in self.hf_keys or value != default:
                out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_hf(data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_hf(), indent=2) + "\n"


# --- validation -------------------------------------------------------------------------
def _fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"invalid config: {key}={value!r}: {why}")


def _check_positive_ints(c: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(c, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(key, value, "must be a positive integer")


def _check_non_negative(c: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(c, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                or not math.isfinite(value):
            _fail(key, value, "must be a finite number >= 0")


def _validate(c: ModelConfig) -> None:
    """The whole model; the MoE keys through the same checks as ``MoEConfig``."""
    _check_positive_ints(c, ("vocab_size", "hidden_size", "intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                             "moe_layer_freq", "max_position_embeddings", "pretraining_tp"))
    _validate_attention(c)
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        _fail("first_k_dense_replace", c.first_k_dense_replace,
              f"must lie in [0, num_hidden_layers={c.num_hidden_layers}]")
    if not c.rms_norm_eps > 0:
        _fail("rms_norm_eps", c.rms_norm_eps, "must be > 0")
    if not c.rope_theta > 0:
        _fail("rope_theta", c.rope_theta, "must be > 0")
    _validate_rope_scaling(c.rope_scaling)
    _check_non_negative(c, ("attention_dropout",))
    _validate_routing(c)
    if c.n_routed_experts is None:
        return  # a dense model: the routing keys are unused
    _validate_moe(c)


def _validate_routing(c: _MoEKeys) -> None:
    """The MoE keys that do not depend on the expert count (checked for dense models too)."""
    _check_positive_ints(c, ("hidden_size", "moe_intermediate_size", "n_group", "topk_group",
                             "n_devices"))
    if c.hidden_act not in HIDDEN_ACTS:
        _fail("hidden_act", c.hidden_act, f"choose one of {HIDDEN_ACTS}")
    if c.scoring_func not in SCORING_FUNCS:
        _fail("scoring_func", c.scoring_func, f"choose one of {SCORING_FUNCS}")
    if c.topk_method not in TOPK_METHODS:
        _fail("topk_method", c.topk_method, f"choose one of {TOPK_METHODS}")
    _check_non_negative(c, ("aux_loss_alpha", "device_balance_alpha", "comm_balance_alpha",
                            "bias_update_speed", "z_loss_alpha"))
    if not c.capacity_factor > 0:
        _fail("capacity_factor", c.capacity_factor, "must be > 0 (e.g. 1.0 or 1.25)")
    if not c.routed_scaling_factor > 0:
        _fail("routed_scaling_factor", c.routed_scaling_factor, "must be > 0")


def _validate_attention(c: ModelConfig) -> None:
    if c.num_attention_heads % c.num_key_value_heads:
        _fail("num_key_value_heads", c.num_key_value_heads,
              f"must divide num_attention_heads={c.num_attention_heads}")
    if not isinstance(c.num_nextn_predict_layers, int) or c.num_nextn_predict_layers < 0:
        _fail("num_nextn_predict_layers", c.num_nextn_predict_layers, "must be an integer >= 0")
    if c.attention_type == "mla":
        _validate_mla(c)
        return
    if c.model_type in MLA_MODEL_TYPES:
        _fail("kv_lora_rank", c.kv_lora_rank, f"model_type {c.model_type!r} uses Multi-head "
              "Latent Attention: set kv_lora_rank (and the other MLA sizes)")
    if c.hidden_size % c.num_attention_heads:
        _fail("num_attention_heads", c.num_attention_heads,
              f"must divide hidden_size={c.hidden_size}")
    if c.head_dim % 2:
        _fail("hidden_size", c.hidden_size, f"head_dim={c.head_dim} must be even for RoPE")


def _validate_mla(c: ModelConfig) -> None:
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        value = getattr(c, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(key, value, "must be a positive integer for Multi-head Latent Attention")
    q = c.q_lora_rank
    if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q < 1):
        _fail("q_lora_rank", q, "must be a positive integer, or null for a full q_proj")
    if c.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", c.qk_rope_head_dim, "must be even for RoPE")
    if c.model_type not in MLA_MODEL_TYPES:
        _fail("model_type", c.model_type, "Multi-head Latent Attention (kv_lora_rank="
              f"{c.kv_lora_rank}) needs model_type 'deepseek_v2' or 'deepseek_v3'")
    if c.num_key_value_heads != c.num_attention_heads:
        _fail("num_key_value_heads", c.num_key_value_heads, "MLA gives every head its own "
              f"key and value: must equal num_attention_heads={c.num_attention_heads}")


def _validate_rope_scaling(scaling: Any) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, Mapping):
        _fail("rope_scaling", scaling, 'must be null or {"type": "linear"|"dynamic", "factor": f}')
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        _fail("rope_scaling", scaling, f"type must be one of {ROPE_SCALING_TYPES}")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or not factor >= 1:
        _fail("rope_scaling", scaling, "factor must be a number >= 1")
    if kind == "yarn":
        original = scaling.get("original_max_position_embeddings")
        if not isinstance(original, int) or isinstance(original, bool) or original < 1:
            _fail("rope_scaling", scaling, "yarn needs original_max_position_embeddings, "
                  "a positive integer (the pretraining context, e.g. 4096)")
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = scaling.get(key, 1)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                    or not math.isfinite(value):
                _fail("rope_scaling", scaling, f"yarn's {key} must be a finite number >= 0")


def _validate_moe(c: _MoEKeys) -> None:
    E, K = c.n_routed_experts, c.num_experts_per_tok
    if not isinstance(E, int) or E < 1:
        _fail("n_routed_experts", E, "must be a positive integer (or null for a dense model)")
    if not isinstance(K, int) or K < 1:
        _fail("num_experts_per_tok", K, "must be a positive integer when experts are routed")
    if K > E:
        _fail("num_experts_per_tok", K, f"top-k cannot exceed n_routed_experts={E}; lower it")
    if c.n_shared_experts is not None and c.n_shared_experts < 0:
        _fail("n_shared_experts", c.n_shared_experts, "must be >= 0 or null")
    if E % c.n_group:
        _fail("n_group", c.n_group, f"must divide n_routed_experts={E}")
    if c.topk_group > c.n_group:
        _fail("topk_group", c.topk_group, f"cannot exceed n_group={c.n_group}")
    if E % c.n_devices:
        _fail("n_devices", c.n_devices,
              f"n_routed_experts={E} is not divisible by it; pick a divisor of {E}")
    M = c.max_devices_per_token
    if M is not None and not 1 <= M <= c.n_devices:
        _fail("max_devices_per_token", M,
              f"M must lie in [1, n_devices={c.n_devices}]; lower it or raise n_devices")
    if c.topk_method in ("group_limited_greedy", "noaux_tc"):
        if c.topk_group * (E // c.n_group) < K:
            _fail("topk_group", c.topk_group,
                  f"{c.topk_group} groups of {E // c.n_group} experts cannot hold top-k={K}; "
                  "raise topk_group")
    if c.topk_method == "noaux_tc" and E // c.n_group < 2:
        _fail("n_group", c.n_group, "noaux_tc ranks groups by their two best experts: "
              "each group needs >= 2 experts")
    if c.topk_method == "device_limited" and c.max_devices * (E // c.n_devices) < K:
        _fail("max_devices_per_token", M,
              f"{c.max_devices} devices of {E // c.n_devices} experts cannot hold top-k={K}")
    if c.bias_update_speed > 0 and not c.uses_bias_balancing:
        _fail("bias_update_speed", c.bias_update_speed,
              'aux-loss-free bias balancing needs topk_method="noaux_tc"')


def check_expert_split(n_experts: int, ep_size: int) -> None:
    """The one divisibility check of expert parallelism (training, ``dsmoe plan``): each of
    the ``ep_size`` ranks owns E/N experts."""
    if n_experts % ep_size:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by --ep {ep_size}; "
                         f"pick an EP size that divides {n_experts}")


def _check_field_names(names: Mapping[str, Any], config_class: type) -> None:
    known = [f.name for f in dataclasses.fields(config_class)]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {name!r}{hint}")


def _parse_value(key: str, text: Any) -> Any:
    """Parse a ``--set`` value: JSON first (numbers, true/false, null, dicts), else a string."""
    if not isinstance(text, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        value = {"true": True, "false": False, "none": None}.get(lowered, text)
    current = ModelConfig.__dataclass_fields__[key].default
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value
