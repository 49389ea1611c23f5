"""Structured pruning: fewer decoder layers, MLP channels and attention heads, leaving a smaller
dense model (`structured.prune`); the sizes asked for (`config.StructuredConfig`), the math of
choosing and refitting (`removal`), whole layers (`layers`). Sits above the engine, below the API."""

from .config import StructuredConfig, parse_fraction
from .structured import prune

__all__ = ["StructuredConfig", "parse_fraction", "prune"]
