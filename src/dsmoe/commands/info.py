"""Show a model's layers, experts, parameter counts and weight memory.

MODEL is an HF model directory (config.json, plus its safetensors if present), a
config.json file, or a preset name (tiny, deepseek-moe-2b, deepseek-moe-16b,
deepseek-moe-145b). Nothing is loaded: counts come from the config's shapes, and for a
directory the stored tensors are read from the safetensors headers only.

Active parameters per token are the weights one token's forward pass reads: everything
except the routed experts it is not sent to (embedding and lm_head included, as in the
DeepSeekMoE paper's 16.4B total / 2.8B active). Memory is for the weights alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dsmoe.config import ModelConfig
from dsmoe.params import WEIGHT_FORMATS, ParameterCount, count_parameters, weight_bytes
from dsmoe.presets import PRESETS

ACTIVE_CONVENTION = ("active: every weight except the routed experts a token is not sent to; "
                     "embedding and lm_head included")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF directory, config.json file or preset name")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def _resolve(model: str) -> tuple[ModelConfig, str, Path | None]:
    """(config, description of the source, HF directory or None)."""
    from dsmoe.checkpoint import hf

    path = Path(model)
    if path.is_dir():
        return hf.read_config(path), f"HF directory {path}", path
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path}: dsmoe info reads HF directories, config.json files and "
                             "presets (for a .gguf file, export or load it first)")
        return hf.read_config(path), f"config file {path}", None
    if model in PRESETS:
        return ModelConfig.preset(model), f"preset {model}", None
    raise ValueError(f"{model!r} is neither an HF directory, a config.json file nor a preset "
                     f"(presets: {', '.join(sorted(PRESETS))})")


def _checkpoint(directory: Path, counts: ParameterCount) -> dict[str, Any] | None:
    """What the directory stores, from safetensors headers; None without weights."""
    from dsmoe.checkpoint import hf

    try:
        stored = hf.stored_tensors(directory)
    except FileNotFoundError:
        return None
    files = sorted({t.file for t in stored.values()})
    numel = 0
    for t in stored.values():
        n = 1
        for dim in t.shape:
            n *= dim
        numel += n
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files),
            "tensors": len(stored), "parameters": numel,
            "dtypes": sorted({t.dtype for t in stored.values()}),
            "matches_config": numel == counts.total}


def describe(config: ModelConfig) -> dict[str, Any]:
    """Everything ``dsmoe info`` reports about a config, as plain data."""
    c = config
    counts = count_parameters(c)
    moe = len(c.moe_layer_indices)
    return {
        "layers": c.num_hidden_layers, "dense_layers": c.num_hidden_layers - moe,
        "moe_layers": moe, "hidden_size": c.hidden_size,
        "attention_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size,
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
                       "by_kind": {k: v for k, v in vars(counts).items()}},
        "active_convention": ACTIVE_CONVENTION,
        "weight_memory_bytes": {fmt: weight_bytes(counts.total, fmt) for fmt in WEIGHT_FORMATS},
    }


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _text(source: str, info: dict[str, Any]) -> str:
    p, kinds = info["parameters"], info["parameters"]["by_kind"]
    lines = [
        f"model        {source}",
        f"layers       {info['layers']} ({info['dense_layers']} dense, {info['moe_layers']} MoE)",
        f"attention    hidden {info['hidden_size']}, {info['attention_heads']} heads "
        f"({info['kv_heads']} key/value), head_dim {info['head_dim']}",
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
        f"({_count(p['active_non_embedding'])} without embedding and lm_head)",
        f"             ({info['active_convention']})",
        "  by kind    " + ", ".join(f"{k.replace('_', ' ')} {_count(v)}"
                                    for k, v in kinds.items() if k != "active_routed_experts"),
        "weights      " + ", ".join(f"{fmt} {_gib(n)}"
                                    for fmt, n in info["weight_memory_bytes"].items()),
        "             (weights only: no KV cache, activations or quantisation scales)",
    ]
    ckpt = info.get("checkpoint", False)
    if ckpt is None:
        lines.append("checkpoint   none (config.json only)")
    elif ckpt:
        check = "matches the config" if ckpt["matches_config"] else "DOES NOT match the config"
        lines.append(f"checkpoint   {ckpt['files']} file(s), {_gib(ckpt['bytes'])}, "
                     f"{ckpt['tensors']} tensors ({'/'.join(ckpt['dtypes'])}), "
                     f"{_count(ckpt['parameters'])} parameters: {check}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config, source, directory = _resolve(args.model)
    info = describe(config)
    if directory is not None:
        info["checkpoint"] = _checkpoint(directory, count_parameters(config))
    if args.json:
        print(json.dumps({"source": source, **info}, indent=2))
    else:
        print(_text(source, info))
    return 0
