"""A tokenizer as llama.cpp's tokenizer keys, by tokenizer kind (not model family):

- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): llama.cpp's "gpt2" model, with its merges;
- SentencePiece BPE as transformers' fast tokenizers hold it (Llama 2, Mistral, Gemma, Phi-3: a BPE
  with byte fallback over "▁"-marked pieces): llama.cpp's "llama" model, with scores and token types.
  The fast tokenizer has no SentencePiece scores, only merges ordered by them (transformers'
  converter ranks the merges by the score of the piece each makes), so a piece's score here is
  minus the rank of the first merge making it: the same merge order llama.cpp's SentencePiece
  tokenizer (highest score first) then follows.

Anything else (Unigram, WordPiece) is refused with one line. Tokens are padded to the model's vocab
size with unused "[PADn]" tokens, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import TokenType

from ..errors import SizewiseError


def backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SizewiseError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    return json.loads(backend.to_str())


def _find(node, type_name: str) -> dict | None:
    """The first component of this type in a tokenizer.json subtree (sequences included)."""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return node
        node = list(node.values())
    if isinstance(node, list):
        return next((f for v in node if (f := _find(v, type_name)) is not None), None)
    return None


def _mentions(node, type_name: str) -> bool:
    return _find(node, type_name) is not None


def _adds_space_prefix(spec: dict) -> bool:
    """Llama 2's normalizer prepends "▁" (or a Metaspace pre-tokenizer does); Gemma's does not."""
    metaspace = _find(spec.get("pre_tokenizer"), "Metaspace")
    return _mentions(spec.get("normalizer"), "Prepend") or (
        metaspace is not None and metaspace.get("prepend_scheme", "always") != "never")


def _kind(spec: dict) -> str:
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and not _mentions(spec.get("pre_tokenizer"), "ByteLevel"):
        return "llama"
    if model.get("type") == "BPE" and (_mentions(spec.get("pre_tokenizer"), "ByteLevel")
                                       or _mentions(spec.get("decoder"), "ByteLevel")):
        return "gpt2"
    raise SizewiseError("GGUF export supports byte-level BPE (llama.cpp 'gpt2') and SentencePiece-style BPE "
                        f"with byte fallback (llama.cpp 'llama') tokenizers; this one is {model.get('type')!r} "
                        f"{'with' if model.get('byte_fallback') else 'without'} byte fallback")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _scores(model: dict, by_id: dict[int, str]) -> dict[int, float]:
    """-rank of the first merge making each piece; 0 for pieces no merge makes (characters, bytes,
    specials: never the result of a merge, so their score is never compared)."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(_merges(model)):
        left, right = merge.split(" ", 1)
        first.setdefault(left + right, rank)
    return {i: -float(first[t]) if t in first else 0.0 for i, t in by_id.items()}


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's tokenizer keys: model, tokens padded to the model's vocab size, their types (and
    scores or merges by kind), special ids, whether BOS/EOS (and for "llama" a space prefix) are
    added, chat template."""
    spec = backend_json(tokenizer)
    kind, model = _kind(spec), spec.get("model") or {}
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise SizewiseError(f"the tokenizer has ids beyond the model's vocab size {vocab_size}")
    added = {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows the embedding has and the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(int(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED))
        elif kind == "llama" and i == tokenizer.unk_token_id:
            types.append(int(TokenType.UNKNOWN))
        elif kind == "llama" and len(by_id[i]) == 6 and by_id[i].startswith("<0x") and by_id[i].endswith(">"):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.NORMAL))

    meta: dict[str, Any] = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": tokens}
    if kind == "llama":
        scores = _scores(model, by_id)
        meta["tokenizer.ggml.scores"] = [scores.get(i, -1e9) for i in range(vocab_size)]
        meta["tokenizer.ggml.token_type"] = types
    else:
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.merges"] = _merges(model)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "unknown": tokenizer.unk_token_id, "padding": tokenizer.pad_token_id}
    for key, value in ids.items():
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    # Whether BOS/EOS are added is read from what the tokenizer does, not from flags it may not have.
    probe = tokenizer("a")["input_ids"]
    meta["tokenizer.ggml.add_bos_token"] = bool(probe and ids["bos"] is not None and probe[0] == ids["bos"])
    meta["tokenizer.ggml.add_eos_token"] = bool(len(probe) > 1 and ids["eos"] is not None and probe[-1] == ids["eos"])
    if kind == "llama":
        meta["tokenizer.ggml.add_space_prefix"] = _adds_space_prefix(spec)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta
