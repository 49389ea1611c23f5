"""Computing in float32 with a model kept in its storage dtype (bf16/fp16 as stored, memory-mapped by
transformers' safetensors loader): one decoder layer at a time is float32, never the whole model.

`weights_in` swaps a module's tensors for copies in another dtype and puts the very same original
tensors back afterwards (no round trip, so a memory-mapped weight stays mapped and exact).
`float32_execution` makes every forward of a model compute as its float32 copy would, holding only
the running layer, the embedding rows a batch looks up, and a block of the head's rows in float32.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

# Head rows converted to float32 at once (elements): 16 Mi values = 64 MiB.
HEAD_BLOCK_ELEMENTS = 2**24


def _floating(module: nn.Module, recurse: bool = True):
    return [t for t in chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
            if t.is_floating_point()]


@contextmanager
def weights_in(module: nn.Module, dtype: torch.dtype, *, keep: bool = False, tensors=None):
    """Inside the block, `module`'s floating parameters and buffers (or just `tensors`) are copies in
    `dtype`. On leaving, the original tensors come back unchanged, or with `keep` (and no error) the
    block's changes: matrices in their original dtype (a solved weight's exact values are its stored
    tensor's), vectors (norm gains, biases an AWQ scale was folded into; small) as they are."""
    swapped = []
    for t in (_floating(module) if tensors is None else tensors):
        if t.dtype != dtype:
            swapped.append((t, t.data))
            t.data = t.data.to(dtype)
    ok = False
    try:
        yield
        ok = True
    finally:
        for t, original in swapped:
            if keep and ok:
                new = t.data.to(original.dtype)
                if torch.equal(new, original):
                    t.data = original
                elif t.dim() > 1:
                    t.data = new
            else:
                t.data = original


def is_float32(model: nn.Module) -> bool:
    return all(t.dtype == torch.float32 for t in _floating(model))


def _blocked_linear(head: nn.Linear):
    """head.forward computing x @ Wᵀ (+ b) in float32 from a few of W's rows at a time."""
    rows = max(1, HEAD_BLOCK_ELEMENTS // head.weight.shape[1])

    def forward(x):
        x = x.float()
        w, b = head.weight, head.bias
        outs = [F.linear(x, w[r:r + rows].float(), None if b is None else b[r:r + rows].float())
                for r in range(0, w.shape[0], rows)]
        return torch.cat(outs, dim=-1)
    return forward


def _embedding_rows(emb: nn.Embedding):
    """Pre/post hooks: the lookup runs on a float32 table of just the looked-up rows."""
    state = {}

    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs["input"]
        used, local = torch.unique(ids, return_inverse=True)
        state["weight"] = module.weight.data
        module.weight.data = module.weight.data[used].float()
        return ((local, *args[1:]), kwargs) if args else (args, {**kwargs, "input": local})

    def post(module, args, kwargs, out):
        restore()
        return out

    def restore():
        if "weight" in state:
            emb.weight.data = state.pop("weight")
    return pre, post, restore


@contextmanager
def float32_execution(model: nn.Module, layers: nn.ModuleList):
    """Every forward of `model` inside the block computes in float32, whatever its storage dtype:
    each decoder layer of `layers` is float32 while it runs, the input embedding looks up float32
    copies of the rows it needs, a linear head computes from blocks of rows, and the remaining small
    tensors (final norm, position tables) are float32 for the block. A float32 model is untouched."""
    if is_float32(model):
        yield
        return
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    big = {id(t) for m in (emb, head) if m is not None for t in _floating(m)}
    in_layers = {id(t) for t in _floating(layers)}
    rest = [t for t in _floating(model) if id(t) not in big and id(t) not in in_layers]
    running: dict[int, ExitStack] = {}

    def enter(layer, args, kwargs):
        if id(layer) not in running:
            running[id(layer)] = stack = ExitStack()
            stack.enter_context(weights_in(layer, torch.float32))

    def leave(layer, args, kwargs, out):
        running.pop(id(layer)).close()
        return out

    with ExitStack() as outer:
        outer.enter_context(weights_in(model, torch.float32, tensors=rest))
        handles = []
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            # prepend: the original tensors are back before a lazy layer (`lazy`) checks them and
            # puts them back on disk
            handles.append(layer.register_forward_hook(leave, with_kwargs=True, prepend=True))
        if isinstance(emb, nn.Embedding) and emb.weight.dtype != torch.float32:
            pre, post, restore = _embedding_rows(emb)
            outer.callback(restore)
            handles.append(emb.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(emb.register_forward_hook(post, with_kwargs=True))
        if isinstance(head, nn.Linear) and head.weight.dtype != torch.float32:
            head.forward = _blocked_linear(head)       # instance attribute: shadows nn.Linear.forward
            outer.callback(lambda: delattr(head, "forward"))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for stack in running.values():            # a layer whose forward was cut short (engine's _Stop)
                stack.close()
            running.clear()
