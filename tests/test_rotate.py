import pytest
import torch

import sizewise
from sizewise import artifact
from sizewise.api import CalibConfig, CompressConfig
from sizewise.arch import discover
from sizewise.errors import SizewiseError
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.uniform import rtn
from sizewise.quant.hadamard import factors, hadamard
from sizewise.quant.rotate import rotate_model, rotation
from tiny import tiny_model

ROTATABLE = ["llama", "qwen2", "mistral", "qwen3", "phi3"]


def _model(family, seed=0):
    """Tiny model with non-trivial norm gains (so folding them matters) and some outlier channels."""
    m = tiny_model(family, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.3, 2.0, generator=g)
        m.get_input_embeddings().weight[:, :3] *= 10
    return m


def _logits(m, x):
    with torch.no_grad():
        return m(x, use_cache=False).logits


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotation_leaves_logits_unchanged(family):
    m = _model(family)
    x = torch.randint(0, m.config.vocab_size, (2, 20))
    before = _logits(m, x)
    emb = m.get_input_embeddings().weight.detach().clone()
    rec = rotate_model(m, discover(m), seed=1)
    after = _logits(m, x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    # It really rotated and folded: embeddings changed, every residual-stream norm weight is now 1
    # (Qwen3's per-head q_norm/k_norm act inside attention, on what the rotation leaves unchanged).
    assert not torch.allclose(m.get_input_embeddings().weight, emb, atol=1e-3)
    norms = [p for n, p in m.named_parameters() if "norm" in n and not n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert rec["rotation"] == "randomized-hadamard" and rec["online_transforms"] == []
    assert rec["norms_folded"] == 2 * m.config.num_hidden_layers + 1


def test_rotated_tied_model_saves_and_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _model("llama")
    assert m.config.tie_word_embeddings
    rec = rotate_model(m, discover(m))
    assert rec["untied_lm_head"] and rec["extra_parameters"] == m.config.vocab_size * m.config.hidden_size
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    m.save_pretrained(tmp_path / "r")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "r", dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings is False
    x = torch.randint(0, m.config.vocab_size, (2, 16))
    assert torch.equal(_logits(back, x), _logits(m, x))


def test_untied_model_stays_untied_without_extra_parameters():
    m = _model("qwen2")
    assert not m.config.tie_word_embeddings
    rec = rotate_model(m, discover(m))
    assert not rec["untied_lm_head"] and rec["extra_parameters"] == 0


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 48, 64, 576, 896, 960])
def test_hadamard_is_orthogonal(n):
    h = hadamard(n)
    assert h.shape == (n, n) and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_hadamard_orders_and_errors():
    assert factors(576) == (36, 16) and factors(64) == (64,) and factors(12) == (12,)
    for n in (6, 188):
        with pytest.raises(SizewiseError, match=f"no Hadamard matrix of order {n}") as e:
            hadamard(n)
        assert "\n" not in str(e.value)


def test_rotation_matrix_is_seeded_and_falls_back_to_random_orthogonal():
    q0, d0 = rotation(48, seed=0)
    q1, _ = rotation(48, seed=1)
    assert d0["kind"] == "randomized-hadamard" and torch.equal(q0, rotation(48, seed=0)[0])
    assert not torch.equal(q0, q1)
    q, d = rotation(188, seed=0)           # no Hadamard construction here for 188 = 4·47
    assert d["kind"] == "random-orthogonal" and "188" in d["why"]
    for m in (q0, q):
        assert torch.allclose(m @ m.t(), torch.eye(m.shape[0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gemma", "gpt2", "opt"])
def test_unsupported_families_get_a_one_line_error(family):
    m = tiny_model(family)
    with pytest.raises(SizewiseError, match="rotation supports: llama, qwen2, mistral") as e:
        rotate_model(m, discover(m))
    assert "\n" not in str(e.value)


def test_rotation_spreads_outlier_columns_and_lowers_rtn_error():
    g = torch.Generator().manual_seed(0)
    n = 576
    w = torch.randn(256, n, generator=g)
    w[:, torch.randperm(n, generator=g)[:6]] *= 30          # planted outlier input channels
    q = rotation(n, seed=0)[0].float()
    wq = w @ q
    ratio = lambda t: (t.abs().max() / t.pow(2).mean().sqrt()).item()   # noqa: E731
    assert ratio(wq) < 0.25 * ratio(w)
    fmt = QuantFormat(4, 64)
    # Q is orthogonal, so the Frobenius error of W·Q equals the error it causes on the original function.
    err = (w - rtn(w, fmt).dequantize()).norm()
    err_rot = (wq - rtn(wq, fmt).dequantize()).norm()
    assert err_rot < 0.7 * err


@pytest.mark.parametrize("method", ["rotate+rtn", "rotate+awq+rtn"])
def test_compress_with_rotation_end_to_end(method, tiny_dirs, tmp_path):
    out = tmp_path / "a"
    cfg = CompressConfig(method, QuantFormat(4, 32),
                         calib=CalibConfig(text=str(tiny_dirs["text"]), samples=4, length=32))
    res = sizewise.compress(str(tiny_dirs["llama"]), cfg, out, progress=False)
    rec = res.manifest["transforms"]["rotate"]
    assert rec["untied_lm_head"] and rec["online_transforms"] == []
    model, _, _ = artifact.load(out)
    x = torch.randint(0, 300, (1, 16))
    assert torch.allclose(_logits(model, x), _logits(res.model, x), atol=1e-4)
