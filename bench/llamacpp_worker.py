"""The llama.cpp side of bench/llamacpp.py; runs under out/llama-venv's python (llama_cpp, numpy only).

    python llamacpp_worker.py JOB.json

A job is one of:
  {"quantize": {"src", "dst", "ftype", "threads", "imatrix", "token_embedding_type"}}
        llama_model_quantize to LLAMA_FTYPE_MOSTLY_<ftype>; "imatrix" (optional) is an .npz of one float32
        vector per GGUF tensor name (mean squared input of each column, llama.cpp's importance matrix),
        "token_embedding_type" (optional) a GGML type name for token_embd.weight
  {"evaluate": {"model", "windows", "score_from", "threads", "kv_type", "extra_bufts", "check", "check_rounded",
                "speed", "lora"}, "out": path}
        "lora" (optional): a LoRA adapter GGUF applied at scale 1 (sizewise's low-rank corrections)
  {"speeds": {"models": {label: path}, "prompt", "prompt_tokens", "gen_tokens", "repeats", "threads", "kv_type",
              "extra_bufts"}, "out": path}
        prompt and generation tokens/s of every model, all loaded in this one process, runs interleaved
        (`speeds`); "prompt" an int32 .npy of token ids
  {"tokenize": {"model", "texts"}, "out": path}
        llama.cpp's token ids of each text (its vocabulary only; no BOS added, special tokens as text)
The evaluation writes its result as JSON to "out". Token windows come as an int32 .npy [n, T]; the
reference logits of the check windows as float32 .npy files [T, vocab].
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time

import numpy as np

import llama_cpp


def _imatrix_entries(path: str):
    """llama.cpp's C importance-matrix list: one {name, data, size} per tensor, ended by a NULL name.
    Returns (the array, the numpy vectors it points into, which must outlive the quantize call)."""
    z = np.load(path)
    vectors = {n: np.ascontiguousarray(z[n], dtype=np.float32) for n in z.files}
    entries = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()  # zeroed: the last is the end
    for e, (n, v) in zip(entries, vectors.items()):
        e.name, e.data, e.size = n.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    return entries, vectors


def quantize(src: str, dst: str, ftype: str, threads: int, imatrix: str | None = None,
             token_embedding_type: str | None = None) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.allow_requantize = True
    keep = None
    if imatrix:
        entries, keep = _imatrix_entries(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if token_embedding_type:
        params.token_embedding_type = getattr(llama_cpp, f"GGML_TYPE_{token_embedding_type}")
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({ftype}) failed with code {rc}")
    return {"quantize_s": time.perf_counter() - t0}


def _check(k: int, logits, ref, first: int, targets, window: dict) -> dict:
    """llama.cpp's logits of window k vs reference logits of the same window."""
    diff = np.abs(logits - ref)
    return {"window": k, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ref_max_abs": float(np.abs(ref).max()), "argmax_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "llama_nll": window["nll"], "ref_nll": _nll(np.asarray(ref[first:-1]), targets), "tokens": window["tokens"]}


def _nll(logits: np.ndarray, targets: np.ndarray, chunk: int = 128) -> float:
    """Summed negative log-likelihood of `targets`, log-softmax in float64 (in chunks: [T, vocab] is large)."""
    total = 0.0
    for s in range(0, len(targets), chunk):
        x = logits[s:s + chunk].astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
        total += float((lse - x[np.arange(len(x)), targets[s:s + chunk]]).sum())
    return total


def _llama(model: str, n_ctx: int, threads: int, kv_type: str, logits_all: bool,
           extra_bufts: bool = False, lora: str | None = None) -> llama_cpp.Llama:
    kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    # llama.cpp's CPU "extra buffer types" (weights repacked for AVX512/AMX kernels) can be switched
    # off only through the model params, which Llama() builds from llama_model_default_params()
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, type_k=kv, type_v=kv,
                               seed=0, verbose=False, lora_path=lora)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default


