"""Lossless packing of whole models and artifacts: bit-exact round trips, refusals, corruption."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sizewise import lossless as lm
from sizewise.errors import SizewiseError
from sizewise.lossless import CorruptData
from sizewise.lossless.cli import pack, unpack


@pytest.fixture(scope="module")
def half_dirs(tmp_path_factory):
    """Tiny models saved in bfloat16 and float16 (what lossless packing is for), with a tokenizer."""
    from tiny import save_tiny, tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("half")
    dirs = {}
    for family in ("llama", "qwen2", "gpt2"):
        for dtype in (torch.bfloat16, torch.float16):
            d = root / f"{family}-{str(dtype)[6:]}"
            tiny_model(family).to(dtype).save_pretrained(d, safe_serialization=True)
            tiny_tokenizer().save_pretrained(d)
            dirs[family, dtype] = d
    dirs["float32"] = save_tiny("llama", root / "llama-float32")
    return dirs


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view: equal views mean equal bits (NaN payloads and -0.0 included)."""
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def reference(directory, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_load_is_bit_identical(family, dtype, half_dirs, tmp_path):
    src = half_dirs[family, dtype]
    res = lm.pack_model(src, tmp_path / "p", threads=2)
    assert res["lossy"] is None and res["format"] == lm.FORMAT_NAME
    assert lm.is_packed_model(tmp_path / "p") and not lm.is_packed_model(src)
    # bf16 exponents of random weights carry ~2.6 of 8 bits; fp16's coded high byte (sign, exponent,
    # 2 mantissa bits) keeps more of its entropy.
    assert res["totals"]["float"]["ratio"] < (0.75 if dtype == torch.bfloat16 else 0.9)

    model, tokenizer, info = lm.load_packed_model(tmp_path / "p", threads=2)
    ref = reference(src, dtype)
    assert_same_state(ref.state_dict(), model.state_dict())
    # Every stored tensor, by name, against the file itself.
    stored = load_file(str(src / "model.safetensors"))
    state = model.state_dict()
    for name, t in stored.items():
        assert torch.equal(bits(t), bits(state[name])), name
    if ref.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, model(x).logits)
    assert info["kind"] == "lossless" and info["lossy"] is None
    assert tokenizer("hello world")["input_ids"] == reference_tokenizer(src)("hello world")["input_ids"]


