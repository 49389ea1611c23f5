"""Outputs written as they are computed: each decoder layer's solved weights go to the file when the
layer is finished and are let go. The files are the very bytes of the all-at-the-end writers."""

import random
import weakref

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

import sizewise
from sizewise import artifact
from sizewise.api import compression
from sizewise.api.exporting import export
from sizewise.cli import main
from sizewise.export import gguf as gguf_export
from sizewise.quant import methods
from sizewise.streamed_safetensors import ST_DTYPES, StreamedFile
from test_resume import LAYERS, model_dir  # noqa: F401 (a 4-layer tiny llama, the fixture)

LINEARS = 7          # a llama layer: q, k, v, o, gate, up, down


def _args(root, out, *extra):
    return ["compress", str(root / "llama"), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--sym", "--calib", str(root / "text.txt"), "--calib-samples", "4", "--calib-len", "32",
            "--calib-dtype", "float32", "--skip", "*.0.mlp.down_proj", "--quiet", *extra]


def test_streamed_safetensors_equals_save_file_in_any_write_order(tmp_path):
    rng = random.Random(0)
    tensors = {}
    for i in range(60):
        dtype = rng.choice(list(ST_DTYPES))
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
        tensors[f"model.w{rng.randint(0, 30)}:{i}"] = (torch.randn(shape) * 9).to(dtype)
    save_file(tensors, str(tmp_path / "a"), metadata={"format": "x"})
    f = StreamedFile(tmp_path / "b", {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, {"format": "x"})
    names = list(tensors)
    rng.shuffle(names)
    for k in names:
        f.write(k, tensors[k])
    f.close()
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_a_tensor_never_written_or_of_another_shape_is_an_error(tmp_path):
    f = StreamedFile(tmp_path / "c", {"a": (torch.float16, (2, 3)), "b": (torch.uint8, (4,))})
    with pytest.raises(sizewise.SizewiseError, match="laid out for"):
        f.write("a", torch.zeros(3, 2, dtype=torch.float16))
    f.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(sizewise.SizewiseError, match="never written, first 'b'"):
        f.close()


def _old_packed(art):
    """packed.safetensors as the all-at-the-end writer made it: every entry at once, through save_file."""
    stored, manifest = artifact.load_stored(art)
    entries = {}
    for name, value in stored.items():
        entries.update({name: value} if isinstance(value, torch.Tensor) else
                       artifact.stored_entries(name, value.fmt, value))
    save_file(entries, str(art.parent / "old.safetensors"), metadata={"format": artifact.FORMAT_NAME})
    return (art.parent / "old.safetensors").read_bytes()


def _counting_solves(monkeypatch):
    """Each stored tensor `methods.solve` returns, watched: the most alive at once."""
    real, alive, seen = methods.solve, set(), {"most": 0, "solved": 0}

    def solve(*args, **kwargs):
        qt = real(*args, **kwargs)
        key = seen["solved"] = seen["solved"] + 1
        alive.add(key)
        weakref.finalize(qt, alive.discard, key)
        seen["most"] = max(seen["most"], len(alive))
        return qt
    monkeypatch.setattr(methods, "solve", solve)
    return seen


def test_artifact_is_written_layer_by_layer_and_equals_the_all_at_once_file(model_dir, tmp_path, monkeypatch):
    seen = _counting_solves(monkeypatch)
    assert main(_args(model_dir, tmp_path / "art")) == 0
    assert seen["solved"] == LAYERS * LINEARS - 1                   # one skipped
    assert seen["most"] <= LINEARS                                  # one layer's, never all of them
    assert (tmp_path / "art" / artifact.PACKED).read_bytes() == _old_packed(tmp_path / "art")
    model, _, _ = artifact.load(tmp_path / "art")                   # and it loads, hashes verified


def test_gguf_equals_the_all_at_once_writer(model_dir, tmp_path, monkeypatch):
    seen = _counting_solves(monkeypatch)
    out = tmp_path / "m.gguf"
    assert main(_args(model_dir, out, "--format", "gguf")) == 0
    assert seen["most"] <= LINEARS
    # the reference: the artifact of the same run, every payload built, then gguf's own all-at-once writer
    art = tmp_path / "art"
    assert main(_args(model_dir, art)) == 0
    stored, manifest = artifact.load_stored(art)
    config = tf.AutoConfig.from_pretrained(art / artifact.MODEL_FILES)
    tokenizer = tf.AutoTokenizer.from_pretrained(art / artifact.MODEL_FILES)
    args = gguf_export.gguf_export_args(manifest["source"])
    writer = gguf.GGUFWriter(tmp_path / "old.gguf", "llama")
    gguf_export._add_metadata(writer, config, tokenizer, args["name"], args["tokenizer_pre"], args["metadata"])
    for name, payload, ggml_type in gguf_export.gguf_tensors(config, stored):
        writer.add_tensor(name, payload, raw_dtype=ggml_type if payload.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert out.read_bytes() == (tmp_path / "old.gguf").read_bytes()


def test_export_reads_one_tensor_at_a_time(model_dir, tmp_path, monkeypatch):
    assert main(_args(model_dir, tmp_path / "art")) == 0
    real, alive, most = artifact.StoredTensors.__getitem__, set(), [0]

    def getitem(self, name):
        value = real(self, name)
        alive.add(name)
        weakref.finalize(value, alive.discard, name)
        most[0] = max(most[0], len(alive))
        return value
    monkeypatch.setattr(artifact.StoredTensors, "__getitem__", getitem)
    export(tmp_path / "art", tmp_path / "m.gguf", format="gguf")
    assert most[0] == 1


def test_a_failure_while_writing_leaves_no_output_and_resumes_to_the_same_bytes(model_dir, tmp_path, monkeypatch,
                                                                                capsys):
    assert main(_args(model_dir, tmp_path / "whole.gguf", "--format", "gguf")) == 0
    real, calls = compression.LayerOutput._release, []

    def release(self, refs):        # the output write fails after two layers were written
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(self, refs)
    out = tmp_path / "stopped.gguf"
    with monkeypatch.context() as m:
        m.setattr(compression.LayerOutput, "_release", release)
        assert main(_args(model_dir, out, "--format", "gguf")) != 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == \
        [".stopped.gguf.checkpoint"]                                # no staging left, only the checkpoint
    capsys.readouterr()
    assert main(_args(model_dir, out, "--format", "gguf")) == 0
    assert "resuming at layer 4/4" in capsys.readouterr().err       # 3 layers kept: written again from it
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()
