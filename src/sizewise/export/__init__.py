"""Exporters: the formats people deploy (GGUF for llama.cpp: gguf_types.py holds the block math, gguf.py the file)."""
