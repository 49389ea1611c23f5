"""Token tables (the embedding and an untied head) as quantizable weights: plans, artifacts, budgets."""

import json
import sys
from pathlib import Path

import pytest
import torch

import sizewise
from sizewise import allocate as A
from sizewise import artifact
from sizewise.api import budget as B
from sizewise.arch import discover
from sizewise.errors import SizewiseError
from sizewise.plan import Choice, Plan
from sizewise.quant.uniform import QuantFormat
from sizewise.sources import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import proxy_validation as PV  # noqa: E402

FMT = QuantFormat(4, 16, symmetric=False, scale_dtype="float16", zero="int")


def _plan(arch, tables: dict[str, tuple[str, QuantFormat]]) -> Plan:
    base = Plan.uniform(arch, "rtn", FMT)
    return Plan(base.choices + [Choice(n, m, f) for n, (m, f) in tables.items()])


@pytest.mark.parametrize("family", ["llama", "qwen2"])          # tied, untied
def test_quantized_tables_are_stored_and_rebuilt_exactly(tiny_dirs, tmp_path, family):
    src = load(tiny_dirs[family])
    arch = discover(src.model)
    assert len(arch.tables) == (1 if arch.tied else 2)
    plan = _plan(arch, {n: ("rtn", QuantFormat(3, 32, symmetric=False, scale_dtype="float16", zero="int"))
                        for n in arch.tables})
    res = sizewise.compress(tiny_dirs[family], sizewise.CompressConfig(plan=plan), tmp_path / "a", progress=False)
    tensors = res.manifest["tensors"]
    for name in arch.tables:
        assert tensors[name]["format"]["bits"] == 3 and not tensors[name]["linear"]
        assert tensors[name]["stored_bits"] < tensors[name]["params"] * 4
    # the dense rebuild from packed tensors equals the model that was evaluated, head included
    weights = artifact.load_weights(tmp_path / "a")
    state = res.model.state_dict()
    for name in state:
        assert torch.equal(weights[name], state[name].float()), name
    stored, _ = artifact.load_stored(tmp_path / "a")
    emb = arch.embedding
    assert len(torch.unique(stored[emb].codes)) <= 8
    if arch.tied:     # one stored tensor serves both ends
        assert torch.equal(res.model.get_output_embeddings().weight, res.model.get_input_embeddings().weight)
    # the file really got smaller than with float tables
    plain = sizewise.compress(tiny_dirs[family], sizewise.CompressConfig(plan=Plan.uniform(arch, "rtn", FMT)),
                              tmp_path / "b", progress=False)
    assert res.manifest["totals"]["file_bytes"] < plain.manifest["totals"]["file_bytes"]
    assert res.manifest["totals"]["linear_stored_bits"] == plain.manifest["totals"]["linear_stored_bits"]


