"""The sequential layer engine: one walk over the decoder layers for every method.

For each decoder layer: *observe* (hooks accumulate per-linear statistics from the layer's
inputs), *solve* (each linear's weight + statistics → compressed weight, a pure function), then
*propagate* (run the compressed layer so the next layer sees the inputs it will see at run time).
Only one layer's activations are held: a buffer of n × L × hidden, in memory or on disk.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import Architecture, LinearRef
from .defaults import HEAD_SAMPLES
from .errors import SizewiseError
from .lazy import held
from .observers import DEFAULT_OBSERVERS, LinearStats, Observer
from .precision import float32_execution, weights_in


# solve(ref, weight [out, in] float32, stats or None) -> the new [out, in] weight the model will use
Solver = Callable[[LinearRef, torch.Tensor, "LinearStats | None"], torch.Tensor]
# transform(layer index, layer, refs, stats by linear name): change the layer's float weights in a way
# that leaves its function unchanged (e.g. AWQ scales folded into the preceding op), updating the
# statistics to match; runs after observe and before solve.
Transform = Callable[[int, torch.nn.Module, list[LinearRef], dict], None]


class LayerCheckpoint(Protocol):
    """Where a run keeps each finished layer so that a stopped run resumes (`checkpoint.py`)."""

    done: int               # layers finished by an earlier run, restored instead of processed

    def announce(self) -> None: ...
    def restore(self, i: int, layer, refs: list[LinearRef]) -> None: ...
    def activations(self, into: torch.Tensor) -> None: ...
    def save_layer(self, i: int, layer, refs: list[LinearRef], activations: torch.Tensor | None) -> None: ...


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


@dataclass
class ActivationBuffer:
    """The current layer's inputs for all samples: [n, L, hidden], in RAM or memory-mapped on disk."""

    n: int
    length: int
    hidden: int
    offload: Path | None = None
    _tmp: object = field(default=None, repr=False)

    def __post_init__(self):
        shape = (self.n, self.length, self.hidden)
        if self.offload is None:
            self.data = torch.empty(shape, dtype=torch.float32)
        else:
            try:
                self.offload.mkdir(parents=True, exist_ok=True)
                self._tmp = tempfile.NamedTemporaryFile(dir=self.offload, suffix=".activations")
                arr = np.lib.format.open_memmap(self._tmp.name, mode="w+", dtype=np.float32, shape=shape)
            except OSError as e:
                raise SizewiseError(f"cannot keep calibration activations in {self.offload}: {e.strerror or e}") from None
            self.data = torch.from_numpy(arr)

    @staticmethod
    def nbytes(n: int, length: int, hidden: int) -> int:
        return n * length * hidden * 4


def _hidden_size(model) -> int:
    """Width of the residual stream (OPT's embeddings may be narrower and projected up)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.hidden_size


def _layer_kinds(model, n: int) -> list:
    """Each decoder layer's attention kind (`config.layer_types`: Gemma's sliding and full layers get
    different masks and rope); None for all where the model has one kind."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = list(getattr(cfg, "layer_types", None) or [])
    return kinds if len(kinds) == n else [None] * n


