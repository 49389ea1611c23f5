"""Tiny random causal LMs built from configs (no downloads), one per supported family.

Each config is named by its family (`sizewise.families`) or by a model type that family covers;
tests/test_families.py checks that every registered family has one here."""

from __future__ import annotations

import json

import torch
import transformers as tf

HIDDEN, INTER, LAYERS, VOCAB = 64, 128, 2, 320

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=512, tie_word_embeddings=True),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=512),
    "mistral": lambda: tf.MistralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=512),
    "gemma3": lambda: tf.Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          vocab_size=VOCAB, max_position_embeddings=512, sliding_window=32),
    "gemma2": lambda: tf.Gemma2Config(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      vocab_size=VOCAB, max_position_embeddings=512, sliding_window=32),
    "gemma": lambda: tf.GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    vocab_size=VOCAB, max_position_embeddings=512),
    "qwen3": lambda: tf.Qwen3Config(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    vocab_size=VOCAB, max_position_embeddings=512),
    "phi3": lambda: tf.Phi3Config(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=512, bos_token_id=1, eos_token_id=2),
    "opt": lambda: tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=512, word_embed_proj_dim=HIDDEN),
}


# vocab: embedding rows past the tokenizer's (as real models have; Qwen2's tokenizer class adds one)
COMMON = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB + 16, max_position_embeddings=384, rms_norm_eps=3e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# One per family GGUF export writes (llama3: Llama with Llama 3's rope), non-default wherever the
# family has a value llama.cpp reads: rope theta, head_dim ≠ hidden/heads, eps, context, soft-caps,
# sliding windows, linear/llama3 rope scaling, untied heads.
FAMILY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "llama3": lambda: tf.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=None, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    "qwen2": lambda: tf.Qwen2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=24, query_pre_attn_scalar=24, sliding_window=4,
                                      attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                                      rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    "gemma3": lambda: tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6}, head_dim=24, query_pre_attn_scalar=24,
                                          sliding_window=4, final_logit_softcapping=10.0, rope_parameters={
                                              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 300000.0},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": lambda: tf.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=128,
                                  rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    # Phi-3.5's LongRoPE, with an original context (32) shorter than the test windows: the long factors run
    "phi3_longrope": lambda: tf.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                           original_max_position_embeddings=32, rope_parameters={
                                               "rope_type": "longrope", "rope_theta": 20000.0,
                                               "long_factor": [1.0 + i / 4 for i in range(8)],
                                               "short_factor": [1.0 + i / 32 for i in range(8)]}),
}


def perturbed_model(cfg):
    """A random model whose norms and biases are not their init values (ones/zeros), so that a norm
    offset or a dropped bias shows in the logits."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 +
               "Quantization maps weights to a small grid; calibration text tells which errors matter. " * 3 +
               "Perplexity is the exponential of the mean negative log-likelihood per token.\n\n") * 4


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, so tests need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny(family: str, path, seed: int = 0):
    """Write a tiny random model of `family` with its tokenizer as a Hugging Face directory."""
    model = tiny_model(family, seed)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_spm_tokenizer(space_prefix: bool = False):
    """A SentencePiece-style fast tokenizer as transformers holds Gemma's or Llama 2's: BPE over
    "▁"-marked pieces with byte fallback (<0x00>..<0xFF> in the vocabulary), BOS added; Llama 2's
    prepends "▁" (`space_prefix`), Gemma's does not."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    norm = normalizers.Replace(" ", "▁")
    if space_prefix:
        norm = normalizers.Sequence([normalizers.Prepend("▁"), norm])
    trained = Tokenizer(models.BPE())
    trained.normalizer = norm
    trained.train_from_iterator(SAMPLE_TEXT.splitlines(), trainers.BpeTrainer(vocab_size=70, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def assert_engine_walk_equals_forward(model, arch, x: torch.Tensor) -> None:
    """The engine's layer-by-layer walk ends at exactly the last decoder layer's output of a plain forward."""
    from sizewise.engine import capture_final_hidden

    got = capture_final_hidden(model, arch, x, batch=2)
    seen = []
    handle = arch.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(x, use_cache=False)
    handle.remove()
    assert torch.equal(got, seen[0])

