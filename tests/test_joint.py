"""One allocator over quantization, pruning and low-rank factors: the joint candidates' exact sizes,
their plans through the artifact, the allocator picking them where they clearly win, and no change
when only quantizers are named."""

import json

import pytest
import torch

import sizewise
from sizewise import allocate as A
from sizewise.allocate import candidates
from sizewise.arch import discover
from sizewise.cli import main
from sizewise.errors import SizewiseError
from sizewise.plan import Choice, Plan
from sizewise.quant.formats import FloatFormat
from sizewise.sources import load
from tiny import tiny_model

# rtn-based (data-free grids) keeps profiling fast; svd rank 2 fits the constructed low-rank layer
AXES = A.JointAxes(svd_ranks=(2, 32))
JOINT = ("rtn", "magnitude", "lowrank", "svd")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantizers_alone_are_todays_candidate_set():
    for q in (("rtn",), ("gptq",)):
        assert A.budget_candidates(q) == A.candidate_set(q)
    # beside RTN, GPTQ is not solved at 8 bits or in groups of 32: RTN's grid is the candidate there
    both = A.budget_candidates(("rtn", "gptq"))
    assert set(both) < set(A.candidate_set(("rtn", "gptq")))
    gptq = {c.format for c in both if c.method == "gptq"}
    assert {(f.bits, f.group_size) for f in gptq} == {(b, g) for b in (2, 3, 4, 5, 6) for g in (64, 128, None)}
    assert {c.format for c in both if c.method == "rtn"} == {c.format for c in A.candidate_set(("rtn",))
                                                             if c.method == "rtn"}
    profiled = {c for c, p in zip(both, candidates.profiled(both)) if p and c.method == "rtn"}
    assert {(c.format.bits, c.format.group_size) for c in profiled} == \
        {(8, g) for g in (32, 64, 128, None)} | {(b, 32) for b in (2, 3, 4, 5, 6)}
    joint = A.budget_candidates(("gptq", "sparsegpt", "lowrank"))
    assert joint[:len(A.candidate_set(("gptq",)))] == A.candidate_set(("gptq",))
    kinds = {c.format.compression for c in joint}
    assert kinds == {"quant", "float", "sparse", "low-rank", "sparse+low-rank"}
    # SparseGPT's candidates round the kept weights with GPTQ in the same pass
    assert {c.method for c in joint if c.format.compression == "sparse"} == {"sparsegpt+gptq"}
    with pytest.raises(SizewiseError, match="lowrank corrects a quantizer"):
        A.budget_candidates(("lowrank",))
    with pytest.raises(SizewiseError, match="llama.cpp's types"):
        A.gguf_candidate_set(("rtn", "magnitude"))


def test_joint_sizes_are_the_composed_formats_stored_bits():
    model = tiny_model("llama")
    arch = discover(model)
    cands = A.budget_candidates(JOINT, axes=AXES)
    sizes = A.size_table(model, arch, cands)
    seen = set()
    for layer in sizes.layers:
        out, inp = layer.shape
        for i, bits in zip(layer.options, layer.bits):
            fmt = cands[i].format
            assert bits == fmt.stored_bits(out, inp)
            seen.add(fmt.compression)
            # by hand, from the patterns' and factors' definitions
            if fmt.compression == "sparse":
                assert bits == _sparse_bits(fmt, out, inp)
            elif fmt.compression == "low-rank":
                base = 0 if fmt.base is None else fmt.base.stored_bits(out, inp)
                assert bits == base + fmt.rank * (out + inp) * 16
            elif fmt.compression == "sparse+low-rank":
                assert bits == _sparse_bits(fmt.base, out, inp) + fmt.rank * (out + inp) * 16
    assert seen == {"quant", "float", "sparse", "low-rank", "sparse+low-rank"}


