"""Bounded memory: a model stored in bf16 is never float32 beyond one decoder layer; its artifact is
the same as the float32 model's."""

import pytest
import torch
from safetensors.torch import load_file

import sizewise
from sizewise import artifact, sources
from sizewise.api import CompressConfig
from sizewise.arch import discover
from sizewise.quant import methods
from sizewise.quant.uniform import QuantFormat
from sizewise.recipe import CalibConfig
from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer


def _save(model, path, shard="40KB"):
    model.save_pretrained(path, max_shard_size=shard)       # several shards, as HF publishes large models
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16") / "m"
    _save(tiny_model("llama", 3).to(torch.bfloat16), d)
    assert len(list(d.glob("*.safetensors"))) > 3
    return d


def _float32_elements_by_layer(model, layers) -> tuple[int, int]:
    """(decoder layers holding any float32 weight, float32 elements outside the decoder layers)."""
    in_layers = {id(p) for p in layers.parameters()}
    converted = sum(any(p.dtype == torch.float32 for p in layer.parameters()) for layer in layers)
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_layers and p.dtype == torch.float32)
    return converted, outside


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sharded_bf16_model_holds_at_most_one_layer_in_float32(bf16_dir, tmp_path, monkeypatch, method):
    src = sources.load(bf16_dir)
    model = src.model
    layers = discover(model).layers
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())       # loaded as stored
    seen = []
    solve = methods.solve

    def checked_solve(*args, **kwargs):
        seen.append(_float32_elements_by_layer(model, layers))
        return solve(*args, **kwargs)

    monkeypatch.setattr(methods, "solve", checked_solve)
    observed = []
    hooks = [m.register_forward_pre_hook(lambda *a: observed.append(_float32_elements_by_layer(model, layers)))
             for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    cfg = CompressConfig(method, QuantFormat(4, 32), calib=CalibConfig(str(text), samples=4, length=32, dtype="float32"))
    sizewise.compress(src, cfg, tmp_path / "a", progress=False)
    for h in hooks:
        h.remove()
    assert len(seen) == 7 * len(layers)
    if method == "gptq":
        assert observed                                  # calibration passes ran through the layers
    for converted, outside in seen + observed:
        assert converted <= 1
        assert outside <= model.config.hidden_size      # the final norm at most; never a token table
    assert all(p.dtype != torch.float32 for p in model.parameters())     # nothing left converted


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq", "rotate+rtn"])
def test_bf16_model_compresses_as_its_float32_copy(bf16_dir, tmp_path, method):
    """Same packed tensors and the same exact dense copy as from the float32 upcast of the same weights."""
    f32 = _save(tiny_model("llama", 3).to(torch.bfloat16).float(), tmp_path / "f32", shard="10MB")
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    cfg = CompressConfig(method, QuantFormat(4, 32), float_dtype="float32",
                         calib=CalibConfig(str(text), samples=4, length=32, dtype="float32"))
    sizewise.compress(str(bf16_dir), cfg, tmp_path / "a16", progress=False)
    sizewise.compress(str(f32), cfg, tmp_path / "a32", progress=False)
    a16, a32 = (load_file(str(tmp_path / d / artifact.PACKED)) for d in ("a16", "a32"))
    assert a16.keys() == a32.keys()
    for k in a16:
        assert torch.equal(a16[k], a32[k]), k
    dense16 = artifact.load_weights(tmp_path / "a16")
    sizewise.api.export(tmp_path / "a16", tmp_path / "dense16", format="hf", float_dtype="float32")
    hf16 = {}
    for f in (tmp_path / "dense16").glob("*.safetensors"):
        hf16.update(load_file(str(f)))
    assert hf16
    for name, t in hf16.items():
        assert t.dtype == torch.float32 and torch.equal(t, dense16[name]), name


def _qwen_like(hidden, layers, vocab=151936):
    import transformers as tf
    return tf.Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 5, num_hidden_layers=layers,
                          num_attention_heads=hidden // 128, num_key_value_heads=2, vocab_size=vocab,
                          dtype="bfloat16")


