"""Pruning and low-rank factors end to end on a tiny model: the CLI, exact bits in the manifest, bit-exact
round trips through the artifact, lossless packing and GGUF (dense pruned weights; the LoRA adapter)."""

import json

import gguf
import numpy as np
import pytest
import torch

from sizewise import artifact
from sizewise.cli import main
from sizewise.export.gguf import rope_row_order
from sizewise.lossless import load_packed_stored, pack_artifact

CALIB = ("--calib-samples", 4, "--calib-len", 48, "--quiet")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _compress(capsys, tiny_dirs, out, *args):
    code, stdout, err = run(capsys, "compress", tiny_dirs["llama"], "--calib", tiny_dirs["text"], *CALIB, *args,
                            "-o", out)
    assert code == 0, err
    return stdout


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("args, bits", [
    (("--method", "sparsegpt", "--sparsity", "2:4"), 16 / 2 + 3 / 4),
    (("--method", "sparsegpt+gptq", "--sparsity", "4:8", "--bits", 4, "--group-size", 32), 4 / 2 + 7 / 8 + 20 / 32),
    (("--method", "wanda", "--sparsity", "50%"), 16 / 2 + 1),
    (("--method", "magnitude", "--sparsity", "2:4", "--float-dtype", "bfloat16"), 16 / 2 + 3 / 4),
    (("--method", "gptq", "--bits", 3, "--group-size", 32, "--lowrank", 4), None),
    (("--method", "svd", "--lowrank", 8), None),
])
def test_compress_stores_exact_bits_and_round_trips(tiny_dirs, tmp_path, capsys, args, bits):
    out = tmp_path / "a"
    _compress(capsys, tiny_dirs, out, *args)
    m = artifact.read_manifest(out)
    linear = {n: e for n, e in m["tensors"].items() if e["linear"]}
    if bits is not None:
        assert m["totals"]["bits_per_weight"] == pytest.approx(bits)
    else:       # rank R adds R·(in + out) float16 values to each weight
        rank = int(args[-1])
        base = 3 + (16 + 3) / 32 if "gptq" in args else 0    # 3-bit codes, float16 scale, 3-bit zero
        for e in linear.values():
            o, i = e["shape"]
            assert e["stored_bits"] == pytest.approx(o * i * base + rank * (o + i) * 16)
    # packed tensors → the dense copy, exactly; through lossless packing, the same stored tensors
    stored, _ = artifact.load_stored(out)
    dense = artifact.dense_state(stored, m)
    model = artifact.load(out)[0].state_dict()
    for n in linear:
        assert torch.equal(dense[n], model[n])
    pack_artifact(out, tmp_path / "packed")
    packed, _ = load_packed_stored(tmp_path / "packed")
    for n in stored:
        assert _same(stored[n], packed[n]), n
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and linear and next(iter(linear)) in stdout


