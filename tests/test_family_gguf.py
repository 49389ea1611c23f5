"""Every family end to end: a tiny random model with non-default config values wherever the family
allows them → compress (RTN, GPTQ; AWQ and rotation where the family allows them) → eval → GGUF →
read back with `gguf` (metadata equal to the config's) → loaded back by transformers, whose logits
must equal the artifact's (wrong tensor names, permutations or norm offsets would not)."""

from __future__ import annotations

import math

import gguf
import pytest
import torch
import transformers as tf

from sizewise import artifact, families
from sizewise.cli import main
from sizewise.errors import SizewiseError
from sizewise.export.gguf import file_names, write_gguf
from tiny import FAMILY_CONFIGS as CONFIGS
from tiny import LLAMA3_ROPE, SAMPLE_TEXT, assert_engine_walk_equals_forward, perturbed_model, tiny_tokenizer

def expected_metadata(cfg) -> dict:
    """The keys llama.cpp's converter writes for this config, written out per architecture."""
    arch = families.of(cfg).gguf.arch
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    keys = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "rope.freq_base": rope["rope_theta"]}
    if rope["rope_type"] == "linear":
        keys |= {"rope.scaling.type": "linear", "rope.scaling.factor": rope["factor"]}
    if arch in ("llama", "phi3"):
        keys["rope.dimension_count"] = head_dim
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or arch in ("qwen3", "gemma2", "gemma3"):
        keys |= {"attention.key_length": head_dim, "attention.value_length": head_dim}
    if arch == "gemma2":
        keys |= {"attn_logit_softcapping": cfg.attn_logit_softcapping, "sliding_window": cfg.sliding_window}
    if arch in ("gemma2", "gemma3"):
        keys |= {"final_logit_softcapping": cfg.final_logit_softcapping, "attention.sliding_window": cfg.sliding_window}
        keys.pop("sliding_window", None)
    if arch == "phi3":
        keys |= {"rope.scaling.original_context_length": cfg.original_max_position_embeddings,
                 "attention.sliding_window": 0}
    if rope["rope_type"] == "longrope":   # transformers' attention factor for a 384 / 32 extension
        keys["rope.scaling.attn_factor"] = math.sqrt(1 + math.log(384 / 32) / math.log(32))
    return {f"{arch}.{k}": v for k, v in keys.items()}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tok = tiny_tokenizer()
    dirs = {}
    for key, make in CONFIGS.items():
        perturbed_model(make()).save_pretrained(root / key)
        tok.save_pretrained(root / key)
        dirs[key] = root / key
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 10)
    dirs["text"] = text
    return dirs


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


# AWQ and rotation on one model of each distinct layer structure (llama3 and mistral share Llama's),
# the rest of their coverage is tests/test_awq.py and tests/test_rotate.py: AWQ's grid search is the
# slow part of these tests.
SAME_LAYERS_AS_LLAMA = ("llama3", "mistral", "phi3_longrope")   # (and as Phi-3's)


def methods_of(key) -> list[str]:
    fam = families.of(CONFIGS[key]())
    if key in SAME_LAYERS_AS_LLAMA:
        return ["rtn", "gptq"]
    return ["rtn", "gptq"] + (["awq+rtn"] if fam.folds else []) + (["rotate+rtn"] if fam.rotates else [])


CASES = [(key, method) for key in CONFIGS for method in methods_of(key)]


