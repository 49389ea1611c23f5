"""IQ4_NL and MXFP4 (llama.cpp's 4-bit codebooks): format, methods, bit-exact ggml bytes, artifacts, GGUF."""

import gguf
import numpy as np
import pytest
import torch

import sizewise
from sizewise import allocate as A
from sizewise import artifact
from sizewise.arch import discover
from sizewise.engine import LinearStats
from sizewise.errors import SizewiseError
from sizewise.plan import Choice, Plan
from sizewise.quant import methods
from sizewise.quant.codebook import IQ4_NL_LEVELS, CodebookFormat, CodebookTensor, codebook_encode, codebook_fit
from sizewise.quant.registry import format_from_dict
from sizewise.quant.uniform import QuantFormat
from sizewise.sources import load

IQ4 = CodebookFormat("IQ4_NL")
MXFP4 = CodebookFormat("MXFP4")
Q4_0 = QuantFormat(4, 32, symmetric=True)


def _data(out=48, inp=256, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(inp, inp, generator=g) / inp ** 0.5 + 0.3 * torch.eye(inp)
    x = (torch.randn(tokens, inp, generator=g) @ a) * torch.exp(0.5 * torch.randn(inp, generator=g))
    return 0.02 * torch.randn(out, inp, generator=g), x


def _out_err(w, qt, x) -> float:
    return float((x @ (w - qt.dequantize()).T).norm())


def test_format_and_its_sizes():
    assert format_from_dict(IQ4.to_dict()) == IQ4 and IQ4.label == "IQ4_NL"
    assert IQ4.stored_bits(4, 64) == 4 * 2 * 18 * 8 and IQ4.bits_per_weight == 4.5
    assert (IQ4.block_bytes, 32) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL][::-1]
    assert A.Candidate("gptq", IQ4).fits(576) and not A.Candidate("gptq", IQ4).fits(48)
    assert A.GGML_FORMATS["IQ4_NL"] == IQ4
    with pytest.raises(SizewiseError):
        CodebookFormat("IQ3_XX")
    assert MXFP4.stored_bits(4, 64) == 4 * 2 * 17 * 8 and MXFP4.bits_per_weight == 4.25 and MXFP4.label == "MXFP4"
    assert (MXFP4.block_bytes, 32) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.MXFP4][::-1]
    assert A.GGML_FORMATS["MXFP4"] == MXFP4 and format_from_dict(MXFP4.to_dict()) == MXFP4


def test_mxfp4_scales_are_powers_of_two_and_minus_zero_reads_as_zero():
    w, _ = _data()
    w[0, :32] = 0                                               # an all-zero block
    ct = methods.solve("rtn", w, None, MXFP4)
    assert torch.equal(ct.d, torch.exp2(torch.log2(ct.d).round()))
    assert torch.equal(ct.dequantize()[0, :32], torch.zeros(32))
    data = ct.fmt.ggml_blocks(ct)
    data[:, 1] = (data[:, 1] & 0xF0) | 8                        # ggml's -0 in the first weight of each row
    back = MXFP4.from_ggml_blocks(data, w.shape)
    assert (back.dequantize()[:, 0] == 0).all()
    # 0.25 bits cheaper than IQ4_NL, and coarser
    err = lambda f: float(((methods.solve("rtn", w, None, f).dequantize() - w) ** 2).sum())      # noqa: E731
    assert err(IQ4) < err(MXFP4)


@pytest.mark.parametrize("fmt", [IQ4, MXFP4], ids=lambda f: f.type_name)
@pytest.mark.parametrize("method", ["rtn", "rtn-mse", "gptq"])
def test_methods_give_blocks_that_ggml_decodes_bit_exactly(method, fmt):
    w, x = _data()
    ct = methods.solve(method, w, LinearStats(x.T @ x, x.abs().sum(0), x.shape[0]), fmt)
    assert isinstance(ct, CodebookTensor) and ct.shape == w.shape
    data = ct.fmt.ggml_blocks(ct)
    assert data.size * 8 == ct.stored_bits()
    ggml = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[fmt.type_name]).reshape(w.shape)
    assert np.array_equal(ggml.view(np.uint32), ct.dequantize().numpy().view(np.uint32))
    back = fmt.from_ggml_blocks(data, w.shape)
    assert torch.equal(back.codes, ct.codes) and torch.equal(back.d, ct.d)


