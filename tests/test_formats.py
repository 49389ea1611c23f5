"""The format protocol, over every format kind: registry round trips, stored parts through the packed
file, declared bits against stored bytes, and a plan of mixed formats through artifact and lossless
packing back to the in-memory model's weights."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sizewise
from sizewise import artifact
from sizewise.api import CompressConfig
from sizewise.arch import discover
from sizewise.plan import Choice, Plan
from sizewise.quant.codebook import CodebookFormat
from sizewise.quant.formats import DTYPE_BITS, FloatFormat, Format
from sizewise.quant.kquant import KQUANT_TYPES, KQuantFormat
from sizewise.quant.lowrank import LowRankFormat
from sizewise.quant.sparse import SparseFormat
from sizewise.quant.registry import FORMATS, format_from_dict
from sizewise.quant.uniform import QuantFormat

UNIFORM = [QuantFormat(b, g, sym, scale, zero)
           for b in range(2, 9) for g in (32, None) for scale in DTYPE_BITS
           for sym, zero in ((True, "int"), (False, "int"), (False, "float16"))]
FIXED = [KQuantFormat(t) for t in KQUANT_TYPES] + [CodebookFormat("IQ4_NL"), CodebookFormat("MXFP4")]
FLOATS = [FloatFormat(d) for d in DTYPE_BITS]
# formats wrapping another: a mask and the kept values, low-rank factors beside a base (or alone)
WRAPPED = [SparseFormat(FloatFormat(), "2:4"), SparseFormat(QuantFormat(4, 32, symmetric=True), "50%"),
           SparseFormat(QuantFormat(3, None), "4:8"), LowRankFormat(QuantFormat(3, 32), 4), LowRankFormat(None, 6),
           LowRankFormat(SparseFormat(QuantFormat(4, 32), "2:4"), 2, "bfloat16")]
ALL = UNIFORM + FIXED + FLOATS + WRAPPED


def _id(f: Format) -> str:
    return f.label.replace(" ", "-")


def test_every_kind_is_registered():
    assert set(FORMATS) == {"quant", "kquant", "codebook", "float", "sparse", "lowrank"}
    assert {type(f).kind for f in ALL} == set(FORMATS)


@pytest.mark.parametrize("fmt", ALL, ids=_id)
def test_registry_round_trip(fmt):
    d = json.loads(json.dumps(fmt.to_dict()))
    assert format_from_dict(d) == fmt
    assert d["kind"] == fmt.kind


@pytest.mark.parametrize("bad", [{"kind": "nope"}, {"bits": 4}, "quant", {"kind": "quant", "bits": 4, "colour": 1},
                                 {"kind": "quant", "bits": 1}])
def test_registry_refuses_what_it_does_not_know(bad):
    with pytest.raises(sizewise.SizewiseError):
        format_from_dict(bad)


def _solve(fmt: Format, w: torch.Tensor):
    return fmt.round(w).to(torch.float32) if not fmt.quantized else fmt.round(w)


@pytest.mark.parametrize("fmt", ALL, ids=_id)
def test_parts_through_the_packed_file_are_exact_and_as_large_as_declared(fmt, tmp_path):
    torch.manual_seed(0)
    out, inp = 6, 512
    w = torch.randn(out, inp) * torch.logspace(-2, 1, inp)           # channels of very different scales
    stored = fmt.round(w)
    entries = artifact.stored_entries("w", fmt, stored)
    parts = fmt.parts(out, inp)
    assert [p.key("w") for p in parts] == list(entries)
    payload = sum(t.numel() * t.element_size() for t in entries.values())
    assert payload == sum(p.nbytes for p in parts)
    packed_parts = sum(p.code_bits is not None for p in parts)
    # every declared bit is stored, and only bit-packed codes round up to a whole byte
    assert 0 <= payload * 8 - fmt.stored_bits(out, inp) < 8 * max(packed_parts, 1)
    save_file(entries, str(tmp_path / "p.safetensors"))
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        back = artifact.read_stored(f.get_tensor, "w", fmt, (out, inp))
    if fmt.quantized:
        assert torch.equal(back.dequantize(), stored.dequantize())
        assert back.stored_bits() == fmt.stored_bits(out, inp)
    else:
        assert torch.equal(back, stored)
        assert back.dtype == getattr(torch, fmt.dtype)


@pytest.mark.parametrize("fmt", [f for f in UNIFORM + FIXED + FLOATS if f.ggml_type], ids=_id)
def test_ggml_blocks_round_trip_where_a_format_has_them(fmt):
    if not fmt.quantized:
        pytest.skip("float tensors are written as arrays, not blocks")
    torch.manual_seed(1)
    w = torch.randn(4, 512)
    st = fmt.round(w)
    blocks = fmt.ggml_blocks(st)
    assert blocks.nbytes * 8 == fmt.stored_bits(4, 512)
    if fmt.kind != "quant":              # uniform formats are stored as their parts; blocks are export-only
        assert torch.equal(fmt.from_ggml_blocks(blocks, (4, 512)).dequantize(), st.dequantize())


def _mixed_plan(arch) -> Plan:
    """Every decoder linear and the embedding get a different format, cycling through the matrix."""
    pool = itertools.cycle([f for f in UNIFORM if f.group_size is None or f.bits in (2, 3, 5, 8)] + FLOATS)
    choices = []
    for ref in arch.all_linears():
        f = next(pool)
        choices.append(Choice(ref.weight_name, "float" if not f.quantized else "rtn", f))
    emb = arch.embedding
    choices.append(Choice(emb, "rtn", QuantFormat(3, 32, False, "bfloat16", "float16")))
    return Plan(choices)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_plan_through_artifact_and_lossless_packing(family, tiny_dirs, tmp_path):
    from sizewise.lossless import load_packed_artifact, pack_artifact
    from tiny import tiny_model

    plan = _mixed_plan(discover(tiny_model(family)))
    scales = {c.format.scale_dtype for c in plan.choices if c.format.kind == "quant"}
    assert scales == set(DTYPE_BITS)                 # float16, bfloat16 and float32 scales all stored
    out = tmp_path / "a"
    res = sizewise.compress(str(tiny_dirs[family]), CompressConfig(plan=plan), out, progress=False)
    in_memory = res.model.state_dict()
    rebuilt = artifact.load_weights(out)
    for name, t in in_memory.items():
        assert torch.equal(rebuilt[name], t.float()), name
    m = res.manifest
    with safe_open(str(out / artifact.PACKED), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    declared = m["totals"]["model_stored_bits"]
    assert 0 <= stored * 8 - declared < 8 * 2 * len(plan.choices)   # codes and int zeros round up to bytes
    pack_artifact(out, tmp_path / "p")
    packed = load_packed_artifact(tmp_path / "p")
    for name, t in in_memory.items():
        assert torch.equal(packed[name], t.float()), name
