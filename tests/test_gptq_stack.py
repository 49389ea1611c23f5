"""GPTQ for many formats in one column loop (`quant.gptq_stack`) equals one `gptq()` per format, exactly,
and profiles made with it are the profiles made one candidate at a time.

Exact, not approximate: every elementwise operation of the stacked loop is the one `gptq()` does on the
same operands, and each row's updates read only that row (rows of a matrix product and of an outer
product are computed independently), so the codes, scales and zeros must be bit-identical.
"""

import pytest
import torch

from sizewise import allocate as A
from sizewise.allocate import candidates as C
from sizewise.arch import discover
from sizewise.observers import LinearStats
from sizewise.quant import methods
from sizewise.quant.gptq import gptq, hessian_factor
from sizewise.quant.grid import decode, encode, fit, grouped, round_trip
from sizewise.quant.gptq_stack import gptq_stacked, stackable
from sizewise.quant.lowrank import LowRankFormat
from sizewise.quant.uniform import QuantFormat
from tiny import tiny_model

FORMATS = [QuantFormat(b, g, symmetric=s, zero=z) for b in (2, 3, 4, 5, 8) for g in (16, 32, None)
           for s, z in ((False, "int"), (True, "int"), (False, "float16"))]


def _same(a, b) -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
            and ((a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)))


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=gen) * 0.02
    w[3, 7] = 0.3                                            # an outlier the clip search must handle
    x = torch.randn(400, 64, generator=gen) * torch.rand(64, generator=gen) * 3
    x[:, 5] = 0                                              # a dead input channel
    return w, x.t() @ x


@pytest.mark.parametrize("clip_search", [False, True])
def test_stacked_equals_one_gptq_per_format_act_order(layer, clip_search):
    w, xtx = layer
    f = hessian_factor(xtx, act_order=True)
    ref = [gptq(w, None, q, factor=f, clip_search=clip_search) for q in FORMATS]
    # a small chunk size: several chunks, mixing integer and float zeros in each
    got = gptq_stacked(w, FORMATS, f, clip_search=clip_search, max_bytes=5 * 3 * w.numel() * 4, max_rows=10 ** 9)
    assert [q.label for q, a, b in zip(FORMATS, ref, got) if not _same(a, b)] == []


def test_without_act_order_only_per_channel_grids_stack(layer):
    w, xtx = layer
    f = hessian_factor(xtx, act_order=False)
    per_channel = [q for q in FORMATS if q.group_size is None]
    assert all(stackable(q, f) for q in per_channel)
    assert not any(stackable(q, f) for q in FORMATS if q.group_size is not None)
    ref = [gptq(w, None, q, factor=f, act_order=False, clip_search=True) for q in per_channel]
    got = gptq_stacked(w, per_channel, f, clip_search=True)
    assert all(_same(a, b) for a, b in zip(ref, got))
    with pytest.raises(ValueError):
        gptq_stacked(w, FORMATS[:1], f)


