"""k-quants (Q2_K .. Q6_K) as first-class formats: in methods, plans, artifacts, the allocator and GGUF.

Small and offline: random tensors, and tiny random Llamas whose widths are multiples of 256 where a
k-quant needs them.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers as tf

import sizewise
from sizewise import allocate as A
from sizewise import api, artifact
from sizewise.allocate import sizes as allocate_sizes
from sizewise.api import compression
from sizewise.arch import discover
from sizewise.cli import main
from sizewise.engine import LinearStats
from sizewise.errors import SizewiseError
from sizewise.export.gguf import gguf_tensor_name, rope_row_order
from sizewise.plan import Choice, Plan
from sizewise.quant import methods
from sizewise.quant.formats import FloatFormat
from sizewise.quant.registry import format_from_dict
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.kquant import KQUANT_TYPES, KQuantFormat, KQuantTensor, kquant_encode, kquant_fit
from sizewise.sources import load

G = gguf.GGMLQuantizationType
Q4_0, Q4_1 = QuantFormat(4, 32, symmetric=True), QuantFormat(4, 32, zero="float16")
Q5_0, Q5_1 = QuantFormat(5, 32, symmetric=True), QuantFormat(5, 32, zero="float16")
Q8_0 = QuantFormat(8, 32, symmetric=True)


def bits_equal(a, b) -> bool:
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    b = np.ascontiguousarray(np.asarray(b, dtype=np.float32))
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- the format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", KQUANT_TYPES)
def test_format_round_trips_through_dicts_plans_and_labels(type_name):
    fmt = KQuantFormat(type_name)
    assert format_from_dict(fmt.to_dict()) == fmt
    assert fmt.label == type_name
    plan = Plan([Choice("model.layers.0.mlp.down_proj.weight", "gptq", fmt)])
    assert Plan.from_json(plan.to_json()).choices == plan.choices
    assert A.Candidate.from_dict(A.Candidate("rtn", fmt).to_dict()) == A.Candidate("rtn", fmt)
    assert A.Candidate("rtn", fmt).fits(512) and not A.Candidate("rtn", fmt).fits(576)
    with pytest.raises(SizewiseError):
        format_from_dict({"kind": "kquant", "type_name": "Q7_K"})


# --- methods --------------------------------------------------------------------------------------


def _data(out=32, inp=512, tokens=1024, seed=0):
    """Weights and correlated inputs X = Z @ A with uneven channel gains (as in test_gptq)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(inp, inp, generator=g) / inp ** 0.5 + 0.3 * torch.eye(inp)
    x = (torch.randn(tokens, inp, generator=g) @ a) * torch.exp(0.5 * torch.randn(inp, generator=g))
    w = 0.02 * torch.randn(out, inp, generator=g)
    return w, x


def _stats(x: torch.Tensor) -> LinearStats:
    return LinearStats(x.T @ x, x.abs().sum(0), x.shape[0])


def _out_err(w, qt, x) -> float:
    return float((x @ (w - qt.dequantize()).T).norm())


@pytest.mark.parametrize("type_name", KQUANT_TYPES)
@pytest.mark.parametrize("method", ["rtn", "rtn-mse", "gptq"])
def test_methods_give_k_quant_tensors_that_ggml_decodes_bit_exactly(type_name, method):
    fmt = KQuantFormat(type_name)
    w, x = _data()
    kt = methods.solve(method, w, _stats(x), fmt)
    assert isinstance(kt, KQuantTensor) and kt.fmt == fmt and kt.shape == w.shape
    data = kt.fmt.ggml_blocks(kt)
    assert data.size * 8 == kt.stored_bits() == fmt.stored_bits(*w.shape)
    assert bits_equal(gguf.quants.dequantize(data, G[type_name]).reshape(w.shape), kt.dequantize().numpy())


@pytest.mark.parametrize("type_name", KQUANT_TYPES)
def test_gptq_beats_rtn_on_the_same_k_quant(type_name):
    fmt = KQuantFormat(type_name)
    w, x = _data()
    e_gptq = _out_err(w, methods.solve("gptq", w, _stats(x), fmt), x)
    e_rtn = _out_err(w, methods.solve("rtn", w, None, fmt), x)
    assert e_gptq < 0.95 * e_rtn


