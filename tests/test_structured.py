"""Structured pruning (`sizewise.prune`): a smaller dense model equal to an explicit reference
computation, least-squares refits that help, sizes that flow into HF and GGUF, one-line errors."""

import copy
import math

import gguf
import pytest
import torch
import transformers as tf

from sizewise import artifact
from sizewise.cli import main
from sizewise.prune import StructuredConfig, prune
from sizewise.prune.removal import output_error, refit, select
from sizewise.recipe import Recipe
from tiny import CONFIGS

DAMP = 0.01


def _model(family, layers=4, seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:1] * layers
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _inputs(model, samples, path):
    """The input of the module at `path` over `samples`, as [tokens, features] float64."""
    got = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    with torch.no_grad():
        model(samples, use_cache=False)
    h.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got]).double()


def _ridge_refit(w, x, keep):
    """argmin ‖X Wᵀ − X_K W'ᵀ‖² + λ‖W' − W_K‖², λ = damp · mean diag(XᵀX), by least squares on
    the stacked system (no Gram, no normal equations)."""
    w = w.double()
    lam = DAMP * (x * x).sum(0).mean()
    a = torch.cat([x[:, keep], lam.sqrt() * torch.eye(len(keep), dtype=torch.float64)])
    b = torch.cat([x @ w.t(), lam.sqrt() * w[:, keep].t()])
    return torch.linalg.lstsq(a, b).solution.t()


def _reference(original, samples, report):
    """The pruned-and-corrected model computed the slow way: a fresh model of the smaller config,
    layers copied by name, then per layer (in order) the removed units sliced out and the consumer
    refitted by least squares on inputs captured from a full forward of the model pruned so far."""
    ref = copy.deepcopy(original)
    dropped = report["layers"]["dropped"] if "layers" in report else []
    kept_layers = [i for i in range(original.config.num_hidden_layers) if i not in dropped]
    cfg = copy.deepcopy(original.config)
    cfg.num_hidden_layers = len(kept_layers)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept_layers]
    small = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            if int(i) in dropped:
                continue
            k = f"model.layers.{kept_layers.index(int(i))}.{rest}"
        state[k] = v
    small.load_state_dict(state)
    before, after = report["before"], report["after"]
    d, group = before["head_dim"], before["heads"] // before["kv_heads"]
    for rec in report.get("per_layer", []):
        layer = small.model.layers[rec["layer"]]
        x_down = _inputs(small, samples, f"model.layers.{rec['layer']}.mlp.down_proj")
        x_o = _inputs(small, samples, f"model.layers.{rec['layer']}.self_attn.o_proj")
        with torch.no_grad():
            if "mlp" in rec:
                keep = [c for c in range(before["intermediate"]) if c not in rec["mlp"]["removed"]]
                w = _ridge_refit(layer.mlp.down_proj.weight, x_down, keep)
                layer.mlp.down_proj = _linear(w, layer.mlp.down_proj.bias)
                for name in ("gate_proj", "up_proj"):
                    lin = getattr(layer.mlp, name)
                    setattr(layer.mlp, name, _linear(lin.weight[keep], None if lin.bias is None else lin.bias[keep]))
            if "heads" in rec:
                heads = [h for h in range(before["heads"]) if h not in rec["heads"]["removed"]]
                assert all(sum(h // group == g for h in rec["heads"]["removed"]) ==
                           (before["heads"] - after["heads"]) // before["kv_heads"] for g in range(before["kv_heads"]))
                cols = [h * d + j for h in heads for j in range(d)]
                attn = layer.self_attn
                attn.o_proj = _linear(_ridge_refit(attn.o_proj.weight, x_o, cols), attn.o_proj.bias)
                q = attn.q_proj
                attn.q_proj = _linear(q.weight[cols], None if q.bias is None else q.bias[cols])
                attn.num_key_value_groups = after["heads"] // after["kv_heads"]
    return small


def _linear(w, bias):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_pruned_model_equals_the_explicit_reference(family):
    original = _model(family)
    model = copy.deepcopy(original)
    samples = torch.randint(0, original.config.vocab_size, (12, 24))
    report = prune(model, samples, StructuredConfig(drop_layers=1, prune_mlp=0.5, prune_heads=2, align=32), batch=5,
                   progress=False)
    assert report["after"] == {**report["before"], "layers": 3, "intermediate": 64, "heads": 2}
    # the dropped block is the one of least angular distance, measured here from the model's own hidden states
    with torch.no_grad():
        hs = original(samples, output_hidden_states=True, use_cache=False).hidden_states
    dist = [(torch.arccos(torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).clamp(-1, 1)) / math.pi)
            .mean().item() for i in range(3)]          # hs[4] is after the final norm: compared up to layer 3's input
    assert report["layers"]["angular_distance"][:3] == pytest.approx(dist, abs=1e-5)
    assert report["layers"]["dropped"] == [min(range(4), key=report["layers"]["angular_distance"].__getitem__)]
    reference = _reference(original, samples, report)
    test = torch.randint(0, original.config.vocab_size, (3, 20))
    with torch.no_grad():
        got, want = model(test).logits, reference(test).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    c = model.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.head_dim) == (3, 64, 2, 16)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"] < report["params_before"]