@pytest.mark.parametrize("key,method", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_family_end_to_end(key, method, family_dirs, tmp_path, capsys):
    src, text = family_dirs[key], family_dirs["text"]
    art, path = tmp_path / "art", tmp_path / f"{key}.gguf"
    cli(capsys, "compress", src, "--method", method, "--bits", 4, "--group-size", 32, "--sym", "-o", art,
        "--calib", text, "--calib-samples", 4, "--calib-len", 32, "--quiet")
    out = cli(capsys, "eval", art, "--text", text, "--ctx", 32, "--windows", 1, "--json", "--quiet")
    assert math.isfinite(float(__import__("json").loads(out)["perplexity"]))
    cli(capsys, "export", art, "--format", "gguf", "-o", path)

    cfg = tf.AutoConfig.from_pretrained(art / "hf")
    reader = gguf.GGUFReader(path)
    got = {k: f.contents() for k, f in reader.fields.items()}
    for k, want in expected_metadata(CONFIGS[key]()).items():
        assert k in got, k
        assert got[k] == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), k
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    assert ("output.weight" in types) == (not cfg.tie_word_embeddings)

    reference = artifact.load(art)[0].eval()     # the dequantized stored weights
    if cfg.model_type == "mistral":     # written as llama.cpp's `llama`, which transformers reads as Llama
        cfg = tf.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")})
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=cfg,
                                                     dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer()(SAMPLE_TEXT[:200])["input_ids"][:40]])
    with torch.no_grad():
        a, b = reference(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_llama3_rope_freqs_are_what_transformers_computes(tmp_path):
    """llama.cpp divides each rotary frequency by rope_freqs[i]: the file's factors must turn the
    default frequencies into transformers' llama3 ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = CONFIGS["llama3"]()
    path = write_gguf(tmp_path / "l3.gguf", cfg, perturbed_model(cfg).state_dict(), tiny_tokenizer())
    (freqs,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    dim = cfg.hidden_size // cfg.num_attention_heads
    base = 1.0 / (LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    factors = torch.tensor(freqs.data, dtype=torch.float32)
    assert {1.0, 8.0} < set(factors.tolist())                  # the test config reaches every branch
    torch.testing.assert_close(base / factors, scaled, rtol=1e-5, atol=0)


@pytest.mark.parametrize("key,change,why", [
    ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
    ("gemma2", {"final_logit_softcapping": None}, "always soft-caps"),
    ("gemma3", {"layer_types": ["full_attention"] * 6}, "layer_types"),
    ("gemma3", {"attn_logit_softcapping": 5.0}, "soft-cap"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding-window"),
    ("mistral", {"sliding_window": 16}, "sliding-window"),
    ("phi3", {"partial_rotary_factor": 0.5}, "rotates 0.5"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
])
def test_what_llama_cpp_would_run_differently_is_refused(key, change, why):
    cfg = CONFIGS[key]()
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(SizewiseError, match=why) as e:
        file_names(cfg, [])
    assert "\n" not in str(e.value)


def test_tokenizer_pre_is_named_from_the_split_regex(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    from sizewise.families.qwen2 import QWEN2_SPLIT

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    cfg = CONFIGS["qwen2"]()
    state = perturbed_model(cfg).state_dict()
    path = write_gguf(tmp_path / "q.gguf", cfg, state, tok)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    path = write_gguf(tmp_path / "given.gguf", cfg, state, tok, tokenizer_pre="custom")   # a given name wins
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "custom"
    path = write_gguf(tmp_path / "plain.gguf", cfg, state, tiny_tokenizer())   # unknown: none written, as before
    assert "tokenizer.ggml.pre" not in gguf.GGUFReader(path).fields


@pytest.mark.parametrize("key", list(CONFIGS))
def test_gguf_loads_back_with_the_family_config(key, tmp_path):
    """sizewise reads a GGUF through transformers, completing the config values its loader leaves at
    their defaults (Qwen3's head_dim, Gemma's soft-caps and attention scale, rope scaling, Phi-3's
    padding id): the float model comes back with identical logits."""
    from sizewise.builtins import gguf_to_hf

    cfg = CONFIGS[key]()
    model = perturbed_model(cfg)
    path = write_gguf(tmp_path / "m.gguf", cfg, model.state_dict(), tiny_tokenizer())
    gguf_to_hf(path, tmp_path / "hf")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer()(SAMPLE_TEXT[:200])["input_ids"][:40]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


@pytest.mark.parametrize("key,space_prefix", [("gemma3", False), ("phi3", True)])
def test_sentencepiece_tokenizer_as_llama_cpp_llama_model(key, space_prefix, tmp_path):
    """Gemma's and Phi-3's tokenizers (SentencePiece BPE with byte fallback) become llama.cpp's
    "llama" tokenizer: scores that merge in the fast tokenizer's order, byte and control types, the
    space prefix; transformers' GGUF tokenizer reader then tokenizes as the original does (for Phi-3
    it merges by the scores, so wrong scores fail here; for Gemma it merges in file order)."""
    from tiny import tiny_spm_tokenizer

    tok = tiny_spm_tokenizer(space_prefix)
    cfg = CONFIGS[key]()
    path = write_gguf(tmp_path / "spm.gguf", cfg, perturbed_model(cfg).state_dict(), tok)
    r = gguf.GGUFReader(path)
    got = {k: f.contents() for k, f in r.fields.items() if not k.startswith(f"{key}.")}
    assert got["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in got
    assert len(got["tokenizer.ggml.tokens"]) == len(got["tokenizer.ggml.scores"]) == cfg.vocab_size
    types, vocab = got["tokenizer.ggml.token_type"], tok.get_vocab()
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<bos>"]] == gguf.TokenType.CONTROL
    assert types[vocab["<unk>"]] == gguf.TokenType.CONTROL   # added as a special token, as in Gemma's
    assert got["tokenizer.ggml.add_space_prefix"] is space_prefix and got["tokenizer.ggml.add_bos_token"] is True
    assert got["tokenizer.ggml.bos_token_id"] == vocab["<bos>"]
    back = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ("The quick brown fox", SAMPLE_TEXT[:300], "naïve café — ü"):
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.parametrize("key", list(CONFIGS))
def test_engine_walk_keeps_the_family_conventions(key):
    """The engine's layer loop reproduces the model's forward with sliding windows shorter than the
    sequence (Gemma's 4 here), per-layer-type rope (Gemma 3), rope scaling and soft-caps in place."""
    from sizewise.arch import discover

    model = perturbed_model(CONFIGS[key]())
    arch = discover(model)
    x = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(0))
    assert_engine_walk_equals_forward(model, arch, x)
