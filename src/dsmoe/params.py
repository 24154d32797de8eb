"""Parameter counts and weight memory of a ModelConfig, computed from shapes alone (no model
is built), so ``dsmoe info`` and ``dsmoe plan`` can size a 145B model on a laptop.

Conventions:
- Counts are of parameters, i.e. the tensors of an HF checkpoint minus buffers (V3's
  routing bias, 1 float per expert, is checkpointed but not a parameter). A tied
  ``lm_head`` is counted once.
- Active parameters per token: every weight a token's forward pass reads, which is all of
  them except the routed experts it is not sent to: embedding and lm_head, attention,
  norms, dense FFNs, routers, shared experts and the top-K routed experts of each MoE layer.
  This is the convention of the DeepSeekMoE paper (16.4B total, 2.8B active for 16B).
  DeepSeek-V2's papers leave the input embedding out (V2-Lite: 15.7B total, 2.4B active):
  ``active_without_input_embedding``.
- V3's multi-token-prediction module is stored in checkpoints but not run by dsmoe: it is
  counted apart (``mtp_parameters``; V3: 671B + 14B).
- Memory is weights only, at a fixed number of bits per parameter: no KV cache,
  activations, optimizer state or quantisation scales.
- Bytes per decode step (``decode_step_bytes``): what one forward over B new tokens must
  read from memory, which bounds decode speed on a CPU (steps/s <= GB/s / bytes). Every
  weight except the routed experts is read once whatever B is; the routed experts read
  are the *union* over the B tokens (at B = 8 with top-6 of 64 that is about half of
  them, not 8 x 6), so it takes how many distinct experts each MoE layer was sent to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from dsmoe.config import ModelConfig

# Bits per parameter of the formats ``dsmoe info`` reports.
WEIGHT_FORMATS: dict[str, int] = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by kind, summed over all layers."""

    embedding: int  # embed_tokens [V, D]
    lm_head: int  # [V, D]; 0 when tied to the embedding
    attention: int  # MHA: q, k, v, o (+ biases); MLA: its projections and latent norms
    norms: int  # two RMSNorms per layer + the final one
    dense_mlp: int  # dense SwiGLU FFNs
    routers: int  # gate [E, D] per MoE layer
    shared_experts: int  # shared experts of every MoE layer
    routed_experts: int  # every routed expert of every MoE layer
    active_routed_experts: int  # top-K routed experts per MoE layer (used by one token)

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.attention + self.norms + self.dense_mlp
                + self.routers + self.shared_experts + self.routed_experts)

    @property
    def active(self) -> int:
        """Parameters one token uses (see the module docstring)."""
        return self.total - self.routed_experts + self.active_routed_experts

    @property
    def non_embedding(self) -> int:
        """Total without the embedding and lm_head matrices."""
        return self.total - self.embedding - self.lm_head

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding - self.lm_head

    @property
    def active_without_input_embedding(self) -> int:
        """Active parameters with lm_head but not the input embedding (a lookup, not a
        matmul): DeepSeek-V2's convention (V2-Lite's 2.4B). A tied matrix is kept: it is
        the lm_head too."""
        return self.active - self.embedding if self.lm_head else self.active


def swiglu_parameters(hidden_size: int, width: int) -> int:
    """gate, up [F, D] and down [D, F] without biases."""
    return 3 * hidden_size * width


def mha_parameters(c: ModelConfig) -> int:
    """One layer's q, k, v, o projections (+ biases)."""
    D, d = c.hidden_size, c.head_dim
    q_out, kv_out = c.num_attention_heads * d, c.num_key_value_heads * d
    return D * q_out + 2 * D * kv_out + q_out * D + (
        q_out + 2 * kv_out + D if c.attention_bias else 0)


def mla_parameters(c: ModelConfig) -> int:
    """One layer's MLA projections and latent norms (+ the biases ``attention_bias`` adds
    to q_a_proj, kv_a_proj_with_mqa and o_proj)."""
    D, H, C, r = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    qk = c.qk_nope_head_dim + r
    bias = c.attention_bias
    if c.q_lora_rank is None:
        queries = D * H * qk
    else:
        Q = c.q_lora_rank
        queries = D * Q + (Q if bias else 0) + Q + Q * H * qk
    latent = D * (C + r) + (C + r if bias else 0) + C + C * H * (c.qk_nope_head_dim + c.v_head_dim)
    return queries + latent + H * c.v_head_dim * D + (D if bias else 0)


# One layer's attention parameters, by ``config.attention_type``.
ATTENTION_PARAMETERS = {"mha": mha_parameters, "mla": mla_parameters}


