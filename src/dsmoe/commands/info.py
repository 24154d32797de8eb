"""Show a model's layers, experts, parameter counts and weight memory.

MODEL is an HF model directory (config.json, plus its safetensors if present), a
config.json file, a llama.cpp "deepseek" GGUF file, or a preset name (tiny,
deepseek-moe-2b, deepseek-moe-16b, deepseek-moe-145b). No weights are loaded: counts come
from the config's shapes; the stored tensors (names, shapes, types) are read from the
safetensors headers of a directory or from the GGUF's metadata and tensor table (the
tensor data is never read, so a quantized GGUF costs no more than a directory). A GGUF's
config is its llama.cpp metadata, read as ``dsmoe.checkpoint.gguf`` reads it for loading.

Active parameters per token are the weights one token's forward pass reads: everything
except the routed experts it is not sent to (embedding and lm_head included, as in the
DeepSeekMoE paper's 16.4B total / 2.8B active); DeepSeek-V2's papers leave the input
embedding out (V2-Lite: 15.7B / 2.4B), and that figure is printed beside it. V3's
multi-token-prediction module is stored but not run: it is reported apart (671B + 14B).
Memory is for the weights alone.

The stored tensors are checked as loading checks them (names, shapes, stored dtypes: an
int32 or fp8 safetensors file is flagged, not called fine); a checkpoint that DOES NOT match
its config exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsmoe.config import ModelConfig
from dsmoe.params import WEIGHT_FORMATS, count_parameters, mtp_parameters, weight_bytes
from dsmoe.presets import PRESETS

if TYPE_CHECKING:
    from dsmoe.checkpoint.gguf import GGUFFile

ACTIVE_CONVENTION = ("active: every weight except the routed experts a token is not sent to; "
                     "embedding and lm_head included, as the DeepSeekMoE paper counts; "
                     "DeepSeek-V2's papers count lm_head but not the input embedding")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model",
                        help="HF directory, config.json file, .gguf file or preset name")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def _is_gguf(path: Path) -> bool:
    """By suffix, or by the magic bytes for a GGUF saved under another name."""
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _resolve(model: str) -> tuple[ModelConfig, str, Path | GGUFFile | None]:
    """(config, description of the source, HF directory / parsed GGUF / None)."""
    from dsmoe.checkpoint import hf

    path = Path(model)
    if path.is_dir():
        return hf.read_config(path), f"HF directory {path}", path
    if path.is_file():
        if _is_gguf(path):
            from dsmoe.checkpoint.gguf import GGUFFile

            gguf_file = GGUFFile(path)  # validates magic, header, tensor extents
            return gguf_file.config(), f"GGUF file {path}", gguf_file
        if path.suffix != ".json":
            raise ValueError(f"{path}: dsmoe info reads HF directories, config.json files, "
                             ".gguf files and presets")
        return hf.read_config(path), f"config file {path}", None
    if model in PRESETS:
        return ModelConfig.preset(model), f"preset {model}", None
    raise ValueError(f"{model!r} is neither an HF directory, a config.json file, a .gguf file "
                     f"nor a preset (presets: {', '.join(sorted(PRESETS))})")


def _type_counts(types: list[str]) -> dict[str, int]:
    """Tensors per stored type, most common first (ties by name)."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _load_problem(directory: Path) -> str | None:
    """Why loading would refuse the directory (names, shapes, stored dtypes such as int32 or
    fp8), from the check loading itself makes; None when it would load."""
    from dsmoe.checkpoint.hf import hf_source
    from dsmoe.checkpoint.loading import meta_model
    from dsmoe.quant.checkpoint import is_quantized_checkpoint

    if is_quantized_checkpoint(directory):  # int8/int4 and scales by design: its own
        return None                         # loader checks that layout
    try:
        source = hf_source(directory)
        # what loading runs before reading a byte of weights
        source.check(meta_model(source.config))
    except ValueError as exc:
        return str(exc).removeprefix("checkpoint does not match the config: ")
    return None


