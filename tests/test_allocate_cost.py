"""What keeps a budget run cheap: measured KLs reduced a forward batch at a time (bounded memory), and
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
    monkeypatch.setattr(P, "LOGIT_BYTES", logit_bytes)      # 1 byte: one sample per forward pass
    rows = P._logit_batch(model, samples, 8)
    assert rows == (8 if logit_bytes > 1 else 1)
    reference = P._log_probs(model, samples, 8)
    assert len(reference) == -(-len(samples) // rows)
    ref = arch.linears[0][0]
    w = ref.weight()
    try:
        ref.set_weight(w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        kl = P._kl_to(model, reference, samples, 8)
        held = _full_kl(reference, P._log_probs(model, samples, 8), samples.numel())
    finally:
        ref.set_weight(w)
    assert kl > 1e-5 and kl == pytest.approx(held, rel=1e-9)
    assert P._kl_to(model, reference, samples, 8) == pytest.approx(0.0, abs=1e-12)   # the model itself


def test_logit_batch_bounds_the_logits_held():
    model = tiny_model("llama")
    vocab = model.get_output_embeddings().weight.shape[0]
    for length in (16, 512, 4096):
        samples = torch.zeros(8, length, dtype=torch.long)
        rows = P._logit_batch(model, samples, 8)
        assert 1 <= rows <= 8 and (rows == 1 or rows * length * vocab * 4 <= P.LOGIT_BYTES)


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
    assert measured.total - base.total == measured.parts["measured plans"]