def _correlated(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) * torch.linspace(0.2, 2, k)) @ mix


def test_greedy_selection_equals_the_slow_one_at_a_time_search():
    """Each step removes the unit whose removal (with the refit of the rest) costs least, counted by
    explicit least squares on the inputs (the ridge term counting removed weights too: the damped
    Gram's objective ‖X(W − W')ᵀ‖² + λ‖W − W'‖²)."""
    torch.manual_seed(0)
    x = _correlated(200, 12, 1).double()
    w = torch.randn(5, 12, dtype=torch.float64)
    gram = x.t() @ x
    units = torch.arange(12).reshape(6, 2)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])

    def cost(removed):
        keep = [c for u in range(6) if u not in removed for c in units[u].tolist()]
        wk = _ridge_refit(w, x, keep)
        full = torch.zeros_like(w)
        full[:, keep] = wk
        lam = DAMP * (x * x).sum(0).mean()
        return ((x @ (w - full).t()) ** 2).sum() + lam * ((full - w) ** 2).sum()     # the damped objective

    for grouped in (False, True):
        removed, left = [], {0: 2, 1: 2}
        for _ in range(4):
            options = [u for u in range(6) if u not in removed and (not grouped or left[int(groups[u])] > 0)]
            best = min(options, key=lambda u: cost(removed + [u]))
            removed.append(best)
            left[int(groups[best])] -= 1
        got = select(w.float(), gram.float(), units, 4, damp=DAMP, steps=4,
                     **({"groups": groups, "per_group": 2} if grouped else {}))
        assert got == sorted(removed)


