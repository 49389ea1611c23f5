"""What keeps a budget run cheap: measured KLs reduced a head chunk at a time (bounded memory), and
candidates a dominating method replaces left unprofiled on linears."""

import pytest
import torch

import sizewise.allocate as A
from sizewise.allocate import profile as P
from sizewise.allocate.candidates import profiled
from sizewise.arch import discover
from sizewise.quant.uniform import QuantFormat

from tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    samples = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(3))
    return model, discover(model), samples


def _full_kl(reference, logp, tokens):
    """The KL as it was computed before: every batch's log-probabilities held, then reduced."""
    return sum(float((r.exp() * (r - l)).sum()) for r, l in zip(reference, logp)) / tokens


@pytest.mark.parametrize("logit_bytes", [1 << 30, 1])
def test_streamed_kl_equals_the_kl_of_held_log_probs(llama, monkeypatch, logit_bytes):
    model, arch, samples = llama
    monkeypatch.setattr(P, "LOGIT_BYTES", logit_bytes)      # 1 byte: one position per head chunk
    vocab = model.get_output_embeddings().weight.shape[0]
    reference = P._log_probs(model, samples, 2)
    assert sum(r.shape[0] * r.shape[1] for r in reference) == samples.numel()
    assert all(r.shape[1] == 1 or r.numel() * 4 <= logit_bytes for r in reference)
    assert len(reference) == (3 if logit_bytes > 1 else 3 * samples.shape[1])   # 5 samples in batches of 2
    whole = torch.log_softmax(model(input_ids=samples).logits.double(), -1)
    assert torch.allclose(torch.cat([torch.cat(reference[:len(reference) // 3], 1)]), whole[:2], atol=1e-6)
    ref = arch.linears[0][0]
    w = ref.weight()
    try:
        ref.set_weight(w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        kl = P._kl_to(model, reference, samples, 2)
        held = _full_kl(reference, P._log_probs(model, samples, 2), samples.numel())
    finally:
        ref.set_weight(w)
    assert kl > 1e-5 and kl == pytest.approx(held, rel=1e-9)
    assert P._kl_to(model, reference, samples, 2) == pytest.approx(0.0, abs=1e-12)   # the model itself


def test_each_decoder_layer_runs_once_per_batch_whatever_the_head_chunks(llama, monkeypatch):
    """What lets `measure_plans` put a plan's weights into one layer at a time: a layer's weights
    are swapped in once per forward batch, however many head chunks the vocabulary needs."""
    model, arch, samples = llama
    monkeypatch.setattr(P, "LOGIT_BYTES", 1)
    calls = []
    h = arch.layers[-1].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        chunks = P._log_probs(model, samples, 2)
    finally:
        h.remove()
    assert len(chunks) == 3 * samples.shape[1] and len(calls) == 3


def test_a_float16_reference_measures_whole_plans_as_float32_does(llama):
    model, arch, samples = llama
    ref16 = P._log_probs(model, samples, 8, torch.float32, store=torch.float16)
    ref32 = P._log_probs(model, samples, 8, torch.float32)
    assert all(r.dtype == torch.float16 for r in ref16)
    ref = arch.linears[0][0]
    w = ref.weight()
    try:
        ref.set_weight(w + 3.0 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
        a = P._kl_to(model, ref16, samples, 8, torch.float32)
        b = P._kl_to(model, ref32, samples, 8, torch.float32)
    finally:
        ref.set_weight(w)
    assert b > 1e-3 and a == pytest.approx(b, rel=1e-2)


def _grid(bits, group):
    return QuantFormat(bits, group, symmetric=False, scale_dtype="float16", zero="int")


def test_rtn_beside_gptq_on_the_same_grid_is_not_profiled_on_linears(llama):
    model, arch, samples = llama
    cands = A.candidate_set(("rtn", "gptq"), bits=(3, 8), group_sizes=(16,))
    keep = profiled(cands)
    assert keep == [c.method != "rtn" for c in cands]
    assert all(profiled(A.candidate_set(("rtn",), bits=(3, 8), group_sizes=(16,))))      # alone: profiled
    # only where GPTQ offers the same format: RTN at 4 bits stays
    mixed = (A.Candidate("rtn", _grid(4, 16)), A.Candidate("gptq", _grid(3, 16)))
    assert profiled(mixed) == [True, True]

    prof = A.profile_model(model, arch, samples, cands, progress=False, tables=False)
    for lp in prof.layers:
        assert [c is not None for c in lp.costs] == keep
    sizes = A.size_table(model, arch, cands)
    uniform = A.uniform_allocations(prof, sizes, "10bpw")
    assert uniform and all(a.note.startswith("uniform gptq") for a in uniform)
    for budget in ("5bpw", "10bpw"):
        for a in A.plan_variants(prof, sizes, budget):
            assert not any(c.method == "rtn" for c in a.plan.choices)


def test_the_plan_measurement_is_in_the_memory_estimate():
    from sizewise.memory import peak_memory

    model = tiny_model("llama")
    kw = dict(task="plan", calibrated=True, samples=8, length=512, kept_statistics=True)
    base, measured = peak_memory(model, **kw), peak_memory(model, measure_samples=8, **kw)
    vocab = model.config.vocab_size
    assert measured.parts["measured plans"] >= 8 * 512 * vocab * 4
    linear_params = sum(r.shape[0] * r.shape[1] for r in discover(model).all_linears())
    assert measured.parts["solved plans"] >= 2 * linear_params       # codes, and the other options' codes
    assert measured.total - base.total == measured.parts["measured plans"] + measured.parts["solved plans"]


def test_option_variants_flip_what_the_plans_methods_take_and_the_user_left_unset():
    from sizewise.plan import Choice, Plan

    g4 = QuantFormat(4, 64)
    gptq = Plan([Choice("a.weight", "gptq", g4), Choice("b.weight", "rtn", g4)])
    assert A.option_variants(gptq, None) == [{"clip_search": False}]
    assert A.option_variants(gptq, {"damp": 0.1}) == [{"clip_search": False}]
    assert A.option_variants(gptq, {"clip_search": True}) == []
    assert A.option_variants(Plan([Choice("a.weight", "rtn", g4)]), None) == []