def evaluate(job: dict) -> dict:
    windows = np.load(job["windows"])
    score_from = job["score_from"]
    n_ctx = windows.shape[1]
    t_load = time.perf_counter()
    llm = _llama(job["model"], n_ctx, job["threads"], job["kv_type"], logits_all=True,
                 extra_bufts=job.get("extra_bufts", False), lora=job.get("lora"))
    load_s = time.perf_counter() - t_load
    per_window, checks, checks_rounded = [], [], []
    eval_s = 0.0
    for k, (x, first) in enumerate(zip(windows, score_from)):
        llm.reset()  # the next eval drops the whole KV cache from position 0
        t0 = time.perf_counter()
        llm.eval(x.tolist())
        eval_s += time.perf_counter() - t0
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float32)
        targets = x[first + 1:].astype(np.int64)
        scored = logits[first:-1]
        per_window.append({"nll": _nll(scored, targets), "tokens": int(len(targets))})
        for refs, out in ((job["check"], checks), (job.get("check_rounded", {}), checks_rounded)):
            if str(k) in refs:
                out.append(_check(k, logits, np.load(refs[str(k)], mmap_mode="r"), first, targets, per_window[-1]))
    nll = sum(w["nll"] for w in per_window)
    tokens = sum(w["tokens"] for w in per_window)
    del llm
    return {"perplexity": float(np.exp(nll / tokens)), "nll_per_token": nll / tokens, "tokens": tokens,
            "per_window": per_window, "checks": checks, "checks_rounded": checks_rounded, "load_s": load_s,
            "eval_tokens_per_s": windows.size / eval_s, **(speed(job, windows[0]) if job.get("speed") else {})}


def speed(job: dict, prompt_window: np.ndarray) -> dict:
    """Prompt processing (tokens/s for a prompt of `prompt_tokens`, last logits only) and greedy generation
    of `gen_tokens` after it; medians of `repeats` runs."""
    cfg = job["speed"]
    prompt = prompt_window[:cfg["prompt_tokens"]].tolist()
    n_ctx = len(prompt) + cfg["gen_tokens"] + 1
    llm = _llama(job["model"], n_ctx, job["threads"], job["kv_type"], logits_all=False,
                 extra_bufts=job.get("extra_bufts", False), lora=job.get("lora"))
    runs = [_timed(llm, prompt, cfg["gen_tokens"]) for _ in range(cfg["repeats"])]
    pp, tg = [r[0] for r in runs], [r[1] for r in runs]
    return {"prompt_tokens_per_s": statistics.median(pp), "gen_tokens_per_s": statistics.median(tg),
            "prompt_tokens_per_s_runs": pp, "gen_tokens_per_s_runs": tg,
            "speed_protocol": {**cfg, "threads": job["threads"], "kv_type": job["kv_type"], "sampling": "greedy"}}


def _timed(llm, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one run from an empty KV cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp = len(prompt) / (time.perf_counter() - t0)
    # greedy: each token is the argmax of the last logits, fed back one at a time (without logits_all
    # the Llama object keeps no scores, so the logits come from the context itself)
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(np.argmax(last))])
    return pp, gen_tokens / (time.perf_counter() - t0)


def speeds(job: dict) -> dict:
    """Several models' speed in this one process, runs interleaved: each round runs every model once, the
    order rotated each round (A B C, B C A, ...), so that a change in the machine's load hits all alike."""
    prompt = np.load(job["prompt"])[:job["prompt_tokens"]].tolist()
    n_ctx = len(prompt) + job["gen_tokens"] + 1
    llms = {k: _llama(path, n_ctx, job["threads"], job["kv_type"], logits_all=False,
                      extra_bufts=job.get("extra_bufts", False)) for k, path in job["models"].items()}
    labels = list(llms)
    runs: dict[str, list] = {k: [] for k in labels}
    for r in range(job["repeats"]):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            runs[k].append(_timed(llms[k], prompt, job["gen_tokens"]))
    return {"runs": {k: {"prompt_tokens_per_s": [p for p, _ in v], "gen_tokens_per_s": [g for _, g in v]}
                     for k, v in runs.items()},
            "speed_protocol": {"prompt_tokens": len(prompt), "gen_tokens": job["gen_tokens"], "repeats": job["repeats"],
                               "threads": job["threads"], "kv_type": job["kv_type"], "sampling": "greedy",
                               "order": "interleaved in one process, rotated each round"}}


def tokenize(job: dict) -> dict:
    llm = llama_cpp.Llama(model_path=job["model"], vocab_only=True, verbose=False)
    return {"ids": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in job["texts"]]}


def system_info() -> dict:
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    if "quantize" in job:
        q = job["quantize"]
        result = quantize(q["src"], q["dst"], q["ftype"], q["threads"], q.get("imatrix"), q.get("token_embedding_type"))
    elif "evaluate" in job:
        result = evaluate(job["evaluate"])
    elif "speeds" in job:
        result = speeds(job["speeds"])
    elif "tokenize" in job:
        result = tokenize(job["tokenize"])
    else:
        raise SystemExit(f"unknown job: {sorted(job)}")
    result.update(system_info())
    with open(job["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
