"""dsmoe's native decode kernels (csrc/rows_matmul.c): built on first use, called via ctypes.

Why native code: decoding multiplies each weight matrix by one activation row per sequence
(or a few), which should run at the speed weights stream from memory. On one CPU core
torch's kernels do not get there for int8 and bf16 weights (see the C file's header,
benchmarks/quantized.py and benchmarks/generate.py); these do ~2x better. They need no
torch headers, so building them is one C compiler call of under a second, cached per
source, compiler and CPU.

When they cannot be used (no C compiler or a failed build; a CPU without AVX2 still gets
portable loops), the functions here return None and callers take torch's kernels; a
warning says why, once. ``DSMOE_NATIVE_KERNELS=0`` turns them off.

Shapes: M rows, K in features, N out features.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = "rows_matmul.c"
# One library; the int4 kernels and the decode step's small ops have files of their own.
SOURCES = (SOURCE, "int4_matmul.c", "decode_ops.c", "decode_step.c")
# Included by every source (the entry points the files call in one another): part of the
# build's inputs and its cache key, not compiled on its own.
HEADERS = ("dsmoe_kernels.h",)
# int4 has a level of its own (vpdpbusd); the other kernels run "avx512" at level 3.
ISA_NAMES = {3: "avx512vnni", 2: "avx512", 1: "avx2", 0: "portable C"}
_ENV_SWITCH = "DSMOE_NATIVE_KERNELS"


def enabled() -> bool:
    return os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where built kernels live: $DSMOE_CACHE, else $XDG_CACHE_HOME/dsmoe, else ~/.cache/dsmoe."""
    if os.environ.get("DSMOE_CACHE"):
        return Path(os.environ["DSMOE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsmoe"


def _cpu_signature() -> str:
    """Model name and flags: a cache shared between different machines must not mix builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def torch_openmp_runtime() -> Path | None:
    """The GNU OpenMP runtime (libgomp) torch has loaded in this process, the one its
    wheel bundles; None where there is none (another runtime, or no /proc to read)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    mapped = {line.split(maxsplit=5)[5] for line in maps.splitlines()
              if line.count(" ") >= 5 and "/libgomp" in line}
    torch_dir = str(Path(torch.__file__).resolve().parent.parent)
    ours = sorted(p for p in mapped if p.startswith(torch_dir))  # torch/lib or torch.libs
    found = ours or sorted(mapped)
    return Path(found[0].strip()) if found else None


def _openmp_flags(runtime: Path | None) -> list[list[str]]:
    """Compiler flags to try in turn. OpenMP only splits rows between threads, so the
    last resort is none. First choice: link the very runtime torch uses, so that the
    kernels' parallel regions run on torch's thread pool (one pool for both; a wheel whose
    runtime has a hashed name would otherwise load the system libgomp as a second pool
    next to it, each spinning while the other works). ``--as-needed`` drops the
    ``-lgomp`` that ``-fopenmp`` adds, which that link no longer needs."""
    flags = [["-fopenmp"], []]
    if runtime is not None:
        flags.insert(0, ["-fopenmp", "-Wl,--as-needed", str(runtime),
                         f"-Wl,-rpath,{runtime.parent}"])
    return flags


def _build(sources: dict[str, bytes], target: Path) -> None:
    """Compile ``sources`` (name -> text; the ``.c`` files are compiled, the others, the
    headers they include, only written beside them) into the shared library ``target``
    (atomically: temp + rename)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        files = [Path(tmp) / name for name in sources]
        for file, text in zip(files, sources.values()):
            file.write_bytes(text)
        out = Path(tmp) / target.name
        compiled = [str(file) for file in files if file.suffix == ".c"]
        base = [compiler, "-O3", "-shared", "-fPIC", *compiled, "-o", str(out)]
        errors = []
        for extra in _openmp_flags(torch_openmp_runtime()):
            result = subprocess.run(base + extra + ["-lm"], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(out, target)
                return
            errors.append(result.stderr.strip()[-2000:])
        raise RuntimeError(f"{compiler} failed:\n" + "\n".join(errors))


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None when unavailable."""
    if not enabled():
        return None
    try:
        sources = {name: resources.files("dsmoe").joinpath("csrc", name).read_bytes()
                   for name in SOURCES + HEADERS}
        key = hashlib.sha256(b"".join(sources.values()) + _cpu_signature().encode() +
                             (os.environ.get("CC") or "").encode() +
                             str(torch_openmp_runtime()).encode()).hexdigest()[:16]
        path = cache_dir() / f"rows_matmul-{platform.machine()}-{key}.so"
        if not path.exists():
            _build(sources, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"dsmoe: the native decode kernels are unavailable, using torch's "
                      f"(slower) instead: {exc}", RuntimeWarning, stacklevel=2)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dsmoe_int8_blocks_matmul.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64,
                                             ctypes.c_int]
    lib.dsmoe_int8_blocks_matmul.restype = ctypes.c_int
    lib.dsmoe_float_blocks_matmul.argtypes = [ptr, ptr, ctypes.c_int, ptr, ptr, i64, i64, i64,
                                              ctypes.c_int]
    lib.dsmoe_float_blocks_matmul.restype = ctypes.c_int
    lib.dsmoe_experts_decode.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr,
                                         ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr,
                                         ctypes.c_int]
    lib.dsmoe_experts_decode.restype = ctypes.c_int
    lib.dsmoe_attention_decode.argtypes = [ptr] * 8 + [i64, ptr] + [i64] * 6 + [
        ctypes.c_float, ctypes.c_int]
    lib.dsmoe_attention_decode.restype = ctypes.c_int
    lib.dsmoe_rows_isa.restype = ctypes.c_int
    lib.dsmoe_omp_max_threads.restype = ctypes.c_int
    lib.dsmoe_rows_limit_isa.argtypes = [ctypes.c_int]
    lib.dsmoe_rows_limit_isa.restype = ctypes.c_int
    lib.dsmoe_stream_read.argtypes = [ptr, i64, ctypes.c_int]
    lib.dsmoe_stream_read.restype = ctypes.c_float
    lib.dsmoe_int4_blocks_matmul.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64,
                                             i64, ctypes.c_int]
    lib.dsmoe_int4_blocks_matmul.restype = ctypes.c_int
    lib.dsmoe_int4_dequantize.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64,
                                          ctypes.c_int]
    lib.dsmoe_int4_dequantize.restype = ctypes.c_int
    lib.dsmoe_q4_0_to_int4.argtypes = [ptr, ptr, ptr, i64]
    lib.dsmoe_q4_0_to_int4.restype = None
    lib.dsmoe_int4_isa.restype = ctypes.c_int
    _declare_decode_ops(lib)
    _declare_decode_step(lib)
    lib.dsmoe_int4_limit_isa.argtypes = [ctypes.c_int]
    lib.dsmoe_int4_limit_isa.restype = ctypes.c_int
    return lib


