"""What one rank holds while training: the memory model behind ``dsmoe plan``.

Computed from a ModelConfig alone (nothing is built), so the 145B preset plans in a
second; tests/test_plan.py checks it against real models and measured processes.

The layout (``Layout``): ``ep`` ranks share the routed experts (E/ep each); with ``fsdp``
(FSDP2 ``fully_shard`` per block, ZeRO-3) every parameter, gradient and optimizer state is
sharded further: non-expert tensors over all N ranks, an expert block over the N/ep ranks
that hold it, so each rank keeps 1/N of everything. Without FSDP everything but the routed
experts is replicated (DDP).

Bytes per parameter (b = bytes of the compute dtype):
- training and full finetuning: weights b, gradients b, AdamW state 8 (two fp32 moments)
  + 4 for an fp32 master copy when b < 4 (bf16: 2 + 2 + 12 = 16, fp32: 4 + 4 + 8 = 16).
  FSDP2's mixed precision keeps fp32 shards (the master) and fp32 sharded gradients
  instead: the same 16 bytes, split 4 + 4 + 8.
- LoRA finetuning (``dsmoe finetune`` without ``--full``): the frozen base weights at b
  with no gradient or optimizer state; the adapters (``dsmoe.finetune.lora``: A [r, in],
  B [out, r] per targeted linear, one pair per routed expert) are fp32 whatever b:
  4 + 4 + 8. Expert adapters are split with their experts.
- ``cpu_offload`` (FSDP only: FSDP2's ``CPUOffloadPolicy``, ``dsmoe train --fsdp
  --offload-optimizer``) keeps the sharded weights, gradients and optimizer state in host
  memory and steps there; the device holds only what is gathered and the activations.
- FSDP's transient memory, with units as ``dsmoe.distributed.fsdp`` wraps them: the root
  (embedding, final norm, lm_head) stays gathered from its forward to the end of
  backward, with its unsharded gradients; the largest block (with its EP-local expert
  block, itself a unit unless ep = N) twice (the one computing and the one prefetched),
  plus one block's unsharded gradients before their reduce-scatter.

Activations kept for backward, per token, in the compute dtype unless noted (a fused
attention stores no S x S scores):
  attention block   2D (residual, norm) + q + k + v + o (``params.attention_widths``)
  FFN block         2D (residual, norm) +
    dense           4 I (gate, act(gate), up, act(gate) * up: SwiGLUMLP's autograd)
    MoE             2E fp32 (logits, scores) + 4 F n_shared + K (2D + 3F) (each routed
                    assignment: gathered input, gate/up, product, expert output; the
                    experts' fused SwiGLU backward recomputes act(gate))
  LoRA              per adapted projection its fp32 input (dropout) and r-wide A x, per
                    token (per assignment for experts): an upper bound, since frozen base
                    matmuls need not keep their inputs
  head              D (lm_head's input) + V fp32 (the loss's log-probabilities; the
                    logits and their fp32 upcast are not kept)
With activation checkpointing only each block's input (D) is kept, plus one block's
activations while backward replays it. A rank holds its own tokens' activations; under
balanced routing the assignments it computes for other ranks equal the ones others
compute for it.

Communication per step per rank (to rank layouts, not to time them): DDP all-reduces
trainable gradients (ring: 2 (W - 1)/W bytes over W ranks); FSDP all-gathers each
block's weights in forward and again in backward (the root's once) and reduce-scatters
gradients ((S - 1)/S each, S the ranks sharing a shard); expert parallelism adds the
all-to-all (``dsmoe.plan``).

Shapes: D hidden, E experts, K picks, F expert width, I dense width, V vocab, L layers,
r LoRA rank, N devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe.config import ModelConfig
from dsmoe.params import ATTENTION_PARAMETERS, attention_widths, swiglu_parameters

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ADAPTER_BYTES = 4  # LoRA adapters are fp32 whatever the base dtype
MOMENT_BYTES = 8  # AdamW's two fp32 moments
MASTER_BYTES = 4  # fp32 master weights under mixed precision
PREFETCH = 2  # FSDP units unsharded at once: the one computing and the next one
METHODS = ("train", "full", "lora")  # pretraining, full finetuning, LoRA finetuning


@dataclass(frozen=True)
class Layout:
    """How the training state is spread over the ranks (what ``--memory`` searches)."""

    ep: int = 1
    fsdp: bool = False
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    @property
    def label(self) -> str:
        parts = [f"EP {self.ep}", "FSDP" if self.fsdp else "DDP"]
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        if self.cpu_offload:
            parts.append("CPU offload")
        return ", ".join(parts)


@dataclass(frozen=True)
class Split:
    """Parameters by how a layout splits them: ``dense`` = all but the routed experts,
    ``experts`` = routed experts (all E of them)."""

    dense: float = 0
    experts: float = 0

    def __add__(self, other: "Split") -> "Split":
        return Split(self.dense + other.dense, self.experts + other.experts)

    @property
    def total(self) -> float:
        return self.dense + self.experts

    def local(self, ep: int) -> float:
        """What one EP rank computes with: the dense part and its E/ep experts."""
        return self.dense + self.experts / ep

    def per_rank(self, devices: int, layout: Layout) -> float:
        """What one rank stores: FSDP shards the EP-local part over devices/ep ranks,
        so 1/devices of everything."""
        return self.total / devices if layout.fsdp else self.local(layout.ep)


# --- parameters by FSDP unit ---------------------------------------------------------------
def block_parameters(config: ModelConfig, layer: int) -> Split:
    """One decoder block: attention, two norms, its dense or MoE feed-forward."""
    c = config
    D = c.hidden_size
    dense = ATTENTION_PARAMETERS[c.attention_type](c) + 2 * D
    if not c.is_moe_layer(layer):
        return Split(dense + swiglu_parameters(D, c.intermediate_size), 0)
    E, expert = c.n_routed_experts, swiglu_parameters(D, c.moe_intermediate_size)
    return Split(dense + E * D + (c.n_shared_experts or 0) * expert, E * expert)


def unit_parameters(config: ModelConfig) -> list[Split]:
    """FSDP units as ``dsmoe.distributed.fsdp`` wraps them: first the root (embedding,
    final norm, lm_head; a tied lm_head counted once), then each block (its expert block
    is a unit of its own, gathered with it)."""
    c = config
    D, V = c.hidden_size, c.vocab_size
    root = V * D + D + (0 if c.tie_word_embeddings else V * D)
    return [Split(root), *(block_parameters(c, i) for i in range(c.num_hidden_layers))]


def _attention_linears(config: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """LoRA target -> (in, out) of each linear it adapts in one block's attention (the
    modules ``dsmoe.finetune.lora.ATTENTION_SITES`` names)."""
    c = config
    D, H = c.hidden_size, c.num_attention_heads
    if c.attention_type == "mla":
        qk = H * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        Q, C = c.q_lora_rank, c.kv_lora_rank
        return {"q": [(D, qk)] if Q is None else [(D, Q), (Q, qk)],
                "k": [(D, C + c.qk_rope_head_dim)],
                "v": [(C, H * (c.qk_nope_head_dim + c.v_head_dim))],
                "o": [(H * c.v_head_dim, D)]}
    q, kv = H * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"q": [(D, q)], "k": [(D, kv)], "v": [(D, kv)], "o": [(q, D)]}


def _ffn_linears(config: ModelConfig, layer: int) -> dict[str, list[tuple[int, int, int]]]:
    """LoRA target -> (copies, in, out) of the feed-forward linears it adapts: copies is
    the number of stacked adapters (E for routed experts) of that shape."""
    c = config
    D = c.hidden_size
    if not c.is_moe_layer(layer):
        I = c.intermediate_size
        return {"gate": [(1, D, I)], "up": [(1, D, I)], "down": [(1, I, D)]}
    E, F, S = c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts or 0
    shared = [(1, D, S * F), (1, D, S * F), (1, S * F, D)] if S else []
    return {"gate": [(E, D, F)], "up": [(E, D, F)], "down": [(E, F, D)],
            "shared": shared, "router": [(1, D, E)]}


def lora_block_parameters(config: ModelConfig, layer: int, r: int,
                          targets: tuple[str, ...]) -> Split:
    """Adapter parameters of one block: r (in + out) per adapted linear."""
    attention = _attention_linears(config)
    dense = sum(r * (i + o) for t in targets for i, o in attention.get(t, []))
    experts = 0
    moe = config.is_moe_layer(layer)
    for t in targets:
        for copies, i, o in _ffn_linears(config, layer).get(t, []):
            if moe and t in ("gate", "up", "down"):
                experts += copies * r * (i + o)
            else:
                dense += copies * r * (i + o)
    return Split(dense, experts)


def lora_unit_parameters(config: ModelConfig, r: int, targets: tuple[str, ...]) -> list[Split]:
    """Adapters per FSDP unit, aligned with ``unit_parameters`` (none in the root)."""
    return [Split(), *(lora_block_parameters(config, i, r, targets)
                       for i in range(config.num_hidden_layers))]


# --- activations -------------------------------------------------------------------------------
def block_activation_bytes(config: ModelConfig, layer: int, b: int,
                           lora: tuple[int, tuple[str, ...]] | None = None) -> float:
    """Bytes one block keeps for backward per token (module docstring); ``lora`` = (r,
    targets) adds each adapter's fp32 input and A x."""
    c = config
    D = c.hidden_size
    total = (2 * D + sum(attention_widths(c))) * b + 2 * D * b
    if c.is_moe_layer(layer):
        E, K, F = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
        total += 2 * E * 4 + (4 * F * (c.n_shared_experts or 0) + K * (2 * D + 3 * F)) * b
    else:
        total += 4 * c.intermediate_size * b
    if lora is not None:
        r, targets = lora
        K = c.num_experts_per_tok or 1
        for t in targets:
            for i, _ in _attention_linears(c).get(t, []):
                total += (i + r) * ADAPTER_BYTES
            for copies, i, _ in _ffn_linears(c, layer).get(t, []):
                per_token = K if copies > 1 else 1  # stacked expert adapters see K rows
                total += 0 if t == "router" else per_token * (i + r) * ADAPTER_BYTES
    return total


