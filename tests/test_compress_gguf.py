"""`sizewise compress --format gguf`: one step from a model to a llama.cpp file, uniform or budgeted."""

import gguf
import numpy as np
import pytest
import torch

from sizewise.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _types(path):
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors}


def test_uniform_q4_0_in_one_step_equals_compress_then_export(tiny_dirs, tmp_path, capsys):
    model = tiny_dirs["llama"]
    flags = ["--bits", 4, "--group-size", 32, "--sym", "--quiet"]
    code, out, err = run(capsys, "compress", model, *flags, "--format", "gguf", "-o", tmp_path / "m.gguf")
    assert code == 0, err
    assert "wrote" in out and "Q4_0" in out
    assert not [p for p in tmp_path.iterdir() if p.name != "m.gguf"]          # no temporary left behind
    types = _types(tmp_path / "m.gguf")
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    # the same bytes as the two-step route
    assert run(capsys, "compress", model, *flags, "-o", tmp_path / "a")[0] == 0
    assert run(capsys, "export", tmp_path / "a", "--format", "gguf", "-o", tmp_path / "two.gguf")[0] == 0
    one = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    two = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "two.gguf").tensors}
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    # and the same file: export names the model the artifact came from, not the artifact's "hf" folder
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()
    name = gguf.GGUFReader(tmp_path / "two.gguf").get_field("general.name")
    assert name.contents() == model.name


def test_formats_gguf_cannot_hold_fail_before_any_work(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--bits", 4, "--group-size", 32, "--format", "gguf",
                       "-o", tmp_path / "m.gguf", "--quiet")          # integer zero points: no ggml home
    assert code == 2 and err.count("\n") == 1 and "GGUF cannot hold" in err
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--format", "gguf", "-o", tmp_path / "dir", "--quiet")
    assert code == 2 and ".gguf" in err
    assert not list(tmp_path.iterdir())


