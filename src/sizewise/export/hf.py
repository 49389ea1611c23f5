"""A dense Hugging Face copy of a model (an artifact's dequantized weights), on request only: the
artifact itself stores packed tensors, and this copy is several times larger.

Written by hand rather than with `save_pretrained`, which needs every weight in memory at once: the
tensors are read one at a time (a layer on disk stays there, `lazy.StateTensors`) and written in
safetensors shards of at most `SHARD_BYTES`, with transformers' shard index, so that memory is
bounded by a shard and not by the model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file

from ..artifact import check_output
from ..atomic import staged_dir
from ..errors import SizewiseError
from ..lazy import StateTensors
from ..quant.formats import TORCH_DTYPES, stored_as

SHARD_BYTES = 1 << 30
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"     # transformers' file names


def write_dense(model, tokenizer, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False,
                shard_bytes: int = SHARD_BYTES) -> dict:
    """Save `model` (every weight cast to `dtype`) and `tokenizer` as a Hugging Face directory `out`."""
    if dtype not in TORCH_DTYPES:
        raise SizewiseError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    out = Path(out)
    check_output(out, overwrite)
    tensors = StateTensors(model, convert=stored_as(dtype))
    with staged_dir(out, overwrite=overwrite) as tmp:
        config = copy.deepcopy(model.config)
        config.dtype = TORCH_DTYPES[dtype]
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        shards, shard, size, total = [], {}, 0, 0

        def flush():
            nonlocal shard, size
            if shard:
                shards.append(list(shard))
                save_file(shard, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

        for name in tensors:
            if name in tensors.tied:            # a tied head: transformers ties it again on loading
                continue
            t = tensors[name].contiguous()
            if shard and size + t.nbytes > shard_bytes:
                flush()
            shard[name], size, total = t, size + t.nbytes, total + t.nbytes
        flush()
        if len(shards) == 1:
            (tmp / "shard-1.safetensors").rename(tmp / WEIGHTS)
        else:
            weight_map = {}
            for k, names in enumerate(shards, 1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                (tmp / f"shard-{k}.safetensors").rename(tmp / file)
                weight_map.update(dict.fromkeys(names, file))
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        tokenizer.save_pretrained(tmp)
    return {"path": str(out), "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()), "dtype": dtype,
            "shards": len(shards)}