def test_encode_picks_the_nearest_level():
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    v = torch.linspace(-140, 130, 997)
    codes = codebook_encode(v, torch.ones_like(v), IQ4).long()
    assert torch.equal((v[:, None] - levels).abs().min(1).values, (v - levels[codes]).abs())
    assert int(codebook_encode(torch.tensor([0.3]), torch.tensor([0.0]), IQ4)) == 8      # scale 0: the level at 1


def test_nonuniform_levels_beat_q4_0_at_its_size_and_gptq_beats_rtn():
    w, x = _data()
    st = LinearStats(x.T @ x, x.abs().sum(0), x.shape[0])
    rtn_iq4, rtn_q40 = methods.solve("rtn", w, None, IQ4), methods.solve("rtn", w, None, Q4_0)
    assert float(((rtn_iq4.dequantize() - w) ** 2).sum()) < 0.8 * float(((rtn_q40.dequantize() - w) ** 2).sum())
    assert _out_err(w, methods.solve("gptq", w, st, IQ4), x) < 0.95 * _out_err(w, rtn_iq4, x)
    # the fit weighs the important input channels more: their error shrinks
    imp = torch.ones(w.shape[1])
    imp[:32] = 1000.0
    plain, weighted = codebook_fit(w, IQ4), codebook_fit(w, IQ4, imp)
    enc = lambda d: (d.float().repeat_interleave(32, 1) * torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)[
        codebook_encode(w, d.float().repeat_interleave(32, 1), IQ4).long()])
    assert ((enc(weighted) - w)[:, :32] ** 2).sum() <= ((enc(plain) - w)[:, :32] ** 2).sum()


def test_iq4_nl_plan_stores_exact_blocks_and_exports_them(tiny_dirs, tmp_path):
    src = load(tiny_dirs["llama"])
    arch = discover(src.model)
    plan = Plan([Choice(r.weight_name, "rtn", (Q4_0, IQ4, MXFP4)[i % 3]) for i, r in enumerate(arch.all_linears())]
                + [Choice(arch.embedding, "rtn", IQ4)])
    res = sizewise.compress(tiny_dirs["llama"], sizewise.CompressConfig(plan=plan), tmp_path / "a", progress=False)
    stored, _ = artifact.load_stored(tmp_path / "a")
    weights = artifact.load_weights(tmp_path / "a")
    state = res.model.state_dict()
    assert isinstance(stored[arch.embedding], CodebookTensor)
    assert all(torch.equal(weights[n], state[n].float()) for n in state)
    # the exported GGUF holds those blocks, and gguf's dequantizer gives the evaluated weights
    sizewise.api.export(tmp_path / "a", tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in r.tensors}
    assert types["token_embd.weight"] == "IQ4_NL" and "IQ4_NL" in {types[f"blk.0.{k}.weight"] for k in
                                                                  ("attn_k", "attn_v", "ffn_up", "ffn_down")}
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    deq = gguf.quants.dequantize(np.array(emb.data), emb.tensor_type)
    assert np.array_equal(deq.reshape(state[arch.embedding].shape), state[arch.embedding].numpy())
    v = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight")
    assert types[v.name] == "MXFP4"
    v_name = next(r.weight_name for r in arch.all_linears() if r.weight_name.endswith("0.self_attn.v_proj.weight"))
    deq = gguf.quants.dequantize(np.array(v.data), v.tensor_type)
    assert np.array_equal(deq.reshape(state[v_name].shape), state[v_name].numpy())
