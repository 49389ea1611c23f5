"""Decoder layers whose weights stay on disk until the layer runs (a model larger than memory).

`load` builds the model with transformers' own loader, asking it to leave the decoder stack on
"disk": everything else (embedding, final norm, head, rotary tables, ties) is loaded and
initialised as transformers does, and the decoder layers' parameters stay on the meta device.
Each layer then records which safetensors file and key holds each of its parameters (checked:
present, same shape, a float dtype) and is *materialized* (read with `safe_open`, in the
model's storage dtype) only while it is held: inside its own forward (hooks), or inside `held`
for code that reads or changes a layer's weights directly (the engine). On release the layer's
parameters go back to meta, unless something changed them (a solved layer): a changed layer stays
resident from then on and is never re-read from disk.

Why not accelerate's offload hooks, which transformers attaches for a "disk" device map: they
reload each leaf module from their own weight map at every forward and write it back to meta
afterwards, so weights the engine assigns (solved layers, AWQ folds) would be lost, and they know
nothing of `precision`'s float32 swap. Here the unit is one decoder layer, and changes are kept.
Memory-mapped pages count in RSS while mapped, so a file is opened only while a layer is read.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from torch import nn

from .arch import discover
from .defaults import LAZY_ABOVE_BYTES
from .errors import SizewiseError

ENV = "SIZEWISE_LAZY"           # "1": always lazy, "0": never; unset: lazy for large models (`wanted`)
_FLOATS = {"F64", "F32", "F16", "BF16"}


@dataclass
class _Layer:
    """One decoder layer's on-disk parameters and whether they are materialized now."""

    module: nn.Module
    where: dict[str, tuple[Path, str]]              # parameter name inside the layer -> (file, key)
    empty: dict[str, nn.Parameter] = field(default_factory=dict)    # the meta parameters, put back on release
    loaded: dict[str, tuple[nn.Parameter, int, int]] = field(default_factory=dict)  # name -> (param, ptr, version)
    depth: int = 0                                  # holders now (`held`, forwards)
    running: int = 0                                # forwards entered by our pre-hook, not yet left
    handles: list = field(default_factory=list)


_LAYERS: "weakref.WeakKeyDictionary[nn.Module, _Layer]" = weakref.WeakKeyDictionary()