def _declare_decode_ops(lib: ctypes.CDLL) -> None:
    """Argument types of decode_ops.c's entry points (see the functions below)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dsmoe_linear_decode.argtypes = [ptr, ctypes.c_int, i64, ctypes.c_int, ptr, ptr, ptr,
                                        i64, ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.dsmoe_linear_decode.restype = ctypes.c_int
    lib.dsmoe_swiglu_decode.argtypes = [ptr, i64, ctypes.c_int, ctypes.c_int] + [ptr] * 9 + [
        i64, i64, i64, ptr, ctypes.c_int]
    lib.dsmoe_swiglu_decode.restype = ctypes.c_int
    lib.dsmoe_rmsnorm_decode.argtypes = [ptr] * 5 + [i64, i64, ctypes.c_float, ctypes.c_int]
    lib.dsmoe_rmsnorm_decode.restype = ctypes.c_int
    lib.dsmoe_experts_decode_dtype.argtypes = [ptr, ctypes.c_int, ptr, ptr, i64, i64,
                                               ctypes.c_int] + [ptr] * 6 + [
        i64, i64, i64, i64, ctypes.c_int, ptr, i64, i64, ptr, ctypes.c_int, ptr, ctypes.c_int]
    lib.dsmoe_experts_decode_dtype.restype = ctypes.c_int
    lib.dsmoe_attention_decode_dtype.argtypes = lib.dsmoe_attention_decode.argtypes
    lib.dsmoe_attention_decode_dtype.restype = ctypes.c_int
    lib.dsmoe_mla_decode.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, ptr, ctypes.c_int,
                                     ptr, ptr, i64, ptr, ptr] + [i64] * 8 + [
        ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.dsmoe_mla_decode.restype = ctypes.c_int
    lib.dsmoe_route_decode.argtypes = [ptr, ctypes.c_int, i64, ptr, ctypes.c_int, i64, i64, i64,
                                       ctypes.c_int, ptr, ctypes.c_int, i64, i64, ctypes.c_int,
                                       ctypes.c_float] + [ptr] * 5 + [ctypes.c_int]
    lib.dsmoe_route_decode.restype = ctypes.c_int


def openmp_max_threads() -> int | None:
    """``omp_get_max_threads()`` as the kernels' OpenMP runtime sees it (0: built without
    OpenMP; None: kernels unavailable). Equal to ``torch.get_num_threads()`` when they
    share torch's runtime, which is what ``torch.set_num_threads`` configures."""
    lib = library()
    return None if lib is None else lib.dsmoe_omp_max_threads()


def isa() -> str | None:
    """The instruction set the kernels run on this CPU, or None when they are unavailable."""
    lib = library()
    return None if lib is None else ISA_NAMES[max(lib.dsmoe_rows_isa(), lib.dsmoe_int4_isa())]


