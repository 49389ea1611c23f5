"""sizewise GGUFs in llama.cpp, side by side with llama.cpp's own quantizer (issue #5, parts 3 and 4).

    .venv/bin/python bench/llamacpp.py [--windows 64] [--sizewise-eval] [--ours m.gguf[:label]]
        [--artifact DIR[:label]] [--types Q4_K_M,Q3_K_M+imatrix,Q4_0+imatrix+emb=Q4_0] [--reuse]

Builds llama-cpp-python from PyPI into out/llama-venv on first use (a native CPU build, kept out of
the project venv and of `make test`). Exports the float model to GGUF F32 with sizewise, quantizes it
with llama.cpp's `llama_model_quantize` to each type in TYPES (optionally with an importance matrix,
"+imatrix", and a token-embedding type, "+emb=Q4_0"), and runs every GGUF in llama.cpp: perplexity
on sizewise's evaluation windows, logits vs sizewise's own evaluation of the same weights (the file
dequantized by sizewise's reader), prompt and generation speed; with --sizewise-eval also sizewise's
perplexity of those weights on the same windows. Writes
bench/results/<--results>.json (default llamacpp) and a table and a plot under out/bench/llamacpp/.

The importance matrix is what llama.cpp's imatrix tool computes (each matmul input column's mean
square), here from sizewise's float-model statistics on the same calibration samples sizewise's own GPTQ
uses, so both quantizers see the same data. Results accumulate in the JSON across runs (a label run again
replaces its row); --reuse skips a GGUF whose row there was measured on the same file and windows.

llama.cpp runs in a separate process (bench/llamacpp_worker.py under the llama venv's python); the
two exchange token ids and logits through .npy and .json files.

An artifact with low-rank corrections exports as the base GGUF plus a LoRA adapter (`NAME.lora.gguf`);
llama.cpp then runs with the adapter applied (`--lora`), its size counts both files, and the check of the
dequantized base alone is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "out" / "llama-venv"
LLAMA_PY = VENV / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# CPU only, tuned for this machine; no GPU backends, no examples/tests/server/multimodal library
CMAKE_ARGS = ("-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF "
              "-DGGML_OPENCL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF")
NICE = ["nice", "-n", "19"]


def ensure_venv(jobs: int = 2) -> dict:
    """Create out/llama-venv with llama-cpp-python compiled from its PyPI sdist, unless it is there."""
    marker = VENV / ".built.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    print(f"building {LLAMA_CPP_PYTHON} into {VENV} (compiles llama.cpp; several minutes) ...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    # base interpreter, not the project venv: the llama venv must not see sizewise's packages
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs), "FORCE_CMAKE": "1"}
    pip = NICE + [str(LLAMA_PY), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
                  "--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON, "numpy"]
    print("$", shlex.join(pip), file=sys.stderr, flush=True)
    subprocess.run(pip, check=True, env=env)
    info = {"package": LLAMA_CPP_PYTHON, "cmake_args": CMAKE_ARGS, "build_s": time.perf_counter() - t0,
            "jobs": jobs, "machine": platform.machine(), "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    marker.write_text(json.dumps(info, indent=1))
    print(f"built in {info['build_s']:.0f} s", file=sys.stderr)
    return info

# llama.cpp's quantization types compared (names of its LLAMA_FTYPE_MOSTLY_* enums)
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")
# what runs by default: every type, the imatrix variants of those the issue's targets compare against,
# and llama.cpp's smallest 4-bit file (Q4_0 with a Q4_0 token embedding, imatrix)
DEFAULT_SPECS = TYPES + tuple(f"{t}+imatrix" for t in ("Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")) \
    + ("Q4_0+imatrix+emb=Q4_0",)
EMB_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16")


def parse_spec(spec: str) -> dict:
    """`Q4_0+imatrix+emb=Q4_0` -> {"ftype": "Q4_0", "imatrix": True, "token_embedding_type": "Q4_0"}."""
    ftype, *extras = spec.split("+")
    if ftype not in TYPES:
        raise ValueError(f"unknown llama.cpp type {ftype!r} in {spec!r}; choose from {', '.join(TYPES)}")
    out = {"ftype": ftype, "imatrix": False, "token_embedding_type": None}
    for e in extras:
        if e == "imatrix":
            out["imatrix"] = True
        elif e.startswith("emb=") and e[4:] in EMB_TYPES:
            out["token_embedding_type"] = e[4:]
        else:
            raise ValueError(f"unknown option {e!r} in {spec!r}: use +imatrix or +emb=TYPE ({', '.join(EMB_TYPES)})")
    return out


def importance_matrix(src, args, path: Path) -> dict:
    """llama.cpp's importance matrix, mean x² of every input column of every decoder matmul, from the float
    model's statistics on sizewise's calibration samples; written as an .npz keyed by GGUF tensor name.
    Returns the key (model, text, samples) it is cached under."""
    import numpy as np
    import torch

    from sizewise import data, engine
    from sizewise.arch import discover
    from sizewise.export.gguf import gguf_tensor_name

    text = data.read_text(args.calib)
    key = {"model_sha256": src.info["sha256"], **text.protocol(), "samples": args.calib_samples,
           "length": args.calib_len, "seed": args.seed, "dtype": args.calib_dtype}
    side = path.with_suffix(".json")
    if path.is_file() and side.is_file() and json.loads(side.read_text()) == key:
        return key
    print(f"importance matrix from {args.calib_samples} x {args.calib_len} tokens of {args.calib}", file=sys.stderr,
          flush=True)
    samples = data.calibration_samples(data.tokenize(src.tokenizer, text), args.calib_samples, args.calib_len,
                                       args.seed)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.calib_dtype]
    stats, _ = engine.statistics(src.model, discover(src.model), samples, compute_dtype=dtype)
    n_layers = src.model.config.num_hidden_layers
    vectors = {gguf_tensor_name(f"{name}.weight", n_layers): (s.xtx.diagonal() / s.count).numpy().astype(np.float32)
               for name, s in stats.items()}
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **vectors)
    tmp.replace(path)
    side.write_text(json.dumps(key))
    return key


def run_worker(job: dict, work: Path) -> dict:
    """One job in the llama venv's python; its result comes back as JSON through a file."""
    job_path, out_path = work / "job.json", work / "job-result.json"
    out_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({**job, "out": str(out_path)}))
    subprocess.run(NICE + [str(LLAMA_PY), str(WORKER), str(job_path)], check=True)
    return json.loads(out_path.read_text())