def test_budget_to_a_mixed_type_gguf(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "b.gguf"
    code, stdout, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", "5.25bpw", "--format", "gguf", "-o", out,
                            "--calib", tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32, "--quiet")
    assert code == 0, err
    types = _types(out)
    linear = {v for k, v in types.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k}
    assert linear <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4", "F16"} and len(linear) >= 2      # mixed types
    # dequantized back with gguf, the linears hold at most 5.25 bits per weight on average
    r = gguf.GGUFReader(out)
    bits = sum(t.n_bytes * 8 for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    params = sum(int(np.prod(t.shape)) for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    assert bits / params <= 5.25


# --- byte budgets count the .gguf file ---------------------------------------------------------


def _gguf_sizes(model_dir, layout="gguf"):
    from sizewise import allocate, api
    from sizewise.api import budget
    from sizewise.arch import discover

    src = api._source(model_dir)
    cands = allocate.gguf_candidate_set(("rtn",))
    return src, allocate.size_table(src.model, discover(src.model), cands, "float16", budget.file_layout(layout, src))


def test_gguf_layout_counts_the_file_exactly(tmp_path):
    """Header (metadata, tokenizer, tensor infos) + every tensor's blocks, padding included: to the byte,
    here with k-quants, quantized token tables and an untied head (an output tensor of its own)."""
    import transformers as tf
    from tiny import tiny_tokenizer

    from sizewise import api
    from sizewise.plan import Choice, Plan

    config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    src, sizes = _gguf_sizes(tmp_path / "m")
    assert sizes.layout.kind == "gguf" and len(sizes.tables) == 2
    # a mixed plan: item k takes option 3k+1 (cycling), so that many types appear
    choices, expected = [], sizes.fixed_file_bytes
    for k, item in enumerate(sizes.layers + sizes.tables):
        j = (3 * k + 1) % len(item.options)
        cand = sizes.candidates[item.options[j]]
        expected += item.file_bytes[j]
        if cand.method != "float" or item in sizes.layers:
            choices.append(Choice(item.name, cand.method, cand.format))
    api.compress(src.info["spec"], api.CompressConfig(plan=Plan(choices)), tmp_path / "art", progress=False)
    api.budget.write_gguf(sizes.layout, tmp_path / "art", tmp_path / "m.gguf")
    types = _types(tmp_path / "m.gguf")
    assert "output.weight" in types and any(t.endswith("_K") for t in types.values()), types
    assert len(set(types.values())) >= 5, types
    assert (tmp_path / "m.gguf").stat().st_size == expected


@pytest.mark.parametrize("where", [0.35, 0.7])
def test_gguf_byte_budget_bounds_the_file(tiny_dirs, tmp_path, where):
    from sizewise import api

    _, sizes = _gguf_sizes(tiny_dirs["llama"])
    lo, hi = sizes.reachable_bytes()
    budget = int(lo + where * (hi - lo))
    calib = api.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
    res, alloc = api.compress_to_budget(tiny_dirs["llama"], f"{budget}B", api.CompressConfig(calib=calib),
                                        tmp_path / "art", layout="gguf", gguf=tmp_path / "m.gguf",
                                        measure_samples=0, progress=False)     # candidates: gguf_candidate_set
    size = (tmp_path / "m.gguf").stat().st_size
    assert res.exported["bytes"] == size == alloc.file_bytes          # the accounting is exact
    assert size <= budget and budget - size <= 0.02 * (hi - lo)       # within budget, and close to it
    assert len(gguf.GGUFReader(tmp_path / "m.gguf").tensors) == 20
    assert alloc.summary()["file_layout"]["kind"] == "gguf"


def test_gguf_size_mismatch_is_an_internal_error(tiny_dirs, tmp_path, monkeypatch):
    from sizewise import api
    from sizewise.errors import SizewiseError
    from sizewise.export.gguf_layout import GGUFLayout

    real = GGUFLayout.measure
    monkeypatch.setattr(GGUFLayout, "measure",
                        lambda self, *a: (lambda fixed, per: (fixed - 64, per))(*real(self, *a)))   # undercount
    with pytest.raises(SizewiseError, match="internal error: the GGUF file"):
        calib = api.CalibConfig(text=str(tiny_dirs["text"]), samples=8, length=32)
        api.compress_to_budget(tiny_dirs["llama"], "8bpw", api.CompressConfig(calib=calib), tmp_path / "art",
                               layout="gguf", gguf=tmp_path / "m.gguf", measure_samples=0, progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_budget_below_reach_fails_before_any_work(tiny_dirs, tmp_path, capsys, monkeypatch):
    from sizewise.api import budget

    profiles = []
    monkeypatch.setattr(budget, "cached_profile", lambda *a, **k: profiles.append(1))
    _, sizes = _gguf_sizes(tiny_dirs["llama"])
    lo, hi = sizes.reachable_bytes()
    assert _gguf_sizes(tiny_dirs["llama"], "artifact")[1].reachable_bytes()[0] != lo    # not the artifact's
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", f"{lo - 1}B", "--format", "gguf",
                       "-o", tmp_path / "m.gguf", "--quiet")
    assert code == 2 and err.count("\n") == 1 and not profiles, err
    assert "below the smallest reachable GGUF file size" in err
    assert f"({lo:,} to {hi:,} bytes)" in err                        # the range in GGUF file bytes
    assert not list(tmp_path.iterdir())


def test_plan_for_gguf_then_compress_with_it(tiny_dirs, tmp_path, capsys):
    """`plan --format gguf` chooses among llama.cpp's types only; the plan applies to a GGUF that fits."""
    model, plan = tiny_dirs["llama"], tmp_path / "plan.json"
    calib = ["--calib", tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32, "--quiet"]
    code, _, err = run(capsys, "plan", model, "--budget", "5.25bpw", "--format", "gguf", "-o", plan, *calib)
    assert code == 0, err
    import json
    from sizewise.allocate import GGML_FORMATS
    from sizewise.quant.registry import format_from_dict
    chosen = [c for c in json.loads(plan.read_text())["choices"] if c["method"] != "float"]
    assert chosen and all(format_from_dict(c["format"]) in GGML_FORMATS.values() for c in chosen)
    code, _, err = run(capsys, "compress", model, "--plan", plan, "--format", "gguf", "-o", tmp_path / "p.gguf", "--quiet")
    assert code == 0, err
    linear = {v for k, v in _types(tmp_path / "p.gguf").items() if k.startswith("blk.") and "norm" not in k}
    assert linear <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4", "F16"} and len(linear) >= 2