def _owner(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (layer.get_submodule(prefix) if prefix else layer), leaf


def _read(rec: _Layer, names) -> dict[str, torch.Tensor]:
    """The stored tensors of `names`, in the model's dtype; each file mapped only while it is read."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(rec.where[name][0], []).append(name)
    out = {}
    for file, group in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in group:
                out[name] = f.get_tensor(rec.where[name][1]).to(rec.empty[name].dtype)
    return out


def _materialize(rec: _Layer) -> None:
    for name, t in _read(rec, rec.where).items():
        module, leaf = _owner(rec.module, name)
        p = nn.Parameter(t, requires_grad=rec.empty[name].requires_grad)
        module._parameters[leaf] = p
        rec.loaded[name] = (p, p.data_ptr(), p._version)


def _changed(rec: _Layer) -> bool:
    """Whether a parameter is no longer what was read: another tensor, or written in place. An
    in-place write (the version counter moved, e.g. an unchanged weight copied back) is compared
    with the file."""
    written = []
    for name, (p, ptr, version) in rec.loaded.items():
        module, leaf = _owner(rec.module, name)
        now = module._parameters[leaf]
        if now is not p or now.data_ptr() != ptr:
            return True
        if now._version != version:
            written.append(name)
    stored = _read(rec, written)
    return any(not torch.equal(rec.loaded[name][0].data, t) for name, t in stored.items())


def _release(rec: _Layer) -> None:
    """Back to meta, or (if anything changed a parameter) resident for good."""
    if _changed(rec):
        _make_resident(rec)
        return
    for name in rec.loaded:
        module, leaf = _owner(rec.module, name)
        module._parameters[leaf] = rec.empty[name]
    rec.loaded.clear()


def _make_resident(rec: _Layer) -> None:
    for h in rec.handles:
        h.remove()
    _LAYERS.pop(rec.module, None)
    # A tensor `safe_open` gives holds its whole file's mapping, and the mapping keeps its written
    # (copy-on-write) pages: a kept norm would pin every solved weight of its layer after the weights
    # themselves were dropped (~0.4 GB per 8B layer). What stays of the read tensors gets its own memory.
    with torch.no_grad():
        for name, (_, ptr, _) in rec.loaded.items():
            module, leaf = _owner(rec.module, name)
            now = module._parameters[leaf]
            if now is not None and not now.is_meta and now.data_ptr() == ptr:
                now.data = now.data.clone()
    rec.loaded.clear()


def _enter(rec: _Layer) -> None:
    if rec.depth == 0 and not rec.loaded:
        _materialize(rec)
    rec.depth += 1


def _leave(rec: _Layer) -> None:
    rec.depth -= 1
    if rec.depth == 0 and rec.module in _LAYERS:
        _release(rec)


def _forward_enter(rec: _Layer) -> None:
    rec.running += 1
    _enter(rec)


def _forward_leave(rec: _Layer) -> None:
    """Also called when a forward fails, possibly in a hook that ran before ours (the engine stops
    a pass in layer 0's first hook): leave only what this forward entered."""
    if rec.running:
        rec.running -= 1
        _leave(rec)


@contextmanager
def held(layer: nn.Module):
    """Inside the block `layer`'s parameters are real tensors (read from disk if it is lazy). Left
    unchanged, they go back to disk on leaving; changed, the layer stays resident."""
    rec = _LAYERS.get(layer)
    if rec is None:
        yield
        return
    _enter(rec)
    try:
        yield
    finally:
        _leave(rec)


def is_lazy(model: nn.Module) -> bool:
    """Whether some decoder layer of `model` still has its weights on disk."""
    return any(rec.module in _LAYERS for rec in _records(model))


def _records(model: nn.Module) -> list[_Layer]:
    return [rec for m in model.modules() if (rec := _LAYERS.get(m)) is not None]


def materialize_all(model: nn.Module) -> None:
    """Read every lazy layer of `model` and keep it resident (what needs the whole model at once:
    rotations, structured pruning, writing every weight)."""
    for rec in _records(model):
        if not rec.loaded:
            _materialize(rec)
        _make_resident(rec)


def each_parameter(model: nn.Module):
    """`model.named_parameters()` with real tensors: each lazy layer is read once, while its own are given.

    Not `named_parameters()` itself: its de-duplication memo keeps every tensor it has yielded until the
    walk ends, so every layer read from disk would stay in memory (an 8B model's whole 16 GB), and it
    reads a module's parameters as it reaches them, after the layer's earlier ones were handed out."""
    records = {rec.module: rec for rec in _records(model)}
    seen: dict[int, nn.Parameter] = {}     # resident parameters given (ties); held so that ids are not reused

    def walk(module: nn.Module, prefix: str):
        rec = records.pop(module, None)
        if rec is not None:         # a lazy layer: all its parameters are recorded in `where`
            _enter(rec)
            try:
                for name in rec.where:
                    yield prefix + name, rec.loaded[name][0]
            finally:
                _leave(rec)
            return
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen[id(p)] = p
                yield prefix + name, p
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}{name}.")

    yield from walk(model, "")


class StateTensors(Mapping):
    """`model.state_dict()` read one tensor at a time, when asked for: a parameter of a layer on disk is
    read alone (the layer stays on disk), the others are given as they are. For writers that stream a
    whole model (GGUF, safetensors shards) without holding it: `described()` sizes the file first,
    `tied` names the tensors that are another name's (a tied head). `convert(name, tensor)`, if given,
    is applied to each tensor as it is read (a cast, checked)."""

    def __init__(self, model: nn.Module, convert=None):
        self._convert = convert or (lambda name, t: t)
        self._state = model.state_dict()          # in order; a layer on disk gives meta tensors
        self._disk = {f"{prefix}.{name}": (rec, name) for prefix, m in model.named_modules()
                      if (rec := _LAYERS.get(m)) is not None for name in rec.where}
        first: dict[tuple, str] = {}
        self.tied: dict[str, str] = {}
        for name, t in self._state.items():
            if not t.is_meta:
                key = (t.data_ptr(), t.dtype, tuple(t.shape))
                if key in first:
                    self.tied[name] = first[key]
                else:
                    first[key] = name

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._state[name]
        if t.is_meta and name in self._disk:
            rec, inner = self._disk[name]
            t = rec.loaded[inner][0].detach() if rec.loaded else _read(rec, [inner])[inner]
        return self._convert(name, t)

    def described(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape and dtype, converted (nothing read)."""
        return {name: self._convert(name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
                for name, t in self._state.items()}


def drop_weight(module: nn.Module) -> None:
    """Replace `module.weight` (a linear whose stored form is already written) by a meta tensor of the
    same shape and dtype: its memory goes, and a layer holding it counts as changed (never re-read)."""
    w = module.weight
    module.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)


def disk_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters now on disk (meta) rather than in memory."""
    return sum(p.numel() * p.element_size() for rec in _records(model) for p in rec.empty.values()
               if not rec.loaded)


def wanted(directory: Path, float32_bytes: int) -> bool:
    """Whether to keep decoder layers on disk: `SIZEWISE_LAZY` if set, else when the model in float32
    would take more than `defaults.LAZY_ABOVE_BYTES` or half the memory available now."""
    choice = os.environ.get(ENV)
    if choice in ("0", "1"):
        return choice == "1"
    return float32_bytes > min(LAZY_ABOVE_BYTES, psutil.virtual_memory().available // 2)


def _checkpoint_index(directory: Path) -> dict[str, tuple[Path, str, list[int]]]:
    """key -> (file, dtype, shape) over every safetensors file of `directory` (the headers only)."""
    index: dict[str, tuple[Path, str, list[int]]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in index:
                    raise SizewiseError(f"{directory}: tensor {key} is stored twice ({index[key][0].name} and {file.name})")
                s = f.get_slice(key)
                index[key] = (file, s.get_dtype(), list(s.get_shape()))
    return index


def _attach(model: nn.Module, directory: Path) -> None:
    """Record where each meta parameter of the decoder stack is stored, checked; add the hooks."""
    arch = discover(model)
    index = _checkpoint_index(directory)
    prefix = getattr(model, "base_model_prefix", "") or ""
    for i, layer in enumerate(arch.layers):
        rec = _Layer(layer, {})
        for name, p in layer.named_parameters():
            full = f"{arch.layers_path}.{i}.{name}"
            keys = [full, full.removeprefix(f"{prefix}."), f"{prefix}.{full}"] if prefix else [full]
            key = next((k for k in keys if k in index), None)
            if key is None:
                raise SizewiseError(f"cannot load a causal LM from {directory}: its weights lack {full}")
            file, dtype, shape = index[key]
            if list(p.shape) != shape:
                raise SizewiseError(f"cannot load a causal LM from {directory}: {key} has shape {shape}, "
                                    f"the config implies {list(p.shape)}")
            if dtype not in _FLOATS:
                raise SizewiseError(f"cannot load a causal LM from {directory}: {key} is {dtype}, not a float dtype")
            if p.device.type != "meta":
                raise SizewiseError(f"cannot load a causal LM from {directory}: {full} was loaded, not left on disk")
            rec.where[name], rec.empty[name] = (file, key), p
        rec.handles = [layer.register_forward_pre_hook(lambda m, a, rec=rec: _forward_enter(rec)),
                       layer.register_forward_hook(lambda m, a, o, rec=rec: _forward_leave(rec), always_call=True)]
        _LAYERS[layer] = rec


def load(directory: Path, config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of a HF directory with its decoder layers left on disk (see the module doc)."""
    from accelerate.hooks import remove_hook_from_submodules
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    path = discover(skeleton).layers_path
    # every tensor outside the decoder stack on the CPU, the stack on "disk" (left unread)
    device_map = {name: "cpu" for name, m in skeleton.named_modules(remove_duplicate=False)
                  if name and not (name == path or name.startswith(f"{path}."))
                  and (m._parameters or m._buffers)}
    device_map[path] = "disk"
    del skeleton
    quiet = logging.getLogger("accelerate.big_modeling")      # "some parameters are on the meta device": by design
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False, dtype=dtype,
                                                     use_safetensors=True, device_map=device_map)
    finally:
        quiet.setLevel(level)
    remove_hook_from_submodules(model)              # accelerate's offload hooks: replaced by ours
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    _attach(model, directory)
    return model
