"""Which GGUF tensor holds which HF DeepSeek tensor, and llama.cpp's q/k row order.

A declarative two-way map: ``tensor_specs(config)`` lists every tensor of llama.cpp's
"deepseek" architecture in file order, each with its shape and the HF tensor(s) it holds.
Readers and writers share it, so the two directions cannot drift apart.

- Names come from the ``gguf`` package (``TENSOR_NAMES``), not string literals.
- Routed experts are one stacked tensor per projection in GGUF (``ffn_gate_exps`` [E, F, D])
  and E tensors in HF (``experts.{e}.gate_proj.weight`` [F, D]).
- NOTE: llama.cpp rotates adjacent pairs (dims 2i, 2i+1) while HF rotates halves (i, i+d/2),
  so llama.cpp's converter reorders the rows of q_proj/k_proj inside every head: row
  ``half*(d/2) + i`` moves to ``2i + half``. ``to_llama_rope_rows``/``from_llama_rope_rows``
  apply that permutation and its inverse (biases too). Without it a GGUF loads fine and
  produces garbage.

Shapes: D hidden, F expert width, E routed experts, V vocab, H heads, d head dim.
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

    @property
    def stacked(self) -> bool:
        return len(self.hf_names) > 1 or self.gguf_name.endswith("_exps.weight")


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + suffix


def tensor_specs(config: ModelConfig, *, tied: bool | None = None) -> list[TensorSpec]:
    """Every tensor of a llama.cpp "deepseek" GGUF for ``config``, in llama.cpp's order.

    ``tied``: whether ``output.weight`` is absent (defaults to ``tie_word_embeddings``).
    """
    c = config
    if c.attention_type != "mha":
        raise ValueError(f"GGUF holds dsmoe's multi-head attention models (llama.cpp's "
                         f"\"deepseek\"); {c.model_type} uses Multi-head Latent Attention "
                         "(llama.cpp's \"deepseek2\"), not supported in GGUF yet: use --format hf")
    tied = c.tie_word_embeddings if tied is None else tied
    V, D, d = c.vocab_size, c.hidden_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
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
        specs.append(spec(T.FFN_NORM, ".weight", (D,), "post_attention_layernorm.weight",
                          keep_f32=True))
        specs += _ffn_specs(c, i, p, spec)
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
