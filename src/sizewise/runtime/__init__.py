"""Models of how runtimes compute with the weights we write (llama.cpp's input rounding: llamacpp.py)."""
