"""Exporters: the formats people deploy (GGUF for llama.cpp: gguf.py the file, gguf_layout.py its exact size; the block bytes are each format's own)."""
