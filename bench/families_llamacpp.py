"""Every family GGUF export writes, run in llama.cpp (issue #15's target, on tiny random models).

    .venv/bin/python bench/families_llamacpp.py [--ctx 64]

For each tiny family model of tests/tiny.py (non-default configs: rope theta and scaling, head_dim,
soft-caps, sliding windows, biases, perturbed norms): sizewise compresses it (RTN, Q4_0), exports the
artifact's dequantized weights to an F32 GGUF and the artifact itself to a Q4_0 GGUF, and llama.cpp
(out/llama-venv, see bench/llamacpp.py) computes the logits of one window of text. Both are compared
with sizewise's float evaluation of the artifact (transformers on its dequantized weights):

- F32 file, F32 KV cache: the same weights and arithmetic up to float rounding, so the difference
  is float noise where the file is right (a wrong tensor name, permutation, norm offset, rope,
  soft-cap or window shows as a difference of the logits' own size);
- Q4_0 file: llama.cpp rounds each matmul's input to 8 bits, so the difference is that rounding's.

And the tokenizer kinds: llama.cpp's tokenization of a few texts, from GGUFs holding a SentencePiece-
style tokenizer (Gemma's, no space prefix; Llama 2's / Phi-3's, with one) and, where the built-in
qwen2.5-coder-0.5b is in the cache, Qwen2.5's byte-level BPE (pre-tokenizer "qwen2"), against
transformers' ids.

Writes bench/results/families_llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model  # noqa: E402
from llamacpp import LLAMA_PY, NICE, WORKER, ensure_venv  # noqa: E402
from tiny import FAMILY_CONFIGS, SAMPLE_TEXT, perturbed_model, tiny_spm_tokenizer, tiny_tokenizer  # noqa: E402

from sizewise.builtins import cache_dir  # noqa: E402
from sizewise.cli import main as sizewise  # noqa: E402
from sizewise.export.gguf import write_gguf  # noqa: E402

TEXTS = ["The quick brown fox", "The year 12345 had 3.14159 pies; don't", "naïve café — ü  two  spaces\nnew line",
         "def f(x):\n    return x**2  # 你好"]


def run(*args) -> None:
    code = sizewise([str(a) for a in args])
    if code:
        raise SystemExit(f"sizewise {' '.join(map(str, args))} failed ({code})")


def llama_cpp_logits(gguf_path: Path, ids: np.ndarray, ref: np.ndarray, tmp: Path) -> dict:
    windows, ref_path, out = tmp / "windows.npy", tmp / "ref.npy", tmp / "out.json"
    np.save(windows, ids[None].astype(np.int32))
    np.save(ref_path, ref.astype(np.float32))
    job = {"evaluate": {"model": str(gguf_path), "windows": str(windows), "score_from": [0], "threads": 1,
                        "kv_type": "f32", "check": {"0": str(ref_path)}}, "out": str(out)}
    (tmp / "job.json").write_text(json.dumps(job))
    subprocess.run(NICE + [str(LLAMA_PY), str(WORKER), str(tmp / "job.json")], check=True)
    result = json.loads(out.read_text())
    return {**{k: result["checks"][0][k] for k in ("max_abs_diff", "mean_abs_diff", "ref_max_abs", "argmax_agreement")},
            "system_info": result.get("system_info")}


def tokenizers(tmp: Path) -> dict:
    """llama.cpp's ids vs transformers' for each tokenizer kind (a tiny model carries the vocabulary)."""
    cases = {"sentencepiece (gemma3)": ("gemma3", tiny_spm_tokenizer(False)),
             "sentencepiece, space prefix (phi3)": ("phi3", tiny_spm_tokenizer(True))}
    qwen = cache_dir() / "models" / "qwen2.5-coder-0.5b"
    if qwen.is_dir():
        cases["byte-level BPE (qwen2.5-coder-0.5b)"] = ("qwen2", tf.AutoTokenizer.from_pretrained(qwen))
    texts = TEXTS + [SAMPLE_TEXT[:1000]]
    out = {}
    for label, (key, tok) in cases.items():
        cfg = FAMILY_CONFIGS[key]()
        cfg.vocab_size = max(cfg.vocab_size, len(tok))
        path = write_gguf(tmp / f"{key}-tok.gguf", cfg, perturbed_model(cfg).state_dict(), tok)
        job = {"tokenize": {"model": str(path), "texts": texts}, "out": str(tmp / "tok.json")}
        (tmp / "job.json").write_text(json.dumps(job))
        subprocess.run(NICE + [str(LLAMA_PY), str(WORKER), str(tmp / "job.json")], check=True)
        got = json.loads((tmp / "tok.json").read_text())["ids"]
        want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        out[label] = {"texts": len(texts), "identical": sum(g == w for g, w in zip(got, want))}
        print(f"tokenizer {label}: {out[label]['identical']}/{len(texts)} texts tokenized identically", flush=True)
    return out


def family(key: str, ctx: int, tmp: Path) -> dict:
    cfg = FAMILY_CONFIGS[key]()
    src, art = tmp / "hf", tmp / "art"
    perturbed_model(cfg).save_pretrained(src)
    tok = tiny_tokenizer()
    tok.save_pretrained(src)
    text = tmp / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    run("compress", src, "--method", "rtn", "--bits", 4, "--group-size", 32, "--sym", "-o", art, "--quiet")
    run("export", art / "hf", "--format", "gguf", "--float-dtype", "float32", "-o", tmp / "f32.gguf")
    run("export", art, "--format", "gguf", "-o", tmp / "q4_0.gguf")
    ids = np.array(tok(SAMPLE_TEXT)["input_ids"][:ctx])
    model = tf.AutoModelForCausalLM.from_pretrained(art / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].numpy()
    return {"model_type": cfg.model_type, "tokens": len(ids),
            "f32": llama_cpp_logits(tmp / "f32.gguf", ids, ref, tmp),
            "q4_0": llama_cpp_logits(tmp / "q4_0.gguf", ids, ref, tmp)}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--families", default=",".join(FAMILY_CONFIGS))
    args = ap.parse_args()
    build = ensure_venv()
    results = {}
    for key in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix=f"sizewise-{key}-") as tmp:
            results[key] = family(key, args.ctx, Path(tmp))
        r = results[key]
        print(f"{key:8s} F32 max|diff| {r['f32']['max_abs_diff']:.2e} (logits up to {r['f32']['ref_max_abs']:.2f}), "
              f"Q4_0 max|diff| {r['q4_0']['max_abs_diff']:.2e}, top-1 agreement {r['q4_0']['argmax_agreement']:.3f}",
              flush=True)
    with tempfile.TemporaryDirectory(prefix="sizewise-tok-") as tmp:
        tokenized = tokenizers(Path(tmp))
    system = next(iter(results.values()))["f32"]["system_info"] if results else None
    for r in results.values():
        for kind in ("f32", "q4_0"):
            r[kind].pop("system_info", None)
    out = ROOT / "bench" / "results" / "families_llamacpp.json"
    out.write_text(json.dumps({"protocol": {"ctx": args.ctx, "kv_cache": "f32", "threads": 1,
                                            "llama_cpp": build.get("package"), "cpu": cpu_model(),
                                            "torch": torch.__version__, "transformers": tf.__version__,
                                            "llama_cpp_system_info": system},
                               "families": results, "tokenizers": tokenized}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