@pytest.mark.parametrize("type_name", ["Q3_K", "Q4_K"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_rounds_on_its_grid_fitted_up_front(type_name, act_order):
    """The grid is kquant_fit's, weighted by diag(XᵀX); with a diagonal XᵀX no error is spread, so
    GPTQ's codes are plain nearest rounding on that grid: what it rounded to is what decodes."""
    fmt = KQuantFormat(type_name)
    w, x = _data(out=16, inp=256)
    kt = methods.solve("gptq", w, _stats(x), fmt, {"act_order": act_order})
    grid = kquant_fit(w, fmt, importance=(x * x).sum(0))
    assert torch.equal(kt.grid.scales, grid.scales) and torch.equal(kt.grid.d, grid.d)
    h = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5)
    kt = methods.solve("gptq", w, LinearStats(h, torch.ones(256), 1), fmt, {"act_order": act_order})
    assert torch.equal(kt.codes, kquant_encode(w, kt.grid))


# --- tiny Llamas with 256-multiple widths ---------------------------------------------------------


def _save_llama(path, hidden: int, inter: int):
    from tiny import VOCAB, tiny_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                         tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Every linear (and the tied embedding) 256 wide: any k-quant fits anywhere."""
    return _save_llama(tmp_path_factory.mktemp("wide"), 256, 256)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """Like SmolLM2: only down_proj's input (the intermediate size) is a multiple of 256."""
    return _save_llama(tmp_path_factory.mktemp("narrow"), 64, 256)


L0, L1 = "model.layers.0.", "model.layers.1."
MIXED = {  # name -> (method, format): every k-quant, every 32-weight type, float, three quantizers
    "model.embed_tokens.weight": ("rtn", KQuantFormat("Q6_K")),
    L0 + "self_attn.q_proj.weight": ("gptq", KQuantFormat("Q4_K")),
    L0 + "self_attn.k_proj.weight": ("rtn", Q5_0),
    L0 + "self_attn.v_proj.weight": ("gptq", KQuantFormat("Q2_K")),
    L0 + "self_attn.o_proj.weight": ("rtn-mse", KQuantFormat("Q3_K")),
    L0 + "mlp.gate_proj.weight": ("gptq", Q4_1),
    L0 + "mlp.up_proj.weight": ("rtn", Q8_0),
    L0 + "mlp.down_proj.weight": ("gptq", KQuantFormat("Q5_K")),
    L1 + "self_attn.q_proj.weight": ("rtn", KQuantFormat("Q6_K")),
    L1 + "self_attn.k_proj.weight": ("float", FloatFormat("float16")),
    L1 + "self_attn.v_proj.weight": ("gptq", Q5_1),
    L1 + "self_attn.o_proj.weight": ("gptq", KQuantFormat("Q3_K")),
    L1 + "mlp.gate_proj.weight": ("rtn", Q4_0),
    L1 + "mlp.up_proj.weight": ("gptq", KQuantFormat("Q2_K")),
    L1 + "mlp.down_proj.weight": ("rtn", KQuantFormat("Q4_K")),
}
CALIB = ["--calib-samples", 8, "--calib-len", 32, "--quiet"]


def test_mixed_plan_compresses_stores_exactly_reloads_and_exports(wide, tiny_dirs, tmp_path, capsys):
    plan = Plan([Choice(n, m, f) for n, (m, f) in MIXED.items()])
    (tmp_path / "plan.json").write_text(plan.to_json())
    code, _, err = run(capsys, "compress", wide, "--plan", tmp_path / "plan.json", "--calib", tiny_dirs["text"],
                       *CALIB, "-o", tmp_path / "art")
    assert code == 0, err
    art = tmp_path / "art"
    manifest = artifact.read_manifest(art)

    # the packed file holds exactly what the allocator's size table predicts, tensor by tensor
    src = load(wide)
    arch = discover(src.model)
    cands = tuple(dict.fromkeys(A.Candidate(m, f) for m, f in MIXED.values()))
    sizes = A.size_table(src.model, arch, cands)
    want = {}
    for item in sizes.layers + sizes.tables:
        k = item.options.index(cands.index(A.Candidate(*MIXED[item.name])))
        assert manifest["tensors"][item.name]["stored_bits"] == item.bits[k]
        shape = tuple(manifest["tensors"][item.name]["shape"])
        for name, dtype, tshape, nbytes in allocate_sizes._tensors(item.name, sizes.candidates[item.options[k]],
                                                                   artifact.stored_shape(manifest["tensors"][item.name]), shape):
            want[name] = (dtype, list(tshape), nbytes)
    header_len = int.from_bytes((art / artifact.PACKED).read_bytes()[:8], "little")
    header = json.loads((art / artifact.PACKED).read_bytes()[8:8 + header_len])
    got = {n: (e["dtype"], e["shape"], e["data_offsets"][1] - e["data_offsets"][0])
           for n, e in header.items() if n in want}
    assert got == want
    assert manifest["totals"]["linear_stored_bits"] == sum(
        l.bits[l.options.index(cands.index(A.Candidate(*MIXED[l.name])))] for l in sizes.layers)
    table_k = sizes.tables[0].options.index(cands.index(A.Candidate(*MIXED["model.embed_tokens.weight"])))
    bound = sizes.fixed_file_bytes + sum(l.file_bytes[l.options.index(cands.index(A.Candidate(*MIXED[l.name])))]
                                         for l in sizes.layers) + sizes.tables[0].file_bytes[table_k]
    file_bytes = (art / artifact.PACKED).stat().st_size
    assert manifest["totals"]["file_bytes"] == file_bytes <= bound <= file_bytes + 8 + 12 * len(header)

    # stored as planned, reloaded bit for bit, the rebuilt model equal, labelled by `info`
    stored, _ = artifact.load_stored(art)
    for name, (method, fmt) in MIXED.items():
        assert format_from_dict(manifest["tensors"][name]["format"]) == fmt
        if isinstance(fmt, KQuantFormat):
            assert isinstance(stored[name], KQuantTensor) and stored[name].fmt == fmt
    weights = artifact.load_weights(art)
    dense = artifact.load(art)[0].state_dict()          # the model rebuilt from its config and packed tensors
    for name, (method, fmt) in MIXED.items():
        if isinstance(fmt, KQuantFormat):
            assert bits_equal(weights[name], stored[name].dequantize())
        assert bits_equal(dense[name], weights[name]), name
    layers = {l["name"]: l["format"] for l in api.info(art)["layers"]}
    assert layers[L0 + "mlp.down_proj.weight"] == "Q5_K" and layers["model.embed_tokens.weight"] == "Q6_K"

    # GGUF: the two-step export and the one-step compress write the same bytes, with the planned types
    assert run(capsys, "export", art, "--format", "gguf", "-o", tmp_path / "two.gguf")[0] == 0
    code, _, err = run(capsys, "compress", wide, "--plan", tmp_path / "plan.json", "--calib", tiny_dirs["text"],
                       *CALIB, "--format", "gguf", "-o", tmp_path / "one.gguf")
    assert code == 0, err
    one = {t.name: t for t in gguf.GGUFReader(tmp_path / "one.gguf").tensors}
    two = {t.name: t for t in gguf.GGUFReader(tmp_path / "two.gguf").tensors}
    assert one.keys() == two.keys() and all(np.array_equal(one[k].data, two[k].data) for k in one)
    by_gguf = {gguf_tensor_name(n, 2): n for n in MIXED}
    heads = {"attn_q": 4, "attn_k": 2}
    for gname, name in by_gguf.items():
        t = two[gname]
        method, fmt = MIXED[name]
        want_type = fmt.label.upper() if isinstance(fmt, KQuantFormat) else \
            {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0"}.get(fmt, "F16")
        assert G(t.tensor_type).name == want_type, gname
        w = weights[name].numpy()
        if gname.split(".")[-2] in heads:
            w = w[rope_row_order(w.shape[0], heads[gname.split(".")[-2]])]
        assert bits_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape), w), gname