def attention_widths(config: ModelConfig) -> tuple[int, int, int, int]:
    """Values per token of one layer's queries, keys, values and attention output, over
    all heads: (q, k, v, o). MLA counts its expanded form (training, prefill): every head's
    key is qk_nope + qk_rope wide, its value v_head_dim."""
    c = config
    if c.attention_type == "mla":
        qk = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        v = c.num_attention_heads * c.v_head_dim
        return qk, qk, v, v
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return q, kv, kv, q


def mtp_parameters(config: ModelConfig) -> int:
    """Parameters of V3's multi-token-prediction module(s) as checkpoints store them (not in
    ``count_parameters``: dsmoe does not run them). Each: its own embedding and output
    head copies [V, D], norms of the hidden state and of the embedding, eh_proj [D, 2D], one
    MoE decoder layer and its final norm."""
    c = config
    D, V = c.hidden_size, c.vocab_size
    E = c.n_routed_experts or 0
    expert = swiglu_parameters(D, c.moe_intermediate_size)
    layer = (ATTENTION_PARAMETERS[c.attention_type](c) + 2 * D + E * D
             + (E + (c.n_shared_experts or 0)) * expert)
    return c.num_nextn_predict_layers * (2 * V * D + 2 * D + 2 * D * D + layer + D)


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Count every parameter of ``Transformer(config)`` from the config alone."""
    c = config
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    attention = ATTENTION_PARAMETERS[c.attention_type](c)
    n_moe = len(c.moe_layer_indices)
    E, K = c.n_routed_experts or 0, c.num_experts_per_tok or 0
    expert = swiglu_parameters(D, c.moe_intermediate_size)
    return ParameterCount(
        embedding=V * D,
        lm_head=0 if c.tie_word_embeddings else V * D,
        attention=L * attention,
        norms=(2 * L + 1) * D,
        dense_mlp=(L - n_moe) * swiglu_parameters(D, c.intermediate_size),
        routers=n_moe * E * D,
        shared_experts=n_moe * (c.n_shared_experts or 0) * expert,
        routed_experts=n_moe * E * expert,
        active_routed_experts=n_moe * K * expert,
    )


def weight_bytes(n_parameters: int, fmt: str) -> int:
    """Bytes of ``n_parameters`` weights stored in ``fmt`` (a key of WEIGHT_FORMATS)."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {sorted(WEIGHT_FORMATS)}")
    return (n_parameters * WEIGHT_FORMATS[fmt] + 7) // 8


@dataclass(frozen=True)
class DecodeStepBytes:
    """Weight bytes one decode step reads, by kind, summed over all layers."""

    embedding: int  # the B looked-up rows of embed_tokens
    attention: int
    norms: int
    dense_mlp: int
    routers: int
    shared_experts: int
    routed_experts: int  # the distinct experts hit, per MoE layer
    lm_head: int  # [V, D]: the embedding matrix itself when tied

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def decode_step_bytes(config: ModelConfig, fmt: str, batch: int,
                      experts_hit: Sequence[float]) -> DecodeStepBytes:
    """Weight bytes (in ``fmt``, a key of WEIGHT_FORMATS) one decode step of ``batch``
    tokens reads when MoE layer i sends them to ``experts_hit[i]`` distinct routed experts
    (a mean over steps may be fractional). No KV cache: its size depends on the context."""
    c = config
    counts = count_parameters(c)
    E = c.n_routed_experts or 0
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if len(experts_hit) != len(c.moe_layer_indices):
        raise ValueError(f"experts_hit has {len(experts_hit)} entries for "
                         f"{len(c.moe_layer_indices)} MoE layers")
    if any(not 0 <= hit <= E for hit in experts_hit):
        raise ValueError(f"experts_hit must lie in [0, n_routed_experts={E}], got "
                         f"{list(experts_hit)}")
    expert = swiglu_parameters(c.hidden_size, c.moe_intermediate_size)

    def size(n: float) -> int:
        return weight_bytes(round(n), fmt)

    return DecodeStepBytes(
        embedding=size(min(batch, c.vocab_size) * c.hidden_size),
        attention=size(counts.attention), norms=size(counts.norms),
        dense_mlp=size(counts.dense_mlp), routers=size(counts.routers),
        shared_experts=size(counts.shared_experts),
        routed_experts=size(sum(experts_hit) * expert),
        lm_head=size(counts.lm_head or counts.embedding))


def weight_memory(config: ModelConfig) -> dict[str, int]:
    """Bytes of all weights in each of WEIGHT_FORMATS."""
    total = count_parameters(config).total
    return {fmt: weight_bytes(total, fmt) for fmt in WEIGHT_FORMATS}
