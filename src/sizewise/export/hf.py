"""A dense Hugging Face copy of a model (an artifact's dequantized weights), on request only: the
artifact itself stores packed tensors, and this copy is several times larger."""

from __future__ import annotations

from pathlib import Path

from ..artifact import check_output
from ..atomic import staged_dir
from ..errors import SizewiseError
from ..quant.formats import TORCH_DTYPES


def write_dense(model, tokenizer, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False) -> dict:
    """Save `model` (every weight cast to `dtype`) and `tokenizer` as a Hugging Face directory `out`."""
    if dtype not in TORCH_DTYPES:
        raise SizewiseError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    out = Path(out)
    check_output(out, overwrite)
    with staged_dir(out, overwrite=overwrite) as tmp:
        model.to(TORCH_DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"path": str(out), "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()), "dtype": dtype}