def limit_isa(name: str) -> str:
    """Run the kernels' ``name`` code path or the best one below it (for tests and
    benchmarks); returns the path now in use. Raises when the kernels are unavailable."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native decode kernels are unavailable")
    levels = {v: k for k, v in ISA_NAMES.items()}
    if name not in levels:
        raise ValueError(f"isa must be one of {sorted(levels)}, got {name!r}")
    rows = lib.dsmoe_rows_limit_isa(levels[name])
    return ISA_NAMES[max(rows, lib.dsmoe_int4_limit_isa(levels[name]))]


def stream_read(buf: torch.Tensor, threads: int) -> float | None:
    """Read every element of the contiguous fp32 CPU tensor ``buf`` once, as fast as this
    code can (wide loads into independent sums, ``threads`` contiguous slices) and return
    their sum: timed over a buffer far beyond the last-level cache, it measures the memory
    bandwidth the weight kernels could at best draw. None when the kernels are unavailable."""
    if buf.dtype != torch.float32 or buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError(f"stream_read: buf must be a contiguous fp32 CPU tensor, got "
                         f"{buf.dtype} on {buf.device}")
    if threads < 1:
        raise ValueError(f"stream_read: threads must be >= 1, got {threads}")
    lib = library()
    return None if lib is None else lib.dsmoe_stream_read(buf.data_ptr(), buf.numel(), threads)


Block = tuple[int, int, int]  # (matrix of the stack, first row, rows)


@functools.lru_cache(maxsize=64)
def _whole_matrix_table(rows: int) -> torch.Tensor:
    """The table of one matrix times all ``rows`` rows (every linear layer's decode step):
    built once per row count, since building a tensor costs more than the check."""
    return torch.tensor([[0, 0, rows]], dtype=torch.int64)  # [1, 3], read-only to C


def _block_table(blocks: list[Block], n_matrices: int, n_rows: int) -> torch.Tensor:
    """blocks as the C code's int64 [nb, 3] table, checked (in Python: a decode step has a
    few dozen blocks, and tensor ops would cost more than the check)."""
    if len(blocks) == 1 and blocks[0] == (0, 0, n_rows) and n_matrices >= 1:
        return _whole_matrix_table(n_rows)
    for e, first, rows in blocks:
        if not (0 <= e < n_matrices and first >= 0 and rows >= 0 and first + rows <= n_rows):
            raise ValueError(f"blocks {blocks} do not fit {n_matrices} matrices and "
                             f"{n_rows} rows")
    return torch.tensor(blocks, dtype=torch.int64).reshape(-1, 3)  # [nb, 3]


def _result(blocks: list[Block], P: int, N: int) -> torch.Tensor:
    """The fp32 [P, N] output: zeros unless one block covers every row."""
    if len(blocks) == 1 and blocks[0][1] == 0 and blocks[0][2] == P:
        return torch.empty(P, N, dtype=torch.float32)
    return torch.zeros(P, N, dtype=torch.float32)


def int8_rows_matmul(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
                     ) -> torch.Tensor | None:
    """rows [M, K] @ (scale * q).T -> fp32 [M, N] for q int8 [N, K], scale bf16 [N];
    None when the kernel is unavailable or cannot take these tensors (non-finite rows)."""
    if q.dim() != 2 or rows.dim() != 2:
        return None
    return int8_blocks_matmul(rows, q.unsqueeze(0), scale.unsqueeze(0), [(0, 0, rows.shape[0])])


def int8_blocks_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       blocks: list[Block]) -> torch.Tensor | None:
    """Rows [first, first + rows) of x [P, K] times matrix e of the stack (scale[e] * q[e]).T,
    for each block (e, first, rows), into the same rows of an fp32 [P, N] result (rows in
    no block are zero): every routed expert of a decode step in one call. q int8 [E, N, K],
    scale bf16 [E, N]. None when the kernel is unavailable or x is not finite."""
    lib = library()
    if lib is None or x.device.type != "cpu" or q.device.type != "cpu" or x.dim() != 2:
        return None
    if q.dtype != torch.int8 or scale.dtype != torch.bfloat16 or q.dim() != 3:
        return None
    E, N, K = q.shape
    if x.shape[1] != K or scale.shape != (E, N):
        raise ValueError(f"int8 matmul: rows {list(x.shape)}, weight {list(q.shape)}, "
                         f"scale {list(scale.shape)} do not fit together")
    xf = x.detach().to(torch.float32).contiguous()
    q, scale = q.contiguous(), scale.contiguous()
    table = _block_table(blocks, E, xf.shape[0])
    out = _result(blocks, xf.shape[0], N)
    status = lib.dsmoe_int8_blocks_matmul(xf.data_ptr(), q.data_ptr(), scale.data_ptr(),
                                          out.data_ptr(), xf.shape[0], table.data_ptr(),
                                          len(blocks), N, K, torch.get_num_threads())
    if status == -2:
        raise MemoryError("int8 matmul: out of memory for the activation buffer")
    return out if status == 0 else None


FLOAT_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def float_rows_matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """rows [M, K] @ weight.T -> fp32 [M, N] for weight fp32 or bf16 [N, K] (rows cast to
    fp32: exact products, fp32 sums); None when the kernels are unavailable or ``weight``
    is not a contiguous CPU matrix of those dtypes (e.g. ``set_matmul_layout``'s
    input-major layout, which torch's kernels serve better anyway)."""
    if weight.dim() != 2 or rows.dim() != 2:
        return None
    return float_blocks_matmul(rows, weight.unsqueeze(0), [(0, 0, rows.shape[0])])


def float_blocks_matmul(x: torch.Tensor, weight: torch.Tensor, blocks: list[Block]
                        ) -> torch.Tensor | None:
    """``int8_blocks_matmul`` for a stack of fp32 or bf16 matrices ``weight [E, N, K]``
    (each contiguous): fp32 [P, N], zeros outside the blocks; None when the kernels are
    unavailable or cannot take these tensors."""
    if (weight.device.type != "cpu" or x.device.type != "cpu"
            or weight.dtype not in FLOAT_WEIGHT_DTYPES or weight.dim() != 3
            or not weight.is_contiguous() or x.dim() != 2):
        return None
    lib = library()
    if lib is None:
        return None
    E, N, K = weight.shape
    if x.shape[1] != K:
        raise ValueError(f"matmul: rows {list(x.shape)} and weight {list(weight.shape)} do "
                         "not fit together")
    xf = x.detach().to(torch.float32).contiguous()
    table = _block_table(blocks, E, xf.shape[0])
    out = _result(blocks, xf.shape[0], N)
    lib.dsmoe_float_blocks_matmul(xf.data_ptr(), weight.data_ptr(),
                                  int(weight.dtype == torch.bfloat16), out.data_ptr(),
                                  table.data_ptr(), len(blocks), N, K, torch.get_num_threads())
    return out


def int4_blocks_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor | None, group_size: int, blocks: list[Block]
                       ) -> torch.Tensor | None:
    """``int8_blocks_matmul`` for int4 stacks in dsmoe's canonical layout (see
    quant/kernels.py): q uint8 [E, N, K/2], scale and zero bf16 [E, N, G] (zero None:
    symmetric). fp32 [P, N], zeros outside the blocks; None when the kernel is unavailable
    or x is not finite."""
    lib = library()
    if lib is None or x.device.type != "cpu" or q.device.type != "cpu" or x.dim() != 2:
        return None
    E, N, half = q.shape
    K = 2 * half
    G = K // group_size if group_size > 0 else 0
    if (x.shape[1] != K or scale.shape != (E, N, G) or G * group_size != K
            or (zero is not None and zero.shape != scale.shape)):
        raise ValueError(f"int4 matmul: rows {list(x.shape)}, weight {list(q.shape)}, scale "
                         f"{list(scale.shape)}, group_size {group_size} do not fit together")
    xf = x.detach().to(torch.float32).contiguous()
    q, scale = q.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    table = _block_table(blocks, E, xf.shape[0])
    out = _result(blocks, xf.shape[0], N)
    status = lib.dsmoe_int4_blocks_matmul(
        xf.data_ptr(), q.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
        out.data_ptr(), xf.shape[0], table.data_ptr(), len(blocks), N, K, group_size,
        torch.get_num_threads())
    if status == -2:
        raise MemoryError("int4 matmul: out of memory for the activation buffer")
    if status == -3:
        raise ValueError(f"int4 matmul: group_size {group_size} must be 32 or a multiple of 64")
    return out if status == 0 else None


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The float weight [N, K] (fp32 or bf16) of one canonical int4 matrix q [N, K/2],
    scale / zero [N, G]; None when the kernels are unavailable or dtype is another."""
    lib = library()
    if lib is None or dtype not in FLOAT_WEIGHT_DTYPES or q.device.type != "cpu":
        return None
    N, K = q.shape[0], 2 * q.shape[1]
    q, scale = q.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    out = torch.empty(N, K, dtype=dtype)
    status = lib.dsmoe_int4_dequantize(q.data_ptr(), scale.data_ptr(),
                                       None if zero is None else zero.data_ptr(),
                                       out.data_ptr(), int(dtype == torch.bfloat16), N, K,
                                       group_size, torch.get_num_threads())
    if status:
        raise ValueError(f"int4 dequantize: group_size {group_size} does not divide {K}")
    return out


# Weight kinds of ``dsmoe_experts_decode``: stored dtype -> kind (uint8: int4 nibbles).
_EXPERT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous tensor of ``dtype``, without an op where it already is one (a
    decode step's router outputs are)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _shared_args(shared: tuple[Operand, Operand, Operand] | None, D: int
                 ) -> tuple[int, ctypes.Array | None, int]:
    """(kind or -1, the nine pointers, width Fs) of the shared experts' operands, checked
    against the hidden size D."""
    if shared is None:
        return -1, None, 0
    gate, up, down = shared
    kind = uniform_kind(gate, up, down)
    per_byte = 2 if kind == 3 else 1
    Fs = gate.weight.shape[0]
    if (kind is None or gate.weight.shape != (Fs, D // per_byte)
            or up.weight.shape != gate.weight.shape
            or down.weight.shape != (D, Fs // per_byte)):
        raise ValueError(f"experts decode: shared experts gate {list(gate.weight.shape)}, up "
                         f"{list(up.weight.shape)}, down {list(down.weight.shape)} do not fit "
                         f"hidden size {D} (or mix kinds)")
    ptrs = (ctypes.c_void_p * 9)(*(p for op in shared for p in (
        op.weight.data_ptr(), _ptr(op.scale), _ptr(op.zero))))
    return kind, ptrs, Fs


def experts_decode(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor,
                   scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                   zeros: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                   group_size: int = 0, out_dtype: torch.dtype = torch.float32,
                   shared: tuple[Operand, Operand, Operand] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A MoE layer's routed SwiGLU (silu) experts for a decode step in one native call:
    sort by expert, both matmuls, the activation and the weighted combine (see the C
    file). x [T, D]; topk_idx [T, K] and topk_weight [T, K] from the router; gate_up
    [E, 2F, D] and down [E, D, F] contiguous, fp32 or bf16; or int8 with ``scales`` (bf16
    [E, 2F], [E, D]); or int4 nibbles uint8 [E, 2F, D/2], [E, D, F/2] with ``scales``
    and ``zeros`` (bf16 [E, N, G]; None: symmetric) in groups of ``group_size``.
    Returns (out [T, D] in ``out_dtype``, fp32 or bf16: fp32 sums rounded once,
    assignments per expert int64 [E]), or None when the kernels are unavailable or cannot
    take these tensors (the caller then runs the torch path, which also handles
    non-finite activations). fp32 and bf16 rows are read as they are (no cast).
    ``shared``: the shared experts' (gate, up, down) SwiGLU operands, added to the routed
    output before its rounding (the MoE layer's whole FFN in the one call)."""
    kind = _EXPERT_KINDS.get(gate_up.dtype)
    if (kind is None or down.dtype != gate_up.dtype or (kind >= 2) != (scales is not None)
            or out_dtype not in FLOAT_WEIGHT_DTYPES
            or gate_up.dim() != 3 or down.dim() != 3 or x.dim() != 2
            or not (gate_up.is_contiguous() and down.is_contiguous())
            or x.device.type != "cpu" or gate_up.device.type != "cpu"):
        return None
    lib = library()
    if lib is None:
        return None
    E, twoF, D = gate_up.shape
    T, K = topk_idx.shape
    per_byte = 2 if kind == 3 else 1
    D, F = D * per_byte, twoF // 2
    if (down.shape != (E, D, F // per_byte) or x.shape != (T, D)
            or topk_weight.shape != (T, K)):
        raise ValueError(f"experts decode: rows {list(x.shape)}, picks {list(topk_idx.shape)}, "
                         f"gate_up {list(gate_up.shape)}, down {list(down.shape)} do not fit")
    shared_kind, shared_ptrs, Fs = _shared_args(shared, D)
    xf = x.detach().contiguous() if x.dtype in FLOAT_WEIGHT_DTYPES else x.detach().float()
    idx = _as(topk_idx, torch.int64)
    w = _as(topk_weight.detach(), torch.float32)
    gu_s, dn_s = (s.contiguous() for s in scales) if scales is not None else (None, None)
    gu_z, dn_z = (None if z is None else z.contiguous() for z in zeros)
    out = torch.empty(T, D, dtype=out_dtype)
    counts = torch.empty(E, dtype=torch.int64)
    status = lib.dsmoe_experts_decode_dtype(
        xf.data_ptr(), xf.dtype == torch.bfloat16, idx.data_ptr(), w.data_ptr(), T, K, kind,
        gate_up.data_ptr(), _ptr(gu_s), _ptr(gu_z), down.data_ptr(), _ptr(dn_s), _ptr(dn_z),
        group_size, E, D, F, shared_kind, shared_ptrs,
        shared[0].group_size if shared else 0, Fs, out.data_ptr(), out_dtype == torch.bfloat16,
        counts.data_ptr(), torch.get_num_threads())
    if status == -2:
        raise MemoryError("experts decode: out of memory for the work buffers")
    if status == -3:
        raise ValueError(f"experts decode: an expert id in topk_idx lies outside [0, {E})")
    if status == -4:
        raise ValueError(f"experts decode: int4 group_size {group_size} must be 32 or a "
                         "multiple of 64 dividing both matrices' inputs")
    return (out, counts) if status == 0 else None


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: int,
                     mask: torch.Tensor | None, scale: float, same_dtype: bool = False
                     ) -> torch.Tensor | None:
    """Multi-head attention of one decode step in one native call (see the C file):
    rotate the new query and key ("rotate half" RoPE), write key and value into the cache
    at ``slot``, attend over slots [0, slot]. q [B, 1, H*d], k and v [B, 1, Hkv*d],
    cos/sin [B, 1, d], keys/values one layer of the cache [B, Hkv, S_max, d] (contiguous),
    mask bool [B or 1, 1, 1, slot + 1] (True = may attend) or None; all fp32 or all bf16.
    Returns fp32 [B, 1, H*d] (``same_dtype``: in the inputs' dtype, rounded once), or None
    when the kernels are unavailable or cannot take these tensors (the caller then runs
    torch's ops)."""
    dtype = q.dtype
    tensors = (q, k, v, cos, sin, keys, values)
    if (dtype not in FLOAT_WEIGHT_DTYPES or any(t.dtype != dtype for t in tensors)
            or any(t.device.type != "cpu" for t in tensors) or keys.dim() != 4
            or not (keys.is_contiguous() and values.is_contiguous())):
        return None
    B, Hkv, S_max, d = keys.shape
    H = q.shape[-1] // d
    if (q.shape != (B, 1, H * d) or k.shape != (B, 1, Hkv * d) or v.shape != k.shape
            or cos.shape != (B, 1, d) or sin.shape != cos.shape or values.shape != keys.shape
            or d % 2 or H % Hkv or not 0 <= slot < S_max):
        return None
    masked = _mask_rows(mask, B, slot + 1)
    lib = library()
    if masked is None or lib is None:
        return None
    rows, stride = masked
    q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
    out = torch.empty(B, 1, H * d, dtype=dtype if same_dtype else torch.float32)
    status = (lib.dsmoe_attention_decode_dtype if same_dtype else lib.dsmoe_attention_decode)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        keys.data_ptr(), values.data_ptr(), None if rows is None else rows.data_ptr(), stride,
        out.data_ptr(), B, H, Hkv, d, S_max, slot, scale, int(dtype == torch.bfloat16))
    if status == -2:
        raise MemoryError("attention decode: out of memory for the scores")
    return out