def _sidecar_matches(path: Path, key: dict) -> bool:
    """A GGUF made by an earlier run is reused only when made from the same inputs (its .json sidecar)."""
    side = path.with_suffix(".json")
    if not (path.is_file() and side.is_file()):
        return False
    made = json.loads(side.read_text())
    made.pop("quantize_s", None)  # how long it took is recorded, not part of what it was made from
    return made == key


def previous_rows(path: Path, same: dict) -> dict[str, dict]:
    """Rows of an earlier run's results, by label, if it measured on the same windows and settings."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    proto = old.get("protocol", {})
    if any(proto.get(k) != v for k, v in same.items()):
        return {}
    return {r["label"]: r for r in old.get("results", [])}


def split_label(spec: str) -> tuple[Path, str]:
    """`path[:label]` -> (path, label); the label defaults to the file or directory name."""
    path, sep, label = spec.rpartition(":")
    if sep and path and label and "/" not in label:
        return Path(path), label
    return Path(spec), Path(spec).stem if spec.endswith(".gguf") else Path(spec).name


def reference_logits(model, windows, check: list[int], work: Path, rounding: dict | None = None,
                     tag: str = "ref") -> dict[str, str]:
    """sizewise's own float32 logits of `model` on the check windows, as .npy files [T, vocab];
    with `rounding` ({module: kind}), with each matmul input rounded as llama.cpp rounds it."""
    import numpy as np
    import torch

    from sizewise.runtime.llamacpp import rounded_inputs

    paths = {}
    with torch.no_grad(), rounded_inputs(rounding or {}):
        for k in check:
            logits = model(input_ids=windows.inputs[k], use_cache=False).logits[0].float().numpy()
            paths[str(k)] = str(work / f"{tag}{k}.npy")
            np.save(paths[str(k)], logits.astype(np.float32))
    return paths


def llamacpp_rounding(model, kind: str, path: Path) -> dict:
    """{module: kind}: how llama.cpp rounds each matmul input of the GGUF (or artifact) at `path`."""
    from sizewise.api import _llamacpp_roundings
    from sizewise.sources import Source

    return _llamacpp_roundings(Source(model, None, {"kind": "artifact" if kind == "artifact" else "gguf",
                                                    "spec": str(path), "path": str(path)}))


def sizewise_model(kind: str, path: Path, work: Path):
    """The same weights as the GGUF at `path`, as sizewise evaluates them: a GGUF is dequantized by
    sizewise's GGUF reader into a scratch HF directory (not the user's cache), an artifact loads as is."""
    import shutil

    from sizewise import builtins, sources

    if kind == "artifact":
        return sources.load(str(path)).model
    scratch = work / "hf-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    builtins.gguf_to_hf(path, scratch)
    try:
        return sources.load(str(scratch)).model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def dequantized_check(path: Path, work: Path, wins, check: list[int], args) -> dict:
    """llama.cpp's logits for the *dequantized* weights of a GGUF vs sizewise's for the same weights.

    With quantized types llama.cpp also rounds the activations (to 8 bits) inside its matmuls, so their
    logits differ from a float evaluation by more than float error. Here sizewise's reader dequantizes
    the GGUF and sizewise writes those weights back as an F32 GGUF: what remains is float arithmetic
    alone, which shows the quantized file holds exactly the weights sizewise evaluated."""
    import shutil

    import numpy as np

    import sizewise
    from sizewise import builtins, sources

    scratch, f32 = work / "hf-dequantized", work / "dequantized-F32.gguf"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        builtins.gguf_to_hf(path, scratch)
        sizewise.api.export(str(scratch), f32, float_dtype="float32", overwrite=True)
        refs = reference_logits(sources.load(str(scratch)).model, wins, check, work)
        windows_npy = work / "check-windows.npy"   # the first windows, so check indices stay the same
        np.save(windows_npy, np.stack([wins.inputs[k][0].numpy() for k in check]).astype(np.int32))
        res = run_worker({"evaluate": {"model": str(f32), "windows": str(windows_npy),
                                       "score_from": [wins.score_from[k] for k in check], "threads": args.threads,
                                       "kv_type": args.kv_type, "extra_bufts": args.extra_bufts, "check": refs,
                                       "speed": None}}, work)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        f32.unlink(missing_ok=True)
    return {"logit_max_abs_diff": max(c["max_abs_diff"] for c in res["checks"]),
            "argmax_agreement": float(np.mean([c["argmax_agreement"] for c in res["checks"]])),
            "checks": res["checks"]}


def gguf_types(path: Path) -> dict[str, int]:
    from collections import Counter

    import gguf
    return dict(Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors))


def markdown(rows: list[dict], ref: dict, proto: dict) -> str:
    lines = [f"Model {proto['model']}, {proto['text']} ({proto['windows']} windows x {proto['ctx']} tokens, "
             f"{proto['tokens_scored']} tokens scored), llama.cpp {proto.get('llama_cpp_python') or LLAMA_CPP_PYTHON} "
             f"on {proto['threads']} threads, KV cache {proto['kv_type']}, CPU extra buffer types (repacked weights) "
             f"{'on' if proto.get('extra_bufts') else 'off'}; {proto['parameters'] / 1e6:.1f}M parameters, "
             "bits per weight = file bytes x 8 / parameters. sizewise (transformers) float perplexity "
             f"{ref['sizewise_perplexity']:.3f}. Logit check on windows {proto['check_windows']}: llama.cpp vs "
             "sizewise's evaluation of the same weights (the GGUF dequantized by sizewise's reader): max |logit "
             "diff|, argmax agreement, perplexity ratio. In quantized matmuls llama.cpp also rounds the activations "
             "to 8 bits, so the last check runs each sizewise GGUF's weights dequantized to an F32 GGUF: float "
             "arithmetic only; and sizewise's evaluation with llama.cpp's input rounding (sizewise "
             "`compare --arithmetic llamacpp`) vs llama.cpp: what is left once that rounding is modelled. "
             "sizewise ppl: sizewise's evaluator on the file's weights, all windows (if run), in float and "
             "with llama.cpp's rounding. "
             "pp: prompt processing, tg: greedy generation (medians). Load average "
             f"{proto['loadavg_start'][0]:.2f} at start, {proto['loadavg_end'][0]:.2f} at end.", "",
             "| type / label | source | MB | bpw | ppl | Δppl vs F32 | sizewise ppl: float / llama.cpp rounding "
             "| logit max diff | argmax agree | Δppl llama.cpp vs sizewise, same weights | logit max diff, as F32 "
             "| logit max diff, sizewise with llama.cpp rounding | pp tok/s | tg tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dq, sw, swr = r.get("dequantized"), r.get("sizewise_perplexity"), r.get("sizewise_llamacpp_perplexity")
        rd = r.get("rounded_logit_max_abs_diff")
        lines.append(f"| {r['label']} | {r['source']} | {r['file_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | "
                     f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / ref['perplexity'] - 1):+.1f}% | "
                     f"{format(sw, '.3f') if sw else ''}{' / ' + format(swr, '.3f') if swr else ''} | "
                     f"{r['logit_max_abs_diff']:.2e} | "
                     f"{100 * r['argmax_agreement']:.2f}% | {100 * (r['check_ppl_ratio'] - 1):+.2f}% | "
                     f"{format(dq['logit_max_abs_diff'], '.2e') if dq else ''} | "
                     f"{format(rd, '.2e') if rd is not None else ''} | "
                     f"{r['prompt_tokens_per_s']:.0f} | {r['gen_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], ref: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = (("llama.cpp", False, "o", "tab:blue", "llama.cpp quantizer"),
              ("llama.cpp", True, "^", "tab:cyan", "llama.cpp quantizer, imatrix"),
              ("sizewise", None, "s", "tab:red", "sizewise allocator (GGUF)"))
    for source, imatrix, marker, color, name in styles:
        pts = [r for r in rows if r["source"] == source and (imatrix is None or ("imatrix" in r["label"]) == imatrix)]
        if not pts:
            continue
        ax.scatter([r["bits_per_weight"] for r in pts], [r["perplexity"] for r in pts], marker=marker, color=color,
                   label=name, zorder=3)
        for r in pts:
            ax.annotate(r["label"], (r["bits_per_weight"], r["perplexity"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    ax.axhline(ref["perplexity"], color="gray", ls="--", lw=1, label=f"F32 in llama.cpp ({ref['perplexity']:.3f})")
    ax.set_xlabel("bits per weight over the whole file (file bytes x 8 / parameters)")
    ax.set_ylabel(f"perplexity in llama.cpp ({ref['windows']} windows x {ref['ctx']})")
    ax.set_title(f"{ref['model']}: perplexity vs GGUF file size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikitext2-test")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--sizewise-eval", action="store_true",
                    help="also sizewise's perplexity of each file's weights on the same windows")
    ap.add_argument("--results", default="llamacpp", help="name of the results JSON under bench/results")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--check-windows", type=int, default=2, help="first windows whose logits are compared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-type", choices=("f32", "f16"), default="f32",
                    help="llama.cpp's KV cache type (f32: only the weights differ from sizewise's float32 evaluation)")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp repack weights into its CPU extra buffer types (AVX512/AMX kernels). Off by "
                         "default: llama-cpp-python 0.3.36 built natively segfaults with them on every quantized "
                         "file, its own included, on an AMX machine; off, every file runs ggml's plain CPU kernels")
    ap.add_argument("--types", default=",".join(DEFAULT_SPECS),
                    help="llama.cpp types to quantize to, each optionally +imatrix and +emb=TYPE ('' for none)")
    ap.add_argument("--calib", default="enwiki-sample", help="calibration text of the importance matrix")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true",
                    help="skip a GGUF already measured (same label, file bytes, windows) in the results JSON")
    ap.add_argument("--no-dequantized-check", action="store_true",
                    help="skip running each sizewise GGUF's weights as F32 in llama.cpp (logits on the check windows)")
    ap.add_argument("--ours", action="append", default=[], metavar="GGUF[:LABEL]", help="a sizewise GGUF (repeatable)")
    ap.add_argument("--artifact", action="append", default=[], metavar="DIR[:LABEL]",
                    help="a sizewise artifact, exported to GGUF here (repeatable)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="speed runs per model (the median is reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "llamacpp")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    from common import save

    import sizewise
    from sizewise import data, sources
    from sizewise.evaluate import environment, evaluate
    from sizewise.export.gguf_lora import lora_path
    from sizewise.runtime.llamacpp import rounded_inputs

    types = [t for t in args.types.split(",") if t]
    try:
        specs = {t: parse_spec(t) for t in types}
    except ValueError as e:
        ap.error(str(e))
    build = ensure_venv(args.threads)
    loadavg_start = os.getloadavg()
    work = args.out / "gguf"
    work.mkdir(parents=True, exist_ok=True)

    src = sources.load(args.model)
    text = data.read_text(args.text)
    tokens = data.tokenize(src.tokenizer, text)
    wins = data.eval_windows(tokens, args.ctx, None, args.windows, data.wants_bos(src.model, src.tokenizer))
    windows_npy = work / "windows.npy"
    np.save(windows_npy, np.stack([x[0].numpy() for x in wins.inputs]).astype(np.int32))
    check = list(range(min(args.check_windows, len(wins.inputs))))
    n_params = sum(p.numel() for p in src.model.parameters())  # tied embeddings count once
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters; {wins.protocol()}", file=sys.stderr, flush=True)

    # sizewise's float perplexity on the same windows: llama.cpp's F32 must agree with it
    sw_float = evaluate(src.model, wins, text, progress=False)

    # the F32 source, written by sizewise, is what llama.cpp's quantizer starts from
    f32 = work / "F32.gguf"
    f32_key = {"model": args.model, "weights_sha256": src.info["sha256"], "float_dtype": "float32"}
    if not _sidecar_matches(f32, f32_key):
        sizewise.api.export(args.model, f32, float_dtype="float32", overwrite=True)
        f32.with_suffix(".json").write_text(json.dumps(f32_key))
    candidates = [("F32", "float", f32, "float", None)]
    for spec in args.ours:                      # ours first: they are what is new
        path, label = split_label(spec)
        candidates.append((label, "gguf", path, "sizewise", None))
    for spec in args.artifact:
        art, label = split_label(spec)
        path = work / f"sizewise-{label}.gguf"
        sizewise.api.export(art, path, overwrite=True)
        candidates.append((label, "artifact", path, "sizewise", art))
    imatrix_path, imatrix_key = work / "imatrix.npz", None
    if any(sp["imatrix"] for sp in specs.values()):
        imatrix_key = importance_matrix(src, args, imatrix_path)
    for t, sp in specs.items():
        path = work / f"{t}.gguf"
        # the plain types' keys stay as before, so their files from earlier runs are still reused
        key = {"source": f32_key, "ftype": sp["ftype"], "llama_cpp": LLAMA_CPP_PYTHON}
        if sp["imatrix"]:
            key["imatrix"] = imatrix_key
        if sp["token_embedding_type"]:
            key["token_embedding_type"] = sp["token_embedding_type"]
        if not _sidecar_matches(path, key):
            print(f"llama.cpp quantize -> {t}", file=sys.stderr, flush=True)
            job = {"src": str(f32), "dst": str(path), "ftype": sp["ftype"], "threads": args.threads,
                   "imatrix": str(imatrix_path) if sp["imatrix"] else None,
                   "token_embedding_type": sp["token_embedding_type"]}
            q = run_worker({"quantize": job}, work)
            path.with_suffix(".json").write_text(json.dumps({**key, "quantize_s": q["quantize_s"]}))
        candidates.append((t, "gguf", path, "llama.cpp", None))

    results_path = ROOT / "bench" / "results" / f"{args.results}.json"
    same = {"model": args.model, "sha256": text.protocol()["sha256"], "ctx": args.ctx, "kv_type": args.kv_type,
            "extra_bufts": args.extra_bufts,
            "windows": len(wins.inputs), "threads": args.threads}
    earlier = previous_rows(results_path, same)
    rows, llama_info = [], {}

    def publish(rows: list[dict], earlier: dict, final: bool = False) -> None:
        """Write the results so far (the JSON, a table, a plot): a run stopped midway keeps its rows."""
        # labels not run this time stay, measured on the same windows
        everything = sorted(rows + list(earlier.values()), key=lambda r: (r["label"] != "F32", r["source"], -r["file_bytes"]))
        f32_row = everything[0]
        proto = {"model": args.model, "model_info": src.info, "parameters": n_params, **text.protocol(), **wins.protocol(),
                 "check_windows": check, "threads": args.threads, "kv_type": args.kv_type, "extra_bufts": args.extra_bufts,
                 "n_ctx": wins.inputs[0].shape[1],
                 "logits_all": True, "speed": {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                                               "repeats": args.repeats, "sampling": "greedy"},
                 "bits_per_weight": "file bytes x 8 / parameters of the model (tied embeddings once)",
                 "perplexity": "exp(mean NLL), log-softmax of llama.cpp's logits in float64, same scored positions as "
                               "sizewise.evaluate", "nice": os.nice(0), **llama_info, "build": build,
                 "imatrix": {"calibration": imatrix_key, "statistic": "mean x² per input column of each decoder matmul, "
                             "float model (llama.cpp's imatrix)"} if imatrix_key else None,
                 "environment": environment(), "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()}
        ref = {"model": args.model, "perplexity": f32_row["perplexity"], "sizewise_perplexity": sw_float["perplexity"],
               "windows": len(wins.inputs), "ctx": args.ctx}
        report = markdown(everything, ref, proto)
        args.out.mkdir(parents=True, exist_ok=True)
        report_path, plot_path = args.out / f"{args.results}.md", args.out / f"{args.results}.png"
        report_path.write_text(report + "\n")
        plot(everything, ref, plot_path)
        if final:
            print(report)
        save(args.results, {"benchmark": "llamacpp", "model": args.model, "reference_perplexity": f32_row["perplexity"],
                            "sizewise_float_perplexity": sw_float["perplexity"], "protocol": proto,
                            "command": shlex.join(["bench/llamacpp.py", *sys.argv[1:]]), "results": everything,
                            "report": str(report_path), "plot": str(plot_path)})

    for label, kind, path, source, art in candidates:
        old = earlier.pop(label, None)
        if args.reuse and old and old["file_bytes"] == path.stat().st_size and old["path"] == str(path):
            print(f"reusing {label}: ppl {old['perplexity']:.3f} from the results JSON", file=sys.stderr, flush=True)
            rows.append(old)
            publish(rows, earlier)
            continue
        print(f"evaluating {label} ({path.name}) in sizewise and llama.cpp", file=sys.stderr, flush=True)
        model = src.model if kind == "float" else sizewise_model(kind, art or path, work)
        refs = reference_logits(model, wins, check, work)
        rounding = llamacpp_rounding(model, kind, art or path)
        refs_rounded = reference_logits(model, wins, check, work, rounding, "rounded")
        sw = (sw_float if model is src.model else evaluate(model, wins, text, progress=False)) \
            if args.sizewise_eval else None
        sw_rounded = None
        if args.sizewise_eval and any(rounding.values()):
            with rounded_inputs(rounding):
                sw_rounded = evaluate(model, wins, text, progress=False)
        if model is not src.model:
            del model
        load_before = os.getloadavg()
        # a model with low-rank corrections carries them in an adapter beside it (applied with --lora)
        adapter = lora_path(path) if source == "sizewise" and lora_path(path).is_file() else None
        res = run_worker({"evaluate": {"model": str(path), "windows": str(windows_npy),
                                       "score_from": wins.score_from, "lora": adapter and str(adapter),
                                       "threads": args.threads, "kv_type": args.kv_type,
                                       "extra_bufts": args.extra_bufts, "check": refs,
                                       "check_rounded": refs_rounded,
                                       "speed": {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                                                 "repeats": args.repeats}}}, work)
        for p in [*refs.values(), *refs_rounded.values()]:
            Path(p).unlink()
        lora_bytes = adapter.stat().st_size if adapter else 0
        size = path.stat().st_size + lora_bytes           # what is deployed: the model and its adapter
        row = {"label": label, "source": source, "path": str(path), "artifact": str(art) if art else None,
               "file_bytes": size, "lora": adapter and str(adapter), "lora_bytes": lora_bytes, "bits_per_weight": size * 8 / n_params, "tensor_types": gguf_types(path),
               "logit_max_abs_diff": max(c["max_abs_diff"] for c in res["checks"]),
               "argmax_agreement": float(np.mean([c["argmax_agreement"] for c in res["checks"]])),
               # perplexity ratio llama.cpp / sizewise on the check windows, same weights: what llama.cpp's own
               # arithmetic (8-bit activations in quantized matmuls) changes
               "check_ppl_ratio": math.exp(sum(c["llama_nll"] - c["ref_nll"] for c in res["checks"])
                                           / sum(c["tokens"] for c in res["checks"])),
               # the same, sizewise computing with llama.cpp's input rounding (runtime/llamacpp.py)
               "rounded_logit_max_abs_diff": max(c["max_abs_diff"] for c in res["checks_rounded"]),
               "rounded_argmax_agreement": float(np.mean([c["argmax_agreement"] for c in res["checks_rounded"]])),
               "rounded_check_ppl_ratio": math.exp(sum(c["llama_nll"] - c["ref_nll"] for c in res["checks_rounded"])
                                                   / sum(c["tokens"] for c in res["checks_rounded"])),
               "loadavg": [load_before, os.getloadavg()],
               "sizewise_perplexity": sw and sw["perplexity"], "sizewise_nll_per_token": sw and sw["nll_per_token"],
               "sizewise_llamacpp_perplexity": (sw_rounded or sw or {}).get("perplexity"),
               **{k: res[k] for k in ("perplexity", "nll_per_token", "tokens", "checks", "load_s", "eval_tokens_per_s",
                                      "prompt_tokens_per_s", "gen_tokens_per_s", "prompt_tokens_per_s_runs",
                                      "gen_tokens_per_s_runs", "per_window", "checks_rounded")}}
        # (not with an adapter: the dequantized base alone lacks the corrections the reference holds)
        row["dequantized"] = (dequantized_check(path, work, wins, check, args)
                              if source == "sizewise" and not adapter and not args.no_dequantized_check else None)
        if row["dequantized"]:
            print(f"  {label} dequantized to F32: logit max diff {row['dequantized']['logit_max_abs_diff']:.2e}",
                  file=sys.stderr, flush=True)
        rows.append(row)
        llama_info = {k: res[k] for k in ("llama_cpp_python", "system_info")}
        publish(rows, earlier)
        print(f"  {label}: ppl {row['perplexity']:.3f}, {size / 1e6:.1f} MB, {row['bits_per_weight']:.2f} bpw, "
              f"logit max diff {row['logit_max_abs_diff']:.2e}, pp {row['prompt_tokens_per_s']:.0f} tok/s, "
              f"tg {row['gen_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)

    publish(rows, earlier, final=True)
    f32_row = rows[0]
    if abs(math.log(f32_row["check_ppl_ratio"])) > 1e-3:
        print(f"WARNING: llama.cpp's F32 perplexity differs from sizewise's on the check windows by "
              f"{100 * (f32_row['check_ppl_ratio'] - 1):+.3f}%", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
