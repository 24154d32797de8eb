"""Transformer: the DeepSeekMoE causal language model.

    input_ids -> embed_tokens -> [Block x L] -> norm -> lm_head -> logits

Design choices:
- Module names follow HF's ``DeepseekForCausalLM`` minus the ``model.`` prefix (added and
  removed by ``dsmoe.checkpoint.hf``), so a checkpoint maps onto it by name; routed experts
  are the only tensors stored differently (stacked in memory, per expert on disk).
- The model builds on any device, including ``meta``. ``init_weights()`` is the single
  place parameters and buffers get values: it runs at the end of ``__init__`` and again
  after ``to_empty()`` when a model was built on ``meta``. Checkpoint loading never runs it
  on parameters (it assigns file tensors) but uses ``init_buffers()`` for the
  non-persistent buffers (RoPE frequencies, MoE load counters).
- One forward serves training, prefill and decoding: positions, the attention mask and
  RoPE angles are computed once per call and shared by every layer; a ``KVCache``
  (``new_cache``) turns it into incremental decoding.
- Left padding: with ``attention_mask``, default positions count real tokens only, so a
  padded row sees exactly the positions and keys of its unpadded run.
- Routing statistics and balance losses of the MoE layers are collected, not computed here:
  ``aux_loss`` is their sum, ``losses`` the per-name sums.

Shapes: B batch, S new tokens, P cached tokens, D hidden, V vocab, L layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.linear import Linear
from dsmoe.model.attention import attention_class
from dsmoe.model.block import Block
from dsmoe.model.cache import KVCache, LatentCache
from dsmoe.model.mask import build_attention_mask
from dsmoe.model.norm import RMSNorm
from dsmoe.model.rope import RotaryEmbedding
from dsmoe.moe.layer import MoELayer, MoEOutput


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V] (or [B, logits_to_keep, V])
    aux_loss: torch.Tensor  # fp32 scalar: sum of the MoE layers' aux_loss (0 in eval)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> sum over layers
    routing: list[MoEOutput] | None = None  # one per MoE layer, in order (return_routing)


class Transformer(nn.Module):
    """DeepSeekMoE (V1's MHA or V2/V3's MLA attention, V1/V2/V3 routing) as a causal LM.

    forward(input_ids):
      1. positions: given, or counted from ``attention_mask``/the cache offset
      2. RoPE cos/sin and the attention mask, once for all layers
      3. embed, L blocks (each may append to the KV cache), final norm, lm_head
      4. advance the cache; sum the MoE layers' balance losses
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        V, D = config.vocab_size, config.hidden_size
        pad = config.pad_token_id if config.pad_token_id is not None and \
            0 <= config.pad_token_id < V else None
        self.embed_tokens = nn.Embedding(V, D, padding_idx=pad)  # [V, D]
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(D, config.rms_norm_eps)
        self.lm_head = Linear(D, V, bias=False)  # [V, D]
        self.rotary = RotaryEmbedding(config.rope_head_dim, config.rope_theta,
                                      config.max_position_embeddings, config.rope_scaling)
        self.tie_weights()
        if not self.embed_tokens.weight.is_meta:  # on meta there are no values to give
            self.init_weights()

    # --- initialisation -----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights as DeepSeek initialises them: normal(0, initializer_range) for
        linear, embedding and expert weights, zero biases, unit norms; then the buffers.
        Also re-ties ``lm_head`` to the embedding (``to_empty`` unties shared tensors)."""
        self.tie_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif hasattr(module, "reset_parameters") and any(
                    True for _ in module.parameters(recurse=False)):
                module.reset_parameters()  # routers, stacked experts: their own init
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Values of the non-persistent buffers (not in checkpoints)."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers()
            elif isinstance(module, MoELayer) and not module.load_counts.is_meta:
                module.load_counts.zero_()

    def tie_weights(self) -> None:
        """Share the embedding matrix with ``lm_head`` when the config asks for it."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # --- forward --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: KVCache | LatentCache | None = None,
                return_routing: bool = False, logits_to_keep: int | None = None
                ) -> ModelOutput:
        """input_ids [B, S]; attention_mask [B, P + S] (1 = token, 0 = padding; left padding
        for batched generation); position_ids [B, S]; ``cache`` from ``new_cache``.
        ``logits_to_keep``: compute logits for the last n positions only (decoding)."""
        B, S = self._check_inputs(input_ids, position_ids, attention_mask, cache)
        past = cache.seq_len if cache is not None else 0
        padding = attention_mask
        if padding is not None and bool(padding.all()):
            padding = None  # nothing padded: keep SDPA's fast paths
        if position_ids is None:
            position_ids = self._default_positions(padding, B, S, past, input_ids.device)
        x = self._embed(input_ids)  # [B, S, D]
        cos, sin = self.rotary(position_ids, past + S, x.dtype)  # [B, S, d] each
        mask = build_attention_mask(padding, S, past, input_ids.device)
        routing: list[MoEOutput] = []
        for layer in self.layers:
            x, moe_out = layer(x, cos, sin, mask, cache)
            if moe_out is not None:
                routing.append(moe_out)
        if cache is not None:
            cache.advance(S)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x))  # [B, S, V]
        return ModelOutput(logits, *self._sum_losses(routing, x.device),
                           routing if return_routing else None)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        try:
            return self.embed_tokens(input_ids)
        except IndexError as exc:  # torch's message does not say which id or which vocab
            raise ValueError(f"input_ids contain ids outside [0, vocab_size="
                             f"{self.config.vocab_size}): min {int(input_ids.min())}, "
                             f"max {int(input_ids.max())}") from exc

    @staticmethod
    def _default_positions(padding: torch.Tensor | None, B: int, S: int, past: int,
                           device: torch.device) -> torch.Tensor:
        """Positions of the new tokens [B, S]: real tokens counted from 0 per row."""
        if padding is None:
            return torch.arange(past, past + S, device=device).expand(B, S)
        counted = padding.long().cumsum(dim=-1) - 1  # [B, P + S]
        return counted[:, -S:].clamp(min=0)

    @staticmethod
    def _sum_losses(routing: list[MoEOutput], device: torch.device
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux = torch.zeros((), dtype=torch.float32, device=device)
        losses: dict[str, torch.Tensor] = {}
        for out in routing:
            aux = aux + out.aux_loss.float()
            for name, value in out.losses.items():
                losses[name] = losses[name] + value if name in losses else value
        return aux, losses

    def _check_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                      attention_mask: torch.Tensor | None,
                      cache: KVCache | LatentCache | None
                      ) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {got}")
        B, S = input_ids.shape
        if S == 0:
            raise ValueError("input_ids is empty (sequence length 0)")
        past = 0
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, "
                                 f"input_ids have batch size {B}")
            cache.check_room(S)
            past = cache.seq_len
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + S):
            raise ValueError(f"attention_mask must have shape [batch, cached + new tokens] = "
                             f"[{B}, {past + S}], got {list(attention_mask.shape)}")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != S
                                         or position_ids.shape[0] not in (1, B)):
            raise ValueError(f"position_ids must have shape [{B}, {S}], "
                             f"got {list(position_ids.shape)}")
        return B, S

    # --- KV cache -----------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache | LatentCache:
        """A preallocated cache for ``max_seq_len`` positions in the model's dtype and device:
        per-head keys and values [L, B, Hkv, S_max, d] for MHA, latents [L, B, S_max, C + r]
        for MLA (the attention kind's ``new_cache``)."""
        ref = self.embed_tokens.weight
        return attention_class(self.config).new_cache(
            self.config, batch_size, max_seq_len, dtype=dtype or ref.dtype,
            device=device or ref.device)

    # --- MoE helpers ----------------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]

    def update_router_biases(self) -> None:
        """After an optimizer step: V3's aux-loss-free bias update on every MoE layer whose
        config uses it (a no-op for V1/V2 routing)."""
        for layer in self.moe_layers():
            if layer.config.uses_bias_balancing:
                layer.update_bias()

    def num_parameters(self, *, active: bool = False) -> int:
        """Parameters of this model (tied ones once); ``active``: those one token uses,
        i.e. all but the routed experts it is not sent to (see ``dsmoe.params``)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = 0
        for layer in self.moe_layers():
            E, K = layer.config.n_routed_experts, layer.config.num_experts_per_tok
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // E
            inactive += (E - K) * per_expert
        return total - inactive

    # --- memory layout of the weight matrices --------------------------------------------
    @torch.no_grad()
    def set_matmul_layout(self, layout: str) -> "Transformer":
        """Store every weight matrix ``"output_major"`` (``[out, in]`` row-major: PyTorch's
        and HF's default) or ``"input_major"`` (its transpose is contiguous). Only strides
        change: shapes, values, parameter objects, names and saved checkpoints stay the same.
        Embedding tables (and an ``lm_head`` tied to one) keep their rows contiguous.

        Why: a decode step multiplies every weight by one activation row per sequence, so it
        streams the weights once and is memory-bound. CPU fp32 BLAS streams an input-major
        matrix faster in ``x @ W.T``: on the AMD EPYC + MKL machine of benchmarks/generate.py
        ~1.5x for the [102400, 1280] ``lm_head`` and ~1.2x for expert-sized matrices, with
        the same results up to summation order. bf16 kernels there prefer output-major, and
        other CPUs may differ: measure before switching. Returns ``self``.
        """
        if layout not in _MATMUL_LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(_MATMUL_LAYOUTS)}, got {layout!r}")
        relayout = _MATMUL_LAYOUTS[layout]
        tables = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for param in self.parameters():
            if param.dim() >= 2 and id(param) not in tables and not param.is_meta:
                param.data = relayout(param.data)  # same Parameter: optimizers keep it
        return self

    # --- generation ---------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, stop=None, seed: int | None = None,
                 **kwargs) -> torch.Tensor:
        """New token ids [B, N] after ``input_ids`` (see ``dsmoe.generate.generate``)."""
        from dsmoe.generate import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                        **kwargs)

    # --- checkpoints ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None =
                        torch.float32, device: torch.device | str = "cpu") -> "Transformer":
        """Load an HF directory (``config.json`` + ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``) or a ``.gguf`` file. Returns the model in eval
        mode. ``dtype=None`` keeps the stored dtype. A directory written by ``dsmoe quantize``
        loads as the quantized model (int8/int4 weights, ``dtype`` for the float parts).
        ``dsmoe.checkpoint.load`` does the work (it owns the format choice)."""
        from dsmoe.checkpoint import load

        return load(path, dtype=dtype, device=device, model_cls=cls)

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int = 5 * 2**30,
                        tokenizer_dir: str | os.PathLike | None = None) -> None:
        """Write an HF directory with DeepSeek's exact tensor names (see ``checkpoint.hf``)."""
        from dsmoe.checkpoint.hf import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir)


def _input_major(weight: torch.Tensor) -> torch.Tensor:
    """[..., out, in] with the last two dimensions stored transposed (stride(-2) == 1)."""
    if weight.transpose(-2, -1).is_contiguous():
        return weight
    return weight.transpose(-2, -1).contiguous().transpose(-2, -1)


def _output_major(weight: torch.Tensor) -> torch.Tensor:
    return weight.contiguous()


_MATMUL_LAYOUTS = {"input_major": _input_major, "output_major": _output_major}
