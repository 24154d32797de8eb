"""GGUF (llama.cpp) checkpoints for DeepSeekMoE: read, write, load into dsmoe.

    read_gguf(path, dtype=)       -> (ModelConfig, HF-named state dict, TokenizerData | None)
    write_gguf(path, config, state_dict, tokenizer, quant="f16"|"bf16"|"f32"|"q8_0"|"q4_0")
    write_model_gguf(model, path, tokenizer, quant=)
    load_gguf(path, dtype=, device=) -> Transformer   (alias: load_gguf_model)
    load_tokenizer(path)          -> dsmoe.tokenizer.Tokenizer

Files use llama.cpp's "deepseek" architecture (LLM_ARCH_DEEPSEEK) for V1 models and
"deepseek2" (LLM_ARCH_DEEPSEEK2) for MLA models (DeepSeek-V2 / V2-Lite / V3), so llama.cpp
loads what dsmoe writes and dsmoe loads what llama.cpp's converter writes. Modules:
``names`` (tensor map, q/k row order, MLA's per-head kv_b), ``metadata`` (config keys),
``mla`` (deepseek2's keys), ``vocab`` (tokenizer keys), ``reader``, ``writer``, ``loader``.
"""

from dsmoe.checkpoint.gguf.loader import load_gguf, load_gguf_model, load_tokenizer
from dsmoe.checkpoint.gguf.metadata import llama_cpp_problems
from dsmoe.checkpoint.gguf.reader import GGUFFile, read_gguf
from dsmoe.checkpoint.gguf.vocab import TokenizerData
from dsmoe.checkpoint.gguf.writer import (QUANT_TYPES, HFDirectoryState, write_gguf,
                                         write_model_gguf)

__all__ = ["GGUFFile", "HFDirectoryState", "QUANT_TYPES", "TokenizerData", "llama_cpp_problems", "load_gguf",
           "load_gguf_model", "load_tokenizer", "read_gguf", "write_gguf", "write_model_gguf"]
