"""Which GGUF tensor holds which HF DeepSeek tensor, and llama.cpp's q/k row order.

A declarative two-way map: ``tensor_specs(config)`` lists every tensor of llama.cpp's
"deepseek" architecture (V1, multi-head attention) or "deepseek2" (V2/V3, Multi-head
Latent Attention) in file order, each with its shape and the HF tensor(s) it holds.
Readers and writers share it, so the two directions cannot drift apart.

- Names come from the ``gguf`` package (``TENSOR_NAMES``), not string literals.
- Routed experts are one stacked tensor per projection in GGUF (``ffn_gate_exps`` [E, F, D])
  and E tensors in HF (``experts.{e}.gate_proj.weight`` [F, D]).
- NOTE: llama.cpp rotates adjacent pairs (dims 2i, 2i+1) while HF rotates halves (i, i+d/2),
  so llama.cpp's converter reorders the rows of q_proj/k_proj inside every head: row
  ``half*(d/2) + i`` moves to ``2i + half``. ``to_llama_rope_rows``/``from_llama_rope_rows``
  apply that permutation and its inverse (biases too). Without it a GGUF loads fine and
  produces garbage.
- MLA ("deepseek2") needs no permutation: DeepSeek-V2/V3 checkpoints already store their
  rope dimensions as interleaved pairs, llama.cpp's NORM rope. A model with
  ``rope_interleave: false`` (halves) has the rope rows of q (the last r of each head) and
  of kv_a (the last r) put in pair order (``rope_tail``), so the file is always in
  llama.cpp's order and reads back as an interleaved model. llama.cpp's converter
  splits ``kv_b_proj`` [H*(n+v), C] per head into ``attn_k_b`` [H, C, n] (transposed: the
  absorbed form multiplies q_nope by it) and ``attn_v_b`` [H, v, C]; files of older
  converters keep it whole as ``attn_kv_b``. Both are read (``kv_b="split"|"whole"``); the
  split one is written, since that is the one llama.cpp loads as MLA (a whole ``kv_b``
  makes it expand every cached token into per-head K and V).

Shapes: D hidden, F expert width, E routed experts, V vocab, H heads, d head dim;
MLA: Q q_lora_rank, C kv_lora_rank, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from dsmoe.config import ModelConfig

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name, torch-order shape and the HF tensors it holds."""

    gguf_name: str  # e.g. "blk.3.ffn_gate_exps.weight"
    shape: tuple[int, ...]  # torch order (outermost first); GGUF's ne[] is the reverse
    hf_names: tuple[str, ...]  # one name, or E per-expert names stacked on dim 0
    rope_heads: int | None = None  # q/k: heads whose rows llama.cpp interleaves
    keep_f32: bool = False  # norms, biases, router: never quantized (llama.cpp's rule)
    kv_b_part: str | None = None  # "k" / "v": this half of MLA's kv_b_proj, per head
    hf_shape: tuple[int, ...] | None = None  # the HF tensor's shape where it differs
    partner: TensorSpec | None = None  # attn_k_b's attn_v_b: read together into kv_b_proj
    rope_tail: tuple[int, int] | None = None  # MLA in halves: (rows per group, rope rows)

    @property
    def stacked(self) -> bool:
        return len(self.hf_names) > 1 or self.gguf_name.endswith("_exps.weight")

    @property
    def source_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor this spec holds."""
        if self.hf_shape is not None:
            return self.hf_shape
        return self.shape[1:] if self.stacked else self.shape


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + suffix


def tensor_specs(config: ModelConfig, *, tied: bool | None = None,
                 kv_b: str = "split") -> list[TensorSpec]:
    """Every tensor of a llama.cpp "deepseek" (MHA) or "deepseek2" (MLA) GGUF for
    ``config``, in llama.cpp's order.

    ``tied``: whether ``output.weight`` is absent (defaults to ``tie_word_embeddings``).
    ``kv_b``: MLA's kv_b_proj as llama.cpp's per-head ``attn_k_b``/``attn_v_b`` ("split")
    or as one ``attn_kv_b`` ("whole", older converters).
    """
    c = config
    if kv_b not in ("split", "whole"):
        raise ValueError(f"kv_b={kv_b!r}: choose 'split' or 'whole'")
    if c.attention_type == "mla" and c.attention_bias:
        raise ValueError("attention_bias=true: llama.cpp's \"deepseek2\" (MLA) has no "
                         "attention biases, so GGUF cannot hold this model (use --format hf)")
    tied = c.tie_word_embeddings if tied is None else tied
    V, D = c.vocab_size, c.hidden_size
    specs = [TensorSpec(_name(T.TOKEN_EMBD, ".weight"), (V, D), ("model.embed_tokens.weight",)),
             TensorSpec(_name(T.OUTPUT_NORM, ".weight"), (D,), ("model.norm.weight",),
                        keep_f32=True)]
    if not tied:
        specs.append(TensorSpec(_name(T.OUTPUT, ".weight"), (V, D), ("lm_head.weight",)))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."

        def spec(tensor: gguf.MODEL_TENSOR, suffix: str, shape: tuple[int, ...], hf: str,
                 **kw: object) -> TensorSpec:
            return TensorSpec(_name(tensor, suffix, i), shape, (p + hf,), **kw)  # type: ignore[arg-type]

        specs.append(spec(T.ATTN_NORM, ".weight", (D,), "input_layernorm.weight", keep_f32=True))
        attention = _mla_specs if c.attention_type == "mla" else _mha_specs
        specs += attention(c, spec, kv_b)
        specs.append(spec(T.FFN_NORM, ".weight", (D,), "post_attention_layernorm.weight",
                          keep_f32=True))
        specs += _ffn_specs(c, i, p, spec)
    return specs


def _mha_specs(c: ModelConfig, spec, kv_b: str) -> list[TensorSpec]:  # noqa: ANN001
    """V1's q/k/v/o projections (q and k rows in llama.cpp's rope order)."""
    D, d, H, Hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    specs = []
    for tensor, proj, rows, heads in ((T.ATTN_Q, "q_proj", H * d, H),
                                      (T.ATTN_K, "k_proj", Hkv * d, Hkv),
                                      (T.ATTN_V, "v_proj", Hkv * d, None)):
        specs.append(spec(tensor, ".weight", (rows, D), f"self_attn.{proj}.weight",
                          rope_heads=heads))
        if c.attention_bias:
            specs.append(spec(tensor, ".bias", (rows,), f"self_attn.{proj}.bias",
                              rope_heads=heads, keep_f32=True))
    specs.append(spec(T.ATTN_OUT, ".weight", (D, H * d), "self_attn.o_proj.weight"))
    if c.attention_bias:
        specs.append(spec(T.ATTN_OUT, ".bias", (D,), "self_attn.o_proj.bias", keep_f32=True))
    return specs


def _mla_specs(c: ModelConfig, spec, kv_b: str) -> list[TensorSpec]:  # noqa: ANN001
    """MLA's projections as llama.cpp's deepseek2 stores them (see the module docstring)."""
    D, H, C = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
    n, r, v, Q = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank
    a = "self_attn."
    halves = not c.extra.get("rope_interleave", True)
    q_tail, kv_tail = ((n + r, r), (C + r, r)) if halves else (None, None)
    if Q is None:
        specs = [spec(T.ATTN_Q, ".weight", (H * (n + r), D), a + "q_proj.weight",
                      rope_tail=q_tail)]
    else:
        specs = [spec(T.ATTN_Q_A, ".weight", (Q, D), a + "q_a_proj.weight"),
                 spec(T.ATTN_Q_A_NORM, ".weight", (Q,), a + "q_a_layernorm.weight",
                      keep_f32=True),
                 spec(T.ATTN_Q_B, ".weight", (H * (n + r), Q), a + "q_b_proj.weight",
                      rope_tail=q_tail)]
    specs += [spec(T.ATTN_KV_A_MQA, ".weight", (C + r, D), a + "kv_a_proj_with_mqa.weight",
                   rope_tail=kv_tail),
              spec(T.ATTN_KV_A_NORM, ".weight", (C,), a + "kv_a_layernorm.weight",
                   keep_f32=True)]
    whole = (H * (n + v), C)  # kv_b_proj
    if kv_b == "whole":
        specs.append(spec(T.ATTN_KV_B, ".weight", whole, a + "kv_b_proj.weight"))
    else:
        v_b = spec(T.ATTN_V_B, ".weight", (H, v, C), a + "kv_b_proj.weight", kv_b_part="v",
                   hf_shape=whole)
        specs += [spec(T.ATTN_K_B, ".weight", (H, C, n), a + "kv_b_proj.weight",
                       kv_b_part="k", hf_shape=whole, partner=v_b), v_b]
    specs.append(spec(T.ATTN_OUT, ".weight", (D, H * v), a + "o_proj.weight"))
    return specs


def _ffn_specs(c: ModelConfig, i: int, p: str, spec) -> list[TensorSpec]:  # noqa: ANN001
    """Layer ``i``'s feed-forward tensors: a dense MLP, or router + experts + shared."""
    D = c.hidden_size
    if not c.is_moe_layer(i):
        Fd = c.intermediate_size
        return [spec(T.FFN_GATE, ".weight", (Fd, D), "mlp.gate_proj.weight"),
                spec(T.FFN_DOWN, ".weight", (D, Fd), "mlp.down_proj.weight"),
                spec(T.FFN_UP, ".weight", (Fd, D), "mlp.up_proj.weight")]
    E, F = c.n_routed_experts, c.moe_intermediate_size
    assert E is not None
    specs = [spec(T.FFN_GATE_INP, ".weight", (E, D), "mlp.gate.weight", keep_f32=True)]
    if c.uses_bias_balancing:
        specs.append(spec(T.FFN_EXP_PROBS_B, ".bias", (E,), "mlp.gate.e_score_correction_bias",
                          keep_f32=True))
    for tensor, proj, shape in ((T.FFN_GATE_EXP, "gate_proj", (E, F, D)),
                                (T.FFN_DOWN_EXP, "down_proj", (E, D, F)),
                                (T.FFN_UP_EXP, "up_proj", (E, F, D))):
        names = tuple(f"{p}mlp.experts.{e}.{proj}.weight" for e in range(E))
        specs.append(TensorSpec(_name(tensor, ".weight", i), shape, names))
    Fs = F * (c.n_shared_experts or 0)
    if Fs:
        specs += [spec(T.FFN_GATE_SHEXP, ".weight", (Fs, D), "mlp.shared_experts.gate_proj.weight"),
                  spec(T.FFN_DOWN_SHEXP, ".weight", (D, Fs), "mlp.shared_experts.down_proj.weight"),
                  spec(T.FFN_UP_SHEXP, ".weight", (Fs, D), "mlp.shared_experts.up_proj.weight")]
    return specs


