"""Evaluation in chunks of positions: the same numbers as one log-softmax over the whole window."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from sizewise.data import Text, eval_windows
from sizewise.evaluate import evaluate_many
from tiny import CONFIGS, VOCAB, tiny_model

TEXT = Text("t", Path("t"), "0" * 64, "x")


def _whole_window(model, reference, windows):
    """The unchunked computation: every position's logits and log-softmax at once."""
    nll = kl = agree = 0.0
    for x, first in zip(windows.inputs, windows.score_from):
        logp = F.log_softmax(model(input_ids=x).logits[0].float()[first:-1], -1)
        ref = F.log_softmax(reference(input_ids=x).logits[0].float()[first:-1], -1)
        t = x[0, first + 1:]
        nll -= logp.gather(1, t[:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
    n = windows.tokens_scored
    return {"nll": nll / n, "kl": kl / n, "agree": agree / n}


def _softcapped_gemma2(seed):
    torch.manual_seed(seed)
    cfg = tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
                          final_logit_softcapping=0.02)  # small cap: the post-head transform changes the numbers
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
@torch.no_grad()
def test_chunked_equals_whole_window(family):
    make = _softcapped_gemma2 if family == "gemma2" else (lambda seed: tiny_model(family, seed))
    model, reference = make(0), make(1)
    tokens = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(tokens, 64, 48, 3)         # overlapping windows: scoring starts mid-window
    want = _whole_window(model, reference, windows)
    for elements in (VOCAB * 5, VOCAB * 64, 10**9):   # 5 positions per chunk, one chunk, one chunk
        res = evaluate_many({"m": model}, windows, TEXT, reference=reference, progress=False,
                            chunk_elements=elements)
        m = res["m"]
        assert m["tokens"] == windows.tokens_scored
        assert m["nll_per_token"] == pytest.approx(want["nll"], rel=1e-5)
        assert m["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
        assert m["top1_agreement"] == pytest.approx(want["agree"], abs=1e-9)
        assert sum(w["tokens"] for w in m["per_window"]) == windows.tokens_scored
        assert math.isclose(sum(w["nll"] for w in m["per_window"]) / m["tokens"], want["nll"], rel_tol=1e-5)
    # the decoders' forwards are themselves again afterwards
    assert "forward" not in vars(model.get_decoder()) and "forward" not in vars(reference.get_decoder())


@torch.no_grad()
def test_softcapping_is_applied():
    """The chunked path goes through the model's own forward after the head (Gemma 2's soft-cap)."""
    model = _softcapped_gemma2(0)
    tokens = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    windows = eval_windows(tokens, 64, None, 1)
    res = evaluate_many({"m": model}, windows, TEXT, progress=False, chunk_elements=VOCAB * 7)["m"]
    model.config.final_logit_softcapping = None
    uncapped = evaluate_many({"m": model}, windows, TEXT, progress=False)["m"]
    assert res["nll_per_token"] != pytest.approx(uncapped["nll_per_token"], rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
@torch.no_grad()
def test_bfloat16_model_evaluates_as_its_float32_copy(family):
    """A model kept in bf16 computes in float32 a layer at a time: the numbers of its float32 copy."""
    stored, reference = tiny_model(family, 0).to(torch.bfloat16), tiny_model(family, 1)
    upcast = tiny_model(family, 0).to(torch.bfloat16).float()
    tokens = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(tokens, 64, None, 2)
    got = evaluate_many({"m": stored}, windows, TEXT, reference=reference, progress=False, chunk_elements=VOCAB * 9)
    want = evaluate_many({"m": upcast}, windows, TEXT, reference=reference, progress=False)
    assert got["m"]["nll_per_token"] == pytest.approx(want["m"]["nll_per_token"], rel=1e-6)
    assert got["m"]["kl"] == pytest.approx(want["m"]["kl"], rel=1e-5)
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())      # and it is still stored in bf16