def test_plan_checks_table_choices(tiny_dirs):
    arch = discover(load(tiny_dirs["llama"]).model)
    emb = arch.embedding
    _plan(arch, {emb: ("gptq", FMT)}).check(arch)           # tied: the embedding computes the logits too
    untied = discover(load(tiny_dirs["qwen2"]).model)
    assert untied.head_table == untied.lm_head and arch.head_table == emb
    with pytest.raises(SizewiseError, match="input embedding: its method must be data-free"):
        _plan(untied, {untied.embedding: ("gptq", FMT)}).check(untied)
    _plan(untied, {untied.lm_head: ("gptq", FMT)}).check(untied)
    with pytest.raises(SizewiseError, match="neither a decoder linear nor a token table"):
        _plan(arch, {"model.norm.weight": ("rtn", FMT)}).check(arch)
    with pytest.raises(SizewiseError, match="divide"):
        _plan(arch, {emb: ("rtn", QuantFormat(4, 48, symmetric=False, scale_dtype="float16", zero="int"))}).check(arch)
    _plan(arch, {emb: ("rtn-mse", FMT)}).check(arch)


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    src = load(tiny_dirs["qwen2"])
    arch = discover(src.model)
    cands = A.candidate_set(("rtn", "gptq"))
    samples = torch.randint(0, src.model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    prof = A.profile_model(src.model, arch, samples, cands, progress=False, table_samples=4)
    return src, arch, cands, A.size_table(src.model, arch, cands), prof


def test_table_costs_are_measured_kls(qwen):
    src, arch, cands, sizes, prof = qwen
    for name in arch.tables:
        lp = prof.by_name[name]
        assert lp.kind == "table"
        for c, cost in zip(cands, lp.costs):
            if c.method == "gptq" and name != arch.head_table:
                assert cost is None                       # an input embedding is quantized without calibration
            elif c.method in ("rtn", "gptq") and c.fits(lp.shape[1]):
                assert cost is not None and cost >= 0
        by_bits = {c.format.bits: cost for c, cost in zip(cands, lp.costs)
                   if c.method == "rtn" and c.format.group_size == 32}
        assert by_bits[2] > by_bits[4] > by_bits[8]
    # token tables are never offered as single-layer pairs for the linear proxy's validation
    assert all(n not in arch.tables for n, _ in PV.proxy_pairs(prof, count=50))
    assert A.Profile.from_json(prof.to_json()).by_name[arch.embedding].kind == "table"


def test_byte_budgets_choose_table_formats_bits_budgets_do_not(qwen, tmp_path):
    src, arch, cands, sizes, prof = qwen
    assert [t.name for t in sizes.tables] == list(arch.tables)
    lo, hi = sizes.reachable_bytes()
    lin_lo = sizes.fixed_file_bytes + sum(sizes.table_float_bytes) + sum(min(l.file_bytes) for l in sizes.layers)
    assert lo < lin_lo                                      # quantized tables reach below float tables
    budget = f"{(lo + lin_lo) // 2}B"                       # only reachable by quantizing a table
    alloc = A.allocate(prof, sizes, budget)
    assert alloc.file_bytes <= (lo + lin_lo) // 2
    assert set(c.name for c in alloc.plan.choices) & set(arch.tables)
    assert "rtn" in A.render(alloc)
    # bits-per-weight budgets count the linears only: tables stay float and out of the plan
    b = A.allocate(prof, sizes, "4bpw")
    assert not set(c.name for c in b.plan.choices) & set(arch.tables)
    assert any(l.strip().startswith(arch.embedding.removesuffix(".weight")[-52:]) and "outside bits/weight" in l
               for l in A.render(b).splitlines())
    # measuring a plan sets its tables too, and restores every weight afterwards
    from sizewise import engine
    before = {k: v.clone() for k, v in src.model.state_dict().items()}
    samples = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    stats, _ = engine.statistics(src.model, arch, samples, progress=False, head=True)
    kl_small, kl_bits = A.measure_plans(src.model, arch, [alloc, b], samples, stats=stats, progress=False)
    assert kl_small > 0 and kl_bits > 0
    assert all(torch.equal(v, before[k]) for k, v in src.model.state_dict().items())


def test_byte_budget_end_to_end_writes_what_was_planned(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / "cache"))
    calib = sizewise.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    src = load(tiny_dirs["mistral"])
    arch = discover(src.model)
    sizes = A.size_table(src.model, arch, A.candidate_set())
    lo, _ = sizes.reachable_bytes()
    lin_lo = sizes.fixed_file_bytes + sum(sizes.table_float_bytes) + sum(min(l.file_bytes) for l in sizes.layers)
    budget = f"{(lo + lin_lo) // 2}B"
    res, alloc = B.compress_to_budget(tiny_dirs["mistral"], budget, tmp_path / "o", sizewise.CompressConfig(calib=calib),
                                      measure_samples=2, progress=False)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["totals"]["file_bytes"] <= alloc.file_bytes <= (lo + lin_lo) // 2
    quantized_tables = [n for n in arch.tables if m["tensors"][n]["format"]["kind"] == "quant"]
    assert quantized_tables and all(m["tensors"][n]["method"] in ("rtn",) for n in quantized_tables)
    assert m["allocation"]["measured_plans"]


def test_head_statistics_are_the_final_hidden_states(tiny_dirs):
    """The head's input, after the last norm, on the last HEAD_SAMPLES calibration samples only."""
    from sizewise import engine
    from sizewise.defaults import HEAD_SAMPLES

    for family in ("llama", "qwen2"):
        src = load(tiny_dirs[family])
        arch = discover(src.model)
        samples = torch.randint(0, 300, (HEAD_SAMPLES + 3, 16), generator=torch.Generator().manual_seed(1))
        st = engine.head_statistics(src.model, arch, samples, batch=5)
        assert list(st) == [arch.head_table]
        with torch.no_grad():
            h = src.model(input_ids=samples[3:], output_hidden_states=True).hidden_states[-1].reshape(-1, src.model.config.hidden_size)
        assert st[arch.head_table].count == h.shape[0]
        torch.testing.assert_close(st[arch.head_table].xtx, h.T @ h, rtol=1e-4, atol=1e-3)


def test_tied_embedding_solved_by_gptq_on_the_head_input(tiny_dirs, tmp_path):
    """A calibrated table choice is solved from the compressed model's final hidden states: its logit
    error on them (tr dW H dWᵀ) is below round-to-nearest's in the same format."""
    from sizewise import engine
    from sizewise.quant.methods import round_to_nearest

    src = load(tiny_dirs["llama"])
    arch = discover(src.model)
    fmt = QuantFormat(3, 32, symmetric=False, scale_dtype="float16", zero="int")
    w = src.model.get_input_embeddings().weight.detach().clone()
    cfg = sizewise.CompressConfig(plan=_plan(arch, {arch.embedding: ("gptq", fmt)}),
                                  calib=sizewise.CalibConfig(text=tiny_dirs["text"], samples=8, length=32))
    res = sizewise.compress(tiny_dirs["llama"], cfg, tmp_path / "g", progress=False)
    assert res.manifest["tensors"][arch.embedding]["method"] == "gptq"
    samples, _ = sizewise.api._calibration(load(tiny_dirs["llama"]), cfg.calib.resolved("cpu"), False)
    h = engine.head_statistics(res.model, arch, samples)[arch.head_table].xtx

    def err(q):
        d = q - w
        return float(((d @ h) * d).sum())

    assert err(res.model.get_input_embeddings().weight.detach()) < 0.9 * err(round_to_nearest(w, fmt).dequantize())
