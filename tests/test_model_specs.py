"""Every command on every kind of model spec (artifact, lossless-packed directory, GGUF file, Hugging
Face directory, built-in name) and on a text file and a missing path: it works, or exits non-zero with
one `error:` line; never a traceback."""

import json

import pytest

from sizewise import api, builtins
from sizewise.cli import main

KINDS = ("artifact", "packed", "gguf", "hf", "builtin")


@pytest.fixture(scope="module")
def specs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    api.compress(str(tiny_dirs["llama"]), api.CompressConfig(), root / "artifact", progress=False)
    assert main(["pack", "--lossless", str(root / "artifact"), "-o", str(root / "packed")]) == 0
    api.export(tiny_dirs["llama"], root / "tiny.gguf", format="gguf")
    return {"artifact": root / "artifact", "packed": root / "packed", "gguf": root / "tiny.gguf",
            "hf": tiny_dirs["llama"], "builtin": "tiny-builtin", "text": tiny_dirs["text"], "missing": root / "nope"}


@pytest.fixture(autouse=True)
def _tiny_builtin(tiny_dirs, monkeypatch):
    """A built-in name that resolves to the tiny model, so no test downloads anything."""
    monkeypatch.setitem(builtins.MODELS, "tiny-builtin", builtins.MODELS["smollm2-135m"])
    monkeypatch.setattr(builtins, "fetch_model", lambda name: tiny_dirs["llama"])


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err):
    lines = err.strip().splitlines()
    return code != 0 and len(lines) == 1 and lines[0].startswith("error: ")


@pytest.mark.parametrize("kind", KINDS)
def test_info_describes_every_kind_of_model(kind, specs, capsys):
    code, out, err = run(capsys, "info", specs[kind], "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["kind"] == kind and r["disk_bytes"] > 0 and r["model_params"] > 0
    assert r["layers"] and all(row["bits_per_weight"] > 0 and row["format"] for row in r["layers"])
    if kind in ("gguf", "hf", "builtin"):
        assert r["architecture"] == "llama"
        formats = {row["format"] for row in r["layers"]}
        assert formats == ({"F32"} if kind == "gguf" else {"f32"})
    else:
        assert r["bits_per_weight"] == pytest.approx(4 + 20 / 64)
    code, out, err = run(capsys, "info", specs[kind])                 # the table
    assert code == 0 and "on disk" in out, err


@pytest.mark.parametrize("bad", ["text", "missing"])
@pytest.mark.parametrize("command", ["info", "eval", "compress", "export", "pack"])
def test_a_text_file_or_missing_path_is_one_error_line(command, bad, specs, tmp_path, capsys):
    extra = {"info": [], "eval": ["--text", specs["text"]], "compress": ["-o", tmp_path / "o"],
             "export": ["-o", tmp_path / "o"], "pack": ["--lossless", "-o", tmp_path / "o"]}[command]
    code, _, err = run(capsys, command, specs[bad], *extra)
    assert one_error_line(code, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_every_command_takes_every_kind_or_says_why_not_in_one_line(kind, specs, tmp_path, capsys):
    spec, text = specs[kind], specs["text"]
    outcomes = {}
    for name, args in {
        "eval": ["eval", spec, "--text", text, "--ctx", 32, "--windows", 1, "--quiet"],
        "compress": ["compress", spec, "--bits", 4, "--group-size", 32, "-o", tmp_path / "c", "--quiet"],
        "export-gguf": ["export", spec, "-o", tmp_path / "e.gguf"],
        "export-hf": ["export", spec, "--format", "hf", "-o", tmp_path / "h"],
        "export-ct": ["export", spec, "--format", "compressed-tensors", "-o", tmp_path / "ct"],
        "pack": ["pack", "--lossless", spec, "-o", tmp_path / "p"],
    }.items():
        code, _, err = run(capsys, *args)
        assert code == 0 or one_error_line(code, err), (name, err)
        outcomes[name] = code == 0
    # what must work: every model evaluates, compresses and exports dense; artifacts export quantized and
    # pack (these float models are float32, which lossless packing refuses without --allow-lossy)
    assert outcomes["eval"] and outcomes["compress"] and outcomes["export-hf"]
    assert outcomes["pack"] == (kind == "artifact")
    assert outcomes["export-ct"] == (kind == "artifact")
    # GGUF holds an artifact only in ggml's types (this one is int4 g64 asym: refused); a float model exports
    # (the tiny GGUF's round trip is refused: its converted tokenizer has ids beyond the tiny vocab)
    assert not outcomes["export-gguf"] if kind == "artifact" else outcomes["export-gguf"] or kind == "gguf"
