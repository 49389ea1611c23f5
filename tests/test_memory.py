"""Bounded memory: a model stored in bf16 is never float32 beyond one decoder layer; its artifact is
the same as the float32 model's."""

import pytest
import torch
from safetensors.torch import load_file

import sizewise
from sizewise import artifact, sources
from sizewise.api import CompressConfig
from sizewise.arch import discover
from sizewise.quant import methods
from sizewise.quant.uniform import QuantFormat
from sizewise.recipe import CalibConfig
from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer


def _save(model, path, shard="40KB"):
    model.save_pretrained(path, max_shard_size=shard)       # several shards, as HF publishes large models
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16") / "m"
    _save(tiny_model("llama", 3).to(torch.bfloat16), d)
    assert len(list(d.glob("*.safetensors"))) > 3
    return d


def _float32_elements_by_layer(model, layers) -> tuple[int, int]:
    """(decoder layers holding any float32 weight, float32 elements outside the decoder layers)."""
    in_layers = {id(p) for p in layers.parameters()}
    converted = sum(any(p.dtype == torch.float32 for p in layer.parameters()) for layer in layers)
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_layers and p.dtype == torch.float32)
    return converted, outside


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sharded_bf16_model_holds_at_most_one_layer_in_float32(bf16_dir, tmp_path, monkeypatch, method):
    src = sources.load(bf16_dir)
    model = src.model
    layers = discover(model).layers
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())       # loaded as stored
    seen = []
    solve = methods.solve

    def checked_solve(*args, **kwargs):
        seen.append(_float32_elements_by_layer(model, layers))
        return solve(*args, **kwargs)

    monkeypatch.setattr(methods, "solve", checked_solve)
    observed = []
    hooks = [m.register_forward_pre_hook(lambda *a: observed.append(_float32_elements_by_layer(model, layers)))
             for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    cfg = CompressConfig(method, QuantFormat(4, 32), calib=CalibConfig(str(text), samples=4, length=32, dtype="float32"))
    sizewise.compress(src, cfg, tmp_path / "a", progress=False)
    for h in hooks:
        h.remove()
    assert len(seen) == 7 * len(layers)
    if method == "gptq":
        assert observed                                  # calibration passes ran through the layers
    for converted, outside in seen + observed:
        assert converted <= 1
        assert outside <= model.config.hidden_size      # the final norm at most; never a token table
    assert all(p.dtype != torch.float32 for p in model.parameters())     # nothing left converted


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bf16_model_compresses_as_its_float32_copy(bf16_dir, tmp_path, method):
    """Same packed tensors and the same exact dense copy as from the float32 upcast of the same weights."""
    f32 = _save(tiny_model("llama", 3).to(torch.bfloat16).float(), tmp_path / "f32", shard="10MB")
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    cfg = CompressConfig(method, QuantFormat(4, 32), float_dtype="float32",
                         calib=CalibConfig(str(text), samples=4, length=32, dtype="float32"))
    sizewise.compress(str(bf16_dir), cfg, tmp_path / "a16", progress=False)
    sizewise.compress(str(f32), cfg, tmp_path / "a32", progress=False)
    a16, a32 = (load_file(str(tmp_path / d / artifact.PACKED)) for d in ("a16", "a32"))
    assert a16.keys() == a32.keys()
    for k in a16:
        assert torch.equal(a16[k], a32[k]), k
    dense16 = artifact.load_weights(tmp_path / "a16")
    hf16 = {}
    for f in (tmp_path / "a16" / "hf").glob("*.safetensors"):
        hf16.update(load_file(str(f)))
    for name, t in hf16.items():
        assert t.dtype == torch.float32 and torch.equal(t, dense16[name]), name
