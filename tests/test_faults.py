"""Fault injection, hostile inputs: malformed GGUF headers, corrupt safetensors, malicious pickles,
edited artifact manifests, out-of-range arguments, NaN weights. Every case ends with one `error:`
line, a non-zero exit and no traceback; nothing is written, every input file is byte-identical
afterwards, and no code from a model directory runs. Output safety and signals: test_faults_output.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sizewise.cli import main

SRC = Path(__file__).resolve().parent.parent / "src"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> sha256 of its bytes; every directory -> "dir"."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def one_error(capsys, *args, contains: str = "") -> str:
    """Run the CLI in-process; assert one `error:` line on stderr, a non-zero exit, no traceback."""
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and contains in lines[0], err
    return lines[0]


# --- GGUF: header and tensor table checked against the file size ------------------------------------


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def _gguf(kvs: list[bytes], tensors: list[bytes] = (), n_kv=None, n_tensors=None, data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def _tensor(name: str, dims, ttype: int = 0, offset: int = 0, n_dims=None) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<II", ttype, 0)[:4] + struct.pack("<Q", offset))


ARCH = _kv_str("general.architecture", "llama")
SMALL = [ARCH, _kv_u32("llama.block_count", 1), _kv_u32("llama.embedding_length", 8),
         _kv_u32("llama.feed_forward_length", 8)]

HOSTILE_GGUF = {
    "no-tensors": (_gguf([ARCH]), "holds no tensors"),                      # the 89-byte Llama of the issue
    "cut-in-header": (_gguf(SMALL)[:40], "truncated or corrupt"),
    "cut-in-magic": (b"GGU", "not a GGUF file"),
    "huge-kv-count": (_gguf([ARCH], n_kv=2 ** 62), "metadata entries"),
    "huge-tensor-count": (_gguf(SMALL, n_tensors=2 ** 61), "tensor entries"),
    "huge-string": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2 ** 60) + b"x" * 40, "needs"),
    "huge-array": (_gguf([_s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2 ** 50)]), "array"),
    "huge-dims": (_gguf(SMALL, [_tensor("w", [2 ** 40, 2 ** 20])]), "runs past the end"),
    "many-dims": (_gguf(SMALL, [_tensor("w", [8] * 3, n_dims=100)]), "dimensions"),
    "zero-dim": (_gguf(SMALL, [_tensor("w", [0, 8])], data=b"\0" * 64), "shape"),
    "unknown-type": (_gguf(SMALL, [_tensor("w", [8, 8], ttype=999)], data=b"\0" * 256), "unknown ggml type"),
    "bad-version": (b"GGUF" + struct.pack("<IQQ", 99, 0, 0) + b"\0" * 8, "version"),
    # a valid table whose metadata describes a 7B model: transformers would allocate it
    "metadata-bigger-than-tensors": (_gguf([ARCH, _kv_u32("llama.block_count", 32), _kv_u32("llama.embedding_length", 4096),
                                            _kv_u32("llama.feed_forward_length", 11008)],
                                           [_tensor("w", [8, 8])], data=b"\0" * 256), "describes a model"),
    # consistent sizes, but no vocabulary: transformers would build its default 32000-token embedding
    "default-vocabulary": (_gguf([ARCH, _kv_u32("llama.block_count", 1), _kv_u32("llama.embedding_length", 64),
                                  _kv_u32("llama.feed_forward_length", 1)],
                                 [_tensor("w", [64, 64])], data=b"\0" * 64 * 64 * 4), "describes a model"),
    "missing-block-count": (_gguf([ARCH], [_tensor("w", [8, 8])], data=b"\0" * 256), "block_count"),
}


@pytest.fixture
def hostile_ggufs(tmp_path):
    files = {}
    for name, (data, _) in HOSTILE_GGUF.items():
        files[name] = tmp_path / f"{name}.gguf"
        files[name].write_bytes(data)
    return files


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_malformed_gguf_is_one_line_everywhere_it_is_read(case, hostile_ggufs, tiny_dirs, tmp_path, capsys):
    path, message = hostile_ggufs[case], HOSTILE_GGUF[case][1]
    before = snapshot(tmp_path)
    one_error(capsys, "compress", path, "-o", tmp_path / "out", "--quiet", contains=message)
    one_error(capsys, "eval", path, "--text", tiny_dirs["text"], "--ctx", 32, "--quiet", contains=message)
    one_error(capsys, "export", path, "-o", tmp_path / "out.gguf", contains=message)
    one_error(capsys, "info", path)
    assert snapshot(tmp_path) == before      # nothing written beside the inputs, inputs unchanged
    assert not (Path(os.environ["SIZEWISE_CACHE"]) / "gguf").exists() or not any(
        (Path(os.environ["SIZEWISE_CACHE"]) / "gguf").iterdir())


def test_a_valid_gguf_still_passes_the_check(tmp_path):
    import gguf
    import numpy as np

    from sizewise.filecheck import check_gguf

    w = gguf.GGUFWriter(tmp_path / "ok.gguf", "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_vocab_size(4)
    w.add_tensor("a", np.zeros((8, 48), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert check_gguf(tmp_path / "ok.gguf")["llama.block_count"] == 1


# --- safetensors, pickles, remote code -------------------------------------------------------------


def _corrupt(data: bytes, how: str) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    return {"truncated": data[: len(data) // 2],
            "cut-in-header": data[: 8 + n // 2],
            "huge-header-length": struct.pack("<Q", 2 ** 62) + data[8:],
            "garbage-header": data[:8] + b"#" * n + data[8 + n:],
            "offsets-past-end": data[:8] + data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
            + data[8 + n:]}[how]


@pytest.mark.parametrize("how", ["truncated", "cut-in-header", "huge-header-length", "garbage-header",
                                 "offsets-past-end"])
def test_corrupt_safetensors_is_one_line(how, tiny_dirs, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    st = d / "model.safetensors"
    st.write_bytes(_corrupt(st.read_bytes(), how))
    before = snapshot(tmp_path)
    one_error(capsys, "compress", d, "-o", tmp_path / "out", "--quiet", contains="cannot load a causal LM")
    one_error(capsys, "eval", d, "--text", tiny_dirs["text"], "--ctx", 32, "--quiet")
    assert snapshot(tmp_path) == before


def test_malicious_pickle_is_refused_by_weights_only_loading(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))
    line = one_error(capsys, "compress", d, "-o", tmp_path / "out", "--allow-pickle", "--quiet")
    assert "weights-only loading refused" in line
    one_error(capsys, "compress", d, "-o", tmp_path / "out", "--quiet", contains="--allow-pickle")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_remote_code_config_through_the_cli_runs_nothing(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil-arch", auto_map={"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    one_error(capsys, "compress", d, "-o", tmp_path / "out", "--quiet")
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "out").exists()


def test_a_config_transformers_rejects_is_one_error_line(tiny_dirs, tmp_path, capsys):
    """Per-layer attention kinds for fewer layers than the config has: transformers' own validation
    refuses it, and that reaches the user as one line naming the model, not "unexpected ... please report"."""
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["qwen2"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_types"] = ["full_attention"] * (cfg["num_hidden_layers"] + 1)
    (d / "config.json").write_text(json.dumps(cfg))
    line = one_error(capsys, "compress", d, "-o", tmp_path / "out", "--quiet")
    assert f"cannot load a causal LM from {d}" in line and "unexpected" not in line
    assert not (tmp_path / "out").exists()


# --- artifacts: edited manifests and flipped bytes -------------------------------------------------


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    import sizewise
    from sizewise.api import CompressConfig
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("faults-art")
    sizewise.compress(str(save_tiny("llama", root / "llama")), CompressConfig(), root / "a", progress=False)
    return root / "a"


def _edit(m: dict, how: str) -> None:
    t = m["tensors"]
    lin = next(k for k, v in t.items() if v["linear"])
    flt = next(k for k, v in t.items() if v["format"]["kind"] == "float" and len(v["shape"]) == 1)
    {"alias-to-nothing": lambda: m.update(aliases={"lm_head.weight": "no.such.tensor"}),
     "alias-to-wrong-shape": lambda: m.update(aliases={"lm_head.weight": flt}),
     "alias-not-a-string": lambda: m.update(aliases={"lm_head.weight": [1]}),
     "format-bits": lambda: t[lin]["format"].update(bits=99),
     "format-kind": lambda: t[lin]["format"].update(kind="nonsense"),
     "format-not-a-dict": lambda: t[lin].update(format="int4"),
     "format-group-size": lambda: t[lin]["format"].update(group_size=0),
     "shape": lambda: t[lin].update(shape=["a", 3]),
     "tensors-a-list": lambda: m.update(tensors=[]),
     "raw-dtype": lambda: t[flt].update(format={"kind": "raw", "dtype": "os.system"})}[how]()


@pytest.mark.parametrize("how", ["alias-to-nothing", "alias-to-wrong-shape", "alias-not-a-string", "format-bits",
                                 "format-kind", "format-not-a-dict", "format-group-size", "shape", "tensors-a-list",
                                 "raw-dtype"])
def test_edited_artifact_manifest_is_one_line(how, artifact_dir, tiny_dirs, tmp_path, capsys):
    a = tmp_path / "a"
    shutil.copytree(artifact_dir, a)
    m = json.loads((a / "manifest.json").read_text())
    _edit(m, how)
    (a / "manifest.json").write_text(json.dumps(m))
    before = snapshot(tmp_path)
    one_error(capsys, "eval", a, "--text", tiny_dirs["text"], "--ctx", 32, "--windows", 1, "--quiet")
    one_error(capsys, "export", a, "-o", tmp_path / "x.gguf")
    if how != "alias-to-wrong-shape":      # info reads the manifest alone
        one_error(capsys, "info", a)
    assert snapshot(tmp_path) == before


def test_flipped_byte_in_packed_tensors_names_the_tensor(artifact_dir, tiny_dirs, tmp_path, capsys):
    from safetensors import safe_open

    a = tmp_path / "a"
    shutil.copytree(artifact_dir, a)
    m = json.loads((a / "manifest.json").read_text())
    assert all(len(e["sha256"]) == 64 for e in m["tensors"].values())
    packed = a / "packed.safetensors"
    data = bytearray(packed.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k.endswith(":codes"))
    data[8 + n + header[key]["data_offsets"][0] + 3] ^= 0x04
    packed.write_bytes(bytes(data))
    with safe_open(str(packed), framework="pt") as f:          # still a valid safetensors file
        assert key in f.keys()
    line = one_error(capsys, "eval", a, "--text", tiny_dirs["text"], "--ctx", 32, "--windows", 1, "--quiet")
    assert key.split(":")[0] in line and "sha256" in line


def test_manifest_without_hashes_loads_unverified(artifact_dir, tmp_path):
    from sizewise import artifact

    a = tmp_path / "a"
    shutil.copytree(artifact_dir, a)
    m = json.loads((a / "manifest.json").read_text())
    for e in m["tensors"].values():
        del e["sha256"]
    (a / "manifest.json").write_text(json.dumps(m))
    assert artifact.load_weights(a).keys() == artifact.load_weights(artifact_dir).keys()


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["compress", "{llama}", "-o", "{out}", "--batch", "0"], "--batch"),
    (["compress", "{llama}", "-o", "{out}", "--batch", "-1"], "--batch"),
    (["compress", "{llama}", "-o", "{out}", "--group-size", "0"], "positive integer"),
    (["compress", "{llama}", "-o", "{out}", "--group-size", "-1"], "positive integer"),
    (["compress", "{llama}", "-o", "{out}", "--damp", "-1"], "--damp"),
    (["compress", "{llama}", "-o", "{out}", "--calib-samples", "0"], "--calib-samples"),
    (["compress", "{llama}", "-o", "{out}", "--calib-len", "1"], "--calib-len"),
    (["compress", "{llama}", "-o", "{out}", "--bits", "0"], "bits must be between"),
    (["compress", "{llama}", "-o", "{out}", "--recipe", "{bad_recipe}"], "calibration batch"),
    (["eval", "{llama}", "--text", "{text}", "--stride", "0"], "--stride"),
    (["eval", "{llama}", "--text", "{text}", "--windows", "0"], "--windows"),
    (["eval", "{llama}", "--text", "{text}", "--ctx", "1"], "--ctx"),
    (["eval", "{llama}", "--text", "{text}", "--ctx", "600", "--quiet"], "exceeds the model's 512 positions"),
    (["plan", "{llama}", "--budget", "4bpw", "--fisher-samples", "0"], "--fisher-samples"),
    (["plan", "{llama}", "--budget", "4bpw", "--measure-samples", "-1"], "--measure-samples"),
    (["compare", "{llama}", "{llama}", "-o", "{out}", "--stride", "0"], "--stride"),
])
def test_out_of_range_arguments_are_one_line(args, message, tiny_dirs, tmp_path, capsys):
    from sizewise.recipe import Recipe

    recipe = Recipe().to_dict()
    recipe["calib"]["batch"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(recipe))
    long_text = tmp_path / "long.txt"
    long_text.write_text(Path(tiny_dirs["text"]).read_text() * 4)
    names = {"llama": tiny_dirs["llama"], "text": long_text, "out": tmp_path / "out", "bad_recipe": tmp_path / "bad.json"}
    one_error(capsys, *[a.format(**names) for a in args], contains=message)
    assert not (tmp_path / "out").exists()


# --- weights that cannot be stored -----------------------------------------------------------------


@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                            (1e6, "beyond float16's range")])
def test_weights_that_cannot_be_stored_are_refused_naming_the_tensor(value, message, tmp_path, capsys):
    import torch

    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[3] = value
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    capsys.readouterr()         # transformers' own progress bar while saving
    line = one_error(capsys, "compress", tmp_path / "m", "-o", tmp_path / "out", "--quiet", contains=message)
    assert "model.norm.weight" in line and not (tmp_path / "out").exists()
    if value == 1e6:        # kept in float32 when asked
        assert main(["compress", str(tmp_path / "m"), "-o", str(tmp_path / "out"), "--float-dtype", "float32",
                     "--quiet"]) == 0


def test_storability_is_checked_slice_by_slice_to_the_last_element(monkeypatch):
    """`check_storable` reads a tensor in slices (an 8B embedding whole would need GB of temporaries):
    a bad value in the last, short slice is still found."""
    import torch

    from sizewise.errors import SizewiseError
    from sizewise.quant import formats

    monkeypatch.setattr(formats, "_CHECK_SLICE", 4)
    for value, dtype, message in [(float("nan"), None, "NaN"), (1e6, "float16", "beyond float16")]:
        t = torch.zeros(3, 5)
        t[2, 4] = value
        with pytest.raises(SizewiseError, match=message):
            formats.check_storable("w", t, dtype)
    formats.check_storable("w", torch.zeros(3, 5), "float16")
    formats.check_storable("w", torch.zeros(0, 5), "float16")


# --- bounded memory --------------------------------------------------------------------------------


def test_hostile_files_under_1mb_stay_under_1gb(hostile_ggufs, tiny_dirs, tmp_path):
    """Every hostile GGUF and a corrupt safetensors, in one fresh process: peak RSS under 1 GB."""
    d = tmp_path / "st"
    shutil.copytree(tiny_dirs["llama"], d)
    (d / "model.safetensors").write_bytes(_corrupt((d / "model.safetensors").read_bytes(), "huge-header-length"))
    specs = [str(p) for p in hostile_ggufs.values()] + [str(d)]
    assert all(os.path.getsize(p) < 1 << 20 for p in specs[:-1])
    script = f"""
