"""Checkpoint formats: HF key mapping, HF safetensors directories, GGUF."""