# --- MLA's kv_b_proj, whole or per head -------------------------------------------------
def kv_b_half(kv_b: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """kv_b_proj [H*(n+v), C] -> ``attn_k_b`` [H, C, n] or ``attn_v_b`` [H, v, C]."""
    H = spec.shape[0]
    per_head = kv_b.reshape(H, -1, kv_b.shape[-1])  # [H, n+v, C]
    if spec.kv_b_part == "k":
        return per_head[:, :spec.shape[2]].transpose(1, 2)
    return per_head[:, per_head.shape[1] - spec.shape[1]:]


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of ``kv_b_half``: [H, C, n] and [H, v, C] -> kv_b_proj [H*(n+v), C]."""
    per_head = torch.cat((k_b.transpose(1, 2), v_b), dim=1)  # [H, n+v, C]
    return per_head.reshape(-1, per_head.shape[-1])


# --- llama.cpp's q/k row order ----------------------------------------------------------
def to_llama_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rows (per head: first halves, then second halves) -> llama.cpp's interleaved
    pairs. ``w`` is [H*d, ...] (weight) or [H*d] (bias)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_llama_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``to_llama_rope_rows``: llama.cpp's row order back to HF's."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_tail_rows(w: torch.Tensor, tail: tuple[int, int], *, to_llama: bool) -> torch.Tensor:
    """``w`` [G*rows, ...] with the last ``r`` rows of each group of ``rows`` (MLA's rope
    part) moved between halves and llama.cpp's pairs; the other rows are untouched."""
    rows, r = tail
    groups = w.reshape(-1, rows, *w.shape[1:]).clone()  # [G, rows, ...]
    rope = groups[:, rows - r:].reshape(-1, *w.shape[1:])  # [G*r, ...]
    move = to_llama_rope_rows if to_llama else from_llama_rope_rows
    groups[:, rows - r:] = move(rope, groups.shape[0]).reshape(groups.shape[0], r, *w.shape[1:])
    return groups.reshape(w.shape)