def _checkpoint(directory: Path, config: ModelConfig) -> dict[str, Any] | None:
    """What the directory stores, from safetensors headers; None without weights. V3's
    multi-token-prediction tensors are counted apart (``mtp_*``): loading ignores them.
    Stored buffers (V3's routing bias) and FP8 block scales are not parameters and not
    counted."""
    from dsmoe.checkpoint import fp8, hf, keys
    from dsmoe.quant.checkpoint import is_quantized_checkpoint

    try:
        stored = hf.stored_tensors(directory)
    except FileNotFoundError:
        return None
    files = sorted({t.file for t in stored.values()})
    decoder = hf.decoder_tensors(stored, config)
    mtp = [t for name, t in stored.items() if name not in decoder]
    decoder, _ = fp8.split_scales(decoder)  # FP8 block scales are not parameters
    numel = sum(math.prod(t.shape) for name, t in decoder.items()
                if not name.endswith(keys.BUFFER_SUFFIXES))
    total = count_parameters(config).total
    problem = _load_problem(directory)
    if problem is None and numel != total and not is_quantized_checkpoint(directory):
        problem = f"{numel} stored parameters, the config implies {total}"
    return {"format": "safetensors", "files": len(files),
            "mtp_tensors": len(mtp), "mtp_parameters": sum(math.prod(t.shape) for t in mtp),
            "bytes": sum(f.stat().st_size for f in files),
            "tensors": len(decoder), "parameters": numel,
            "dtypes": sorted({t.dtype for t in stored.values()}),
            "tensor_types": _type_counts([t.dtype for t in stored.values()]),
            "file_type": None, "matches_config": problem is None, "problem": problem}


def _gguf_checkpoint(f: GGUFFile, config: ModelConfig) -> dict[str, Any]:
    """What a GGUF stores, from its tensor table (no tensor data is read). The tensors are
    checked name by name and shape by shape against the metadata's config, the check
    ``load_gguf`` makes; a mismatch is reported, not raised, as for a directory."""
    import gguf

    types = [gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in f.tensors.values()]
    file_type = f.get("general.file_type", None)
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(int(file_type)).name
        except (ValueError, TypeError):  # a newer type, or metadata of the wrong type
            file_type = f"unknown ({file_type})"
    try:
        f.check_tensors(config)
        problem = None
    except ValueError as exc:
        problem = str(exc).removeprefix(f"{f.path}: ")
    return {"format": "gguf", "files": 1, "bytes": f.path.stat().st_size,
            "mtp_tensors": 0, "mtp_parameters": 0,
            "tensors": len(types),
            "parameters": sum(int(t.n_elements) for t in f.tensors.values()),
            "dtypes": sorted(set(types)), "tensor_types": _type_counts(types),
            "file_type": file_type, "matches_config": problem is None, "problem": problem}


def describe(config: ModelConfig) -> dict[str, Any]:
    """Everything ``dsmoe info`` reports about a config, as plain data."""
    c = config
    counts = count_parameters(c)
    moe = len(c.moe_layer_indices)
    return {
        "layers": c.num_hidden_layers, "dense_layers": c.num_hidden_layers - moe,
        "moe_layers": moe, "hidden_size": c.hidden_size,
        "attention": c.attention_type, "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "mla": _mla(c) if c.attention_type == "mla" else None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "routed_experts": c.n_routed_experts if moe else 0,
        "shared_experts": (c.n_shared_experts or 0) if moe else 0,
        "experts_per_token": c.num_experts_per_tok if moe else 0,
        "expert_width": c.moe_intermediate_size if moe else None,
        "dense_width": c.intermediate_size,
        "routing": f"{c.scoring_func}, {c.topk_method}" if moe else None,
        "parameters": {"total": counts.total, "active": counts.active,
                       "non_embedding": counts.non_embedding,
                       "active_non_embedding": counts.active_non_embedding,
                       "active_without_input_embedding": counts.active_without_input_embedding,
                       "multi_token_prediction": mtp_parameters(c),
                       "by_kind": {k: v for k, v in vars(counts).items()}},
        "active_convention": ACTIVE_CONVENTION,
        "multi_token_prediction_layers": c.num_nextn_predict_layers,
        "weight_memory_bytes": {fmt: weight_bytes(counts.total, fmt) for fmt in WEIGHT_FORMATS},
    }


def _mla(c: ModelConfig) -> dict[str, Any]:
    return {"q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
            "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim,
            "v_head_dim": c.v_head_dim,
            "cache_values_per_token_and_layer": c.kv_lora_rank + c.qk_rope_head_dim}