def _sparse_bits(fmt, out, inp):
    """2:4: 3 index bits per group of 4; 50%: a 1-bit mask; half of each row kept on a grid with
    float16 scales and integer zeros per group of the original columns."""
    g, b = fmt.inner.group_size, fmt.inner.bits
    mask = out * inp // 4 * 3 if fmt.pattern == "2:4" else out * inp
    return mask + out * (inp // 2) * b + out * (inp // g) * (16 + b)


@pytest.fixture(scope="module")
def constructed():
    """A tiny model whose layer-0 q_proj is exactly rank 2 and whose layer-1 gate_proj is exactly 2:4 sparse."""
    model = tiny_model("llama")
    arch = discover(model)
    refs = {r.weight_name: r for r in arch.all_linears()}
    g = torch.Generator().manual_seed(3)
    q = refs["model.layers.0.self_attn.q_proj.weight"]
    q.set_weight(0.05 * torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g))
    gate = refs["model.layers.1.mlp.gate_proj.weight"]
    w = gate.weight().clone()
    order = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=g).argsort(-1)
    w.view(w.shape[0], -1, 4).scatter_(-1, order[..., :2], 0.0)     # two of every four are zero
    gate.set_weight(w)
    samples = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    cands = A.budget_candidates(JOINT, axes=AXES)
    sizes = A.size_table(model, arch, cands)
    return model, arch, samples, cands, sizes, A.profile_model(model, arch, samples, cands, progress=False)


def test_allocator_picks_low_rank_and_sparse_where_they_clearly_win(constructed):
    model, arch, samples, cands, sizes, prof = constructed
    low, sparse = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight"
    for budget in ("3bpw", "4bpw"):
        alloc = A.allocate(prof, sizes, budget)
        chosen = {c.name: c for c in alloc.plan.choices}
        assert chosen[low].method == "svd" and chosen[low].format.rank == 2, chosen[low]
        assert chosen[sparse].format.compression == "sparse" and chosen[sparse].format.pattern == "2:4", chosen[sparse]
        text = A.render(alloc)
        assert "kinds chosen: quant " in text and "low-rank " in text and "sparse " in text
    # the same layers under quantizers alone: no such choice, and a worse prediction at equal budget
    quant = A.allocate(prof, sizes, "3bpw", allowed=lambda c: c.format.compression in ("quant", "float"))
    assert quant.predicted_total > A.allocate(prof, sizes, "3bpw").predicted_total


def test_quant_only_allocation_is_unchanged_by_joint_candidates(constructed):
    """Quantization candidates cost and size the same beside pruning and low-rank ones: restricted to
    them, the joint profile's plan is today's plan."""
    model, arch, samples, cands, sizes, prof = constructed
    qc = A.candidate_set(("rtn",))
    qprof = A.profile_model(model, arch, samples, qc, progress=False)
    qsizes = A.size_table(model, arch, qc)
    for budget in ("2.5bpw", "3.5bpw", "5bpw"):
        today = A.allocate(qprof, qsizes, budget)
        joint = A.allocate(prof, sizes, budget, allowed=lambda c: c.format.compression in ("quant", "float"))
        assert joint.plan.choices == today.plan.choices
        assert joint.predicted_total == pytest.approx(today.predicted_total, rel=1e-12)


