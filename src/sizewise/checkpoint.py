"""Resumable runs: what a compress has finished, kept layer by layer in `.NAME.checkpoint/` beside -o.

    state.json               the run's fingerprint (and its parts, to name a difference), layers done
    layer-00007.safetensors  layer 7 as solved: its quantized linears' stored tensors (the artifact's
                             exact parts), its other parameters as they are, the RNG state; metadata
                             holds the formats and per-layer notes (e.g. AWQ's scales log)
    activations-00007.npy    the calibration activations after layer 7 (the next layer's inputs)
    lock                     held while a run uses the checkpoint

A layer counts only once state.json says so (written last, renamed into place), so a run stopped at
any point leaves a checkpoint that is whole up to some layer. Not a staging area (`atomic.claim`
removes those of dead runs): it is kept on failure and interrupt, and removed after success.
File names are built from layer numbers, never read from the checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .artifact import read_stored, stored_entries
from .errors import SizewiseError
from .quant.registry import format_from_dict

STATE, LOCK, VERSION = "state.json", "lock", 1
RNG = "__rng__"


def location(out: str | Path, stage: str = "") -> Path:
    """Where the checkpoint of output `out` lives: beside it, named after it (and the run's `stage`:
    a budget's profile is one, its compression another)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}{'.' + stage if stage else ''}.checkpoint"


def versions() -> dict:
    """What computes, as part of a fingerprint."""
    from . import __version__

    return {"sizewise version": __version__, "torch version": torch.__version__}


def _refused(path: Path, why: str) -> SizewiseError:
    return SizewiseError(f"the checkpoint {path} {why}; run with --restart to discard it")


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _difference(old: dict, new: dict) -> str:
    """Name what differs between two fingerprints' parts (the recipe down to its fields)."""
    for key, value in new.items():
        was = old.get(key)
        if was != value:
            if isinstance(value, dict) and isinstance(was, dict):
                return f"{key} ({', '.join(sorted(k for k in set(was) | set(value) if was.get(k) != value.get(k)))})"
            return key
    return "format version"


def _fsync_replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


class Checkpoint:
    """A run's checkpoint directory, locked while open. `done` layers are finished."""

    def __init__(self, path: Path, parts: dict, n_layers: int, *, restart: bool = False):
        self.path, self.parts, self.n_layers = Path(path), parts, n_layers
        self.print = fingerprint(parts)
        self.done = 0
        self._fd = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise SizewiseError(f"cannot keep a checkpoint in {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise SizewiseError(f"another sizewise run is using the checkpoint {self.path}") from None
        try:
            self._read(restart)
        except BaseException:
            self.close()
            raise

    def _read(self, restart: bool) -> None:
        state_file = self.path / STATE
        if restart:
            for p in self.path.iterdir():
                if p.name != LOCK:
                    p.unlink() if p.is_file() or p.is_symlink() else shutil.rmtree(p, ignore_errors=True)
            return
        if not state_file.is_file():
            return
        try:
            state = json.loads(state_file.read_text())
            done, old = int(state["done"]), state["parts"]
            if not isinstance(old, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _refused(self.path, f"is unreadable ({e})") from None
        if state.get("version") != VERSION or state.get("fingerprint") != self.print:
            raise _refused(self.path, f"was made by another run (its {_difference(old, self.parts)} differs)")
        if not 0 <= done <= self.n_layers:
            raise _refused(self.path, f"records {done} of {self.n_layers} layers")
        self.done = done

    def announce(self) -> None:
        if self.done:
            at = f"layer {self.done + 1}/{self.n_layers}" if self.done < self.n_layers else \
                f"the end ({self.n_layers}/{self.n_layers} layers done)"
            print(f"resuming at {at} from {self.path}", file=sys.stderr)

    # --- one layer ---------------------------------------------------------------------------------

    def save(self, i: int, quantized: dict, params: dict[str, torch.Tensor], notes: dict,
             activations: torch.Tensor | None) -> None:
        """Layer `i` is finished: `quantized` (local name -> stored tensor), `params` (local name ->
        tensor as the model holds it), `notes` (JSON), and the next layer's inputs."""
        tensors, formats = {}, {}
        for name, qt in quantized.items():
            tensors.update(stored_entries(name, qt.fmt, qt))
            formats[name] = {"format": qt.fmt.to_dict(), "shape": list(qt.shape)}
        tensors.update({name: t.detach().contiguous() for name, t in params.items()})
        tensors[RNG] = torch.get_rng_state()
        meta = {"formats": json.dumps(formats), "params": json.dumps(sorted(params)), "notes": json.dumps(notes)}
        layer_file = self._layer_file(i)
        tmp = layer_file.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        _fsync_replace(tmp, layer_file)
        if activations is not None:
            act = self._activations_file(i)
            tmp = act.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                np.save(f, activations.numpy(), allow_pickle=False)
            _fsync_replace(tmp, act)
        state = {"version": VERSION, "fingerprint": self.print, "parts": self.parts, "done": i + 1}
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        _fsync_replace(tmp, self.path / STATE)
        self.done = i + 1
        if i > 0:
            self._activations_file(i - 1).unlink(missing_ok=True)

    def load(self, i: int) -> tuple[dict, dict, dict]:
        """Layer `i` as saved: (quantized stored tensors, parameters, notes); restores the RNG state
        after the last layer loaded."""
        f = self._layer_file(i)
        try:
            with safe_open(str(f), framework="pt") as st:
                meta = st.metadata() or {}
                formats, names = json.loads(meta["formats"]), json.loads(meta["params"])
                quantized = {name: read_stored(st.get_tensor, name, format_from_dict(e["format"]), tuple(e["shape"]))
                             for name, e in formats.items()}
                params = {name: st.get_tensor(name) for name in names}
                rng = st.get_tensor(RNG)
                notes = json.loads(meta["notes"])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, SizewiseError) as e:
            raise _refused(self.path, f"has a missing or corrupt {f.name} ({e})") from None
        if i == self.done - 1:
            torch.set_rng_state(rng)
        return quantized, params, notes

    def activations(self, into: torch.Tensor) -> None:
        """Fill `into` with the inputs of the first unfinished layer."""
        f = self._activations_file(self.done - 1)
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _refused(self.path, f"has a missing or corrupt {f.name} ({e})") from None
        if arr.shape != tuple(into.shape) or arr.dtype != np.float32:
            raise _refused(self.path, f"holds {arr.dtype} {arr.shape} in {f.name}, expected float32 {tuple(into.shape)}")
        for s in range(arr.shape[0]):           # one sample at a time: no second copy of the buffer
            into[s] = torch.from_numpy(np.array(arr[s]))

    def _layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def _activations_file(self, i: int) -> Path:
        return self.path / f"activations-{i:05d}.npy"

    # --- lifetime ----------------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        """Kept (unlocked) if the block failed, for the next run; removed if it succeeded."""
        self.remove() if kind is None else self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """The run succeeded: nothing to resume (its state first, so a removal cut short leaves none)."""
        (self.path / STATE).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()


class NotesCheckpoint(Checkpoint):
    """A checkpoint of an engine pass that changes no weight: per layer only the activations and
    `notes` (layer -> JSON), which the pass fills as it goes and a resumed pass gets back."""

    def __init__(self, path: Path, parts: dict, n_layers: int, notes: dict, *, restart=False):
        super().__init__(path, parts, n_layers, restart=restart)
        self.notes = notes

    def save_layer(self, i: int, layer, refs, activations: torch.Tensor | None) -> None:
        self.save(i, {}, {}, self.notes.get(i, {}), activations)

    def restore(self, i: int, layer, refs) -> None:
        self.notes[i] = self.load(i)[2]


class LayerCheckpoint(Checkpoint):
    """A checkpoint of the engine's decoder layers: what `engine.run` saves after each layer and
    restores for the layers a stopped run finished.

    `quantized` (weight name -> stored tensor) is the run's own table, which the solver fills and a
    restored layer fills again; `notes` (layer -> JSON) is what else a layer leaves (AWQ's log)."""

    def __init__(self, path: Path, parts: dict, n_layers: int, quantized: dict, notes: dict, *, restart=False):
        super().__init__(path, parts, n_layers, restart=restart)
        self.quantized, self.notes = quantized, notes

    @staticmethod
    def _names(layer, refs) -> dict[str, str]:
        """Each linear's weight name -> its parameter's name inside the layer."""
        local = {id(p): n for n, p in layer.named_parameters()}
        return {ref.weight_name: local[id(ref.module.weight)] for ref in refs}

    def save_layer(self, i: int, layer, refs, activations: torch.Tensor | None) -> None:
        names = self._names(layer, refs)
        quantized = {names[w]: self.quantized[w] for w in names if w in self.quantized}
        params = {n: p.data for n, p in layer.named_parameters() if n not in quantized}
        self.save(i, quantized, params, self.notes.get(i, {}), activations)

    def restore(self, i: int, layer, refs) -> None:
        """Layer `i` as the finished run left it: quantized weights dequantized into the layer's
        storage dtype, every other parameter as saved (norms AWQ scaled, weights kept float)."""
        quantized, params, notes = self.load(i)
        names = self._names(layer, refs)
        own = dict(layer.named_parameters())
        if set(quantized) | set(params) != set(own):
            raise _refused(self.path, f"does not hold this model's parameters of layer {i}")
        for ref in refs:
            local = names[ref.weight_name]
            if local in quantized:
                qt = self.quantized[ref.weight_name] = quantized[local]
                w, p = qt.dequantize(), ref.module.weight
                params[local] = (w.t() if ref.transposed else w).to(p.dtype).contiguous()
        for n, p in own.items():
            if tuple(params[n].shape) != tuple(p.shape):
                raise _refused(self.path, f"holds layer {i}'s {n} as {tuple(params[n].shape)}, expected {tuple(p.shape)}")
            p.data = params[n]
        if notes:
            self.notes[i] = notes
