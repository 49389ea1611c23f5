"""llama.cpp's input rounding (`runtime.llamacpp`) and the allocator pricing it for GGUF plans."""

import gguf
import numpy as np
import pytest
import torch

from sizewise import allocate as A
from sizewise.arch import discover
from sizewise.engine import LinearStats
from sizewise.observers import DEFAULT_OBSERVERS, RoundingGram
from sizewise.errors import SizewiseError
from sizewise.export.gguf_layout import GGUFLayout
from sizewise.quant.codebook import CodebookFormat
from sizewise.quant.formats import FloatFormat
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.kquant import KQuantFormat
from sizewise.runtime.llamacpp import input_rounding, round_input, rounded_inputs
from sizewise.sources import load


def _activations(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g) ** 4 * 10
    x[0, :32] = 0                                   # an all-zero block
    x[1, 5] = 300.0                                 # an outlier that sets its block's scale
    return x


def test_q8_0_rounding_is_ggml_q8_0_bit_for_bit():
    x = _activations(16, 576)
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(round_input(x, "q8_0").numpy(), ref)


def test_q8_K_rounding_puts_the_largest_value_at_minus_127_steps():
    x = _activations(4, 512, seed=1)
    r = round_input(x, "q8_K")
    for row, out in zip(x.reshape(-1, 256), r.reshape(-1, 256)):
        m = row[row.abs().argmax()]
        if m == 0:
            assert (out == 0).all()
            continue
        step = float(m.abs()) / 127
        q = out / (-m / 127)                        # the integer codes, up to float rounding
        assert torch.allclose(q, q.round(), atol=1e-3) and q.max() <= 127.001 and q.min() >= -127.001
        assert float((out - row).abs().max()) <= 0.5 * step * (1 + 1e-5)
        assert torch.isclose(out[row.abs().argmax()], m)
    # coarser blocks than q8_0's: more error on the same inputs
    assert (r - x).norm() > (round_input(x, "q8_0") - x).norm()


def test_float_roundings_and_none():
    x = _activations(2, 64)
    assert torch.equal(round_input(x, None), x)
    assert torch.equal(round_input(x, "f16"), x.half().float())
    assert torch.equal(round_input(x, "bf16"), x.bfloat16().float())


def test_each_ggml_type_names_its_vec_dot_rounding():
    q = lambda b, sym, zero: QuantFormat(b, 32, symmetric=sym, scale_dtype="float16", zero=zero)  # noqa: E731
    assert input_rounding(q(4, True, "int")) == "q8_0"            # Q4_0
    assert input_rounding(q(4, False, "float16")) == "q8_0"       # Q4_1: Q8_1 rounds the same values
    assert input_rounding(CodebookFormat("IQ4_NL")) == "q8_0"
    assert input_rounding(KQuantFormat("Q4_K")) == "q8_K"
    assert input_rounding(FloatFormat("float16")) == "f16"
    assert input_rounding(FloatFormat("bfloat16")) == "bf16"
    assert input_rounding(FloatFormat("float32")) is None
    with pytest.raises(ValueError, match="not a ggml type"):
        input_rounding(QuantFormat(3, 64, symmetric=False, scale_dtype="float16", zero="int"))


def test_rounded_inputs_hooks_only_inside_the_block():
    lin = torch.nn.Linear(64, 8, bias=False)
    x = _activations(3, 64)
    with rounded_inputs({lin: "q8_0"}):
        inside = lin(x)
    assert torch.allclose(inside, lin(round_input(x, "q8_0")))
    assert torch.equal(lin(x), x @ lin.weight.t())


def test_stats_gather_rounding_error_on_the_first_tokens_only():
    x = _activations(40, 256)
    s = LinearStats.empty(256, "cpu", (*DEFAULT_OBSERVERS, RoundingGram(("q8_0", "q8_K"), 30)))
    s.add(x[:20])
    s.add(x[20:])
    assert s.count == 40 and s.rounding_count == 30
    for kind in ("q8_0", "q8_K"):
        e = round_input(x[:30], kind) - x[:30]
        assert torch.allclose(s.rounding[kind], e.t() @ e, rtol=1e-5, atol=1e-6)
    # a width the block does not tile gets no accumulator for it
    assert set(LinearStats.empty(64, "cpu", (*DEFAULT_OBSERVERS, RoundingGram(("q8_0", "q8_K"), 8))).rounding) == {"q8_0"}