@pytest.mark.parametrize("options", [{}, {"act_order": False}, {"clip_search": False, "block_size": 16}])
def test_solve_many_equals_solve(options):
    """What profiling calls: every format of one weight at once, stacked or not (a k-quant's fixed grid,
    a low-rank wrapper), as each alone."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=gen) * 0.02
    x = torch.randn(600, 256, generator=gen) * torch.rand(256, generator=gen)
    fmts = [QuantFormat(3, 32), QuantFormat(4, None, symmetric=True), QuantFormat(8, 64, zero="float16"),
            C.GGML_FORMATS["Q4_K"], LowRankFormat(QuantFormat(2, 32), 4)]
    many = methods.solve_many("gptq", w, LinearStats(xtx=x.t() @ x, count=600), fmts, options)
    one = [methods.solve("gptq", w, LinearStats(xtx=x.t() @ x, count=600), q, options) for q in fmts]
    for a, b in zip(one, many):
        assert torch.equal(a.dequantize(), b.dequantize())
    assert all(_same(a, b) for a, b in zip(one[:3], many[:3]))
    rtn = methods.solve_many("rtn", w, None, fmts[:3])
    assert all(_same(a, methods.solve("rtn", w, None, q)) for a, q in zip(rtn, fmts))


def test_profile_costs_are_those_of_one_candidate_at_a_time():
    """The profile solves each linear's candidates together; its errors are still those of each
    candidate's own solve (`_dequantized`, what `compress` stores), to float32 summation order of the
    error sum: the same dW, so equal up to the last bits of `float(row.sum())` (rel 1e-6)."""
    model = tiny_model("llama")
    arch = discover(model)
    # RTN at 3 bits alone: profiled; at 2 and 8 bits beside GPTQ: not (`candidates.profiled`)
    cands = A.candidate_set(("rtn", "gptq"), bits=(2, 8), group_sizes=(32, None)) + \
        A.candidate_set(("rtn",), bits=(3,), group_sizes=(32, None), float_dtype=None)
    samples = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    prof = A.profile_model(model, arch, samples, cands, progress=False, keep_stats=True, tables=False)
    checked = 0
    for ref in arch.all_linears():
        lp, stats, w = prof.by_name[ref.weight_name], prof.stats[ref.name], ref.weight().float()
        for i, c in enumerate(cands):
            if not c.fits(w.shape[1]) or (c.method == "rtn" and c.format.bits != 3):
                assert lp.errors[i] is None
                continue
            dw = C._dequantized(c, w, LinearStats(xtx=stats.xtx, count=stats.count), None) - w
            expect = float((((dw @ stats.xtx) * dw).sum(1).clamp_min(0) / stats.count).sum())
            assert lp.errors[i] == pytest.approx(expect, rel=1e-6, abs=1e-12)
            checked += 1
    assert checked >= len(arch.all_linears()) * 5      # GPTQ at 2 and 8 bits, RTN at 3, per-channel at least


def test_measured_plans_hold_each_candidates_own_solve():
    """`measure_plans` solves every plan's weights up front, each weight's candidates together; the
    weights it measured (and hands on to `compress`) are each candidate's own solve, exactly."""
    model = tiny_model("llama")
    arch = discover(model)
    cands = A.candidate_set(("rtn", "gptq"), bits=(2, 3, 4, 8), group_sizes=(32, None))
    samples = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    prof = A.profile_model(model, arch, samples, cands, progress=False, keep_stats=True, tables=False)
    sizes = A.size_table(model, arch, cands)
    variants = A.plan_variants(prof, sizes, "3.5bpw")
    cache = A.SolvedCache()
    A.measure_plans(model, arch, variants, samples[:2], stats=prof.stats, cache=cache, progress=False)
    refs = {r.weight_name: r for r in arch.all_linears()}
    assert {(c.name, C.Candidate(c.method, c.format)) for v in variants for c in v.plan.choices} == set(cache.weights)
    assert any(c.method == "gptq" for _, c in cache.weights)
    for (name, cand), solved in cache.weights.items():
        st = prof.stats[refs[name].name]
        own = C._solved(cand, refs[name].weight(), LinearStats(xtx=st.xtx, count=st.count), None)
        assert torch.equal(C._dense(own), C._dense(solved))


@pytest.mark.parametrize("fmt", [QuantFormat(3, 16), QuantFormat(4, 16, symmetric=True), QuantFormat(2, 16, zero="float16")])
def test_round_trip_is_decode_of_encode(fmt):
    """The clip search's error uses `grid.round_trip`: the values `decode(encode(w))` gives, clamping included."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=gen)
    scale, zero = fit(grouped(w, fmt), fmt, 0.6)                 # clipped: some weights beyond the grid
    s, z = scale[..., None], None if zero is None else zero[..., None]
    wg = grouped(w, fmt)
    assert torch.equal(round_trip(wg, s, z, fmt), decode(encode(wg, s, z, fmt), s, z, fmt))
