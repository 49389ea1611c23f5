"""Budget allocation: exact knapsack, exact sizes, budgets and their errors, the proxy, plans end to end."""

import itertools
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import sizewise
from sizewise import allocate as A
from sizewise.allocate import candidates, choice
from sizewise.api import budget as B
from sizewise.arch import discover
from sizewise.errors import SizewiseError
from sizewise.plan import Plan
from sizewise.sources import load
from tiny import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import proxy_validation as PV  # noqa: E402


def _brute(weights, costs, cap):
    best = None
    for ch in itertools.product(*[range(len(w)) for w in weights]):
        if sum(w[j] for w, j in zip(weights, ch)) <= cap:
            c = sum(cc[j] for cc, j in zip(costs, ch))
            best = c if best is None else min(best, c)
    return best


# --- knapsack -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(400))
def test_knapsack_equals_brute_force(seed):
    r = np.random.default_rng(seed)
    n = int(r.integers(1, 7))
    weights = [r.integers(1, 40, int(r.integers(1, 6))).tolist() for _ in range(n)]
    if seed % 3 == 0:    # integer costs: many ties and equal-cost plateaus
        costs = [r.integers(0, 6, len(w)).astype(float).tolist() for w in weights]
    elif seed % 3 == 1:  # costs falling with weight, like real candidates
        costs = [(1.0 / np.asarray(w) ** 2 * r.lognormal()).tolist() for w in weights]
    else:
        costs = [r.random(len(w)).tolist() for w in weights]
    lo, hi = sum(min(w) for w in weights), sum(max(w) for w in weights)
    cap = int(r.integers(lo, hi + 1))
    sol = A.solve_mckp(weights, costs, cap)
    weight = sum(w[j] for w, j in zip(weights, sol.choice))
    cost = sum(c[j] for c, j in zip(costs, sol.choice))
    assert weight == sol.weight <= cap
    assert cost == pytest.approx(_brute(weights, costs, cap), rel=1e-12, abs=1e-15)
    assert sol.cost == pytest.approx(cost, rel=1e-12, abs=1e-15)


def test_knapsack_infeasible_capacity_raises():
    with pytest.raises(SizewiseError, match="no choice fits"):
        A.solve_mckp([[5, 9], [3]], [[1.0, 0.5], [0.0]], 7)