def _run_with_capture(model, layers, samples: torch.Tensor, buffer: ActivationBuffer, batch: int) -> list[dict]:
    """Fill `buffer` with layer 0's inputs; return each layer's other arguments by batch size.

    Layers of another kind than layer 0 get theirs from one more pass of one batch of each size,
    stopped at the last layer whose arguments are still missing."""
    kinds = _layer_kinds(model, len(layers))
    extra: dict[object, dict[int, tuple]] = {kind: {} for kind in kinds}
    start = 0

    def record(kind, args, kwargs):
        b = (args[0] if args else kwargs["hidden_states"]).shape[0]
        extra[kind].setdefault(b, (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return b

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        b = record(kinds[0], args, kwargs)
        buffer.data[start:start + b] = h.detach().float().cpu()
        raise _Stop

    # first of layer 0's hooks: the pass stops before the layer is read from disk (`lazy`) or converted
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with float32_execution(model, layers):
            for start in range(0, samples.shape[0], batch):
                ids = samples[start:start + batch].to(model.device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    firsts = {kind: i for i, kind in reversed(list(enumerate(kinds))) if kind != kinds[0]}
    if firsts:
        last = max(firsts.values())

        def other(i):
            def hook(module, args, kwargs):
                record(kinds[i], args, kwargs)
                if i == last:
                    raise _Stop
            return hook

        handles = [layers[i].register_forward_pre_hook(other(i), with_kwargs=True, prepend=True)
                   for i in firsts.values()]
        try:
            with float32_execution(model, layers):
                for b in sorted(extra[kinds[0]]):
                    try:
                        model(input_ids=samples[:b].to(model.device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
    return [extra[kind] for kind in kinds]


def _cast(x, dtype):
    """Floating tensors in captured layer arguments (rotary cos/sin, masks) follow the compute dtype."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _layer_forward(layer, h, extra):
    args, kwargs = extra[h.shape[0]]
    if h.dtype != torch.float32:
        args, kwargs = _cast(args, h.dtype), {k: _cast(v, h.dtype) for k, v in kwargs.items()}
    out = layer(h, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _observe(layer, refs: list[LinearRef], buffer: ActivationBuffer, batch: int, extra, device, dtype,
             observers: tuple[Observer, ...] = DEFAULT_OBSERVERS) -> dict:
    """Run the float layer over all samples, accumulating each linear's input statistics.

    Linears fed the very same tensor share one accumulator, so XᵀX is computed once per input.
    """
    owner: dict[str, str] = {}              # linear name -> name of the linear whose stats it shares
    stats: dict[str, LinearStats] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}   # per batch: id(input) -> (input kept alive, first reader)

    def hook(name, in_features):
        def accumulate(module, args):
            x = args[0]
            first = seen.setdefault(id(x), (x, name))[1]
            if first != name:                   # same tensor as an earlier reader in this batch
                owner.setdefault(name, first)
                return
            if name not in stats:
                stats[name] = LinearStats.empty(in_features, device, observers)
            stats[name].add(x)
        return accumulate

    hooks = [ref.module.register_forward_pre_hook(hook(ref.name, ref.shape[1])) for ref in refs]
    try:
        for s in range(0, buffer.n, batch):
            seen.clear()
            _layer_forward(layer, buffer.data[s:s + batch].to(device, dtype), extra)
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    for name, first in owner.items():
        stats[name] = stats[first]
    return stats


def _process_layer(i: int, layer, refs: list[LinearRef], solve: Solver, transform: Transform | None,
                   buffer: ActivationBuffer, batch: int, extra, device, compute_dtype,
                   observers: tuple[Observer, ...]) -> None:
    """Observe, transform, solve and propagate decoder layer `i`; its weights are float32 only meanwhile.

    The solved weights are exact in float32 while the compressed layer propagates; afterwards the
    layer goes back to its storage dtype (the solver's stored tensors are the exact result), and the
    tensors nothing changed are the very originals again (still memory-mapped)."""
    with weights_in(layer, torch.float32, keep=True):
        with weights_in(layer, compute_dtype):
            stats = _observe(layer, refs, buffer, batch, extra, device, compute_dtype, observers)
        if transform is not None:
            transform(i, layer, refs, stats)
        for ref in refs:
            ref.set_weight(solve(ref, ref.weight(), stats[ref.name]))
        del stats
        with weights_in(layer, compute_dtype):
            for s in range(0, buffer.n, batch):       # propagate through the compressed layer
                out = _layer_forward(layer, buffer.data[s:s + batch].to(device, compute_dtype), extra)
                buffer.data[s:s + batch] = out.float().cpu()


def _resume(checkpoint: LayerCheckpoint | None, arch: Architecture, buffer: ActivationBuffer | None) -> int:
    """Restore the layers an earlier run finished (and the next layer's inputs); return their count."""
    if checkpoint is None or not checkpoint.done:
        return 0
    checkpoint.announce()
    for i in range(checkpoint.done):
        with held(arch.layers[i]):              # restored weights keep the layer resident
            checkpoint.restore(i, arch.layers[i], arch.linears[i])
    if buffer is not None and checkpoint.done < len(arch.layers):
        checkpoint.activations(buffer.data)
    return checkpoint.done


def run(model, arch: Architecture, solve: Solver, samples: torch.Tensor | None, *,
        batch: int = 8, offload: Path | None = None, progress: bool = True,
        compute_dtype: torch.dtype = torch.float32, transform: Transform | None = None,
        stats: dict[str, LinearStats] | None = None, observers: tuple[Observer, ...] = DEFAULT_OBSERVERS,
        checkpoint: LayerCheckpoint | None = None) -> dict:
    """Compress every linear of every decoder layer in place; return timing and memory facts.

    With `samples` None the solver gets no statistics and no forward pass runs (data-free methods).
    `compute_dtype` is the dtype of the calibration forward passes (bfloat16 is several times faster
    on CPUs with bf16 units); statistics are always accumulated in float32.
    `stats` (linear name -> statistics gathered earlier, e.g. by `statistics`) replaces the passes:
    every layer is solved from those inputs at once ("one-shot"), without propagating the
    compressed layers' outputs. A sweep over budgets uses this to observe the model only once.
    `observers`: what is accumulated of each linear's inputs (`observers.py`: XᵀX and Σ|x| by default).
    `checkpoint`: each finished layer is saved there with the next layer's inputs; the layers an
    earlier run finished are restored from it instead of processed.
    """
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    bar = tqdm(total=len(arch.layers), desc="layers", unit="layer", disable=not progress, file=sys.stderr)
    if samples is None or stats is not None:
        if transform is not None and stats is not None:
            raise ValueError("a per-layer transform needs the calibration passes; it cannot run from saved statistics")
        done = _resume(checkpoint, arch, None)
        for i, refs in enumerate(arch.linears):
            if i >= done:
                with held(arch.layers[i]):      # read from disk if lazy; stays resident once changed
                    for ref in refs:
                        ref.set_weight(solve(ref, ref.weight(), None if stats is None else stats[ref.name]))
                    if checkpoint is not None:
                        checkpoint.save_layer(i, arch.layers[i], refs, None)
            bar.update()
        bar.close()
        return {"engine_s": time.perf_counter() - t0, "activation_bytes": 0}

    n, length = samples.shape
    hidden = _hidden_size(model)
    buffer = ActivationBuffer(n, length, hidden, offload)
    where = f"on disk in {offload}" if offload else "in memory (--offload DIR keeps them on disk)"
    print(f"calibration activations: {n} x {length} x {hidden} float32 = "
          f"{ActivationBuffer.nbytes(n, length, hidden) / 2**20:.0f} MiB {where}", file=sys.stderr)
    with torch.no_grad():
        extras = _run_with_capture(model, arch.layers, samples, buffer, batch)
        done = _resume(checkpoint, arch, buffer)
        for i, layer in enumerate(arch.layers):
            if i >= done:
                with held(layer):               # read from disk if lazy; stays resident once changed
                    _process_layer(i, layer, arch.linears[i], solve, transform, buffer, batch, extras[i], device,
                                   compute_dtype, observers)
                    if checkpoint is not None:
                        checkpoint.save_layer(i, layer, arch.linears[i], buffer.data)
            bar.update()
    bar.close()
    return {"engine_s": time.perf_counter() - t0,
            "activation_bytes": ActivationBuffer.nbytes(n, length, hidden)}


def head_statistics(model, arch: Architecture, samples: torch.Tensor, *, batch: int = 8,
                    compute_dtype: torch.dtype = torch.float32) -> dict[str, LinearStats]:
    """The output head's input statistics (the final hidden states, after the last norm), keyed by
    `arch.head_table`, the token table that computes the logits; {} if the model has none to quantize.

    From the *last* `HEAD_SAMPLES` of the calibration `samples`: the allocator measures the tables'
    costs on the first few, which thus stay held out. One forward pass, stopped before the logits
    (the largest matmul of a small model); with a half-precision `compute_dtype` the pass runs under
    autocast. The model is unchanged.
    """
    name = arch.head_table
    samples = samples[-HEAD_SAMPLES:]
    if name is None or not len(samples):
        return {}
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    stats = LinearStats.empty(head.weight.shape[1], device)

    def hook(module, args):
        stats.add(args[0].detach())
        raise _Stop

    handle = head.register_forward_pre_hook(hook)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    try:
        with torch.no_grad(), autocast, float32_execution(model, arch.layers):
            for s in range(0, len(samples), batch):
                try:
                    model(input_ids=samples[s:s + batch].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return {name: stats}


def statistics(model, arch: Architecture, samples: torch.Tensor, *, batch: int = 8, offload: Path | None = None,
               progress: bool = True, compute_dtype: torch.dtype = torch.float32,
               measure: Solver | None = None, head: bool = False,
               observers: tuple[Observer, ...] = DEFAULT_OBSERVERS,
               checkpoint: LayerCheckpoint | None = None) -> tuple[dict[str, LinearStats], dict]:
    """Every decoder linear's input statistics under the *float* model, in one pass; the model is unchanged.

    `measure(ref, w, stats)`, if given, is called per linear as the layer is observed (its return
    value is ignored). With `head`, also the output head's (`head_statistics`), under its table's
    weight name. Returns (stats by name, the engine's facts); with a `checkpoint` an earlier run had
    layers of, the statistics of those layers are missing (their measurements are the checkpoint's).
    """
    kept: dict[str, LinearStats] = {}

    def keep(ref, w, s):
        kept[ref.name] = s
        if measure is not None:
            measure(ref, w, s)
        return w                                    # the float model propagates

    facts = run(model, arch, keep, samples, batch=batch, offload=offload, progress=progress,
                compute_dtype=compute_dtype, observers=observers, checkpoint=checkpoint)        # exact weights restored after bf16 passes (weights_in)
    if head:
        t0 = time.perf_counter()
        kept.update(head_statistics(model, arch, samples, batch=batch, compute_dtype=compute_dtype))
        facts["head_s"] = time.perf_counter() - t0
    return kept, facts


def capture_final_hidden(model, arch: Architecture, samples: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Run the decoder stack layer by layer exactly as `run` does, without changing anything.

    Used by tests: equal to the plain forward's last decoder output when nothing is compressed.
    """
    n, length = samples.shape
    hidden = _hidden_size(model)
    buffer = ActivationBuffer(n, length, hidden)
    with torch.no_grad():
        extras = _run_with_capture(model, arch.layers, samples, buffer, batch)
        for layer, extra in zip(arch.layers, extras):
            with held(layer), weights_in(layer, torch.float32):
                for s in range(0, n, batch):
                    buffer.data[s:s + batch] = _layer_forward(layer, buffer.data[s:s + batch], extra)
    return buffer.data
