"""GGUF export: block types bit-exact against gguf's own dequantizer, and a tiny Llama written whole.

Everything here is offline and small: random tensors, a tiny random LlamaForCausalLM and a
byte-level BPE tokenizer built in memory.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from sizewise.errors import SizewiseError
from sizewise.export.gguf import rope_row_order, tensor_payload, write_gguf
from sizewise.quant.formats import FloatFormat
from sizewise.quant.grid import decode, encode
from sizewise.quant.uniform import QuantFormat, fit_ggml, rtn, rtn_ggml

from sizewise.quant.kquant import (
    KQuantFormat,
    KQuantGrid,
    KQuantTensor,
    kquant_decode,
    kquant_encode,
    kquant_fit,
    kquant_rtn,
    surrogate_format,
)

G = gguf.GGMLQuantizationType

# the format protocol under the names these tests were written with

def to_ggml_bytes(qt):
    return qt.fmt.ggml_blocks(qt)


def ggml_type_for(fmt):
    return None if fmt.ggml_type is None else G[fmt.ggml_type]


def kquant_from_ggml_bytes(data, fmt, shape):
    return fmt.from_ggml_blocks(data, shape)


kquant_to_ggml_bytes = to_ggml_bytes
ggml_bytes = tensor_payload

BLOCK32 = {
    "Q8_0": QuantFormat(8, 32, symmetric=True),
    "Q4_0": QuantFormat(4, 32, symmetric=True),
    "Q4_1": QuantFormat(4, 32, zero="float16"),
    "Q5_0": QuantFormat(5, 32, symmetric=True),
    "Q5_1": QuantFormat(5, 32, zero="float16"),
}
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def bits_equal(a, b) -> bool:
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    b = np.ascontiguousarray(np.asarray(b, dtype=np.float32))
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def awkward_weights(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights plus the cases that break fits: a zero row, a constant row, an all-positive
    row, outliers, values of very different magnitude from row to row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[0] = 0
    w[1] = 0.25
    w[2] = w[2].abs() + 0.1
    w[3, ::37] *= 40
    w[4] *= 1e-3
    w[5] *= 300
    return w


def write_one(tmp_path, data: np.ndarray, ggml_type) -> gguf.ReaderTensor:
    """A minimal GGUF holding one tensor, read back with gguf's reader."""
    path = tmp_path / f"one_{G(ggml_type).name}.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("t", data, raw_dtype=ggml_type if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = gguf.GGUFReader(path).tensors
    return t


# --- 32-weight blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", list(BLOCK32))
@pytest.mark.parametrize("fitter", ["grid", "ggml"])
def test_block32_file_round_trip_is_bit_exact(tmp_path, type_name, fitter):
    fmt = BLOCK32[type_name]
    w = awkward_weights(8, 128)
    qt = rtn_ggml(w, fmt) if fitter == "ggml" else rtn(w, fmt)
    data = to_ggml_bytes(qt)
    assert ggml_type_for(fmt) == G[type_name]
    t = write_one(tmp_path, data, G[type_name])
    assert t.tensor_type == G[type_name]
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    assert bits_equal(got, qt.dequantize().numpy())


@pytest.mark.parametrize("type_name", list(BLOCK32))
def test_block32_every_code_lands_where_ggml_reads_it(type_name):
    """Random codes over the whole range and random scales/mins (not just what a fit produces)."""
    fmt = BLOCK32[type_name]
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, fmt.qmax + 1, (4, 64), generator=g, dtype=torch.uint8)
    scales = (torch.randn(4, 2, generator=g) * 0.05).half()
    zeros = None if fmt.symmetric else (torch.randn(4, 2, generator=g)).half()
    from sizewise.quant.uniform import QuantizedTensor

    qt = QuantizedTensor(fmt, codes, scales, zeros)
    data = to_ggml_bytes(qt)
    assert bits_equal(gguf.quants.dequantize(data, G[type_name]), qt.dequantize().numpy())


def test_stored_bits_equal_ggml_block_bytes():
    w = awkward_weights(6, 512)
    for type_name, fmt in BLOCK32.items():
        data = to_ggml_bytes(rtn(w, fmt))
        assert fmt.stored_bits(6, 512) == data.size * 8, type_name
        assert data.size == gguf.quants.quant_shape_to_byte_shape((6, 512), G[type_name])[1] * 6
    for type_name in KQUANTS:
        kt = kquant_rtn(w, KQuantFormat(type_name))
        data = kquant_to_ggml_bytes(kt)
        assert kt.stored_bits() == KQuantFormat(type_name).stored_bits(6, 512) == data.size * 8
        assert data.size == gguf.GGML_QUANT_SIZES[G[type_name]][1] * 2 * 6