class MLAShape(NamedTuple):
    """Multi-head Latent Attention's widths: H heads, n nope and r rope dims of a query /
    key, v of a value, C the latent rank."""
    heads: int
    nope: int
    rope: int
    v: int
    rank: int


def _mask_rows(mask: torch.Tensor | None, B: int, keys: int
               ) -> tuple[torch.Tensor | None, int] | None:
    """A decode step's bool mask [B or 1, 1, 1, keys] as uint8 rows and their stride (0: one
    row for every sequence); (None, 0) without a mask; None for any other mask."""
    if mask is None:
        return None, 0
    if mask.dtype != torch.bool or mask.shape[-1] != keys or mask.shape[0] not in (1, B):
        return None
    rows = mask.reshape(mask.shape[0], keys).contiguous().view(torch.uint8)
    return rows, 0 if rows.shape[0] == 1 else keys


def mla_decode(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, latents: torch.Tensor,
               slot: int, mask: torch.Tensor | None, w_kv_b: torch.Tensor, scale: float,
               shape: MLAShape) -> torch.Tensor | None:
    """MLA's absorbed decode attention in one call (see csrc/decode_ops.c): normalise and
    rotate the new latent into the cache at ``slot``, absorb each head's query through
    W_UK, attend over slots [0, slot], values through W_UV. q [B, 1, H*(n+r)] (q_proj's
    output), kv [B, 1, C+r] (kv_a_proj_with_mqa's), norm_weight [C], cos/sin [B, 1, r],
    latents one layer of the cache [B, S_max, C+r] (contiguous), mask bool [B or 1, 1, 1,
    slot + 1] or None, w_kv_b [H*(n+v), C]; all of one dtype, fp32 or bf16. Returns
    [B, 1, H*v] in that dtype (o_proj's input), or None when the kernels are unavailable or
    cannot take these tensors (the caller runs torch's ops)."""
    H, n, r, v, C = shape
    tensors = (q, kv, norm_weight, cos, sin, latents, w_kv_b)
    dtype = q.dtype
    if (dtype not in FLOAT_WEIGHT_DTYPES or any(t.dtype != dtype for t in tensors)
            or any(t.device.type != "cpu" for t in tensors) or latents.dim() != 3
            or not latents.is_contiguous() or r % 2):
        return None
    B, S_max, W = latents.shape
    if (q.shape != (B, 1, H * (n + r)) or kv.shape != (B, 1, C + r) or W != C + r
            or cos.shape != (B, 1, r) or sin.shape != cos.shape
            or norm_weight.shape != (C,) or w_kv_b.shape != (H * (n + v), C)
            or not 0 <= slot < S_max):
        return None
    rows = _mask_rows(mask, B, slot + 1)
    lib = library()
    if rows is None or lib is None:
        return None
    q, kv, norm_weight, cos, sin, w_kv_b = (t.contiguous() for t in (q, kv, norm_weight, cos,
                                                                     sin, w_kv_b))
    out = torch.empty(B, 1, H * v, dtype=dtype)
    status = lib.dsmoe_mla_decode(
        q.data_ptr(), kv.data_ptr(), norm_weight.data_ptr(), eps, cos.data_ptr(),
        sin.data_ptr(), interleaved, latents.data_ptr(), _ptr(rows[0]), rows[1],
        w_kv_b.data_ptr(), out.data_ptr(), B, H, n, r, v, C, S_max, slot, scale,
        dtype == torch.bfloat16, torch.get_num_threads())
    if status == -2:
        raise MemoryError("MLA decode: out of memory for the scores")
    return out


