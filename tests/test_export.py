"""Artifact → GGUF: what llama.cpp reads back is exactly what sizewise evaluated."""

import gguf
import numpy as np
import pytest
import torch

import sizewise
from sizewise import artifact
from sizewise.api import CompressConfig
from sizewise.cli import main
from sizewise.errors import SizewiseError
from sizewise.export.gguf import gguf_tensor_name
from sizewise.quant.uniform import QuantFormat


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, zero="float16"), QuantFormat(4, 32, symmetric=True),
                                 QuantFormat(5, 32, zero="float16"), QuantFormat(8, 32, symmetric=True)], ids=str)
def test_gguf_export_is_bit_exact(fmt, tiny_dirs, tmp_path):
    out = tmp_path / "a"
    sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", fmt), out, progress=False)
    res = sizewise.api.export(out, tmp_path / "m.gguf")
    state = artifact.load_weights(out)
    reader = gguf.GGUFReader(res["path"])
    by_name = {t.name: t for t in reader.tensors}
    checked = 0
    for name, w in state.items():
        if not name.endswith("proj.weight"):
            continue
        t = by_name[gguf_tensor_name(name, 2)]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if "q_proj" in name or "k_proj" in name:
            continue      # rows are permuted for llama.cpp's rope layout; checked in test_gguf.py
        assert np.array_equal(got.view(np.uint32), w.numpy().view(np.uint32)), name
        checked += 1
    assert checked == 10


def test_gguf_export_refuses_formats_it_cannot_hold(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "a"
    sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", QuantFormat(4, 64)), out, progress=False)
    with pytest.raises(SizewiseError, match="cannot hold exactly"):
        sizewise.api.export(out, tmp_path / "m.gguf")
    assert main(["export", str(out), "-o", str(tmp_path / "m.gguf")]) != 0
    assert "error: " in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_export_of_an_unquantized_model(dtype, tiny_dirs, tmp_path):
    """A model that is not an artifact exports as floats: F32/F16 matrices, F32 norms, same values."""
    from sizewise.sources import load

    res = sizewise.api.export(tiny_dirs["llama"], tmp_path / "m.gguf", float_dtype=dtype)
    want = {"float32": "F32", "float16": "F16"}[dtype]
    assert set(res["tensor_types"]) == {"F32", want}
    state = load(str(tiny_dirs["llama"])).model.state_dict()
    by_name = {t.name: t for t in gguf.GGUFReader(res["path"]).tensors}
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        w = state[name].to(getattr(torch, dtype) if state[name].dim() > 1 else torch.float32)
        got = np.asarray(by_name[gguf_tensor_name(name, 2)].data).reshape(w.shape)
        assert np.array_equal(got, w.numpy()), name
    with pytest.raises(SizewiseError, match="applies to unquantized models only"):
        out = tmp_path / "a"
        sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", QuantFormat(8, 32, symmetric=True)), out,
                          progress=False)
        sizewise.api.export(out, tmp_path / "q.gguf", float_dtype="float16")
