"""Low-rank corrections as a llama.cpp LoRA adapter GGUF (`llama-cli -m out.gguf --lora out.lora.gguf`).

llama.cpp adds scale·B·(A·x) to each adapted matmul, with scale = alpha / rank where
`adapter.lora.alpha` is set (rank = B's inner size), else 1. sizewise's factors are the correction
itself (W ≈ Q(W) + B·A), so alpha is the rank when every layer has the same rank (scale 1, the
conventional file) and 0 otherwise (scale 1 for each, whatever its rank).

Tensors: `blk.N.attn_q.weight.lora_a` [rank, in] and `.lora_b` [out, rank] (numpy order; ggml's ne is
reversed), in the factors' own float dtype. The rows of B for q/k are permuted as the base weight's
rows are in the model file (`gguf.rope_row_order`).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from .. import families
from ..atomic import staged_file
from ..errors import SizewiseError
from .gguf import file_names, rope_row_order, write_file

_NUMPY = (torch.float16, torch.float32)


def lora_path(model_path: str | os.PathLike) -> Path:
    """Where the adapter of a model file goes: `out.gguf` -> `out.lora.gguf`."""
    p = Path(model_path)
    return p.with_name(p.stem + ".lora.gguf")


def write_lora_gguf(path: str | os.PathLike, config, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    names) -> Path:
    """Write the LoRA adapter for `factors` (transformers weight name -> (A [rank, in], B [out, rank]));
    `names` are all the model's tensor names (to map them to llama.cpp's the way the model file does)."""
    path = Path(path)
    fam = families.of(config).gguf
    to_gguf = file_names(config, names)
    heads = fam.rope_heads(config)
    ranks = {a.shape[0] for a, _ in factors.values()}
    alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0
    tensors = []
    for hf_name, (a, b) in factors.items():
        if a.dtype not in _NUMPY or b.dtype != a.dtype:
            raise SizewiseError(f"LoRA factors of {hf_name} are {a.dtype}; the adapter holds float16 or float32")
        b = b.cpu().numpy()
        module = hf_name.rsplit(".", 1)[0]
        proj = next((p for p in heads if module.endswith(f".{p}")), None)
        if proj is not None:
            b = b[rope_row_order(b.shape[0], heads[proj])]
        name = to_gguf[hf_name]
        tensors += [(f"{name}.lora_a", np.ascontiguousarray(a.cpu().numpy()), None),
                    (f"{name}.lora_b", np.ascontiguousarray(b), None)]

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    with staged_file(path) as tmp:
        write_file(tmp, fam.arch, metadata, tensors)
    return path