def test_peak_estimate_grows_with_the_model_and_the_run():
    from sizewise.memory import meta_model, peak_memory

    small, large = meta_model(_qwen_like(896, 24)), meta_model(_qwen_like(1536, 28))
    assert next(small.parameters()).dtype == torch.bfloat16 and next(small.parameters()).is_meta
    for task, kw in [("compress", {}), ("compress", {"calibrated": True, "samples": 16, "length": 512}),
                     ("plan", {"calibrated": True, "samples": 16, "length": 512, "kept_statistics": True}),
                     ("eval", {"ctx": 1024})]:
        assert peak_memory(small, task=task, **kw).total < peak_memory(large, task=task, **kw).total, task
    gptq = dict(task="compress", calibrated=True, length=512)
    assert peak_memory(small, samples=16, **gptq).total < peak_memory(small, samples=128, **gptq).total
    assert peak_memory(small, task="compress").total < peak_memory(small, samples=16, **gptq).total
    assert peak_memory(small, task="compress").total < peak_memory(small, task="compress", export_gguf=True).total
    assert peak_memory(small, task="eval", ctx=512).total < peak_memory(small, task="eval", ctx=2048).total
    # the vocabulary costs a bounded chunk of logits, not a window's worth
    wide = meta_model(_qwen_like(896, 24, vocab=262144))
    grow = peak_memory(wide, task="eval", ctx=1024).parts["logit chunks"]
    assert grow <= peak_memory(small, task="eval", ctx=1024).parts["logit chunks"] * 1.01
    # 1.5B shapes stored in bf16: about 3 GB of weights, a few GB at the peak
    total = peak_memory(large, task="compress", calibrated=True, samples=16, length=512).total
    assert 3e9 < total < 8e9


def test_a_run_that_cannot_fit_is_refused_in_one_line(monkeypatch, capsys):
    from sizewise.errors import SizewiseError
    from sizewise.memory import OVERRIDE_ENV, meta_model, peak_memory, require

    absurd = meta_model(_qwen_like(16384, 100))          # ~460B parameters, on the meta device
    peak = peak_memory(absurd, task="compress")
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    with pytest.raises(SizewiseError) as e:
        require(peak)
    assert "\n" not in str(e.value) and "GB" in str(e.value) and OVERRIDE_ENV in str(e.value)
    assert "peak memory ≈" in capsys.readouterr().err
    require(peak_memory(meta_model(_qwen_like(896, 2)), task="compress"))     # a small one fits
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    require(peak)                                                              # warned, not refused
    assert "warning:" in capsys.readouterr().err


def test_eval_prints_its_peak_memory(tiny_dirs, capsys, monkeypatch):
    from sizewise import memory

    monkeypatch.setattr(memory, "_said", set())      # printed once per process: an earlier test may have said it
    sizewise.evaluate(str(tiny_dirs["llama"]), str(tiny_dirs["text"]), ctx=32, windows=1, progress=False)
    assert "peak memory ≈" in capsys.readouterr().err


def test_gguf_converts_a_shard_at_a_time(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sizewise import builtins, gguf_convert
    from test_builtins import write_tiny_llama_gguf

    original = write_tiny_llama_gguf(tmp_path / "t.gguf")
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", 20_000)
    written = []
    import safetensors.torch as st          # convert() imports save_file when it runs: patched here
    real = st.save_file
    monkeypatch.setattr(st, "save_file", lambda tensors, *a, **k: (written.append(tensors), real(tensors, *a, **k)))
    builtins.gguf_to_hf(tmp_path / "t.gguf", tmp_path / "hf")
    assert len(written) > 2
    for shard in written:       # never more than a shard (or one tensor larger than a shard) at once
        assert len(shard) == 1 or sum(t.numel() * 4 for t in shard.values()) <= 20_000
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    want, got = original.state_dict(), converted.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
