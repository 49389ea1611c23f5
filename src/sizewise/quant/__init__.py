"""Quantization: stored formats (formats.py), grid math (grid.py), bit packing (pack.py), methods."""