def test_formats_without_an_exact_gguf_type():
    assert ggml_type_for(QuantFormat(4, 32, zero="int")) is None       # int zero point: offset rounds
    assert ggml_type_for(QuantFormat(4, 64, symmetric=True)) is None   # group size
    assert ggml_type_for(QuantFormat(4, 32, symmetric=True, scale_dtype="bfloat16")) is None
    assert ggml_type_for(QuantFormat(3, 32, symmetric=True)) is None
    assert ggml_type_for(QuantFormat(8, 32, zero="float16")) is None
    assert ggml_type_for(FloatFormat("bfloat16")) == G.BF16
    with pytest.raises(SizewiseError):
        to_ggml_bytes(rtn(torch.randn(2, 64), QuantFormat(4, 32, zero="int")))


def test_ggml_scale_choice_is_more_accurate_at_4_bits():
    """ggml's d = max/-8 (signed) beats grid.fit's 2*amax/15 on Gaussian weights (measured ~9%)."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))
    fmt = BLOCK32["Q4_0"]
    err_grid = (rtn(w, fmt).dequantize() - w).pow(2).mean()
    err_ggml = (rtn_ggml(w, fmt).dequantize() - w).pow(2).mean()
    assert err_ggml < 0.9 * err_grid
    scale, zero = fit_ggml(w.reshape(64, -1, 32), fmt)
    assert zero is None and torch.equal(scale, scale.half().float()) and (scale != 0).all()


# --- k-quants ---------------------------------------------------------------------------------


def random_grid(fmt: KQuantFormat, out: int, inp: int, seed: int = 0) -> KQuantTensor:
    """Parameters over their whole stored ranges, to check every bit position of the packing."""
    g = torch.Generator().manual_seed(seed)
    k = fmt.spec.lbits
    lo, hi = (-(1 << (k - 1)), (1 << (k - 1)) - 1) if fmt.symmetric else (0, (1 << k) - 1)
    sup, sub = inp // 256, inp // fmt.sub_size
    grid = KQuantGrid(
        fmt,
        d=(torch.randn(out, sup, generator=g) * 0.01).half(),
        dmin=None if fmt.symmetric else (torch.rand(out, sup, generator=g) * 0.01).half(),
        scales=torch.randint(lo, hi + 1, (out, sub), generator=g, dtype=torch.int16),
        mins=None if fmt.symmetric else torch.randint(0, hi + 1, (out, sub), generator=g, dtype=torch.int16),
    )
    codes = torch.randint(0, fmt.qmax + 1, (out, inp), generator=g, dtype=torch.uint8)
    return KQuantTensor(grid, codes)


@pytest.mark.parametrize("type_name", KQUANTS)
def test_kquant_packing_matches_ggml_layout(type_name):
    kt = random_grid(KQuantFormat(type_name), 4, 512)
    data = kquant_to_ggml_bytes(kt)
    assert bits_equal(gguf.quants.dequantize(data, G[type_name]), kt.dequantize().numpy())
    assert KQuantFormat(type_name).block_bytes == gguf.GGML_QUANT_SIZES[G[type_name]][1]
    # unpacking is the exact inverse: the same grid and codes, and packing them again the same bytes
    back = kquant_from_ggml_bytes(data, KQuantFormat(type_name), (4, 512))
    assert torch.equal(back.codes, kt.codes) and torch.equal(back.grid.scales, kt.grid.scales)
    assert torch.equal(back.grid.d.view(torch.int16), kt.grid.d.view(torch.int16))
    assert (back.grid.mins is None) == (kt.grid.mins is None)
    if kt.grid.mins is not None:
        assert torch.equal(back.grid.mins, kt.grid.mins)
        assert torch.equal(back.grid.dmin.view(torch.int16), kt.grid.dmin.view(torch.int16))
    assert np.array_equal(kquant_to_ggml_bytes(back), data)
    noise = np.random.default_rng(0).integers(0, 256, data.shape, dtype=np.uint8)   # any bytes at all
    assert np.array_equal(kquant_to_ggml_bytes(kquant_from_ggml_bytes(noise, KQuantFormat(type_name), (4, 512))),
                          noise)
    with pytest.raises(SizewiseError):
        kquant_from_ggml_bytes(data[:, 1:], KQuantFormat(type_name), (4, 512))


@pytest.mark.parametrize("type_name", KQUANTS)
def test_kquant_fit_file_round_trip_is_bit_exact(tmp_path, type_name):
    fmt = KQuantFormat(type_name)
    w = awkward_weights(8, 512)
    kt = kquant_rtn(w, fmt)
    # the stored integers are inside their ranges and the effective scale is never zero
    scale, zero = kt.grid.effective()
    assert (scale != 0).all() and torch.isfinite(scale).all()
    assert (zero is None) == fmt.symmetric
    data, ggml_type = ggml_bytes(kt)
    t = write_one(tmp_path, data, ggml_type)
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    assert bits_equal(got, kt.dequantize().numpy())
    assert float((kt.dequantize()[0]).abs().max()) == 0.0  # a zero row stays exactly zero
    # a fit is accurate: error well under the weights' own spread on the Gaussian rows
    rel = (kt.dequantize()[6:] - w[6:]).pow(2).mean() / w[6:].pow(2).mean()
    assert rel < {2: 0.12, 3: 0.03, 4: 0.01, 5: 0.0025, 6: 0.0007}[fmt.bits]


@pytest.mark.parametrize("type_name", KQUANTS)
def test_kquant_fit_beats_naive_min_max(type_name):
    """The searched fit is no worse than min/max sub-blocks with scales rounded by max (rounds=0
    still searches; compare with a hand-rolled naive grid built through the public types)."""
    fmt = KQuantFormat(type_name)
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(3))
    fitted = (kquant_rtn(w, fmt).dequantize() - w).pow(2).mean()
    unrefined = (kquant_rtn(w, fmt, rounds=0).dequantize() - w).pow(2).mean()
    assert fitted <= unrefined
    # naive: per sub-block min/max, integer scales relative to the largest
    x = w.reshape(32, -1, fmt.sub_size)
    k = (1 << fmt.spec.lbits) - 1
    if fmt.symmetric:
        h = 1 << (fmt.bits - 1)
        s = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) / -h
        sup = s.reshape(32, -1, 256 // fmt.sub_size)
        d = (sup.gather(-1, sup.abs().argmax(-1, keepdim=True)).squeeze(-1) / -((k + 1) // 2)).half()
        ls = (sup / d.float()[..., None]).round().clamp(-((k + 1) // 2), k // 2)
        ls = torch.where(ls == 0, torch.ones_like(ls), ls)
        grid = KQuantGrid(fmt, d, None, ls.reshape(32, -1).short(), None)
    else:
        lo = x.amin(-1).clamp(max=0)
        s, m = ((x.amax(-1) - lo) / fmt.qmax).reshape(32, 4, -1), (-lo).reshape(32, 4, -1)
        d, dmin = (s.amax(-1) / k).half(), (m.amax(-1) / k).half()
        ls = (s / d.float()[..., None]).round().clamp(1, k)
        lm = (m / dmin.float()[..., None]).round().clamp(0, k)
        grid = KQuantGrid(fmt, d, dmin, ls.reshape(32, -1).short(), lm.reshape(32, -1).short())
    naive = (kquant_decode(kquant_encode(w, grid), grid) - w).pow(2).mean()
    assert fitted < naive


def test_kquant_importance_weights_the_error():
    fmt = KQuantFormat("Q3_K")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 512, generator=g)
    imp = torch.rand(512, generator=g) ** 4 * 100  # a few channels matter far more
    def weighted(kt):
        return float(((kt.dequantize() - w) ** 2 * imp).mean())
    assert weighted(kquant_rtn(w, fmt, imp)) < weighted(kquant_rtn(w, fmt))
    with pytest.raises(SizewiseError):
        kquant_fit(w, fmt, torch.ones(256))


def test_kquant_effective_grid_drives_column_wise_encoding():
    """GPTQ rounds one column at a time against a fixed grid: per-weight scale/zero with grid.encode
    and grid.decode (surrogate format) give the same codes and values as the k-quant itself."""
    fmt = KQuantFormat("Q4_K")
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    kt = kquant_rtn(w, fmt)
    scale, zero = kt.grid.per_weight()
    sf = surrogate_format(fmt)
    j = 77
    codes = encode(w[:, j], scale[:, j], zero[:, j], sf)
    assert torch.equal(codes, kt.codes[:, j])
    assert bits_equal(decode(codes, scale[:, j], zero[:, j], sf).numpy(), kt.dequantize()[:, j].numpy())


def test_kquant_rows_must_be_multiples_of_256():
    fmt = KQuantFormat("Q4_K")
    with pytest.raises(SizewiseError) as e:
        fmt.check(576, "model.layers.0.mlp.up_proj")
    msg = str(e.value)
    assert "\n" not in msg and "576" in msg and "256" in msg and "up_proj" in msg
    with pytest.raises(SizewiseError):
        kquant_rtn(torch.randn(4, 576), fmt)
    with pytest.raises(SizewiseError):
        fmt.stored_bits(4, 576)
    with pytest.raises(SizewiseError):
        KQuantFormat("Q7_K")
    assert fmt.to_dict() == {"kind": "kquant", "type_name": "Q4_K"}
    assert fmt.bits_per_weight == 4.5


# --- a whole model ----------------------------------------------------------------------------


def tiny_tokenizer():
    """A byte-level BPE with a few merges, three special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<s>", "</s>"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o")]
    vocab = {t: i for i, t in enumerate(specials + alphabet + ["Ġt", "he", "Ġthe", "lo"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    return tok


def tiny_llama(tied: bool, vocab_size: int = 272):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return cfg, model


PLAN = {  # one of every kind of choice
    "model.embed_tokens.weight": KQuantFormat("Q6_K"),
    "model.layers.0.self_attn.q_proj.weight": KQuantFormat("Q4_K"),
    "model.layers.0.self_attn.k_proj.weight": BLOCK32["Q5_0"],
    "model.layers.0.self_attn.v_proj.weight": KQuantFormat("Q2_K"),
    "model.layers.0.self_attn.o_proj.weight": KQuantFormat("Q3_K"),
    "model.layers.0.mlp.gate_proj.weight": BLOCK32["Q4_1"],
    "model.layers.0.mlp.up_proj.weight": BLOCK32["Q4_0"],
    "model.layers.0.mlp.down_proj.weight": KQuantFormat("Q5_K"),
    "model.layers.1.self_attn.q_proj.weight": BLOCK32["Q8_0"],
    "model.layers.1.self_attn.k_proj.weight": torch.float16,
    "model.layers.1.self_attn.v_proj.weight": BLOCK32["Q5_1"],
    "model.layers.1.mlp.gate_proj.weight": torch.bfloat16,
    "lm_head.weight": BLOCK32["Q8_0"],
}
EXPECTED_TYPES = {
    "token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_0",
    "blk.0.attn_v.weight": "Q2_K", "blk.0.attn_output.weight": "Q3_K", "blk.0.ffn_gate.weight": "Q4_1",
    "blk.0.ffn_up.weight": "Q4_0", "blk.0.ffn_down.weight": "Q5_K", "blk.0.attn_norm.weight": "F32",
    "blk.0.ffn_norm.weight": "F32", "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "F16",
    "blk.1.attn_v.weight": "Q5_1", "blk.1.attn_output.weight": "F32", "blk.1.ffn_gate.weight": "BF16",
    "blk.1.ffn_up.weight": "F32", "blk.1.ffn_down.weight": "F32", "blk.1.attn_norm.weight": "F32",
    "blk.1.ffn_norm.weight": "F32", "output_norm.weight": "F32",
}


def compress(model, tied: bool):
    """(weights for the writer, the float state the file must reproduce)."""
    weights, values = {}, {}
    for name, v in model.state_dict().items():
        choice = PLAN.get(name)
        if tied and name == "lm_head.weight":
            continue
        if choice is None:
            weights[name], values[name] = v, v
        elif isinstance(choice, torch.dtype):
            weights[name], values[name] = v.to(choice), v.to(choice).float()
        elif isinstance(choice, KQuantFormat):
            kt = kquant_rtn(v, choice)
            weights[name], values[name] = kt, kt.dequantize()
        else:
            qt = rtn_ggml(v, choice) if choice.symmetric else rtn(v, choice)
            weights[name], values[name] = qt, qt.dequantize()
    if tied:
        values["lm_head.weight"] = values["model.embed_tokens.weight"]
    return weights, values


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg, model = tiny_llama(tied=True)
    tok = tiny_tokenizer()
    weights, values = compress(model, tied=True)
    out = tmp_path_factory.mktemp("gguf")
    path = write_gguf(out / "tiny.gguf", cfg, weights, tok, tokenizer_pre="gpt-2", name="tiny test",
                      metadata={"general.license": "apache-2.0"})
    return cfg, tok, values, path


def field(reader, key):
    return reader.fields[key].contents()


def test_export_metadata_names_and_types(exported):
    cfg, tok, values, path = exported
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.name") == "tiny test"
    assert field(r, "general.license") == "apache-2.0"
    assert field(r, "llama.block_count") == 2
    assert field(r, "llama.embedding_length") == 256
    assert field(r, "llama.feed_forward_length") == 512
    assert field(r, "llama.context_length") == 128
    assert field(r, "llama.attention.head_count") == 4
    assert field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "llama.rope.dimension_count") == 64
    assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "llama.vocab_size") == 272
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 272
    assert tokens[:3] == ["<|endoftext|>", "<s>", "</s>"] and types[:3] == [3, 3, 3]
    the = tok.get_vocab()["Ġthe"]
    assert tokens[the] == "Ġthe" and types[the] == 1
    assert tokens[-1] == "[PAD271]" and types[-1] == 5  # embedding rows past the tokenizer
    assert field(r, "tokenizer.ggml.merges") == ["Ġ t", "h e", "Ġt he", "l o"]
    assert field(r, "tokenizer.ggml.bos_token_id") == 1
    assert field(r, "tokenizer.ggml.eos_token_id") == 2
    assert field(r, "tokenizer.ggml.padding_token_id") == 0
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    got = {t.name: t.tensor_type.name for t in r.tensors}
    assert got == EXPECTED_TYPES  # tied: no output.weight
    assert not list(path.parent.glob(".*tmp"))  # the temporary file was renamed away


def test_export_tensors_read_back_bit_exact(exported):
    cfg, _, values, path = exported
    from sizewise.export.gguf import gguf_tensor_name

    by_gguf = {gguf_tensor_name(n, 2): n for n in values if n != "lm_head.weight"}
    heads = {"attn_q": 4, "attn_k": 2}
    for t in gguf.GGUFReader(path).tensors:
        want = values[by_gguf[t.name]].numpy()
        kind = t.name.split(".")[-2]
        if kind in heads:
            want = want[rope_row_order(want.shape[0], heads[kind])]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert bits_equal(got, want), t.name


def test_export_loads_in_transformers_with_identical_logits(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cfg, tok, values, path = exported
    reference = LlamaForCausalLM(cfg).eval()
    reference.load_state_dict(values)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert loaded.config.tie_word_embeddings
    ids = torch.tensor([[1, 260, 78, 262, 100, 5, 262, 3, 40]])
    with torch.no_grad():
        a, b = reference(ids).logits, loaded(ids).logits
    assert torch.equal(a, b)  # same weights bit for bit, same code: same logits
    tok2 = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "hello the lot</s> world"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]


def test_untied_model_writes_output(tmp_path):
    cfg, model = tiny_llama(tied=False)
    weights, _ = compress(model, tied=False)
    path = write_gguf(tmp_path / "untied.gguf", cfg, weights, tiny_tokenizer())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == "Q8_0"
    assert "tokenizer.ggml.pre" not in gguf.GGUFReader(path).fields


def test_rope_row_order_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(48, 5)  # 3 heads of 16 rows
    permuted = rows[rope_row_order(48, 3)]
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted, 3, 3)
    assert np.array_equal(back, rows)
    assert not np.array_equal(permuted, rows)


def test_export_refuses_what_it_cannot_write(tmp_path):
    from transformers import GPT2Config

    cfg, model = tiny_llama(tied=True)
    sd = model.state_dict()
    with pytest.raises(SizewiseError, match="GGUF export supports: llama"):
        write_gguf(tmp_path / "x.gguf", GPT2Config(), sd)
    partial = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(SizewiseError, match="missing"):
        write_gguf(tmp_path / "x.gguf", cfg, partial)
    with pytest.raises(SizewiseError, match="no place"):
        write_gguf(tmp_path / "x.gguf", cfg, {**sd, "model.extra.weight": torch.zeros(2, 2)})
    bad = dict(sd)
    bad["model.layers.0.mlp.up_proj.weight"] = rtn(sd["model.layers.0.mlp.up_proj.weight"], QuantFormat(4, 64))
    with pytest.raises(SizewiseError):
        write_gguf(tmp_path / "x.gguf", cfg, bad)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