def test_joint_plan_applies_via_compress_plan_and_round_trips(tiny_dirs, tmp_path, capsys):
    """Every kind in one plan: `compress --plan` stores what the sizes said, and the artifact reads back
    the compressed model bit for bit."""
    src = load(tiny_dirs["llama"])
    arch = discover(src.model)
    cands = [c for c in A.budget_candidates(("rtn", "sparsegpt", "lowrank", "svd"), axes=AXES)
             if c.format.compression not in ("quant", "float")]
    refs = arch.all_linears()
    picks = [next(c for c in cands[k % len(cands):] + cands if c.fits(r.shape[1])) for k, r in enumerate(refs)]
    plan = Plan([Choice(r.weight_name, c.method, c.format) for r, c in zip(refs, picks)])
    assert {c.format.compression for c in plan.choices} == {"sparse", "low-rank", "sparse+low-rank"}
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    text = tiny_dirs["text"]
    out = tmp_path / "art"
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--plan", path, "--calib", text, "--calib-samples", 4,
                       "--calib-len", 32, "-o", out, "--quiet")
    assert code == 0, err
    res = sizewise.compress(tiny_dirs["llama"], sizewise.CompressConfig(
        plan=plan, calib=sizewise.CalibConfig(text=str(text), samples=4, length=32)), tmp_path / "api", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    bits = sum(c.format.stored_bits(*r.shape) for r, c in zip(refs, plan.choices))
    assert manifest["totals"]["linear_stored_bits"] == bits
    assert all(manifest["tensors"][c.name]["format"] == c.format.to_dict() for c in plan.choices)
    back = load(out).model
    mine = dict(res.model.named_parameters())
    for name, p in back.named_parameters():
        assert torch.equal(p, mine[name]), name
    # the size table's bound holds for the file the plan wrote
    sizes = A.size_table(src.model, arch, tuple(dict.fromkeys(picks)) + (A.Candidate("float", FloatFormat()),))
    bound = sizes.fixed_file_bytes + sum(l.file_bytes[l.options.index(sizes.candidates.index(c))]
                                         for l, c in zip(sizes.layers, picks)) + sum(sizes.table_float_bytes)
    assert manifest["totals"]["file_bytes"] <= bound


def test_sweep_with_joint_candidates_reports_the_kinds(tiny_dirs, tmp_path, capsys):
    text = tiny_dirs["text"]
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "3,4", "-o", out, "--method",
                            ",".join(JOINT), "--calib", text, "--calib-samples", 8, "--calib-len", 32, "--text", text,
                            "--ctx", 32, "--windows", 2, "--measure-samples", 2, "--quiet")
    assert code == 0, err
    res = json.loads((out / "sweep.json").read_text())
    assert res["joint"] and (out / "kinds_per_layer.png").stat().st_size > 0
    assert "kinds_per_layer.png" in (out / "report.md").read_text()
    for p in (p for p in res["points"] if p["kind"] == "allocated"):
        assert len(p["kinds"]) == len(res["linears"])
        assert f"{p['label']}: kinds chosen: " in stdout
        manifest = json.loads((out / p["dir"] / "manifest.json").read_text())
        assert manifest["totals"]["linear_stored_bits"] == p["linear_stored_bits"] <= p["budget_value"] * res["linear_params"]


def test_compress_budget_with_joint_candidates(tiny_dirs, tmp_path, capsys):
    text = tiny_dirs["text"]
    out = tmp_path / "b"
    code, stdout, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", "3.5bpw", "--method",
                            "rtn,magnitude,lowrank", "--calib", text, "--calib-samples", 8, "--calib-len", 32,
                            "--measure-samples", 0, "-o", out, "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["bits_per_weight"] <= 3.5
    assert "kinds chosen: quant " in stdout
    assert manifest["allocation"]["budget"] == "3.5bpw"
    assert manifest["totals"]["linear_stored_bits"] == manifest["allocation"]["linear_bits"]


@pytest.mark.parametrize("argv, message", [
    (["--budget", "3bpw", "--method", "lowrank"], "lowrank corrects a quantizer's grid"),
    (["--budget", "3bpw", "--method", "rtn,magnitude", "--format", "gguf"], "llama.cpp's types"),
    (["--budget", "3bpw", "--method", "rtn", "--sparsity", "2:4"], "--budget chooses sparsity and ranks"),
])
def test_joint_budget_errors_are_one_line(tiny_dirs, tmp_path, capsys, argv, message):
    out = tmp_path / ("o.gguf" if "gguf" in argv else "o")
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "-o", out, "--quiet", *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_without_calibration_text_factors_are_priced_as_compress_makes_them():
    """Without text `compress` corrects a data-free grid with the plain SVD of its error; the profile
    (on samples the model wrote) must price that weight, not the input-whitened one it would make with text."""
    from sizewise.quant import methods

    model = tiny_model("llama")
    arch = discover(model)
    samples = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    cands = tuple(c for c in A.budget_candidates(("rtn", "lowrank"), axes=AXES) if c.format.compression == "low-rank")
    ref = arch.all_linears()[0]
    w = ref.weight().float()
    for text_given in (False, True):
        prof = A.profile_model(model, arch, samples, cands, progress=False, keep_stats=True, tables=False,
                               text_given=text_given)
        stats = prof.stats[ref.name]
        got = prof.by_name[ref.weight_name].errors
        for c, err in zip(cands, got):
            made = methods.solve(c.method, w, stats if text_given else None, c.format).dequantize()
            dw = made - w
            want = float((((dw @ stats.xtx) * dw).sum(1).clamp_min(0) / stats.count).sum())
            assert err == pytest.approx(want, rel=1e-6), (text_given, c.label)
        if text_given:
            assert all(a < b for a, b in zip(got, plain))   # whitening fits the inputs: less output error
        plain = got