def test_knapsack_realistic_instance_is_fast_and_tight():
    """210 layers x 25 options with costs like 4^-bits: exact, inside the budget, between its bounds."""
    r = np.random.default_rng(1)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    weights, costs = [], []
    for out, inp in shapes:
        imp, w, c = r.lognormal(0, 1.5), [], []
        for b in (2, 3, 4, 5, 6, 8):
            for g in (32, 64, 128, None):
                if g and inp % g:
                    continue
                w.append(out * inp * b + out * (inp // (g or inp)) * (16 + b))
                c.append(imp * out * inp * 4.0 ** -b * (1.3 if g is None else 1 - 0.1 * (128 // g)) * (1 + 0.05 * r.random()))
        w.append(out * inp * 16)
        c.append(imp * out * inp * 1e-7)
        weights.append(w)
        costs.append(c)
    n_params = sum(o * i for o, i in shapes)
    previous = float("inf")
    for bpw in (2.5, 3.25, 4.0):
        cap = int(bpw * n_params)
        sol = A.solve_mckp(weights, costs, cap)
        assert sum(w[j] for w, j in zip(weights, sol.choice)) == sol.weight <= cap
        assert sol.cost < previous      # more budget never costs more
        previous = sol.cost


# --- budgets and sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, value", [
    ("3.5bpw", "bpw", Fraction(7, 2)), ("3.1 bpw", "bpw", Fraction(31, 10)), ("70MB", "bytes", 70 * 10**6),
    ("70MiB", "bytes", 70 * 2**20), ("1.5GB", "bytes", 15 * 10**8), ("2GiB", "bytes", 2 * 2**30),
    ("512kB", "bytes", 512000), ("123B", "bytes", 123)])
def test_parse_budget(text, kind, value):
    b = A.parse_budget(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize("text", ["abc", "3.5", "70 parsecs", "0bpw", "-3bpw"])
def test_bad_budget_is_one_line_error(text):
    with pytest.raises(SizewiseError) as e:
        A.parse_budget(text)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    arch = discover(model)
    cands = A.candidate_set()
    return model, arch, cands, A.size_table(model, arch, cands)


def test_sizes_come_from_the_formats(llama):
    model, arch, cands, sizes = llama
    assert sizes.linear_params == sum(r.shape[0] * r.shape[1] for r in arch.all_linears())
    for layer in sizes.layers:
        for i, bits in zip(layer.options, layer.bits):
            assert bits == cands[i].format.stored_bits(*layer.shape)
    # tiny llama: input sizes 64 and 128; group 128 does not divide 64, so those layers lack it
    q = next(l for l in sizes.layers if l.name.endswith("q_proj.weight"))
    assert len(q.options) == len(cands) - 6


@pytest.mark.parametrize("budget, words", [("1bpw", "below"), ("17bpw", "above"), ("10kB", "below"),
                                           ("1GB", "above")])
def test_unreachable_budget_names_the_range_before_profiling(tiny_dirs, monkeypatch, budget, words):
    def no_profiling(*a, **k):
        raise AssertionError("profiled before checking the budget")

    monkeypatch.setattr(B, "profile_model", no_profiling)
    with pytest.raises(SizewiseError) as e:
        B.plan_for_budget(tiny_dirs["llama"], budget, progress=False)
    msg = str(e.value)
    assert words in msg and "reachable:" in msg and " to " in msg and "\n" not in msg


def test_reachable_range_ends_are_accepted(llama):
    *_, sizes = llama
    lo, hi = sizes.reachable_bits()
    n = sizes.linear_params
    assert A.check_budget(A.Budget("lo", "bpw", Fraction(lo, n)), sizes) == lo
    assert A.check_budget(A.Budget("hi", "bpw", Fraction(hi, n)), sizes) == hi
    with pytest.raises(SizewiseError):
        A.check_budget(A.Budget("under", "bpw", Fraction(lo - 1, n)), sizes)
    blo, bhi = sizes.reachable_bytes()
    A.check_budget(A.Budget("lo", "bytes", Fraction(blo)), sizes)
    with pytest.raises(SizewiseError):
        A.check_budget(A.Budget("under", "bytes", Fraction(blo - 1)), sizes)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_file_size_bound_is_tight_and_never_below_the_real_file(tiny_dirs, tmp_path, family):
    """A random mixed plan, applied: exact linear bits, and packed file ≤ predicted bound (a few bytes above)."""
    src = load(tiny_dirs[family])
    arch = discover(src.model)
    cands = A.candidate_set(bits=(2, 3, 5, 8))
    sizes = A.size_table(src.model, arch, cands)
    r = np.random.default_rng(0)
    picks = [int(r.integers(len(l.options))) for l in sizes.layers]
    plan = Plan([candidates._choice(l.name, cands[l.options[k]]) for l, k in zip(sizes.layers, picks)])
    res = sizewise.compress(src, sizewise.CompressConfig(plan=plan), tmp_path / "a", progress=False)
    t = res.manifest["totals"]
    assert t["linear_stored_bits"] == sum(l.bits[k] for l, k in zip(sizes.layers, picks))
    bound = sizes.fixed_file_bytes + sum(sizes.table_float_bytes) + sum(l.file_bytes[k] for l, k in zip(sizes.layers, picks))
    assert t["file_bytes"] == (tmp_path / "a" / "packed.safetensors").stat().st_size
    n_tensors = len(res.manifest["tensors"]) + 2 * len(sizes.layers)
    assert t["file_bytes"] <= bound <= t["file_bytes"] + 8 + 2 * 6 * n_tensors


# --- proxy ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiled(llama):
    model, arch, cands, sizes = llama
    samples = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    return A.profile_model(model, arch, samples, cands, progress=False), samples


def test_profile_error_is_the_exact_layer_output_error(llama, profiled):
    """errors[i] = trace(ΔW XᵀX ΔWᵀ)/N equals the mean over tokens of ‖ΔW x‖², measured directly."""
    model, arch, cands, _ = llama
    prof, samples = profiled
    ref = arch.linears[1][4]                   # a layer-1 MLP input: propagated through layer 0
    xs = []
    h = ref.module.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(samples, use_cache=False)
    h.remove()
    x = torch.cat(xs)
    lp = prof.by_name[ref.weight_name]
    i = next(i for i, c in enumerate(cands) if c.method == "rtn" and c.format.bits == 3 and c.format.group_size == 32)
    dw = candidates._dequantized(cands[i], ref.weight(), None, None) - ref.weight()
    assert lp.errors[i] == pytest.approx(float(((x @ dw.t()) ** 2).sum(1).mean()), rel=1e-3)
    assert all(c is None or c >= 0 for c in lp.costs)
    # fewer bits, more error, at a fixed group size
    by_bits = [lp.costs[j] for j, c in enumerate(cands) if c.method == "rtn" and c.format.group_size == 32]
    assert by_bits == sorted(by_bits, reverse=True)


def test_proxy_ranks_single_layer_changes_like_the_measured_kl(llama, profiled):
    model, arch, cands, _ = llama
    prof, samples = profiled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = PV.validate_proxy(model, arch, prof, samples, count=10, seed=0)
    assert len(res["pairs"]) == 10
    assert res["spearman"] > 0.7, res
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # model restored
    # the hard part: one format on every layer, so only the layers' importance separates them;
    # measured on held-out token sequences
    held_out = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    i = next(i for i, c in enumerate(cands) if c.method == "rtn" and c.format.bits == 3 and c.format.group_size == 32)
    res = PV.validate_proxy(model, arch, prof, held_out, pairs=PV.proxy_pairs(prof, 100, candidate=i))
    assert len(res["pairs"]) == len(arch.all_linears())
    assert res["spearman"] > 0.8, res
    assert 0.5 < res["median_ratio"] < 2           # ½·Fisher makes it a KL estimate, not just a ranking


def test_spearman():
    assert PV.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert PV.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert PV.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1)


# --- allocation -----------------------------------------------------------------------------------


def test_allocation_is_the_knapsack_optimum_and_improves_with_budget(llama, profiled):
    *_, sizes = llama
    prof, _ = profiled
    previous = None
    for bpw in ("2.5bpw", "3bpw", "3.5bpw", "4.25bpw", "6bpw"):
        alloc = A.allocate(prof, sizes, bpw)
        assert alloc.linear_bits <= A.parse_budget(bpw).value * sizes.linear_params
        assert alloc.linear_bits == sum(c.format.stored_bits(*alloc.shapes[c.name]) for c in alloc.plan.choices)
        if previous is not None:
            assert alloc.predicted_total <= previous
        previous = alloc.predicted_total
    # a uniform choice that fits the same budget is never predicted better than the allocation
    alloc = A.allocate(prof, sizes, "4.5bpw")
    i = next(i for i, c in enumerate(sizes.candidates) if c.method == "rtn" and c.format.bits == 4
             and c.format.group_size == 32)
    uniform = sum(prof.by_name[l.name].costs[i] for l in sizes.layers)
    assert alloc.predicted_total <= uniform


def test_profile_round_trips_and_mismatches_are_refused(llama, profiled):
    *_, sizes = llama
    prof, _ = profiled
    again = A.Profile.from_json(prof.to_json())
    assert again.candidates == prof.candidates and [l.costs for l in again.layers] == [l.costs for l in prof.layers]
    with pytest.raises(SizewiseError, match="different candidate set"):
        A.allocate(again, A.size_table(llama[0], llama[1], A.candidate_set(bits=(4,))), "4.5bpw")


def test_render_shows_every_layer_and_the_totals(llama, profiled):
    *_, sizes = llama
    alloc = A.allocate(profiled[0], sizes, "3.25bpw")
    text = A.render(alloc)
    assert "pred. KL" in text and "bits/weight" in text and "3.25 bits/weight" in text
    assert all(c.name.removesuffix(".weight") in text for c in alloc.plan.choices)


def test_end_to_end_two_budgets_then_compress(tiny_dirs, tmp_path, monkeypatch):
    """profile (once, then from the cache) → allocate at 2 budgets → JSON → compress: exact sizes."""
    monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / "cache"))     # this test's own, empty cache
    calls = []
    real = B.profile_model
    monkeypatch.setattr(B, "profile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib = sizewise.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    src = load(tiny_dirs["llama"])
    for budget in ("3.25bpw", "80kB"):
        alloc = B.plan_for_budget(src, budget, calib=calib, progress=False)
        plan = Plan.from_json(alloc.plan.to_json())
        assert plan.choices == alloc.plan.choices
        out = tmp_path / budget
        res = sizewise.compress(tiny_dirs["llama"], sizewise.CompressConfig(plan=plan), out, progress=False)
        t = res.manifest["totals"]
        assert t["linear_stored_bits"] == alloc.linear_bits
        if alloc.budget.kind == "bpw":
            assert t["linear_stored_bits"] <= Fraction(13, 4) * t["linear_params"]
        else:
            assert t["file_bytes"] <= alloc.file_bytes <= 80_000
        tensors = json.loads((out / "manifest.json").read_text())["tensors"]
        assert [e["format"] for e in tensors.values() if e["linear"]] == \
            [c.format.to_dict() for c in plan.choices if tensors[c.name]["linear"]]
        # every choice, token tables included, is stored exactly as planned
        assert all(tensors[c.name]["format"] == c.format.to_dict() for c in plan.choices)
    assert len(calls) == 1                     # the second budget reused the cached profile


def test_compress_to_budget_records_the_allocation(tiny_dirs, tmp_path):
    calib = sizewise.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    res, alloc = B.compress_to_budget(tiny_dirs["gpt2"], "4bpw", tmp_path / "o",
                                      sizewise.CompressConfig(calib=calib), progress=False)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["allocation"]["budget"] == "4bpw" and m["totals"]["bits_per_weight"] <= 4
    assert m["totals"]["linear_stored_bits"] == alloc.linear_bits


def test_uniform_plans_fit_and_are_sorted_by_prediction(llama, profiled):
    *_, sizes = llama
    prof, _ = profiled
    unis = A.uniform_allocations(prof, sizes, "4.5bpw")
    assert unis and all(a.linear_bits <= Fraction(9, 2) * sizes.linear_params for a in unis)
    assert [a.predicted_total for a in unis] == sorted(a.predicted_total for a in unis)
    for a in unis:
        assert len({(c.method, c.format) for c in a.plan.choices}) == 1 and a.note.startswith("uniform")
    # the knapsack is never predicted worse than any uniform plan of the same budget
    assert A.allocate(prof, sizes, "4.5bpw").predicted_total <= unis[0].predicted_total


def test_plan_variants_respect_their_floors_and_the_budget(llama, profiled):
    *_, sizes = llama
    prof, _ = profiled
    variants = A.plan_variants(prof, sizes, "3.5bpw")
    assert variants[0].note == "knapsack" and len(variants) >= 2
    for a in variants:
        assert a.linear_bits <= Fraction(7, 2) * sizes.linear_params
        if "below" in a.note:
            floor = int(a.note.split("below ")[1].split()[0])
            assert min(c.format.bits for c in a.plan.choices if c.method != "float") >= floor
    keys = [tuple((c.method, c.format) for c in a.plan.choices) for a in variants]
    assert len(set(keys)) == len(keys)


def test_measure_plans_is_the_kl_of_the_plans_model_and_restores_the_weights(llama, profiled):
    model, arch, _, sizes = llama
    prof, samples = profiled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variants = A.plan_variants(prof, sizes, "3.5bpw")[:2]
    kls = A.measure_plans(model, arch, variants, samples[:4], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the first plan's KL measured directly on a copy of the model with those weights
    import copy
    twin = copy.deepcopy(model)
    tarch = discover(twin)
    refs = {r.weight_name: r for r in tarch.all_linears()}
    for c in variants[0].plan.choices:
        refs[c.name].set_weight(candidates._dequantized(A.Candidate(c.method, c.format), refs[c.name].weight(), None, None))
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=samples[:4]).logits.double(), -1)
        q = torch.log_softmax(twin(input_ids=samples[:4]).logits.double(), -1)
    direct = float((p.exp() * (p - q)).sum()) / samples[:4].numel()
    assert kls[0] == pytest.approx(direct, rel=1e-3) and kls[0] > 0


def test_measured_choice_is_the_least_measured_kl_and_is_recorded(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / "cache"))
    calib = sizewise.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    alloc = B.plan_for_budget(load(tiny_dirs["llama"]), "3.5bpw", calib=calib, quantizers=("rtn", "gptq"),
                              measure_samples=4, progress=False)
    rows = alloc.measured
    assert len(rows) >= 2 and sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["measured_kl"] == min(r["measured_kl"] for r in rows) and chosen["how"] == alloc.note
    assert alloc.bits_per_weight <= 3.5
    assert alloc.summary()["measured_plans"] == rows
    # a second call reads the profile from the cache and recomputes the statistics GPTQ needs
    again = B.plan_for_budget(load(tiny_dirs["llama"]), "3.5bpw", calib=calib, quantizers=("rtn", "gptq"),
                              measure_samples=4, progress=False)
    assert [r["measured_kl"] for r in again.measured] == pytest.approx([r["measured_kl"] for r in rows], rel=1e-5)