def test_lossless_packing_keeps_k_quants(narrow, tmp_path):
    from sizewise import lossless as lm

    plan = Plan.uniform(discover(load(narrow).model), "rtn", Q8_0)
    plan = Plan([Choice(c.name, "rtn", KQuantFormat("Q3_K")) if "down_proj" in c.name else c for c in plan.choices])
    sizewise.compress(narrow, sizewise.CompressConfig(plan=plan), tmp_path / "a", progress=False)
    lm.pack_artifact(tmp_path / "a", tmp_path / "p")
    packed = lm.load_packed_artifact(tmp_path / "p")
    plain = artifact.load_weights(tmp_path / "a")
    assert packed.keys() == plain.keys() and all(bits_equal(packed[k], plain[k]) for k in plain)


@pytest.mark.parametrize("method", ["awq+gptq", "rotate+rtn"])
def test_transforms_before_a_k_quant(narrow, tiny_dirs, tmp_path, method):
    plan = Plan.uniform(discover(load(narrow).model), "gptq", Q4_0)
    plan = Plan([Choice(c.name, c.method, KQuantFormat("Q4_K")) if "down_proj" in c.name else c
                 for c in plan.choices])
    calib = sizewise.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    res = sizewise.compress(narrow, sizewise.CompressConfig(method=method, plan=plan, calib=calib), tmp_path / "a",
                            progress=False)
    stored, _ = artifact.load_stored(tmp_path / "a")
    down = L0 + "mlp.down_proj.weight"
    assert isinstance(stored[down], KQuantTensor)
    assert bits_equal(res.model.state_dict()[down], stored[down].dequantize())


