"""`sizewise compress --format gguf`: one step from a model to a llama.cpp file, uniform or budgeted."""

import gguf
import numpy as np
import pytest
import torch

from sizewise import artifact
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
    assert linear <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"} and len(linear) >= 2      # mixed types
    # dequantized back with gguf, the linears hold at most 5.25 bits per weight on average
    r = gguf.GGUFReader(out)
    bits = sum(t.n_bytes * 8 for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    params = sum(int(np.prod(t.shape)) for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    assert bits / params <= 5.25
