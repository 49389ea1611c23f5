import importlib.util

import pytest
import torch

import sizewise
from sizewise import artifact
from sizewise.api import CalibConfig, CompressConfig
from sizewise.arch import discover
from sizewise.engine import run
from sizewise.quant.awq import awq_transform, norm_offset, search_scale
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.uniform import rtn
from tiny import CONFIGS, tiny_model

FMT = QuantFormat(3, 32)

# What the fold table must find in each family (names relative to a decoder layer).
EXPECTED = {
    "llama": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj"},
    "qwen2": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj"},
    "mistral": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj"},
    "qwen3": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj"},
    "gemma3": {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj", "self_attn.v_proj"},
    "gemma2": {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj", "self_attn.v_proj"},
    "gemma": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj"},   # Gemma 1: Llama's places
    "phi3": {"input_layernorm", "post_attention_layernorm", "mlp.gate_up_proj", "self_attn.qkv_proj"},
    "gpt2": {"ln_1", "ln_2", "attn.c_attn"},
    "opt": {"self_attn_layer_norm", "final_layer_norm", "fc1", "self_attn.v_proj"},
}


def _salient_model(family, seed=0, channels=4, factor=8.0):
    """A tiny model whose embeddings have a few large channels, so activations have salient inputs."""
    m = tiny_model(family, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        e = m.get_input_embeddings().weight
        e[:, torch.randperm(e.shape[1], generator=g)[:channels]] *= factor
        for name, p in m.named_parameters():   # non-trivial norm gains, so folding into them is tested
            if p.dim() == 1 and name.endswith("weight") and ("norm" in name or ".ln_" in name):
                p.uniform_(0.5, 1.5, generator=g)
    x = torch.randint(0, m.config.vocab_size, (6, 24), generator=g)
    return m, discover(m), x


def _awq(arch, logs, fmt=FMT, **kw):
    return lambda i, layer, refs, stats: logs.append(
        awq_transform(i, layer, refs, stats, lambda ref: fmt, arch.model_type, **kw))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_folded_scales_leave_the_float_model_unchanged(family):
    m, arch, x = _salient_model(family)
    with torch.no_grad():
        before = m(x, use_cache=False).logits
    logs, seen = [], {}

    def identity(ref, w, stats):
        seen[ref.name] = (stats.xtx.clone(), stats.abs_sum.clone())
        return w

    # α = 0.5 forces every group to fold a non-trivial scale.
    run(m, arch, identity, x, progress=False, transform=_awq(arch, logs, alphas=(0.5,)))
    with torch.no_grad():
        after = m(x, use_cache=False).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    for log in logs:
        prefix = f"{arch.layers_path}.{log['layer']}."
        assert {g["prev"][len(prefix):] for g in log["groups"]} == EXPECTED[family]
        assert all(g["alpha"] == 0.5 for g in log["groups"])
    # The statistics the solver received were updated to the folded inputs: recollect them from the new model.
    fresh = {}
    run(m, arch, lambda ref, w, s: (fresh.setdefault(ref.name, (s.xtx, s.abs_sum)), w)[1], x, progress=False)
    for name, (xtx, a) in seen.items():
        assert torch.allclose(xtx, fresh[name][0], rtol=1e-3, atol=1e-3 * fresh[name][0].abs().max()), name
        assert torch.allclose(a, fresh[name][1], rtol=1e-3, atol=1e-4 * fresh[name][1].abs().max()), name


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_proxy_error_never_above_rtn_and_usually_below(family):
    m, arch, x = _salient_model(family)
    logs = []
    run(m, arch, lambda r, w, s: w, x, progress=False, transform=_awq(arch, logs))
    groups = [g for log in logs for g in log["groups"]]
    assert groups and all(g["error_after"] <= g["error_before"] for g in groups)
    # The norm groups (which see the salient embedding channels) improve clearly.
    norm_groups = [g for g in groups if "norm" in g["prev"] or g["prev"].endswith(("ln_1", "ln_2"))]
    assert all(g["error_after"] < 0.9 * g["error_before"] for g in norm_groups)


def test_search_proxy_equals_the_measured_output_error():
    """trace(ΔW XᵀX ΔWᵀ) is exactly ‖X ΔWᵀ‖² for the chosen scales."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g) * torch.linspace(0.1, 5, 64)
    w = torch.randn(48, 64, generator=g)
    alpha, s, before, after = search_scale([w], [FMT], x.t() @ x, x.abs().mean(0))
    q = rtn(w * s, FMT).dequantize() / s
    assert after == pytest.approx(((x @ (w - q).t()) ** 2).sum().item(), rel=1e-3)
    assert before == pytest.approx(((x @ (w - rtn(w, FMT).dequantize()).t()) ** 2).sum().item(), rel=1e-3)
    assert 0 < alpha <= 1 and after < before


def _layer_outputs(m, arch, x):
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in arch.layers]
    with torch.no_grad():
        m(x, use_cache=False)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_awq_lowers_real_quantization_error_on_salient_channels(family):
    """RTN 3-bit g32 with and without AWQ, measured on the calibration data, layer by layer."""
    errors = {}
    for use_awq in (False, True):
        m, arch, x = _salient_model(family)
        reference = _layer_outputs(m, arch, x)
        run(m, arch, lambda r, w, s: rtn(w, FMT).dequantize(), x, progress=False,
            transform=_awq(arch, []) if use_awq else None)
        got = _layer_outputs(m, arch, x)
        errors[use_awq] = sum(((a - b).pow(2).mean() / b.pow(2).mean()).item()
                              for a, b in zip(got, reference)) / len(got)
    assert errors[True] < 0.95 * errors[False], errors


def test_norm_offsets_are_detected():
    assert norm_offset(tiny_model("llama").model.norm) == 0.0
    assert norm_offset(tiny_model("gemma3").model.norm) == 1.0        # Gemma multiplies by 1 + weight
    assert norm_offset(tiny_model("opt").model.decoder.final_layer_norm) == 0.0
    assert norm_offset(torch.nn.Identity()) is None


def test_float_groups_are_skipped_and_reported():
    m, arch, x = _salient_model("llama")
    logs = []
    keep = lambda ref: None if "mlp" in ref.name else FMT          # noqa: E731
    run(m, arch, lambda r, w, s: w, x, progress=False,
        transform=lambda i, layer, refs, stats: logs.append(awq_transform(i, layer, refs, stats, keep, "llama")))
    assert all(any("gate_proj" in n for s in log["skipped"] for n in s["linears"]) for log in logs)
    assert all(s["reason"] == "not quantized" for log in logs for s in log["skipped"])


def test_gpt2_mlp_output_is_reported_as_not_foldable():
    m, arch, x = _salient_model("gpt2")
    logs = []
    run(m, arch, lambda r, w, s: w, x, progress=False, transform=_awq(arch, logs))
    skipped = [s for log in logs for s in log["skipped"]]
    assert len(skipped) == len(arch.layers)
    assert all(s["linears"][0].endswith("mlp.c_proj") and "GELU" in s["reason"] for s in skipped)


def _check_artifact(res, out):
    model, _, manifest = artifact.load(out)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, res.model(x).logits, atol=1e-4)
    logs = manifest["transforms"]["awq"]
    assert [log["layer"] for log in logs] == list(range(len(logs))) and all(log["groups"] for log in logs)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_compress_with_awq_end_to_end(method, tiny_dirs, tmp_path):
    if method.endswith("gptq") and importlib.util.find_spec("sizewise.quant.gptq") is None:
        pytest.skip("gptq.py not available yet")
    out = tmp_path / "a"
    cfg = CompressConfig(method, QuantFormat(4, 32),
                         calib=CalibConfig(text=str(tiny_dirs["text"]), samples=4, length=32))
    res = sizewise.compress(str(tiny_dirs["llama"]), cfg, out, progress=False)
    _check_artifact(res, out)
