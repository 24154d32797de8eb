"""A decode step with static shapes, replayed as one CUDA graph (gpt-fast's recipe).

A decode step of a MoE model launches a few hundred small kernels per token (per layer:
norms, projections, RoPE, attention, the router's top-k, the dispatch sort, the expert
GEMMs, the combine); at batch 1 on a GPU their launch cost exceeds their run time several
times over. Captured once as a CUDA graph, the whole step is one launch.

Design choices:
- Everything the step reads or writes lives at fixed addresses: the preallocated
  ``KVCache`` storage, and small device buffers for the current tokens, their positions,
  the cache slot being written and the valid (non-padding) slots. The graph is replayed
  after the caller copies the next tokens in; slot and positions advance inside it.
- Static shapes: attention reads the whole cache ``[.., S_max, d]`` under a mask (slot <=
  current slot, padding excluded) instead of the growing prefix view eager decoding uses.
  Each step writes its keys and values with ``index_copy_`` at the slot tensor.
- No host sync anywhere in the step, so capture succeeds and the graph is valid for any
  routing: the MoE counts are a scatter-add (``balance.expert_counts``), and the expert
  GEMMs take the per-expert offsets on the device (``torch._grouped_mm``) or, where that
  kernel is missing, gather each row's expert weights (the ``gather`` kernel).
- The model code is unchanged: the step calls the model's own modules (embedding, blocks,
  norm, head) with a slot-writing view of the cache in place of ``KVCache`` (MHA) or
  ``LatentCache`` (MLA, whose decode step then runs in its absorbed form). Prefill runs
  eagerly through ``Transformer.forward`` into the same storage.
- ``compile=True`` additionally runs the step through ``torch.compile`` before capture
  (fuses the elementwise work between the GEMMs).
- NOTE: warm-up and capture run the step for real; slot and positions are restored
  afterwards, and the cache entries they wrote lie at or after the current slot, so each
  is overwritten by a real step before any query can see it.

On CPU the same seam gives ``NativeDecoder``: the whole step (embedding, blocks, norm,
head) is one native call over a plan of pointers built once (``dsmoe.native_step``,
csrc/decode_step.c), for the models whose every piece the native ops take; the others
decode eagerly (``native_unsupported_reason`` says why).

Shapes: B batch, S_max cache slots, L layers, Hkv key/value heads, d head dim, V vocab.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable

import torch

from dsmoe import native, native_step
from dsmoe.model.cache import KVCache, LatentCache
from dsmoe.model.mask import AttentionMask
from dsmoe.model.rope import _LENGTH_DEPENDENT
from dsmoe.moe.grouped_gemm import grouped_mm_supported

if TYPE_CHECKING:
    from dsmoe.model import Transformer


class _SlotWriter:
    """What attention sees of the cache during a static step: ``update`` writes the new
    entries (MHA: keys and values; MLA: the latent) at the slot tensor and returns the
    layer's whole storage, which the step's mask limits to the filled slots."""

    seq_len = 1  # attention asks whether a prefix is cached: it always is when decoding

    def __init__(self, cache: KVCache | LatentCache, slot: torch.Tensor) -> None:
        self.slot = slot  # [1] long, on the cache's device
        if isinstance(cache, KVCache):  # [L, B, Hkv, S_max, d]: slots on dim 2 of a layer
            self.stores, self.dim = (cache.keys, cache.values), 2
        else:  # LatentCache [L, B, S_max, C + r]: slots on dim 1 of a layer
            self.stores, self.dim = (cache.latents,), 1

    def update(self, layer_idx: int, *new: torch.Tensor):  # noqa: ANN201 - the cache's own
        out = []
        for store, entry in zip(self.stores, new):  # entry: one slot, e.g. [B, Hkv, 1, d]
            layer = store[layer_idx]
            layer.index_copy_(self.dim, self.slot, entry)
            out.append(layer)
        return out[0] if len(out) == 1 else tuple(out)


def graph_unsupported_reason(model: "Transformer") -> str | None:
    """Why this model's decode step cannot be a static graph here, or None if it can."""
    device = model.embed_tokens.weight.device
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA model (this one is on {device.type})"
    if model.rotary.kind in _LENGTH_DEPENDENT:
        return f"rope_scaling {model.rotary.kind!r} depends on the sequence length"
    return None


def _last_logits(model: "Transformer", input_ids: torch.Tensor, positions: torch.Tensor,
                 attention_mask: torch.Tensor, cache: KVCache | LatentCache) -> torch.Tensor:
    """One ``Transformer.forward`` into ``cache``: fp32 logits of the last position [B, V]."""
    return model(input_ids, position_ids=positions, attention_mask=attention_mask,
                 cache=cache, logits_to_keep=1).logits[:, -1].float()


