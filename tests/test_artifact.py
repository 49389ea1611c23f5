import json

import pytest
import torch
from safetensors.torch import load_file

import sizewise
from sizewise import artifact
from sizewise.api import CompressConfig
from sizewise.errors import SizewiseError
from sizewise.quant.uniform import QuantFormat


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "phi3", "gemma3", "mistral"])
def test_packed_artifact_rebuilds_exactly_the_dense_weights(family, tiny_dirs, tmp_path):
    out = tmp_path / "a"
    res = sizewise.compress(str(tiny_dirs[family]), CompressConfig("rtn", QuantFormat(3, 32)), out, progress=False)
    rebuilt = artifact.load_weights(out)
    in_memory = res.model.state_dict()
    dense = load_file(str(out / "hf" / "model.safetensors"))
    for name, t in in_memory.items():
        assert torch.equal(rebuilt[name], t.float()), name
    for name, t in dense.items():
        assert torch.equal(rebuilt[name], t.float()), name
    manifest = json.loads((out / "manifest.json").read_text())
    linears = [e for e in manifest["tensors"].values() if e["linear"]]
    assert linears and all(e["method"] == "rtn" for e in linears)


def test_dense_copy_loads_with_plain_transformers(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "a"
    res = sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", QuantFormat(4, 32)), out, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(out / "hf")
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(plain(x).logits, res.model(x).logits)


def test_bits_per_weight_comes_from_the_stored_bytes(tiny_dirs, tmp_path):
    out = tmp_path / "a"
    fmt = QuantFormat(4, 32)
    res = sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", fmt), out, progress=False)
    t = res.manifest["totals"]
    assert t["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 32)
    packed = load_file(str(out / "packed.safetensors"))
    payload_bits = sum(v.numel() * v.element_size() * 8 for v in packed.values())
    assert payload_bits == t["model_stored_bits"]
    assert t["file_bytes"] > payload_bits / 8          # safetensors adds only its header


def test_skip_keeps_layers_in_float(tiny_dirs, tmp_path):
    res = sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", QuantFormat(2, 32), skip=("*.down_proj",)),
                            tmp_path / "a", progress=False)
    entries = res.manifest["tensors"]
    downs = [e for n, e in entries.items() if "down_proj" in n]
    assert downs and all(e["method"] == "float" and e["format"]["dtype"] == "float16" for e in downs)


def test_output_that_holds_something_is_refused_before_any_work(tiny_dirs, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SizewiseError, match="already exists"):
        sizewise.compress("no-such-model", CompressConfig(), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_no_output(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "a"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(RuntimeError):
        sizewise.compress(str(tiny_dirs["llama"]), CompressConfig(), out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_corrupt_artifacts_give_clear_errors(tiny_dirs, tmp_path):
    out = tmp_path / "a"
    sizewise.compress(str(tiny_dirs["llama"]), CompressConfig(), out, progress=False)
    (out / "packed.safetensors").write_bytes(b"garbage")
    with pytest.raises(SizewiseError, match="missing or corrupt"):
        artifact.load_weights(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(SizewiseError, match="corrupt"):
        artifact.read_manifest(out)


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path):
    from sizewise.atomic import staged_dir

    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (out / "old.txt").read_text() == "old"
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()            # invisible until the block completes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and [p.name for p in out.iterdir()] == ["new.txt"]
