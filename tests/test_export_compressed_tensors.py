"""compressed-tensors export: transformers (with the compressed-tensors package) loads the checkpoint as a
quantized model, and its logits are sizewise's dequantized model's."""

import json

import pytest
import torch

import sizewise
from sizewise import api, artifact
from sizewise.api import CalibConfig, CompressConfig
from sizewise.errors import SizewiseError
from sizewise.plan import Choice, Plan
from sizewise.quant.codebook import CodebookFormat
from sizewise.quant.formats import FloatFormat
from sizewise.quant.uniform import QuantFormat

pytest.importorskip("compressed_tensors")
L0, L1 = "model.layers.0.", "model.layers.1."


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _load_quantized(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(model.model.layers[1].mlp.up_proj, "quantization_scheme", None) is not None   # loaded quantized
    return model


@pytest.mark.parametrize("method,fmt", [("rtn", QuantFormat(4, 32)), ("gptq", QuantFormat(4, 32, symmetric=True)),
                                        ("gptq", QuantFormat(8, None, symmetric=True))])
def test_transformers_loads_it_with_sizewise_logits(method, fmt, tiny_dirs, tmp_path):
    calib = CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    res = sizewise.compress(str(tiny_dirs["llama"]), CompressConfig(method, fmt, calib=calib), tmp_path / "a",
                            progress=False)
    out = api.export(tmp_path / "a", tmp_path / "ct", format="compressed-tensors")
    assert not out["dense"] and sum(len(m) for m in out["groups"].values()) == 14
    model = _load_quantized(tmp_path / "ct")
    # the checkpoint stores packed codes, not dense weights
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert L0 + "mlp.up_proj.weight_packed" in keys and L0 + "mlp.up_proj.weight" not in keys
    x = torch.randint(0, 300, (2, 24))
    # Loaded in float32, its weights are bit-identical to sizewise's (a float16 scale times an integer code
    # below 2^9 is exact in float32, and the embedding and norms are stored in float16 in both), so the same
    # forward gives the same logits; no tolerance is needed.
    assert torch.equal(_logits(model, x), _logits(res.model, x))
    got = dict(model.named_parameters())       # decompressed on the first forward: weights again
    for name, p in res.model.named_parameters():
        assert torch.equal(got[name], p), name


def test_mixed_plan_loads_and_what_it_cannot_hold_is_dense_and_listed(tiny_dirs, tmp_path, capsys):
    choices = {
        L0 + "self_attn.q_proj.weight": ("rtn", QuantFormat(3, 32, symmetric=True)),
        L0 + "self_attn.k_proj.weight": ("rtn", QuantFormat(5, 16)),                       # -> 6-bit symmetric
        L0 + "self_attn.v_proj.weight": ("rtn", QuantFormat(8, None, symmetric=True)),
        L0 + "self_attn.o_proj.weight": ("rtn", QuantFormat(4, 32, zero="float16")),       # Q4_1: dense
        L0 + "mlp.gate_proj.weight": ("rtn", CodebookFormat("IQ4_NL")),                     # dense
        L0 + "mlp.up_proj.weight": ("rtn", QuantFormat(2, 64)),
        L0 + "mlp.down_proj.weight": ("rtn", QuantFormat(4, 32, scale_dtype="bfloat16")),  # dense
        L1 + "self_attn.q_proj.weight": ("rtn", QuantFormat(8, 32)),                       # 9 bits: dense
        L1 + "self_attn.k_proj.weight": ("float", FloatFormat("float16")),
    }
    plan = Plan([Choice(n, m, f) for n, (m, f) in choices.items()]
                + [Choice(n, "rtn", QuantFormat(4, 64, symmetric=True)) for n in
                   (L1 + "self_attn.v_proj.weight", L1 + "self_attn.o_proj.weight", L1 + "mlp.gate_proj.weight",
                    L1 + "mlp.up_proj.weight", L1 + "mlp.down_proj.weight")])
    res = sizewise.compress(str(tiny_dirs["llama"]), CompressConfig(plan=plan), tmp_path / "a", progress=False)
    from sizewise.cli import main

    assert main(["export", str(tmp_path / "a"), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    printed = capsys.readouterr().out
    note = json.loads((tmp_path / "ct" / "sizewise_export.json").read_text())
    dense = {L0 + "self_attn.o_proj", L0 + "mlp.gate_proj", L0 + "mlp.down_proj", L1 + "self_attn.q_proj"}
    assert set(note["dense"]) == dense and all(f"dense: {m} (" in printed for m in dense)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    bits = {m: g["weights"]["num_bits"] for g in config["config_groups"].values() for m in g["targets"]}
    assert bits == {L0 + "self_attn.q_proj": 3, L0 + "self_attn.k_proj": 6, L0 + "self_attn.v_proj": 8,
                    L0 + "mlp.up_proj": 3, **{L1 + n: 4 for n in ("self_attn.v_proj", "self_attn.o_proj",
                                                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}}
    assert set(config["ignore"]) == dense
    model = _load_quantized(tmp_path / "ct")
    x = torch.randint(0, 300, (2, 24))
    got, want = _logits(model, x), _logits(res.model, x)
    # The quantized layers are bit-identical (see above); the dense ones are rounded to float16 (IQ4_NL
    # and bfloat16-scale weights are not all float16 values): relative error <= 2^-11 per weight.
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=1e-3, rtol=0)
    params = dict(model.named_parameters())
    for name, p in res.model.named_parameters():
        assert torch.equal(params[name], p) == (name.removesuffix(".weight") not in dense), name


def test_only_artifacts_export_and_an_existing_output_is_kept(tiny_dirs, tmp_path):
    with pytest.raises(SizewiseError, match="not a sizewise artifact"):
        api.export(tiny_dirs["llama"], tmp_path / "ct", format="compressed-tensors")
    sizewise.compress(str(tiny_dirs["llama"]), CompressConfig(), tmp_path / "a", progress=False)
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "mine").write_text("x")
    with pytest.raises(SizewiseError, match="already exists"):
        api.export(tmp_path / "a", tmp_path / "ct", format="compressed-tensors")
    assert [p.name for p in (tmp_path / "ct").iterdir()] == ["mine"]
    assert artifact.is_artifact(tmp_path / "a")
