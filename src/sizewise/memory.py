"""How much memory a run will need at its peak, from the model's shapes, said before the run starts.

`peak_memory` is the one estimate (compress, plan, sweep, eval); `require` prints it and refuses a
run that cannot fit in the memory available now. The terms follow what the code holds at once:
the model in its storage dtype (memory-mapped pages count once touched; decoder layers kept on disk
(`lazy`) only while one is read, until compression keeps the solved ones), one decoder layer in
float32 (`precision`), the solver's statistics of that layer (GPTQ's Hessians), the calibration
activations (`engine.ActivationBuffer`), one layer's solved weights until they are written, and for
evaluation one window's activations and a chunk of logits (`evaluate.CHUNK_ELEMENTS`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import psutil
import torch

from .arch import discover
from .defaults import LOGIT_BYTES, REFERENCE_FLOAT32_BYTES
from .errors import SizewiseError
from .evaluate import CHUNK_ELEMENTS
from .lazy import disk_bytes
from .precision import HEAD_BLOCK_ELEMENTS

OVERRIDE_ENV = "SIZEWISE_IGNORE_MEMORY"     # "1": warn instead of refusing
GB = 1e9


@dataclass
class Peak:
    """Bytes by what holds them at the peak; `total` is their sum."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v >= GB / 100)
        return f"peak memory ≈ {self.total / GB:.1f} GB ({shown})"


