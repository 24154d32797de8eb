"""QuantMatrix: a (stack of) weight matrix [..., N, K] held as int8 or int4, plus matmul.

One class serves a single linear layer ([N, K]) and stacked experts ([E, N, K]): the stack
is sliced per expert and each slice is a plain 2-D kernel call. It owns its buffers, and
three conversions:
  set_float(W)              quantise a float weight (replacing the buffers, e.g. on meta)
  quantized_state()         canonical tensors for a checkpoint (layout-free; see kernels)
  load_quantized_state(sd)  the inverse: canonical tensors -> kernel layout

Buffers (persistent, so ``.to()`` moves them; a dtype cast such as ``model.float()`` leaves
them as they are: they are the format, not the compute dtype):
  int8  qweight int8 [..., N, K], scale bf16 [..., N]
  int4  with dsmoe's native kernels (``native.library()``): the canonical tensors themselves,
        qweight uint8 [..., N, K/2] nibbles, scale bf16 [..., N, G], zero bf16 [..., N, G];
        without them (no C compiler): qweight in torch's packed CPU layout and
        scale_zero bf16 [..., G, N, 2], for ``torch._weight_int4pack_mm_for_cpu``.
        The choice is made once, at construction (``self.packed``). ``symmetric``: no
        zero (w = (q - 8) * scale, llama.cpp's Q4_0 form), as loaded from Q4_0 GGUFs.

Shapes: N out features, K in features, G groups per row, M rows.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.quant import kernels

BITS = (4, 8)
_FORMAT_DTYPE_BUFFERS = ("scale", "zero", "scale_zero")  # bf16 by format, never cast


class QuantMatrix(nn.Module):
    def __init__(self, out_features: int, in_features: int, *, bits: int,
                 group_size: int = 128, stack: tuple[int, ...] = (), symmetric: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        self.out_features, self.in_features, self.stack = out_features, in_features, stack
        if bits == 4:
            group = kernels.int4_group_size(in_features, out_features, group_size)
            if group is None:  # the int4 kernel cannot take this shape: keep it in int8
                bits = 8
            else:
                group_size = group
        self.bits, self.group_size = bits, group_size if bits == 4 else None
        # int4 in torch's packed layout only when dsmoe's kernels cannot be built
        self.packed = bits == 4 and native.library() is None
        self.symmetric = bits == 4 and symmetric  # int4 without zeros: llama.cpp's Q4_0 form
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.empty(*stack, N, K, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("scale", torch.empty(*stack, N, dtype=torch.bfloat16,
                                                      device=device))
        else:
            G = K // group_size
            self.register_buffer("qweight", torch.empty(*stack, N, K // 2, dtype=torch.uint8,
                                                        device=device))
            if self.packed:
                self.register_buffer("scale_zero", torch.empty(
                    *stack, G, N, 2, dtype=torch.bfloat16, device=device))
            else:
                for name in ("scale",) if self.symmetric else ("scale", "zero"):
                    self.register_buffer(name, torch.empty(*stack, N, G, dtype=torch.bfloat16,
                                                           device=device))

    def _apply(self, fn, recurse: bool = True):
        """``Module.to(dtype)`` / ``.float()`` would cast the bf16 scales and zeros, which the
        kernels read as bf16 (int8: an error; int4: silently wrong sums): keep their dtype
        and only follow the device ``fn`` moves them to (bf16 -> fp16 -> bf16 would not be
        exact, so the originals are moved, not cast back)."""
        before = {n: self._buffers[n] for n in _FORMAT_DTYPE_BUFFERS
                  if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    # --- matmul -------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [..., K] @ W.T -> [..., N]; ``index`` picks one matrix of a stack."""
        q = self.qweight if index is None else self.qweight[index]
        if self.bits == 8:
            scale = self.scale if index is None else self.scale[index]
            return kernels.int8_linear(x, q, scale)
        if not self.packed:
            scale, zero = self.scale, None if self.symmetric else self.zero
            if index is not None:
                scale, zero = scale[index], None if zero is None else zero[index]
            return kernels.int4_matmul(x, q, scale, zero, self.group_size)
        sz = self.scale_zero if index is None else self.scale_zero[index]
        return kernels.int4_linear(x, q, sz, self.group_size, self.out_features)

    def takes_blocks(self, x: torch.Tensor) -> bool:
        """Whether ``matmul_blocks`` can run rows like ``x`` (a stack in dsmoe's own layout,
        rows without a gradient; the native call itself may still decline)."""
        return self.stack and not self.packed and not records_grad(x)

    def matmul_blocks(self, x: torch.Tensor, blocks: list[tuple[int, int, int]]
                      ) -> torch.Tensor | None:
        """For a stack: rows [first, first + rows) of ``x [P, K]`` times matrix e, per
        ``(e, first, rows)`` block, in one native call -> fp32 [P, N] (zeros outside the
        blocks). None where that call does not apply: rows needing a gradient, or the
        native kernels unavailable; the caller then loops over ``matmul``."""
        if not self.takes_blocks(x):
            return None
        N, K = self.out_features, self.in_features
        if self.bits == 8:
            q = self.qweight.reshape(-1, N, K)  # [E, N, K]
            return native.int8_blocks_matmul(x, q, self.scale.reshape(-1, N), blocks)
        G = K // self.group_size
        zero = None if self.symmetric else self.zero.reshape(-1, N, G)
        return native.int4_blocks_matmul(x, self.qweight.reshape(-1, N, K // 2),
                                         self.scale.reshape(-1, N, G), zero, self.group_size,
                                         blocks)

    def decode_operand(self) -> native.Operand | None:
        """This (single) matrix as the native decode ops take it, or None where they cannot
        (a stack, or int4 in torch's packed layout)."""
        if self.stack or self.packed:
            return None
        if self.bits == 8:
            return native.Operand(self.qweight, self.scale)
        return native.Operand(self.qweight, self.scale, None if self.symmetric else self.zero,
                              self.group_size)

    @property
    def kernel_max_rows(self) -> int:
        """Rows per matrix up to which ``matmul_blocks``' row kernels beat a GEMM."""
        return kernels.INT8_KERNEL_MAX_ROWS if self.bits == 8 else kernels.INT4_KERNEL_MAX_ROWS

    @property
    def prefill_max_rows(self) -> int:
        """Rows per matrix of a stack up to which one ``matmul_blocks`` call for all the
        matrices beats a dequantize + GEMM per matrix (no per-matrix calls or barriers)."""
        return (kernels.INT8_BLOCKS_MAX_ROWS if self.bits == 8
                else kernels.INT4_BLOCKS_MAX_ROWS)

    # --- conversions ----------------------------------------------------------------------
    @torch.no_grad()
    def set_float(self, weight: torch.Tensor) -> None:
        """Quantise ``weight [..., N, K]`` into this matrix's format and device."""
        expected = (*self.stack, self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {list(weight.shape)}, expected {list(expected)}")
        device = self.qweight.device if not self.qweight.is_meta else weight.device
        # One matrix at a time: a stack of experts never has all its float temporaries alive.
        flat = weight.reshape(-1, self.out_features, self.in_features)
        if self.bits == 8:
            parts = [kernels.quantize_int8(w) for w in flat]
            names = ("qweight", "scale")
        elif self.symmetric:
            parts = [kernels.quantize_int4_symmetric(w, self.group_size) for w in flat]
            names = ("qweight", "scale")
        else:
            parts = [kernels.quantize_int4(w, self.group_size) for w in flat]
            names = ("qweight", "scale", "zero")
        state = {name: torch.stack([p[i] for p in parts]).reshape(
            *self.stack, *parts[0][i].shape) for i, name in enumerate(names)}
        self.load_quantized_state(state, device=device)

    def canonical_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the tensors ``quantized_state`` returns."""
        N, K, lead = self.out_features, self.in_features, self.stack
        if self.bits == 8:
            return {"qweight": ((*lead, N, K), torch.int8),
                    "scale": ((*lead, N), torch.bfloat16)}
        G = K // self.group_size
        shapes = {"qweight": ((*lead, N, K // 2), torch.uint8),
                  "scale": ((*lead, N, G), torch.bfloat16),
                  "zero": ((*lead, N, G), torch.bfloat16)}
        if self.symmetric:
            del shapes["zero"]
        return shapes

    def quantized_state(self) -> dict[str, torch.Tensor]:
        """Canonical tensors: int8 {qweight, scale}; int4 {qweight (nibbles), scale, zero}
        (no zero when symmetric)."""
        if self.bits == 8:
            return {"qweight": self.qweight, "scale": self.scale}
        if not self.packed:
            return {name: getattr(self, name) for name in self.canonical_shapes()}
        N, K = self.out_features, self.in_features
        flat_q = self.qweight.reshape(-1, *self.qweight.shape[-2:])
        q = torch.stack([kernels.kernel_unpack_int4(p, N, K) for p in flat_q])
        sz = self.scale_zero.transpose(-3, -2)  # [..., N, G, 2]
        state = {"qweight": q.reshape(*self.stack, N, K // 2),
                 "scale": sz[..., 0].contiguous(), "zero": sz[..., 1].contiguous()}
        return {name: state[name] for name in self.canonical_shapes()}

    @torch.no_grad()
    def load_quantized_state(self, state: dict[str, torch.Tensor], *,
                             device: torch.device | str | None = None) -> None:
        """Take canonical tensors (``quantized_state``'s form), checking their shapes."""
        device = device if device is not None else self.qweight.device
        N, K, lead = self.out_features, self.in_features, self.stack
        _check_shapes(state, {k: shape for k, (shape, _) in self.canonical_shapes().items()})
        if self.bits == 8:  # aligned: safetensors' memory maps are only 8-byte aligned
            self.qweight = kernels.aligned(state["qweight"].to(device=device, dtype=torch.int8))
            self.scale = kernels.aligned(state["scale"].to(device=device, dtype=torch.bfloat16))
            return
        if not self.packed:  # used in place: the native kernel reads any alignment
            self.qweight = state["qweight"].to(device=device, dtype=torch.uint8).contiguous()
            for name in self.canonical_shapes().keys() - {"qweight"}:
                setattr(self, name, state[name].to(device=device, dtype=torch.bfloat16)
                        .contiguous())
            return
        q = state["qweight"].reshape(-1, N, K // 2)
        packed = torch.stack([kernels.kernel_pack_int4(p.to("cpu")) for p in q])
        self.qweight = packed.reshape(*lead, *packed.shape[1:]).to(device)
        zero = torch.zeros_like(state["scale"]) if self.symmetric else state["zero"]
        self.scale_zero = kernels.scales_and_zeros(state["scale"], zero).to(device)

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None
                   ) -> torch.Tensor:
        """The float weight [..., N, K] this matrix represents (matrix ``index`` of a stack:
        [N, K]), for QLoRA's backward, tests and debugging."""
        state = self.quantized_state()
        if index is not None:
            state = {k: v[index] for k, v in state.items()}
        if self.bits == 8:
            return kernels.dequantize_int8(state["qweight"], state["scale"], dtype)
        zero = state.get("zero", torch.zeros_like(state["scale"]))
        return kernels.dequantize_int4(state["qweight"], state["scale"], zero, dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        group += ", symmetric=True" if self.symmetric else ""
        stack = f", stack={list(self.stack)}" if self.stack else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{group}{stack}")


def _check_shapes(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ValueError(f"quantized tensors missing: {', '.join(missing)}")
    wrong = [f"{k} (expected {list(v)}, got {list(state[k].shape)})"
             for k, v in shapes.items() if tuple(state[k].shape) != v]
    if wrong:
        raise ValueError("quantized tensors have the wrong shape: " + "; ".join(wrong))