def _attention_line(info: dict[str, Any]) -> str:
    heads = f"hidden {info['hidden_size']}, {info['attention_heads']} heads"
    m = info["mla"]
    if m is None:
        return f"{heads} ({info['kv_heads']} key/value), head_dim {info['head_dim']}"
    q = "full q_proj" if m["q_lora_rank"] is None else f"q_lora_rank {m['q_lora_rank']}"
    return (f"{heads}, MLA: {q}, kv_lora_rank {m['kv_lora_rank']}, qk {m['qk_nope_head_dim']}"
            f" + rope {m['qk_rope_head_dim']}, v {m['v_head_dim']}; cache "
            f"{m['cache_values_per_token_and_layer']} values per token and layer")


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _size(n: int) -> str:
    """A file size in the largest binary unit that keeps it >= 1."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} B"


def _text(source: str, info: dict[str, Any]) -> str:
    p, kinds = info["parameters"], info["parameters"]["by_kind"]
    lines = [
        f"model        {source}",
        f"layers       {info['layers']} ({info['dense_layers']} dense, {info['moe_layers']} MoE)",
        f"attention    {_attention_line(info)}",
    ]
    if info["moe_layers"]:
        lines.append(
            f"experts      {info['routed_experts']} routed (top-{info['experts_per_token']}) + "
            f"{info['shared_experts']} shared per MoE layer, width {info['expert_width']}; "
            f"routing {info['routing']}")
    lines += [
        f"dense FFN    width {info['dense_width']}",
        f"vocabulary   {info['vocab_size']} "
        f"({'tied' if info['tie_word_embeddings'] else 'separate'} embedding and lm_head)",
        f"parameters   {_count(p['total'])} total, {_count(p['active'])} active per token "
        f"with embedding and lm_head, {_count(p['active_without_input_embedding'])} without "
        f"the input embedding, {_count(p['active_non_embedding'])} without both",
        f"             ({info['active_convention']})",
        "  by kind    " + ", ".join(f"{k.replace('_', ' ')} {_count(v)}"
                                    for k, v in kinds.items() if k != "active_routed_experts"),
        *([f"MTP          + {_count(p['multi_token_prediction'])} in "
             f"{info['multi_token_prediction_layers']} multi-token-prediction layer(s): "
             "stored in checkpoints, not run by dsmoe (ignored when loading)"]
          if p["multi_token_prediction"] else []),
        "weights      " + ", ".join(f"{fmt} {_gib(n)}"
                                    for fmt, n in info["weight_memory_bytes"].items()),
        "             (weights only: no KV cache, activations or quantisation scales)",
    ]
    ckpt = info.get("checkpoint", False)
    if ckpt is None:
        lines.append("checkpoint   none (config.json only)")
    elif ckpt:
        check = ("matches the config" if ckpt["matches_config"]
                 else f"DOES NOT match the config: {ckpt['problem']}")
        types = ", ".join(f"{t}: {n} tensor{'s' if n != 1 else ''}" if i == 0 else f"{t}: {n}"
                          for i, (t, n) in enumerate(ckpt["tensor_types"].items()))
        where = (f"GGUF, file type {ckpt['file_type']}" if ckpt["format"] == "gguf"
                 else f"{ckpt['files']} safetensors file(s)")
        lines.append(f"checkpoint   {where}, {_size(ckpt['bytes'])}, {ckpt['tensors']} tensors "
                     f"({types}), {_count(ckpt['parameters'])} parameters: {check}")
        if ckpt.get("mtp_tensors"):
            lines.append(f"             {ckpt['mtp_tensors']} multi-token-prediction tensors "
                         f"({_count(ckpt['mtp_parameters'])} parameters) ignored for inference")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config, source, stored = _resolve(args.model)
    info = describe(config)
    if isinstance(stored, Path):
        info["checkpoint"] = _checkpoint(stored, config)
    elif stored is not None:
        info["checkpoint"] = _gguf_checkpoint(stored, config)
    if args.json:
        print(json.dumps({"source": source, **info}, indent=2))
    else:
        print(_text(source, info))
    # A checkpoint that would not load is a failure, for scripts as for people.
    return 1 if (info.get("checkpoint") or {}).get("matches_config") is False else 0