class EagerDecoder:
    """Prefill and decode through ``Transformer.forward`` with a growing ``KVCache`` view:
    any model, any device. Same protocol as ``StaticDecoder``."""

    def __init__(self, model: "Transformer", batch_size: int, max_seq_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch_size, max_seq_len)
        self.mask: torch.Tensor | None = None  # [B, cached + 1]
        self.next_pos: torch.Tensor | None = None  # [B, 1]

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        self.mask, self.next_pos = attention_mask, positions[:, -1:] + 1
        return _last_logits(self.model, input_ids, positions, attention_mask, self.cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        logits = _last_logits(self.model, tokens.view(B, 1), self.next_pos, self.mask,
                              self.cache)
        self.next_pos = self.next_pos + 1
        return logits


# Captured decoders kept per model for reuse by later ``generate`` calls (a capture, and
# with compile=True a compilation, costs far more than a step). Keyed on the batch size,
# the slot count (rounded up, so prompts of similar lengths share one), compile, and the
# addresses of the model's tensors: a graph reads memory by address, so a model whose
# weights were replaced (load_state_dict(assign=True), .to()) gets a fresh capture.
_DECODERS: "weakref.WeakKeyDictionary[Transformer, dict[tuple, StaticDecoder]]" = \
    weakref.WeakKeyDictionary()
_KEEP_PER_MODEL = 2
_SLOT_ROUNDING = 256


def _graph_decoder(model: "Transformer", batch_size: int, max_seq_len: int, compile: bool
                   ) -> "StaticDecoder":
    slots = -(-max_seq_len // _SLOT_ROUNDING) * _SLOT_ROUNDING
    key = (batch_size, slots, compile, native_step.model_addresses(model))
    kept = _DECODERS.setdefault(model, {})
    decoder = kept.pop(key, None) or StaticDecoder(model, batch_size, slots, compile=compile)
    kept[key] = decoder  # most recently used last
    while len(kept) > _KEEP_PER_MODEL:
        del kept[next(iter(kept))]
    return decoder


def make_decoder(model: "Transformer", batch_size: int, max_seq_len: int, *,
                 cuda_graph: bool | None = None, compile: bool = False
                 ) -> "EagerDecoder | StaticDecoder | NativeDecoder":
    """The decoder ``generate`` uses: a CUDA-graph ``StaticDecoder`` where the model
    supports one (``cuda_graph=None``: on CUDA; True: required, else an error naming why),
    else on CPU the one-native-call ``NativeDecoder`` where the model qualifies
    (``native_unsupported_reason``), else the eager one. Graph decoders are captured once
    and reused."""
    if cuda_graph is None:
        cuda_graph = graph_unsupported_reason(model) is None
    if cuda_graph:  # StaticDecoder refuses a model it cannot capture, naming why
        return _graph_decoder(model, batch_size, max_seq_len, compile)
    if compile:
        raise ValueError("compile=True needs the CUDA-graph decoder (cuda_graph=True)")
    try:  # the plan's build is the check: it is made once
        return NativeDecoder(model, batch_size, max_seq_len)
    except native_step.Unsupported:
        return EagerDecoder(model, batch_size, max_seq_len)


def native_unsupported_reason(model: "Transformer", batch_size: int = 1) -> str | None:
    """Why this model's CPU decode step of ``batch_size`` rows cannot be one native call
    (``NativeDecoder``), or None if it can."""
    return native_step.unsupported_reason(model, batch_size)


class NativeDecoder(EagerDecoder):
    """Prefill through ``Transformer.forward`` into a ``KVCache`` as ``EagerDecoder`` does,
    then decode each token in one native call (csrc/decode_step.c): the per-module path's
    numerics without its ~80 Python module calls per layer. The plan of pointers is built
    at construction and again by ``prefill`` when the model's tensors moved. A step whose
    activations are not finite is redone through the modules (their torch fallbacks)."""

    def __init__(self, model: "Transformer", batch_size: int, max_seq_len: int) -> None:
        super().__init__(model, batch_size, max_seq_len)
        self.plan = native_step.build_plan(model, self.cache, batch_size)
        self.scratch = native.decode_step_scratch(self.plan.model)
        self.valid = torch.ones(batch_size, max_seq_len, dtype=torch.uint8)  # [B, S_max]
        self.positions = torch.zeros(batch_size, dtype=torch.long)  # [B]

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        if native_step.stale(self.model, self.plan):
            self.plan = native_step.build_plan(self.model, self.cache, self.cache.batch_size)
            self.scratch = native.decode_step_scratch(self.plan.model)
        logits = super().prefill(input_ids, positions, attention_mask)
        P = input_ids.shape[1]
        self.valid.fill_(1)
        self.valid[:, :P] = attention_mask
        self.positions.copy_(positions[:, -1] + 1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.check_room(1)
        slot = cache.seq_len
        ids = tokens.reshape(-1).to(torch.long).contiguous()  # [B]
        logits = native.decode_step(self.plan.model, ids, self.positions, self.valid, slot,
                                    self.scratch)
        if logits is None:  # not finite somewhere: the modules' own fallbacks decide
            self.mask = self.valid[:, :slot + 1].long()
            logits = _last_logits(self.model, ids.view(-1, 1), self.positions.view(-1, 1),
                                  self.mask, cache)
            self.positions += 1
            return logits
        cache.advance(1)
        return logits


def graph_expert_kernel(dtype: torch.dtype) -> str:
    """The expert GEMM kernel a captured step uses: ``torch._grouped_mm`` where it is
    Hopper's native bf16 kernel (elsewhere torch may serve it with a loop that reads the
    offsets on the host, which capture forbids), else ``gather``."""
    native = (dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0)
              and grouped_mm_supported("cuda", dtype))
    return "grouped_mm" if native else "gather"


class StaticDecoder:
    """Prefill eagerly, then decode one token per ``step`` by replaying a CUDA graph
    (``use_graph=False``: the same static step run eagerly, on any device; the tests
    compare it with ``Transformer.forward`` on CPU).

        dec = StaticDecoder(model, batch_size=B, max_seq_len=P + N)
        logits = dec.prefill(ids, positions, mask)     # [B, V] fp32, last position
        logits = dec.step(next_tokens)                 # [B, V] fp32, one per call
    """

    def __init__(self, model: "Transformer", batch_size: int, max_seq_len: int, *,
                 use_graph: bool = True, compile: bool = False) -> None:
        if use_graph:
            reason = graph_unsupported_reason(model)
            if reason is not None:
                raise ValueError(f"cannot decode with a CUDA graph: {reason}")
        self.model = model
        self.cache = model.new_cache(batch_size, max_seq_len)
        self.batch_size = batch_size
        device = model.embed_tokens.weight.device
        B = batch_size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)  # [B, 1]
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)  # [B, 1]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # [1]
        self.valid = torch.ones(B, max_seq_len, dtype=torch.bool, device=device)  # [B, S_max]
        self.key_slots = torch.arange(max_seq_len, device=device)  # [S_max]
        self.writer = _SlotWriter(self.cache, self.slot)
        self.use_graph, self.graph = use_graph, None
        self.logits: torch.Tensor | None = None  # the graph's output buffer [B, V]
        self._step_fn: Callable[[], torch.Tensor] = self._static_step
        if compile:
            self._step_fn = torch.compile(self._static_step, dynamic=False)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the (left-padded) prompts [B, P] into the cache; logits of the last position."""
        B, P = input_ids.shape
        if B != self.batch_size or P >= self.cache.max_seq_len:
            raise ValueError(f"this decoder holds {self.batch_size} rows of "
                             f"{self.cache.max_seq_len} positions; got prompts {B} x {P}")
        self.cache.reset()
        logits = _last_logits(self.model, input_ids, positions, attention_mask, self.cache)
        self.valid.fill_(True)
        self.valid[:, :P] = attention_mask.bool()
        self.positions.copy_(positions[:, -1:] + 1)
        self.slot.fill_(P)
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [B]`` at the next position; their logits [B, V] fp32 (a buffer the
        next ``step`` overwrites when the graph is used)."""
        self.tokens.copy_(tokens.view(-1, 1))
        if not self.use_graph:
            return self._step_fn()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _static_step(self) -> torch.Tensor:
        model = self.model
        x = model.embed_tokens(self.tokens)  # [B, 1, D]
        cos, sin = model.rotary(self.positions, self.cache.max_seq_len, x.dtype)
        visible = self.valid & (self.key_slots <= self.slot)  # [B, S_max]
        mask = AttentionMask(visible[:, None, None, :], is_causal=False)
        for layer in model.layers:
            x, _ = layer(x, cos, sin, mask, self.writer)
        logits = model.lm_head(model.norm(x))[:, -1].float()  # [B, V]
        self.slot.add_(1)
        self.positions.add_(1)
        return logits

    def _capture(self) -> None:
        """Warm up (kernel choices, autotuning, lazy inits) and capture one step."""
        experts = [layer.experts for layer in self.model.moe_layers()
                   if hasattr(layer.experts, "kernel")]  # quantized experts have no choice
        graph_kernel = graph_expert_kernel(self.model.embed_tokens.weight.dtype)
        saved = [(e, e.kernel) for e in experts]
        slot, positions = self.slot.clone(), self.positions.clone()
        try:
            for e in experts:
                e.kernel = graph_kernel
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step_fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step_fn()
        finally:
            for e, kernel in saved:
                e.kernel = kernel
            self.slot.copy_(slot)
            self.positions.copy_(positions)