def test_statistics_pass_leaves_the_model_exactly_as_it_was(llama):
    from sizewise import engine
    model, arch, *_ = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        stats, _ = engine.statistics(model, arch, samples, progress=False, compute_dtype=dtype)
        assert set(stats) == {r.name for r in arch.all_linears()} and all(s.count == 64 for s in stats.values())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_engine_from_saved_statistics_equals_solving_each_layer_from_them(llama):
    from sizewise import engine
    from sizewise.quant import methods
    from sizewise.quant.uniform import QuantFormat
    import copy
    model, arch, *_ = llama
    twin = copy.deepcopy(model)
    tarch = discover(twin)
    samples = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    stats, _ = engine.statistics(model, arch, samples, progress=False)
    fmt = QuantFormat(3, 16, symmetric=False, scale_dtype="float16", zero="int")
    expect = {r.name: methods.solve("gptq", r.weight(), stats[r.name], fmt).dequantize() for r in arch.all_linears()}
    engine.run(twin, tarch, lambda ref, w, s: methods.solve("gptq", w, s, fmt).dequantize(), samples,
               stats=stats, progress=False)
    assert all(torch.equal(r.weight(), expect[r.name]) for r in tarch.all_linears())


def test_measure_memo_reuses_weights_reference_and_plans(llama, profiled, monkeypatch):
    model, arch, _, sizes = llama
    prof, samples = profiled
    variants = A.plan_variants(prof, sizes, "3.5bpw")[:2]
    plain = A.measure_plans(model, arch, variants, samples[:4], progress=False)
    solved, forwards = [], []
    # what measure_plans calls: the reference's forward passes (_log_probs), each plan's (_kl_to)
    real_all, real_logp, real_kl = choice._solved_all, choice._log_probs, choice._kl_to
    monkeypatch.setattr(choice, "_solved_all", lambda *a, **k: solved.append(1) or real_all(*a, **k))
    monkeypatch.setattr(choice, "_log_probs", lambda *a, **k: forwards.append(1) or real_logp(*a, **k))
    monkeypatch.setattr(choice, "_kl_to", lambda *a, **k: forwards.append(1) or real_kl(*a, **k))
    memo = A.SolvedCache()
    first = A.measure_plans(model, arch, variants, samples[:4], progress=False, cache=memo)
    n_solved, n_fwd = len(solved), len(forwards)
    assert first == pytest.approx(plain, rel=1e-6) and n_fwd == 1 + len(variants) and n_solved > 0
    again = A.measure_plans(model, arch, variants[::-1], samples[:4], progress=False, cache=memo)
    assert again == first[::-1] and len(solved) == n_solved and len(forwards) == n_fwd     # nothing recomputed