def q4_0_to_int4(blocks: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """llama.cpp Q4_0 blocks (uint8 [n, 18]) -> symmetric int4: q uint8 [n, 16] in the
    canonical nibble order and scale bf16 [n] (the fp16 d rounded); None without the
    library. Streams the bytes once (torch's gather + cat + pack takes ~10x longer).
    ``out``: contiguous (q, scale) of those shapes to write into (e.g. slots of the final
    stacked weights) instead of new tensors."""
    lib = library()
    if lib is None:
        return None
    blocks = blocks.contiguous()
    n = blocks.shape[0]
    if out is None:
        out = torch.empty(n, 16, dtype=torch.uint8), torch.empty(n, dtype=torch.bfloat16)
    q, scale = out
    if (q.dtype, scale.dtype) != (torch.uint8, torch.bfloat16) or q.numel() != 16 * n \
            or scale.numel() != n or not (q.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"q4_0_to_int4: out must be contiguous uint8 [{n}, 16] and bf16 "
                         f"[{n}], got {q.dtype} {list(q.shape)} and {scale.dtype} "
                         f"{list(scale.shape)}")
    lib.dsmoe_q4_0_to_int4(blocks.data_ptr(), q.data_ptr(), scale.data_ptr(), n)
    return q, scale


# --- the decode step's small ops (csrc/decode_ops.c) ----------------------------------------
class Operand(NamedTuple):
    """One weight matrix [N, K] as the decode ops take it: fp32 or bf16 ``weight``; or int8
    with bf16 ``scale`` [N]; or int4 nibbles uint8 [N, K/2] with bf16 ``scale`` and
    ``zero`` [N, G] (zero None: symmetric) in groups of ``group_size``."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int = 0


def _kind(op: Operand) -> int | None:
    """``_EXPERT_KINDS``' code of a contiguous CPU operand, None for anything else."""
    w = op.weight
    kind = _EXPERT_KINDS.get(w.dtype)
    if (kind is None or w.dim() != 2 or w.device.type != "cpu" or not w.is_contiguous()
            or (kind >= 2) != (op.scale is not None)):
        return None
    return kind


def uniform_kind(*ops: Operand) -> int | None:
    """The one kind operands share with one group size (the native SwiGLU steps take no
    mix: ``QuantMatrix`` may keep a shape int4 cannot take in int8, or pick a smaller
    group), else None."""
    kind = _kind(ops[0])
    if kind is None or any(_kind(op) != kind or op.group_size != ops[0].group_size
                           for op in ops[1:]):
        return None
    return kind


def _rows_ok(x: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.dtype in FLOAT_WEIGHT_DTYPES and x.device.type == "cpu"
            and x.is_contiguous())


def linear_decode(x: torch.Tensor, op: Operand, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """x [M, K] @ W.T (+ bias [N]) -> [M, N] in ``out_dtype`` (default x's; fp32 sums,
    rounded once), reading and writing the activations in their dtype (no casts around
    the kernel); bias in ``out_dtype``. None when the kernels are unavailable or cannot
    take these tensors (non-finite rows for int8 / int4): the caller runs torch's path."""
    kind = _kind(op)
    out_dtype = out_dtype or x.dtype
    lib = library()
    if kind is None or lib is None or not _rows_ok(x) or out_dtype not in FLOAT_WEIGHT_DTYPES:
        return None
    M, K = x.shape
    N = op.weight.shape[0]
    if op.weight.shape[1] * (2 if kind == 3 else 1) != K or (
            bias is not None and (bias.dtype != out_dtype or bias.shape != (N,))):
        raise ValueError(f"linear decode: rows {list(x.shape)}, weight "
                         f"{list(op.weight.shape)} do not fit together")
    out = torch.empty(M, N, dtype=out_dtype)
    status = lib.dsmoe_linear_decode(
        x.data_ptr(), x.dtype == torch.bfloat16, M, kind, op.weight.data_ptr(),
        _ptr(op.scale), _ptr(op.zero), op.group_size, _ptr(bias), N, K, out.data_ptr(),
        out_dtype == torch.bfloat16, torch.get_num_threads())
    if status == -2:
        raise MemoryError("linear decode: out of memory for the activation buffers")
    return out if status == 0 else None


def swiglu_decode(x: torch.Tensor, gate: Operand, up: Operand, down: Operand
                  ) -> torch.Tensor | None:
    """down(silu(gate x) * up x) for x [M, D] (gate, up [F, D], down [D, F], all of one
    kind and group size) in one call -> [M, D] in x's dtype (fp32 inside, rounded once).
    None when the kernels are unavailable or cannot take these tensors."""
    kind = uniform_kind(gate, up, down)
    lib = library()
    if kind is None or lib is None or not _rows_ok(x):
        return None
    M, D = x.shape
    per_byte = 2 if kind == 3 else 1
    F = gate.weight.shape[0]
    if (gate.weight.shape != (F, D // per_byte) or up.weight.shape != gate.weight.shape
            or down.weight.shape != (D, F // per_byte)):
        raise ValueError(f"swiglu decode: rows {list(x.shape)}, gate {list(gate.weight.shape)},"
                         f" up {list(up.weight.shape)}, down {list(down.weight.shape)} do not"
                         " fit together")
    out = torch.empty(M, D, dtype=x.dtype)
    status = lib.dsmoe_swiglu_decode(
        x.data_ptr(), M, x.dtype == torch.bfloat16, kind,
        *(p for op in (gate, up, down) for p in (op.weight.data_ptr(), _ptr(op.scale),
                                                 _ptr(op.zero))),
        gate.group_size, D, F, out.data_ptr(), torch.get_num_threads())
    if status == -2:
        raise MemoryError("swiglu decode: out of memory for the activation buffers")
    return out if status == 0 else None


def rmsnorm_decode(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   delta: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """RMSNorm of rows x [M, D] (``model/norm.py``'s order of roundings) in one call ->
    (None, normed [M, D]); with ``delta`` the residual add first -> (x + delta, its norm).
    All tensors of one dtype (fp32 or bf16); None where that does not hold or the kernels
    are unavailable."""
    lib = library()
    if (lib is None or not _rows_ok(x) or weight.dtype != x.dtype or weight.dim() != 1
            or weight.shape[0] != x.shape[1] or not weight.is_contiguous()
            or (delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype
                                       or not delta.is_contiguous()))):
        return None
    M, D = x.shape
    out = torch.empty(M, D, dtype=x.dtype)
    total = None if delta is None else torch.empty(M, D, dtype=x.dtype)
    if lib.dsmoe_rmsnorm_decode(x.data_ptr(), _ptr(delta), _ptr(total), weight.data_ptr(),
                                out.data_ptr(), M, D, eps, x.dtype == torch.bfloat16):
        raise MemoryError("rmsnorm decode: out of memory")
    return total, out


# Selection codes of ``dsmoe_route_decode``: how the kept expert groups are ranked (none:
# every expert competes).
ROUTE_GROUP_RANKS = {None: 0, "max": 1, "top2": 2}


def router_decode(x: torch.Tensor, gate: torch.Tensor, k: int, renormalize: bool,
                  scaling: float, *, sigmoid: bool = False, bias: torch.Tensor | None = None,
                  group_rank: str | None = None, groups: int = 1, keep_groups: int = 1
                  ) -> tuple[torch.Tensor, ...] | None:
    """Routing of x [T, D] by the gate weight [E, D] (fp32 or bf16) in one call -> (topk_idx
    int64 [T, K], weight, topk_score fp32 [T, K], scores, logits fp32 [T, E]), the picks in
    descending order of (bias-corrected) score. Softmax scores (``sigmoid``: V3's), plus the
    fp32 ``bias`` [E] for the selection only; ``group_rank`` "max" / "top2" keeps the
    ``keep_groups`` best of ``groups`` contiguous expert groups (moe/router.py's
    ``select_group_limited``), None picks among all experts. None when the kernels are
    unavailable, cannot take these tensors, or a logit is not finite."""
    lib = library()
    if (lib is None or not _rows_ok(x) or gate.dtype not in FLOAT_WEIGHT_DTYPES
            or gate.dim() != 2 or gate.shape[1] != x.shape[1] or not gate.is_contiguous()
            or gate.device.type != "cpu" or not 0 < k <= gate.shape[0]):
        return None
    T, D = x.shape
    E = gate.shape[0]
    method = ROUTE_GROUP_RANKS[group_rank]
    if method and (groups < 1 or E % groups or not 0 < keep_groups <= groups
                   or k > keep_groups * (E // groups) or (method == 2 and E // groups < 2)):
        return None  # torch's selection raises its own error for these
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (E,)
                             or bias.device.type != "cpu" or not bias.is_contiguous()):
        return None
    logits, scores = torch.empty(T, E), torch.empty(T, E)
    idx, score, weight = torch.empty(T, k, dtype=torch.int64), torch.empty(T, k), torch.empty(T, k)
    status = lib.dsmoe_route_decode(
        x.data_ptr(), x.dtype == torch.bfloat16, T, gate.data_ptr(), gate.dtype == torch.bfloat16,
        E, D, k, sigmoid, _ptr(bias), method, groups if method else 1,
        keep_groups if method else 1, renormalize, scaling, logits.data_ptr(),
        scores.data_ptr(), idx.data_ptr(), score.data_ptr(), weight.data_ptr(),
        torch.get_num_threads())
    if status == -2:
        raise MemoryError("router decode: out of memory")
    return (idx, weight, score, scores, logits) if status == 0 else None


# --- a whole decode step in one call (csrc/decode_step.c) ----------------------------------
_i64, _ptr_t = ctypes.c_int64, ctypes.c_void_p


class StepOp(ctypes.Structure):
    """decode_step.c's ``step_op``: one weight matrix [N, K] (``Operand``'s fields) and an
    optional bias [N] in the activations' dtype."""

    _fields_ = [("kind", _i64), ("group", _i64), ("N", _i64), ("K", _i64), ("w", _ptr_t),
                ("scale", _ptr_t), ("zero", _ptr_t), ("bias", _ptr_t)]


class StepLayer(ctypes.Structure):
    """decode_step.c's ``step_layer``: one block's norms, projections, cache, routing and
    FFN (routing -1: dense SwiGLU in ``shared``); MLA's own fields last (MLA: ``q`` is
    q_proj or q_b_proj, ``k`` kv_a_proj_with_mqa)."""

    _fields_ = [("in_norm", _ptr_t), ("post_norm", _ptr_t), ("in_eps", ctypes.c_float),
                ("post_eps", ctypes.c_float), ("q", StepOp), ("k", StepOp), ("v", StepOp),
                ("o", StepOp), ("keys", _ptr_t), ("values", _ptr_t), ("routing", _i64),
                ("gate", _ptr_t), ("bias", _ptr_t), ("gate_bf16", _i64), ("E", _i64),
                ("top_k", _i64), ("renorm", _i64), ("sigmoid", _i64), ("method", _i64),
                ("groups", _i64), ("keep", _i64), ("scaling", ctypes.c_float), ("ekind", _i64),
                ("egroup", _i64), ("F", _i64), ("gate_up", _ptr_t), ("gu_scale", _ptr_t),
                ("gu_zero", _ptr_t), ("down", _ptr_t), ("dn_scale", _ptr_t),
                ("dn_zero", _ptr_t), ("skind", _i64), ("sgroup", _i64), ("Fs", _i64),
                ("shared", _ptr_t * 9), ("q_a", StepOp), ("q_norm", _ptr_t),
                ("kv_norm", _ptr_t), ("q_eps", ctypes.c_float), ("kv_eps", ctypes.c_float),
                ("mla_scale", ctypes.c_float), ("interleaved", _i64), ("kv_b", _ptr_t),
                ("latents", _ptr_t)]


class StepModel(ctypes.Structure):
    """decode_step.c's ``step_model``: the shapes, the embedding, the RoPE table [S_max, d]
    (MLA: [S_max, r]), the final norm and head, the layers, then MLA's widths (mla 0: MHA)."""

    _fields_ = [(name, _i64) for name in ("n_layers", "B", "D", "H", "Hkv", "d", "S_max", "V",
                                          "bf16", "max_E", "max_K")] + [
        ("final_eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("embed", _ptr_t),
        ("final_norm", _ptr_t), ("cos", _ptr_t), ("sin", _ptr_t), ("head", StepOp),
        ("layers", ctypes.POINTER(StepLayer))] + [
        (name, _i64) for name in ("mla", "n", "r", "v", "C", "Q")]


def _declare_decode_step(lib: ctypes.CDLL) -> None:
    plan = ctypes.POINTER(StepModel)
    lib.dsmoe_decode_step_scratch_bytes.argtypes = [plan]
    lib.dsmoe_decode_step_scratch_bytes.restype = _i64
    lib.dsmoe_decode_step.argtypes = [plan, _ptr_t, _ptr_t, _ptr_t, _i64, _ptr_t, _ptr_t,
                                      ctypes.c_int]
    lib.dsmoe_decode_step.restype = ctypes.c_int


def decode_step_scratch(plan: StepModel) -> torch.Tensor | None:
    """The work buffer ``decode_step`` needs for ``plan`` (allocate once per plan)."""
    lib = library()
    if lib is None:
        return None
    return torch.empty(lib.dsmoe_decode_step_scratch_bytes(ctypes.byref(plan)), dtype=torch.uint8)


_STEP_ERRORS = {
    -2: (MemoryError, "out of memory for the attention scores or expert buffers"),
    -4: (ValueError, "an int4 group size the kernels do not take"),
    -5: (ValueError, "a position beyond the decoder's RoPE table (max_seq_len)"),
    -6: (ValueError, "a token id outside [0, vocab_size)"),
    -7: (ValueError, "a routing kind the native step does not know"),
}


def decode_step(plan: StepModel, tokens: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor, slot: int, scratch: torch.Tensor) -> torch.Tensor | None:
    """One decode step of the whole model in one native call (see decode_step.c): tokens
    int64 [B] at ``positions`` int64 [B] (advanced by one in place on success), attending
    to the slots ``valid`` uint8 [B, S_max] marks, writing the cache at ``slot``. Returns
    fp32 logits [B, V], or None when an activation was not finite (the caller redoes the
    step through the modules; nothing but the cache at ``slot`` was written)."""
    lib = library()
    if lib is None:
        return None
    B = plan.B
    if not 0 <= slot < plan.S_max:
        raise ValueError(f"native decode step: slot {slot} outside the cache's "
                         f"[0, {plan.S_max})")
    for name, t, dtype, shape in (("tokens", tokens, torch.long, (B,)),
                                  ("positions", positions, torch.long, (B,)),
                                  ("valid", valid, torch.uint8, (B, plan.S_max))):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"native decode step: {name} must be contiguous {dtype} "
                             f"{list(shape)}, got {t.dtype} {list(t.shape)}")
    if scratch.numel() < lib.dsmoe_decode_step_scratch_bytes(ctypes.byref(plan)):
        raise ValueError("native decode step: scratch smaller than decode_step_scratch's")
    logits = torch.empty(B, plan.V, dtype=torch.float32)
    status = lib.dsmoe_decode_step(ctypes.byref(plan), tokens.data_ptr(), positions.data_ptr(),
                                   valid.data_ptr(), slot, scratch.data_ptr(),
                                   logits.data_ptr(), torch.get_num_threads())
    if status in _STEP_ERRORS:
        error, why = _STEP_ERRORS[status]
        raise error(f"native decode step: {why}")
    return logits if status == 0 else None