import resource, sys
from sizewise.cli import main
codes = [main(["eval", spec, "--text", {str(tiny_dirs['text'])!r}, "--ctx", "32", "--quiet"]) for spec in {specs!r}]
print(max(codes), min(codes), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    top, low, rss_kb = map(int, r.stdout.split())
    assert top == low == 2
    assert rss_kb < 1 << 20, f"peak RSS {rss_kb / 1024:.0f} MB"


# --- traversal: names from a packed directory's manifest, through the CLI ----------------------------


@pytest.mark.parametrize("where", ["files", "tensor-file"])
@pytest.mark.parametrize("name", ["../escaped.json", "/tmp/sizewise-escaped.json", "a/../../escaped.json"])
def test_traversal_manifest_is_one_line_and_writes_nothing_outside(where, name, tmp_path, capsys):
    import torch

    from sizewise.lossless import pack_model
    from tiny import tiny_model, tiny_tokenizer

    src = tmp_path / "src"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    tiny_tokenizer().save_pretrained(src)
    packed = tmp_path / "work" / "p"
    pack_model(src, packed)
    m = json.loads((packed / "manifest.json").read_text())
    if where == "files":
        m["files"] = [*m["files"], name]
    else:
        m["tensors"][next(iter(m["tensors"]))]["file"] = name
    (packed / "manifest.json").write_text(json.dumps(m))
    before = snapshot(tmp_path)
    capsys.readouterr()                       # the setup's own progress output
    one_error(capsys, "unpack", packed, "-o", tmp_path / "work" / "u")
    one_error(capsys, "eval", packed, "--text", packed / "manifest.json", "--ctx", 32, "--quiet")
    assert snapshot(tmp_path) == before and not Path("/tmp/sizewise-escaped.json").exists()