def _text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def peak_memory(model, *, task: str, calibrated: bool = False, samples: int = 0, length: int = 0,
                batch: int = 8, ctx: int = 0, models: tuple = (), quantized_fraction: float = 1.0,
                kept_statistics: bool = False, export_gguf: bool = False, keep_model: bool = True,
                measure_samples: int = 0) -> Peak:
    """Estimated peak resident bytes of `task` ("compress", "plan", "eval") on `model` (loaded, or
    built on the meta device: only shapes and dtypes are read).

    compress/plan: `calibrated` (GPTQ/AWQ statistics), `samples` × `length` calibration tokens in
    batches of `batch`; `quantized_fraction` of the linear weights are solved (one layer's kept
    until written); `kept_statistics`: every layer's statistics are kept (a budget's measured plans, a
    sweep); `export_gguf`: the artifact is then read back one tensor at a time and written as GGUF;
    `measure_samples` (plan): held-out samples of `length` tokens plans are measured on. eval:
    windows of `ctx` tokens, and `models` (other models evaluated beside it).
    """
    cfg = _text_config(model)
    arch = discover(model)
    layer = max(arch.layers, key=lambda m: sum(p.numel() for p in m.parameters()))
    layer_params = sum(p.numel() for p in layer.parameters())
    widths = sorted({ref.shape[1] for ref in arch.linears[0]})
    largest_linear = max(ref.shape[0] * ref.shape[1] for ref in arch.linears[0])
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    inter = max(max(ref.shape) for ref in arch.linears[0])
    heads = getattr(cfg, "num_attention_heads", 1) or 1

    def stored(m) -> int:
        seen, total = set(), 0
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    on_disk = disk_bytes(model)             # decoder layers left on disk until they run (`lazy`)
    parts = {"model (storage dtype)": stored(model) - on_disk}
    if on_disk:
        parts["layer read from disk"] = stored(layer)
    if task in ("compress", "plan"):
        # solved layers stay resident in the model when the result holds it (else their linears leave once
        # written: `compress(keep_model=False)`; the norms that stay are small)
        if keep_model:
            parts["layers kept after solving"] = on_disk
        # one decoder layer's solved weights, kept until the layer is finished and written (`api.compression.
        # LayerOutput`): uint8 codes + scales (~1.1 B/weight) and the bit-packed copy being written
        layer_linear = max(sum(ref.shape[0] * ref.shape[1] for ref in refs) for refs in arch.linears)
        parts["solved weights"] = int(layer_linear * quantized_fraction * 1.6)
        if export_gguf:
            # the export reads the artifact one tensor at a time (`artifact.StoredTensors`): the largest,
            # a token table in its 2-byte float dtype, as read and as its payload copy
            table = max((rows * cols for rows, cols in arch.tables.values()), default=0)
            parts["GGUF export"] = max(table, largest_linear) * 2 * 2
        if calibrated:
            parts["layer in float32"] = layer_params * 4 * 2         # float32 copy + compute-dtype copy
            # every Gram of the layer (one per distinct input width, two for the widest: q/k/v and o),
            # and the solver's factor and working copy of the largest
            grams = sum(w * w * 4 for w in widths) * 2
            parts["solver statistics"] = grams + widths[-1] ** 2 * 4 * 2
            if kept_statistics:
                parts["statistics of every layer"] = grams * (len(arch.layers) - 1)
            parts["calibration activations"] = samples * length * hidden * 4
            parts["forward temporaries"] = batch * length * (3 * inter + 6 * hidden) * 4 + \
                batch * heads * length * length * 4
            if task == "plan":      # each candidate's dequantized copy of one linear while measured
                parts["candidates"] = largest_linear * 4 * 4
            if task == "plan" and measure_samples:
                # the float model's log-probabilities kept as the reference (float32, or float16 when
                # large), a head chunk's logits and its temporaries (`allocate.profile._kl_to`), and the
                # token tables rounded to the plan's float dtype beside their own tensors
                values = measure_samples * length * vocab
                parts["measured plans"] = values * reference_dtype(values).itemsize + 4 * LOGIT_BYTES \
                    + sum(rows * cols * 4 for rows, cols in arch.tables.values())
                # the plans' weights kept solved (a byte per code), and the best plan's solved again with
                # other method options (`allocate.option_variants`)
                parts["solved plans"] = sum(r.shape[0] * r.shape[1] for r in arch.all_linears()) * 2
        else:
            parts["one linear in float32"] = largest_linear * 4 * 4   # its copy, groups, codes, dequantized
    elif task == "eval":
        parts["other models"] = sum(stored(m) - disk_bytes(m) for m in models)
        n = 1 + len(models)
        parts["layer in float32"] = layer_params * 4
        parts["window activations"] = n * ctx * (3 * inter + 6 * hidden) * 4 + heads * ctx * ctx * 4
        parts["logit chunks"] = n * min(CHUNK_ELEMENTS, ctx * vocab) * 4 * 4 + HEAD_BLOCK_ELEMENTS * 4
    else:
        raise ValueError(f"unknown task {task!r}")
    parts["runtime"] = 400 * 2**20          # Python, torch, transformers and their allocator slack
    return Peak(parts)


def reference_dtype(values: int) -> torch.dtype:
    """How measured plans keep the float model's `values` log-probabilities: float32, or float16 above
    `REFERENCE_FLOAT32_BYTES`."""
    return torch.float16 if values * 4 > REFERENCE_FLOAT32_BYTES else torch.float32


_said: set[str] = set()


def require(peak: Peak, *, available: int | None = None, stream=None) -> None:
    """Print the estimate (once per process: a sweep asks per point); refuse (one-line error) if it
    exceeds what this process can still get: the memory available now plus what the process already
    holds (e.g. a loaded model's pages)."""
    stream = stream or sys.stderr
    if peak.describe() not in _said:
        _said.add(peak.describe())
        print(peak.describe(), file=stream)
    held = psutil.Process().memory_info().rss
    free = psutil.virtual_memory().available if available is None else available
    if peak.total <= free + held:
        return
    message = (f"this run needs about {peak.total / GB:.1f} GB at its peak; {(free + held) / GB:.1f} GB is available "
               f"(set {OVERRIDE_ENV}=1 to try anyway)")
    if os.environ.get(OVERRIDE_ENV) == "1":
        print(f"warning: {message}", file=stream)
        return
    raise SizewiseError(message)


def meta_model(config) -> torch.nn.Module:
    """A model with `config`'s shapes and no memory, to estimate before building anything."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False,
                                                dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