def test_sparse_gguf_holds_the_pruned_weights_exactly(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "s"
    _compress(capsys, tiny_dirs, out, "--method", "sparsegpt+gptq", "--sparsity", "2:4", "--bits", 4,
              "--group-size", 32, "--sym")
    code, _, err = run(capsys, "export", out, "-o", tmp_path / "s.gguf")
    assert code == 0, err
    stored, m = artifact.load_stored(out)
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    t = {x.name: x for x in reader.tensors}["blk.0.ffn_up.weight"]
    assert gguf.GGMLQuantizationType(t.tensor_type).name == "Q4_0"
    deq = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(128, 64)
    want = stored["model.layers.0.mlp.up_proj.weight"].dequantize()
    assert torch.equal(deq, want) and (deq == 0).float().mean() >= 0.5
    # an asymmetric kept grid has no exact zero: refused in one line
    _compress(capsys, tiny_dirs, tmp_path / "asym", "--method", "sparsegpt+gptq", "--sparsity", "2:4", "--bits", 4,
              "--group-size", 32)
    code, _, err = run(capsys, "export", tmp_path / "asym", "-o", tmp_path / "asym.gguf")
    assert code == 2 and err.startswith("error:") and "sparse" in err and not (tmp_path / "asym.gguf").exists()


def test_lowrank_gguf_writes_a_lora_adapter(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "q4r4.gguf"
    stdout = _compress(capsys, tiny_dirs, out, "--method", "gptq", "--bits", 4, "--group-size", 32, "--sym",
                       "--lowrank", 4, "--format", "gguf")
    adapter = tmp_path / "q4r4.lora.gguf"
    assert "--lora" in stdout and adapter.is_file()
    r = gguf.GGUFReader(adapter)

    def field(key):
        f = r.get_field(key)
        return f.contents()

    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == 4.0 and field("general.architecture") == "llama"
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 14
    # the same factors as an artifact stores them (the GGUF run's recipe rebuilds it exactly)
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--calib", tiny_dirs["text"], *CALIB, "--method", "gptq",
                       "--bits", 4, "--group-size", 32, "--sym", "--lowrank", 4, "-o", tmp_path / "art")
    stored, m = artifact.load_stored(tmp_path / "art")
    heads = {"q_proj": 4, "k_proj": 2}
    for layer in range(2):
        for hf, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")]:
            st = stored[f"model.layers.{layer}.{hf}.weight"]
            a = np.array(tensors[f"blk.{layer}.{gg}.weight.lora_a"].data)
            b = np.array(tensors[f"blk.{layer}.{gg}.weight.lora_b"].data)
            assert a.dtype == np.float16 and a.shape == (4, st.shape[1]) and b.shape == (st.shape[0], 4)
            proj = hf.split(".")[1]
            want_b = st.b.numpy()
            if proj in heads:
                want_b = want_b[rope_row_order(want_b.shape[0], heads[proj])]
            assert np.array_equal(a, st.a.numpy()) and np.array_equal(b, want_b)
    # the model file holds the base weights exactly
    base = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.1.ffn_up.weight"]
    deq = torch.from_numpy(gguf.dequantize(base.data, base.tensor_type).copy()).reshape(128, 64)
    st = stored["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(deq, st.base.dequantize())
    assert torch.equal(deq + st.b.float() @ st.a.float(), st.dequantize())


def test_pruning_and_factor_flags_are_one_line_errors(tiny_dirs, tmp_path, capsys):
    llama = tiny_dirs["llama"]
    for args, msg in [(("--method", "gptq", "--sparsity", "2:4"), "--sparsity needs a pruning method"),
                      (("--method", "wanda"), "give --sparsity"),
                      (("--method", "svd"), "give --lowrank"),
                      (("--method", "sparsegpt", "--sparsity", "3:3"), "N:M sparsity"),
                      (("--method", "magnitude", "--sparsity", "2:4", "--budget", "3bpw"), "--budget"),
                      (("--method", "gptq", "--lowrank", 0), "rank must be a positive"),
                      (("--method", "svd", "--lowrank", 16, "--format", "gguf"), "factors alone")]:
        out = tmp_path / ("x.gguf" if "gguf" in args else "x")
        code, _, err = run(capsys, "compress", llama, *args, "-o", out, "--quiet")
        assert code == 2 and err.startswith("error:") and msg in err and "Traceback" not in err, (args, err)
        assert not out.exists()


def test_methods_lists_pruning_and_recipe_round_trips(tiny_dirs, tmp_path, capsys):
    code, stdout, _ = run(capsys, "methods")
    assert code == 0 and all(m in stdout for m in ("sparsegpt+gptq", "wanda", "magnitude", "svd"))
    _compress(capsys, tiny_dirs, tmp_path / "a", "--method", "wanda", "--sparsity", "2:4", "--lowrank", 2)
    recipe = json.loads((tmp_path / "a" / "manifest.json").read_text())["recipe"]
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--recipe", tmp_path / "r.json", "-o", tmp_path / "b",
                       "--quiet")
    assert code == 0, err
    a, b = artifact.load_weights(tmp_path / "a"), artifact.load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_free_lowrank_skips_calibration(tiny_dirs, tmp_path, capsys, monkeypatch):
    """RTN + factors without --calib draws no calibration samples (not even self-generated ones) and stores
    the plain truncated SVD of W − Q(W); with --calib the same factors are whitened by the inputs."""
    from transformers import AutoModelForCausalLM

    from sizewise import data
    from sizewise.quant.uniform import QuantFormat

    def refused(*_, **__):
        raise AssertionError("a data-free run drew calibration samples")

    flags = ("--method", "rtn", "--bits", 3, "--group-size", 32, "--lowrank", 4, "--quiet")
    with monkeypatch.context() as mp:
        for name in ("generate_samples", "calibration_samples", "read_text"):
            mp.setattr(data, name, refused)
        code, _, err = run(capsys, "compress", tiny_dirs["llama"], *flags, "-o", tmp_path / "free")
    assert code == 0, err
    assert artifact.read_manifest(tmp_path / "free").get("calibration") is None
    _compress(capsys, tiny_dirs, tmp_path / "calib", *flags)
    free, calib = artifact.load_stored(tmp_path / "free")[0], artifact.load_stored(tmp_path / "calib")[0]
    weights = dict(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).named_parameters())
    factored = [n for n, st in free.items() if hasattr(st, "a")]
    assert len(factored) == 14
    for name in factored:
        w, st = weights[name].detach().float(), free[name]
        q = QuantFormat(3, 32).round(w).dequantize()
        assert torch.equal(st.base.dequantize(), q)
        u, s, vh = torch.linalg.svd((w - q).double(), full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]            # the truncated SVD of the error
        low = (st.b.double() @ st.a.double())
        assert torch.allclose(low, best, atol=2e-3 * float(best.abs().max()), rtol=0), name
        whitened = calib[name].b.double() @ calib[name].a.double()
        assert not torch.allclose(whitened, best, atol=2e-2 * float(best.abs().max()), rtol=0), name
