import pytest
import torch

from sizewise.arch import discover
from sizewise.engine import LinearStats, run
from sizewise.errors import SizewiseError
from tiny import CONFIGS, assert_engine_walk_equals_forward, tiny_model


@pytest.mark.parametrize("family", list(CONFIGS))
def test_discovery_finds_every_decoder_linear(family):
    model = tiny_model(family)
    arch = discover(model)
    assert len(arch.layers) == model.config.num_hidden_layers
    names = {n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    found = {r.name for r in arch.all_linears()}
    # Every linear inside the decoder stack is found; only the head (and OPT-like projections) lie outside.
    assert found and found == {n for n in names if n.startswith(arch.layers_path + ".")}
    for ref in arch.all_linears():
        w = ref.weight()
        assert w.shape == ref.shape
        ref.set_weight(w * 2)
        assert torch.equal(ref.weight(), w * 2)
    assert arch.embedding is not None


def test_unknown_architecture_gets_a_clear_error():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3, "model_type": "weird"})()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))

    with pytest.raises(SizewiseError, match="unsupported architecture Weird: found no stack of 3"):
        discover(Weird())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_engine_walk_equals_plain_forward(family):
    """Layer-by-layer propagation reproduces the model's own forward pass exactly."""
    model = tiny_model(family)
    arch = discover(model)
    x = torch.randint(0, model.config.vocab_size, (5, 12))
    assert_engine_walk_equals_forward(model, arch, x)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_identity_method_leaves_model_unchanged_and_sees_every_token(family, tmp_path):
    model = tiny_model(family)
    arch = discover(model)
    x = torch.randint(0, model.config.vocab_size, (6, 10))
    with torch.no_grad():
        before = model(x, use_cache=False).logits
    counts = {}

    def identity(ref, w, stats):
        counts[ref.name] = stats.count
        # Statistics are consistent: diag(XᵀX) is the per-channel sum of squares.
        assert stats.xtx.shape == (ref.shape[1], ref.shape[1])
        assert torch.allclose(stats.xtx, stats.xtx.t())
        return w

    run(model, arch, identity, x, batch=4, offload=tmp_path, progress=False)
    with torch.no_grad():
        after = model(x, use_cache=False).logits
    assert torch.equal(before, after)
    assert set(counts) == {r.name for r in arch.all_linears()} and set(counts.values()) == {60}


def test_statistics_match_a_direct_computation():
    model = tiny_model("llama")
    arch = discover(model)
    x = torch.randint(0, model.config.vocab_size, (3, 8))
    target = arch.linears[0][0]            # q_proj of layer 0 sees the normed embeddings
    inputs = []
    h = target.module.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(x, use_cache=False)
    h.remove()
    X = torch.cat(inputs)
    got = {}
    run(model, arch, lambda ref, w, s: (got.setdefault(ref.name, s), w)[1], x, batch=3, progress=False)
    assert torch.allclose(got[target.name].xtx, X.t() @ X, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got[target.name].abs_sum, X.abs().sum(0), rtol=1e-5)


def test_compression_errors_propagate_to_next_layer():
    """Layer 1 must see the inputs produced by the *compressed* layer 0."""
    model = tiny_model("llama")
    arch = discover(model)
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    first_xtx = {}

    def zero_layer0(ref, w, stats):
        first_xtx.setdefault(ref.name, stats.xtx.clone())
        return torch.zeros_like(w) if ".0." in ref.name else w

    run(model, arch, zero_layer0, x, progress=False)
    # With layer 0's linears zeroed, layer 0 is the identity on the residual stream, so layer 1's
    # q_proj input equals layer 0's q_proj input.
    q0, q1 = arch.linears[0][0].name, arch.linears[1][0].name
    assert torch.allclose(first_xtx[q0], first_xtx[q1], rtol=1e-4, atol=1e-5)


def test_linears_reading_one_input_share_statistics():
    model = tiny_model("llama")
    arch = discover(model)
    got = {}
    run(model, arch, lambda ref, w, s: (got.setdefault(ref.name.split(".", 3)[-1], s), w)[1],
        torch.randint(0, model.config.vocab_size, (4, 8)), batch=2, progress=False)
    assert got["self_attn.q_proj"] is got["self_attn.k_proj"] is got["self_attn.v_proj"]
    assert got["mlp.gate_proj"] is got["mlp.up_proj"]
    assert got["self_attn.o_proj"] is not got["self_attn.q_proj"] and got["mlp.down_proj"] is not got["mlp.up_proj"]
    assert got["self_attn.q_proj"].count == 32


def test_bfloat16_calibration_passes_leave_float_weights_untouched():
    model = tiny_model("llama")
    arch = discover(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    run(model, arch, lambda ref, w, s: (seen.setdefault(ref.weight_name, w), w)[1],
        torch.randint(0, model.config.vocab_size, (2, 8)), progress=False, compute_dtype=torch.bfloat16)
    for name, w in seen.items():
        assert torch.equal(w, before[name])           # the solver saw the float32 weights
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])


def test_half_precision_statistics_match_the_exact_gram():
    # activations with a large common mean, as in LLM residual streams: the case where rounding the
    # bf16 product's output would be relative to the mean rather than to the spread
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 512, 96, generator=g) * 0.5 + torch.linspace(-4, 8, 96)).bfloat16()
    exact = x.reshape(-1, 96).double().t() @ x.reshape(-1, 96).double()
    stats = LinearStats.empty(96, "cpu")
    stats.add(x)
    assert stats.xtx.dtype == torch.float32 and stats.count == 2048
    err = (stats.xtx.double() - exact).norm() / exact.norm()
    naive = ((x.reshape(-1, 96).t() @ x.reshape(-1, 96)).double() - exact).norm() / exact.norm()
    assert err < 1e-4 and err < naive / 4, (float(err), float(naive))
    assert torch.allclose(stats.abs_sum.double(), x.reshape(-1, 96).double().abs().sum(0), rtol=1e-5)