# --- the allocator --------------------------------------------------------------------------------


def test_gguf_candidates_offer_k_quants_only_where_they_fit(narrow):
    src = load(narrow)
    cands = A.gguf_candidate_set(("rtn",))
    sizes = A.size_table(src.model, discover(src.model), cands)
    for layer in sizes.layers:
        offered = {cands[i].format.label for i in layer.options}
        assert ({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= offered) == layer.name.endswith("down_proj.weight")
        for i, bits in zip(layer.options, layer.bits):
            assert bits == cands[i].format.stored_bits(*layer.shape)


def test_budgeted_gguf_takes_k_quants_when_it_must(narrow, tiny_dirs, tmp_path, capsys):
    """4.2 bits/weight is below every 32-weight type (Q4_0: 4.5): only down_proj in Q2_K/Q3_K reaches it."""
    out = tmp_path / "b.gguf"
    code, stdout, err = run(capsys, "compress", narrow, "--budget", "4.2bpw", "--format", "gguf", "-o", out,
                            "--calib", tiny_dirs["text"], *CALIB)
    assert code == 0, err
    r = gguf.GGUFReader(out)
    types = {t.name: G(t.tensor_type).name for t in r.tensors}
    assert {types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]} & {"Q2_K", "Q3_K"}
    linear = [t for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name]
    assert sum(t.n_bytes * 8 for t in linear) / sum(int(np.prod(t.shape)) for t in linear) <= 4.2


def test_k_quant_on_a_layer_too_narrow_fails_before_any_work(narrow, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("calibrated before checking the plan")

    monkeypatch.setattr(compression, "_calibration", no_work)
    plan = Plan.uniform(discover(load(narrow).model), "gptq", Q4_0)
    bad = L1 + "self_attn.o_proj.weight"
    plan = Plan([Choice(c.name, c.method, KQuantFormat("Q4_K")) if c.name == bad else c for c in plan.choices])
    (tmp_path / "plan.json").write_text(plan.to_json())
    for extra in ([], ["--format", "gguf"]):
        out = tmp_path / ("m.gguf" if extra else "a")
        code, _, err = run(capsys, "compress", narrow, "--plan", tmp_path / "plan.json", *extra, "-o", out, "--quiet")
        assert code == 2 and err.count("\n") == 1 and "o_proj" in err and "256" in err and "64" in err
        assert not out.exists()
