"""sizewise: compress a causal LM to the size you choose, and measure what it cost."""

__version__ = "0.1.0"