def reference_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def test_load_can_widen_to_float32_exactly(half_dirs, tmp_path):
    src = half_dirs["llama", torch.bfloat16]
    lm.pack_model(src, tmp_path / "p")
    model, _, _ = lm.load_packed_model(tmp_path / "p", dtype=torch.float32)
    ref = reference(src, torch.float32)
    assert_same_state(ref.state_dict(), model.state_dict())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unpack_gives_plain_transformers_directory(family, half_dirs, tmp_path):
    src = half_dirs[family, torch.bfloat16]
    lm.pack_model(src, tmp_path / "p")
    res = lm.unpack_model(tmp_path / "p", tmp_path / "u")
    assert res["files"] == ["model.safetensors"]
    x = torch.randint(0, 300, (2, 16))
    a, b = reference(src, torch.bfloat16), reference(tmp_path / "u", torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert_same_state(load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "u" / "model.safetensors")))
    # Same tensors, same safetensors metadata: the file itself comes back byte for byte.
    assert (src / "model.safetensors").read_bytes() == (tmp_path / "u" / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (src / name).read_bytes() == (tmp_path / "u" / name).read_bytes()


def test_sharded_model_keeps_its_shards(half_dirs, tmp_path):
    from tiny import tiny_model, tiny_tokenizer

    src = tmp_path / "sharded"
    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(src)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1
    lm.pack_model(src, tmp_path / "p")
    lm.unpack_model(tmp_path / "p", tmp_path / "u")
    assert sorted(p.name for p in (tmp_path / "u").glob("*.safetensors")) == shards
    for s in shards:
        assert (src / s).read_bytes() == (tmp_path / "u" / s).read_bytes()
    model, _, _ = lm.load_packed_model(tmp_path / "p")
    assert_same_state(reference(src, torch.bfloat16).state_dict(), model.state_dict())


def test_float32_needs_explicit_lossy_conversion(half_dirs, tmp_path):
    src = half_dirs["float32"]
    with pytest.raises(SizewiseError, match="float32.*--allow-lossy"):
        lm.pack_model(src, tmp_path / "p")
    with pytest.raises(SizewiseError, match="lossy"):
        lm.pack_model(src, tmp_path / "p", dtype="bfloat16")
    assert not (tmp_path / "p").exists()
    res = lm.pack_model(src, tmp_path / "p", dtype="bfloat16", allow_lossy=True)
    lossy = res["lossy"]
    assert lossy["what"].startswith("float32 -> bfloat16 rounding") and lossy["tensors"] > 0
    f32 = load_file(str(src / "model.safetensors"))
    expected = max((t - t.bfloat16().float()).abs().max().item() for t in f32.values())
    assert lossy["max_abs_error"] == pytest.approx(expected)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "bfloat16"
    # From here on the packed bf16 weights round-trip exactly: they equal the float32 ones rounded.
    model, _, info = lm.load_packed_model(tmp_path / "p")
    assert info["lossy"] == lossy
    state = model.state_dict()
    for name, t in f32.items():
        assert torch.equal(bits(state[name]), bits(t.bfloat16())), name


def test_rounding_that_overflows_is_refused(tmp_path):
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6          # beyond float16's 65504
        model.model.norm.weight[1] = float("inf")  # already infinite: not an overflow
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    with pytest.raises(SizewiseError, match="model.norm.weight: values overflow float16"):
        lm.pack_model(tmp_path / "src", tmp_path / "p", dtype="float16", allow_lossy=True)
    res = lm.pack_model(tmp_path / "src", tmp_path / "q", dtype="bfloat16", allow_lossy=True)
    assert 0 < res["lossy"]["max_abs_error"] < float("inf")


def test_float16_to_bfloat16_is_lossy_too(half_dirs, tmp_path):
    with pytest.raises(SizewiseError, match="float16.*lossy"):
        lm.pack_model(half_dirs["llama", torch.float16], tmp_path / "p", dtype="bfloat16")
    # Asking for the dtype the model already has changes nothing and is not lossy.
    res = lm.pack_model(half_dirs["llama", torch.float16], tmp_path / "p", dtype="float16")
    assert res["lossy"] is None


def test_manifest_sizes_match_the_files(half_dirs, tmp_path):
    src = half_dirs["llama", torch.bfloat16]
    res = lm.pack_model(src, tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest == {k: v for k, v in res.items() if k != "path"}
    size = (tmp_path / "p" / lm.WEIGHTS).stat().st_size
    assert manifest["weights_nbytes"] == size == manifest["totals"]["file_bytes"]
    at = 0
    stored = load_file(str(src / "model.safetensors"))
    assert list(manifest["tensors"]) == list(stored) or set(manifest["tensors"]) == set(stored)
    for name, e in manifest["tensors"].items():
        assert e["offset"] == at
        at += e["nbytes"]
        t = stored[name]
        assert e["shape"] == list(t.shape) and e["dtype"] == str(t.dtype)[6:]
        assert e["raw_nbytes"] == t.numel() * t.element_size()
        if e["encoding"] == "float":
            assert e["entropy_bound_bits"] <= 8 * e["nbytes"]
    assert at == size
    totals = manifest["totals"]
    assert totals["raw_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert totals["coded_bytes"] == size
    assert totals["entropy_bound_bytes"] <= totals["coded_bytes"]
    assert sorted(manifest["files"]) == sorted(p.name for p in (tmp_path / "p").iterdir()
                                               if p.name not in ("manifest.json", lm.WEIGHTS))


def _packed(half_dirs, tmp_path):
    out = tmp_path / "p"
    lm.pack_model(half_dirs["llama", torch.bfloat16], out)
    return out, json.loads((out / "manifest.json").read_text())


def test_flipped_byte_anywhere_is_an_error_never_wrong_weights(half_dirs, tmp_path):
    out, manifest = _packed(half_dirs, tmp_path)
    path = out / lm.WEIGHTS
    clean = path.read_bytes()
    # One byte in each tensor's payload: header, entropy-coded symbols, or raw mantissa plane.
    for name, e in manifest["tensors"].items():
        for where in (0, e["nbytes"] // 2, e["nbytes"] - 1):
            data = bytearray(clean)
            data[e["offset"] + where] ^= 0x10
            path.write_bytes(bytes(data))
            with pytest.raises(CorruptData, match=name.replace(".", r"\.")):
                lm.load_packed_model(out)
    path.write_bytes(clean)
    lm.load_packed_model(out)


def test_tampered_manifest_hash_is_caught(half_dirs, tmp_path):
    out, manifest = _packed(half_dirs, tmp_path)
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptData, match="sha256 mismatch"):
        lm.load_packed_model(out)
    with pytest.raises(CorruptData, match="sha256 mismatch"):
        lm.unpack_model(out, tmp_path / "u")
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("where", ["files", "tensor-file", "shards"])
@pytest.mark.parametrize("name", ["../escaped.json", "/tmp/sizewise-escaped.json", "a/../../escaped.json",
                                  "..\\escaped.json", ""])
def test_manifest_names_stay_inside_their_directory(half_dirs, tmp_path, where, name):
    """A manifest naming a file outside the packed directory is refused before anything is read or written."""
    out, manifest = _packed(half_dirs, tmp_path)
    if where == "files":
        manifest["files"] = [*manifest["files"], name]
    elif where == "tensor-file":
        manifest["tensors"][next(iter(manifest["tensors"]))]["file"] = name
    else:
        manifest["shards"] = {name: {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    for call in (lambda: lm.unpack_model(out, tmp_path / "u"), lambda: lm.load_packed_model(out)):
        with pytest.raises(SizewiseError) as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "u").exists() and sorted(p.name for p in tmp_path.parent.iterdir()) == before


def test_truncated_or_extended_file_is_an_error(half_dirs, tmp_path):
    out, _ = _packed(half_dirs, tmp_path)
    path = out / lm.WEIGHTS
    clean = path.read_bytes()
    path.write_bytes(clean[:-1])
    with pytest.raises(CorruptData, match="truncated"):
        lm.load_packed_model(out)
    path.write_bytes(clean + b"\0")
    with pytest.raises(CorruptData):
        lm.load_packed_model(out)
    path.unlink()
    with pytest.raises(CorruptData, match="missing"):
        lm.load_packed_model(out)


def test_output_that_holds_something_is_refused(half_dirs, tmp_path):
    src = half_dirs["llama", torch.bfloat16]
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SizewiseError, match="not empty"):
        lm.pack_model(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    lm.pack_model(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and lm.is_packed_model(out)
    with pytest.raises(SizewiseError, match="not empty"):
        lm.unpack_model(out, out)
    assert not list(tmp_path.glob(".p.*"))   # no temporary directories left behind


def test_bad_sources_are_one_line_errors(half_dirs, tmp_path):
    with pytest.raises(SizewiseError, match="no model at"):
        lm.pack_model(tmp_path / "nothing", tmp_path / "p")
    out, _ = _packed(half_dirs, tmp_path)
    with pytest.raises(SizewiseError, match="already lossless-packed"):
        lm.pack_model(out, tmp_path / "q")
    with pytest.raises(SizewiseError, match="not a lossless-packed"):
        lm.load_packed_model(half_dirs["llama", torch.bfloat16])
    with pytest.raises(SizewiseError, match="threads"):
        lm.pack_model(half_dirs["llama", torch.bfloat16], tmp_path / "r", threads=0)


# ---------------------------------------------------------------- quantized artifacts


@pytest.fixture(scope="module")
def rtn_artifact(tiny_dirs, tmp_path_factory):
    import sizewise
    from sizewise.api import CompressConfig
    from sizewise.quant.uniform import QuantFormat

    out = tmp_path_factory.mktemp("art") / "a"
    sizewise.compress(str(tiny_dirs["llama"]), CompressConfig("rtn", QuantFormat(4, 32)), out, progress=False)
    return out


def test_artifact_code_stats(rtn_artifact):
    stats = lm.code_artifact_stats(rtn_artifact)
    t = stats["totals"]
    assert stats["tensors"] and t["nominal_bits_per_code"] == 4
    assert t["entropy_bound_bits_per_code"] <= t["coded_bits_per_code"]
    assert 0 < t["single_code_entropy_bits_per_code"] <= 4
    for row in stats["tensors"].values():
        assert row["codes"] == row["shape"][0] * row["shape"][1]
    # Min-max RTN codes of tiny random matrices are close to uniform (entropy ~3.9 bits), and each
    # 64x64 tensor pays a header and Huffman tables: coding costs at most a little here. Real models
    # are measured in bench/lossless.py.
    assert t["entropy_bound_bits_per_code"] < 4 and t["coded_bits_per_code"] < 4.15
    assert t["bits_per_weight_coded"] < t["bits_per_weight_nominal"] + 0.2


def test_packed_artifact_rebuilds_the_same_dense_weights(rtn_artifact, tmp_path):
    from sizewise import artifact

    res = lm.pack_artifact(rtn_artifact, tmp_path / "p")
    assert res["kind"] == "artifact" and lm.is_packed_model(tmp_path / "p")
    assert res["totals"]["file_bytes"] < (rtn_artifact / artifact.PACKED).stat().st_size
    dense = lm.load_packed_artifact(tmp_path / "p")
    expected = artifact.load_weights(rtn_artifact)
    assert dense.keys() == expected.keys()
    for name in expected:
        assert torch.equal(bits(dense[name]), bits(expected[name])), name
    stored, _ = artifact.load_stored(rtn_artifact)
    again, _ = lm.load_packed_stored(tmp_path / "p")
    for name, t in stored.items():
        if hasattr(t, "codes"):
            assert torch.equal(again[name].codes, t.codes) and torch.equal(again[name].scales, t.scales)
    model, _, info = lm.load_packed_model(tmp_path / "p")
    ref, _, _ = artifact.load(rtn_artifact)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    assert info["compressed_from"] == json.loads((rtn_artifact / "manifest.json").read_text())["source"]


# ---------------------------------------------------------------- command line


def test_cli_pack_unpack(half_dirs, tmp_path):
    src = half_dirs["llama", torch.bfloat16]
    runner = CliRunner()
    r = runner.invoke(pack, [str(src), "--lossless", "-o", str(tmp_path / "p"), "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "LOSSY" not in r.output
    r = runner.invoke(unpack, [str(tmp_path / "p"), "-o", str(tmp_path / "u")])
    assert r.exit_code == 0, r.output
    assert (src / "model.safetensors").read_bytes() == (tmp_path / "u" / "model.safetensors").read_bytes()


def test_cli_refusals_raise_sizewise_errors(half_dirs, tmp_path):
    runner = CliRunner()
    src = str(half_dirs["llama", torch.bfloat16])
    cases = [
        (pack, [src, "-o", str(tmp_path / "a")], "--lossless"),
        (pack, [str(half_dirs["float32"]), "--lossless", "-o", str(tmp_path / "b")], "allow-lossy"),
        (pack, [src, "--lossless", "--allow-lossy", "-o", str(tmp_path / "c")], "--dtype"),
        (unpack, [src, "-o", str(tmp_path / "d")], "not a lossless-packed"),
    ]
    for command, args, message in cases:
        r = runner.invoke(command, args)
        assert isinstance(r.exception, SizewiseError), (args, r.output)
        assert message in str(r.exception) and "\n" not in str(r.exception)


def test_cli_lossy_flag_says_so(half_dirs, tmp_path):
    r = CliRunner().invoke(pack, [str(half_dirs["float32"]), "--lossless", "--dtype", "bfloat16", "--allow-lossy",
                                  "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "LOSSY: float32 -> bfloat16 rounding" in r.output


def test_cli_packs_an_artifact(rtn_artifact, tmp_path):
    r = CliRunner().invoke(pack, [str(rtn_artifact), "--lossless", "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "integer codes" in r.output
    r = CliRunner().invoke(unpack, [str(tmp_path / "p"), "-o", str(tmp_path / "u")])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    from sizewise import artifact
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    expected = artifact.load_weights(rtn_artifact)
    for name, t in plain.state_dict().items():
        assert torch.equal(t, expected[name]), name


def test_sources_load_reads_packed_directories(half_dirs, tmp_path):
    import inspect

    from sizewise import sources

    if "is_packed_model" not in inspect.getsource(sources.load):
        pytest.skip("sources.load does not dispatch to lossless packing yet")
    src = half_dirs["llama", torch.bfloat16]
    lm.pack_model(src, tmp_path / "p")
    loaded = sources.load(str(tmp_path / "p"))
    assert loaded.info["kind"] == "lossless"
    ref = reference(src, torch.float32)   # sources give float32; bf16 -> float32 is exact
    assert_same_state(ref.state_dict(), loaded.model.state_dict())


def test_info_reads_packed_directories(rtn_artifact, half_dirs, tmp_path, capsys):
    from sizewise import api
    from sizewise.cli import main

    lm.pack_artifact(rtn_artifact, tmp_path / "pa")
    plain, packed = api.info(rtn_artifact), api.info(tmp_path / "pa")
    assert packed["layers"] == plain["layers"] and packed["bits_per_weight"] == plain["bits_per_weight"]
    assert packed["file_bytes"] == (tmp_path / "pa" / lm.WEIGHTS).stat().st_size < plain["file_bytes"]
    lm.pack_model(half_dirs["llama", torch.bfloat16], tmp_path / "pm")
    m = api.info(tmp_path / "pm")
    assert m["bits_per_weight"] is None and m["layers"] and all(r["bits_per_weight"] < 16.5 for r in m["layers"])
    assert m["lossless"]["ratio"] < 1
    assert main(["info", str(tmp_path / "pm")]) == 0
    out = capsys.readouterr().out
    assert "lossless-packed" in out and "bits/param" in out