@pytest.fixture(scope="module")
def priced(tiny_dirs):
    src = load(tiny_dirs["llama"])
    arch = discover(src.model)
    cands = A.gguf_candidate_set(("rtn",))
    samples = torch.randint(0, src.model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    plain = A.profile_model(src.model, arch, samples, cands, progress=False)
    llama = A.profile_model(src.model, arch, samples, cands, progress=False, arithmetic="llamacpp")
    return src, arch, cands, samples, plain, llama


def test_profile_adds_each_candidates_input_rounding_cost(priced):
    src, arch, cands, _, plain, llama = priced
    kinds = [input_rounding(c.format) for c in cands]
    assert llama.protocol["arithmetic"] == "llamacpp" and plain.protocol["arithmetic"] is None
    for lp, lq in zip(plain.by_name.values(), llama.by_name.values()):
        if lq.kind == "table":
            continue
        assert lp.rounding == {} and set(lq.rounding) == {"q8_0", "f16"}    # 64/128 wide: no q8_K
        assert lq.rounding["q8_0"] > 100 * lq.rounding["f16"] > 0
        for i, k in enumerate(kinds):
            if lp.costs[i] is None:
                assert lq.costs[i] is None
            else:
                assert lq.costs[i] == pytest.approx(lp.costs[i] + lq.rounding[k], rel=1e-4)
    # each role's rounding costs were scaled to the KL measured with all its inputs rounded
    cal = llama.protocol["rounding_calibration"]
    assert set(cal) == {f"model.layers.{r}.weight q8_0" for r in ("self_attn.q_proj", "self_attn.k_proj",
                        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    down = [l for l in llama.layers if l.name.endswith("down_proj.weight")]
    measured = cal["model.layers.mlp.down_proj.weight q8_0"]["measured"]
    assert measured > 0 and sum(l.rounding["q8_0"] for l in down) == pytest.approx(measured, rel=1e-9)
    # the head table: the same data-free candidate costs more once its input is rounded
    head = arch.head_table
    q8 = next(i for i, c in enumerate(cands) if c.label == "rtn int8 g32 sym")
    assert llama.by_name[head].costs[q8] > plain.by_name[head].costs[q8]
    # the profile survives its JSON round trip, rounding costs included
    again = A.Profile.from_json(llama.to_json())
    assert again.by_name[arch.all_linears()[0].weight_name].rounding == llama.layers[0].rounding


def test_allocation_refuses_a_profile_for_another_arithmetic(priced, tiny_dirs):
    src, arch, cands, _, plain, llama = priced
    gguf_sizes = A.size_table(src.model, arch, cands, layout=GGUFLayout.for_source(src))
    lo, hi = gguf_sizes.reachable_bytes()
    budget = f"{(lo + hi) // 2}B"
    with pytest.raises(SizewiseError, match="profile again"):
        A.allocate(plain, gguf_sizes, budget)
    assert A.allocate(llama, gguf_sizes, budget).file_bytes <= (lo + hi) // 2


def test_gguf_plans_are_measured_with_llamacpps_rounding(priced):
    src, arch, cands, samples, plain, llama = priced
    gguf_sizes = A.size_table(src.model, arch, cands, layout=GGUFLayout.for_source(src))
    art_sizes = A.size_table(src.model, arch, cands)
    budget = "8.5bpw"                               # every linear Q8_0 fits
    g = A.uniform_allocations(llama, gguf_sizes, budget)
    a = A.uniform_allocations(plain, art_sizes, budget)
    g, a = (next(x for x in plans if "int8 g32 sym" in x.note) for plans in (g, a))
    before = {n: p.clone() for n, p in src.model.named_parameters()}
    kl_gguf, kl_art = A.measure_plans(src.model, arch, [g, a], samples[:2], progress=False)
    assert kl_gguf > 1.5 * kl_art > 0                # 8-bit weights, and 8-bit inputs on top
    assert all(torch.equal(p, before[n]) for n, p in src.model.named_parameters())
    x = torch.randn(2, 8, src.model.config.hidden_size)
    assert torch.equal(arch.all_linears()[0].module(x), x @ arch.all_linears()[0].module.weight.t())  # hooks gone


def test_compare_with_llamacpp_arithmetic(tiny_dirs, tmp_path):
    import sizewise
    from sizewise import api

    q8 = QuantFormat(8, 32, symmetric=True, scale_dtype="float16")          # Q8_0
    w4 = QuantFormat(4, 64, symmetric=False, scale_dtype="float16", zero="int")   # no ggml type
    for name, fmt in (("q8", q8), ("w4", w4)):
        sizewise.compress(tiny_dirs["llama"], sizewise.CompressConfig(method="rtn", format=fmt), tmp_path / name,
                          progress=False)
    args = dict(text=tiny_dirs["text"], ctx=32, windows=2, progress=False)
    plain = api.compare(tiny_dirs["llama"], [tmp_path / "q8"], **args)["candidates"]["q8"]
    llama = api.compare(tiny_dirs["llama"], [tmp_path / "q8"], arithmetic="llamacpp", **args)["candidates"]["q8"]
    assert (plain["arithmetic"], llama["arithmetic"]) == ("float", "llamacpp")
    assert llama["kl"] > 1.2 * plain["kl"] > 0         # 8-bit inputs on top of 8-bit weights
    with pytest.raises(SizewiseError, match="ggml types; .*w4 stores int4 g64"):
        api.compare(tiny_dirs["llama"], [tmp_path / "w4"], arithmetic="llamacpp", **args)
    with pytest.raises(SizewiseError, match="needs an artifact"):
        api.compare(tiny_dirs["llama"], [tiny_dirs["qwen2"]], arithmetic="llamacpp", **args)


@pytest.mark.parametrize("family", ["llama", "phi3"])    # phi3: its own GGUF names (fused attn_qkv)
def test_a_gguf_is_evaluated_with_its_own_types(family, tiny_dirs, tmp_path):
    import sizewise
    from sizewise import api

    q4 = QuantFormat(4, 32, symmetric=True, scale_dtype="float16")          # Q4_0
    sizewise.compress(tiny_dirs[family], sizewise.CompressConfig(method="rtn", format=q4), tmp_path / "a",
                      progress=False)
    api.export(tmp_path / "a", tmp_path / "a.gguf")
    res = api.compare(tiny_dirs[family], [tmp_path / "a", tmp_path / "a.gguf"], tiny_dirs["text"], ctx=32,
                      windows=2, progress=False, arithmetic="llamacpp")["candidates"]
    assert res["a.gguf"]["arithmetic"] == "llamacpp"
    assert res["a.gguf"]["kl"] == pytest.approx(res["a"]["kl"], rel=1e-4)