def test_refit_beats_plain_removal_on_held_out_inputs():
    x, held = _correlated(2000, 64, 2), _correlated(2000, 64, 2)[1000:]
    x = x[:1000]
    w = torch.randn(32, 64)
    removed = select(w, x.t() @ x, torch.arange(64)[:, None], 24, damp=DAMP)
    keep = torch.tensor([c for c in range(64) if c not in removed])
    plain = output_error(w, held.t() @ held, w[:, keep], keep)
    fitted = output_error(w, held.t() @ held, refit(w, x.t() @ x, keep, DAMP), keep)
    assert fitted < 0.5 * plain
    # and the greedy choice beats removing the same number of channels by weight norm alone
    by_norm = torch.argsort(w.norm(dim=0))[24:].sort().values
    naive = output_error(w, held.t() @ held, refit(w, x.t() @ x, by_norm, DAMP), by_norm)
    assert fitted < naive


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_artifact_reloads_in_transformers_and_gguf_holds_the_smaller_model(tiny_dirs, tmp_path, capsys):
    model, text = tiny_dirs["llama"], tiny_dirs["text"]
    flags = ("--drop-layers", 1, "--prune-mlp", "50%", "--prune-heads", 2, "--calib", text, "--calib-samples", 8,
             "--calib-len", 32, "--quiet")
    code, out, err = _run(capsys, "compress", model, *flags, "-o", tmp_path / "slim")
    assert code == 0, err
    assert "layers 2 -> 1, MLP channels 128 -> 64, query heads 4 -> 2" in out
    code, _, err = _run(capsys, "export", tmp_path / "slim", "--format", "hf", "--dtype", "float32", "-o", tmp_path / "dense")
    assert code == 0, err
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    c = hf.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (1, 64, 2, 2)
    packed, _, manifest = artifact.load(tmp_path / "slim")
    x = torch.randint(0, c.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, packed(x).logits)
    assert manifest["transforms"]["structured"]["after"]["intermediate"] == 64
    assert all(r["linear"] is False or r["method"] == "float" for r in manifest["tensors"].values())

    code, _, err = _run(capsys, "compress", model, *flags, "--format", "gguf", "-o", tmp_path / "slim.gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(tmp_path / "slim.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    assert (meta["llama.block_count"], meta["llama.feed_forward_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"]) == (1, 64, 2, 2)
    assert meta["llama.attention.key_length"] == 16      # head_dim no longer hidden / heads
    shapes = {t.name: tuple(int(s) for s in t.shape) for t in reader.tensors}
    assert not any(n.startswith("blk.1.") for n in shapes)
    assert shapes["blk.0.ffn_down.weight"] == (64, 64) and shapes["blk.0.ffn_up.weight"] == (64, 64)
    assert shapes["blk.0.attn_q.weight"] == (64, 32) and shapes["blk.0.attn_output.weight"] == (32, 64)


def test_pruned_then_quantized(tiny_dirs, tmp_path, capsys):
    code, out, err = _run(capsys, "compress", tiny_dirs["llama"], "--prune-mlp", "50%", "--method", "gptq", "--bits", 4,
                          "--group-size", 32, "--calib", tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32,
                          "-o", tmp_path / "q", "--quiet")
    assert code == 0, err
    m = artifact.read_manifest(tmp_path / "q")
    downs = [v for k, v in m["tensors"].items() if k.endswith("down_proj.weight")]
    assert downs and all(v["method"] == "gptq" and v["shape"] == [64, 64] for v in downs)
    assert m["recipe"]["structured"]["prune_mlp"] == 0.5
    assert Recipe.from_dict(m["recipe"]).structured == StructuredConfig(prune_mlp=0.5)


@pytest.mark.parametrize("flags, message", [
    (("--drop-layers", 2), "cannot drop 2 of the model's 2 decoder layers"),
    (("--prune-mlp", "100%"), "would remove every MLP channel"),
    (("--prune-mlp", "5%"), "would keep 128"),
    (("--prune-mlp", "lots"), "expected a fraction"),
    (("--prune-heads", 1), "remove a multiple of 2"),
    (("--prune-heads", 4), "leaving at least one per group"),
    (("--prune-mlp", "50%", "--budget", "4bpw"), "does not combine with --budget"),
])
def test_impossible_requests_are_one_line_errors(tiny_dirs, tmp_path, capsys, flags, message):
    code, out, err = _run(capsys, "compress", tiny_dirs["llama"], *flags, "--calib", tiny_dirs["text"],
                          "-o", tmp_path / "x", "--quiet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_unsupported_family_is_a_one_line_error(tiny_dirs, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", tiny_dirs["gpt2"], "--drop-layers", 1, "--calib", tiny_dirs["text"],
                        "--calib-samples", 4, "--calib-len", 16, "-o", tmp_path / "x", "--quiet")
    assert code == 2 and "structured pruning supports model types llama" in err and "'gpt2'" in err
    assert not (tmp_path / "x").exists()


def test_a_slightly_indefinite_gram_is_damped_until_it_factors():
    """Grams summed in half precision can have small negative eigenvalues; damping grows until
    the Cholesky factor exists instead of failing mid-model."""
    x = _correlated(40, 64, 3)                        # rank 40 < 64: singular
    gram = x.t() @ x
    gram -= 0.02 * gram.diagonal().mean() * torch.eye(64)      # now indefinite: 1% damping is not enough
    assert torch.linalg.cholesky_ex(gram.double() + 0.01 * gram.diagonal().mean() * torch.eye(64)).info != 0
    w = torch.randn(8, 64)
    removed = select(w, gram, torch.arange(64)[:, None], 16, damp=DAMP)
    keep = torch.tensor([c for c in range(64) if c not in removed])
    assert len(removed) == 16 and torch.isfinite(refit(w, gram, keep, DAMP)).all()