def activation_bytes_per_token(config: ModelConfig, dtype: str, *,
                               activation_checkpointing: bool = False,
                               lora: tuple[int, tuple[str, ...]] | None = None) -> float:
    """Bytes kept for backward per token (module docstring's model)."""
    c, b = config, DTYPE_BYTES[dtype]
    D, V = c.hidden_size, c.vocab_size
    blocks = [block_activation_bytes(c, i, b, lora) for i in range(c.num_hidden_layers)]
    kept = (len(blocks) * D * b + max(blocks, default=0) if activation_checkpointing
            else sum(blocks))
    return kept + D * b + V * 4


# --- per-rank state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    """Parameters per FSDP unit: all weights, and the trainable ones (all of them, or the
    LoRA adapters) with their bytes per element."""

    units: list[Split]
    trainable_units: list[Split]
    weight_bytes: int  # frozen or trained base weights
    trainable_bytes: int  # per trainable element, weights and gradients alike
    optimizer_bytes: int  # per trainable element
    lora: bool

    @property
    def weights(self) -> Split:
        return sum(self.units, Split())

    @property
    def trainable(self) -> Split:
        return sum(self.trainable_units, Split())


def training_state(config: ModelConfig, dtype: str, method: str = "train", lora_r: int = 8,
                   lora_targets: tuple[str, ...] = ()) -> State:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    b = DTYPE_BYTES[dtype]
    units = unit_parameters(config)
    if method == "lora":
        return State(units, lora_unit_parameters(config, lora_r, lora_targets), b,
                     ADAPTER_BYTES, MOMENT_BYTES, True)
    return State(units, units, b, b, MOMENT_BYTES + (MASTER_BYTES if b < 4 else 0), False)


def _gathered(state: State, devices: int, layout: Layout) -> tuple[list[float], list[float]]:
    """Per FSDP unit (root first): bytes of its all-gathered weights and of its unsharded
    gradients. An expert block held by one rank (ep = N) is not sharded, so not gathered."""
    def local(split: Split) -> float:
        return split.dense + (split.experts / layout.ep if devices > layout.ep else 0)

    adapter = state.trainable_bytes if state.lora else 0
    weights = [local(w) * state.weight_bytes + local(t) * adapter
               for w, t in zip(state.units, state.trainable_units)]
    return weights, [local(t) * state.trainable_bytes for t in state.trainable_units]


def memory_per_rank(state: State, devices: int, layout: Layout) -> tuple[dict[str, float],
                                                                          float]:
    """(device bytes by kind: parameters, gradients, optimizer, fsdp_transient;
    host bytes) for one rank; activations are added by the caller."""
    trainable = state.trainable.per_rank(devices, layout)
    base = state.weights.per_rank(devices, layout) * state.weight_bytes
    memory = {"parameters": base + (trainable * state.trainable_bytes if state.lora else 0),
              "gradients": trainable * state.trainable_bytes,
              "optimizer": trainable * state.optimizer_bytes, "fsdp_transient": 0.0}
    if layout.fsdp:
        # the root stays gathered (and collects its gradients) from its forward to the
        # end of backward; blocks are gathered PREFETCH at a time, one block's gradients
        weights, grads = _gathered(state, devices, layout)
        memory["fsdp_transient"] = weights[0] + grads[0] + PREFETCH * max(weights[1:],
                                                                           default=0) \
            + max(grads[1:], default=0)
    host = 0.0
    if layout.cpu_offload:  # FSDP2's CPUOffloadPolicy: every sharded tensor on the host
        host = memory["parameters"] + memory["gradients"] + memory["optimizer"]
        memory.update(parameters=0.0, gradients=0.0, optimizer=0.0)
    return memory, host


def sync_bytes(state: State, devices: int, layout: Layout) -> dict[str, float]:
    """Weight and gradient collectives per step per rank (module docstring)."""
    W, R = devices, devices // layout.ep  # R: ranks holding the same expert block

    def ring(split: Split, nbytes: int) -> float:
        return ((W - 1) / W * split.dense + (R - 1) / R * split.experts / layout.ep) * nbytes

    grads = ring(state.trainable, state.trainable_bytes)
    if not layout.fsdp:
        return {"gradient all-reduce": 2 * grads}
    adapter = state.trainable_bytes if state.lora else 0
    gathers = [ring(w, state.weight_bytes) + ring(t, adapter)
               for w, t in zip(state.units, state.trainable_units)]
    # blocks are gathered again for backward, the root once
    return {"weight all-gathers": gathers[0] + 2 * sum(gathers[1:]),
            "gradient reduce-scatter": grads}
