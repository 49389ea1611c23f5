"""Structured pruning in llama.cpp (issue 16: "a model with 10-25% fewer parameters runs that much faster
in llama.cpp (tokens/s, same machine, same run) and its perplexity is reported against quantizing the full
model to the same file size").

    .venv/bin/python bench/structured.py            # the full run: SmolLM2, 64 windows, 5 interleaved rounds

A quick check that it works (minutes): --windows 2 --repeats 2 --prompt-tokens 64 --gen-tokens 16
--calib-samples 8 --calib-len 128 --threads 1.

The model pruned by `sizewise compress --drop-layers 3 --prune-mlp 10%` (the decoder layers whose input and
output differ least removed, the MLPs' least important channels removed and the down projections refitted
by least squares on calibration text) as GGUF F16 and Q8_0 (RTN, 32-weight groups), beside the full model
at F16 and Q8_0, and the full model fitted by sizewise's allocator to each pruned file's size
(`compress --budget <bytes>B --method rtn --format gguf`: per-layer F16, Q8_0 .. Q2_K). Every GGUF is
made by sizewise; token embeddings stay F16 except where the allocator chooses otherwise.

Speed: llama.cpp (llama-cpp-python, out/llama-venv as bench/llamacpp.py builds it) prompt processing of
the first window's first --prompt-tokens tokens and greedy generation of --gen-tokens, every GGUF loaded in
one process and the runs interleaved (each round runs every model once, the order rotated each round),
so load drifts hit all alike; per model the median tokens/s and the median over rounds of its ratio to the
full F16 model in the same round. Perplexity: llama.cpp's, of each GGUF on the first --windows windows of
1024 tokens of WikiText-2 test (sizewise's tokenization; bench/llamacpp_worker.py's evaluate job).
Parameters are counted from each GGUF's tensors (the tied embedding once).
Results: bench/results/structured[-MODEL].json; GGUFs under out/bench/structured[-MODEL] (a GGUF made
earlier with the same command is reused: its .json sidecar).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SIZEWISE, machine, per_model, save
from llamacpp import ensure_venv, run_worker

REFERENCE = "full-F16"
Q8_0 = ["--bits", "8", "--group-size", "32", "--sym"]


def made(model: str, path: Path, flags: list[str]) -> dict:
    """`sizewise compress MODEL --format gguf -o path FLAGS` in its own process, unless its sidecar says an
    earlier run made this file with the same command. Returns the sidecar (command, wall time)."""
    cmd = SIZEWISE + ["compress", model, "-o", str(path), "--format", "gguf", "--force", "--quiet", *flags]
    side = path.with_suffix(".json")
    try:
        earlier = json.loads(side.read_text())
        if earlier["command"] == shlex.join(cmd[2:]) and path.is_file():
            print(f"reusing {path}", file=sys.stderr)
            return earlier
    except (OSError, ValueError, KeyError):
        pass
    print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    info = {"command": shlex.join(cmd[2:]), "wall_s": time.perf_counter() - t0}
    side.write_text(json.dumps(info))
    return info


def parameters(path: Path) -> int:
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drop-layers", type=int, default=3)
    ap.add_argument("--prune-mlp", default="10%")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--text", default="wikitext2-test")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--extra-bufts", action="store_true", help="llama.cpp's repacked CPU kernels (see bench/llamacpp.py)")
    args = ap.parse_args()

    import numpy as np

    import sizewise
    from sizewise import data, sources

    build = ensure_venv(args.threads)
    name = per_model("structured", args.model)
    work = ROOT / "out" / "bench" / name
    work.mkdir(parents=True, exist_ok=True)
    calib = ["--calib", args.calib, "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)]
    prune = ["--drop-layers", str(args.drop_layers), "--prune-mlp", args.prune_mlp]

    # the pruned models and the full ones at the same types
    ggufs, made_by = {}, {}
    full_f16 = ggufs[REFERENCE] = work / f"{REFERENCE}.gguf"
    key = {"model": args.model, "float_dtype": "float16"}
    side = full_f16.with_suffix(".json")
    if not (full_f16.is_file() and side.is_file() and json.loads(side.read_text()) == key):
        sizewise.api.export(args.model, full_f16, float_dtype="float16", overwrite=True)
        side.write_text(json.dumps(key))
    made_by[REFERENCE] = {"command": f"sizewise.api.export({args.model!r}, float_dtype='float16')"}
    for label, flags in [("pruned-F16", prune + calib), ("full-Q8_0", Q8_0), ("pruned-Q8_0", prune + Q8_0 + calib)]:
        ggufs[label] = work / f"{label}.gguf"
        made_by[label] = made(args.model, ggufs[label], flags)
    # the full model at each pruned file's size, per-layer types chosen by the allocator
    for t in ("F16", "Q8_0"):
        label, size = f"full-at-pruned-{t}-size", ggufs[f"pruned-{t}"].stat().st_size
        ggufs[label] = work / f"{label}.gguf"
        made_by[label] = made(args.model, ggufs[label], ["--budget", f"{size}B", "--method", "rtn", *calib])

    src = sources.load(args.model)
    text = data.read_text(args.text)
    wins = data.eval_windows(data.tokenize(src.tokenizer, text), args.ctx, None, args.windows,
                             data.wants_bos(src.model, src.tokenizer))
    windows_npy = work / "windows.npy"
    np.save(windows_npy, np.stack([x[0].numpy() for x in wins.inputs]).astype(np.int32))
    np.save(work / "prompt.npy", wins.inputs[0][0].numpy().astype(np.int32))
    del src

    rows = {}
    for label, path in ggufs.items():
        print(f"perplexity of {label} in llama.cpp", file=sys.stderr, flush=True)
        res = run_worker({"evaluate": {"model": str(path), "windows": str(windows_npy), "score_from": wins.score_from,
                                       "threads": args.threads, "kv_type": "f32", "extra_bufts": args.extra_bufts,
                                       "check": {}, "check_rounded": {}, "speed": None}}, work)
        rows[label] = {"label": label, "path": str(path), "file_bytes": path.stat().st_size,
                       "parameters": parameters(path), "perplexity": res["perplexity"], "tokens": res["tokens"],
                       "made_by": made_by[label], "llama_cpp_python": res["llama_cpp_python"]}
        rows[label]["bits_per_parameter"] = rows[label]["file_bytes"] * 8 / rows[label]["parameters"]

    print(f"speed: {args.repeats} interleaved rounds", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    sp = run_worker({"speeds": {"models": {k: str(p) for k, p in ggufs.items()}, "prompt": str(work / "prompt.npy"),
                                "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                                "repeats": args.repeats, "threads": args.threads, "kv_type": "f32",
                                "extra_bufts": args.extra_bufts}}, work)
    ref = rows[REFERENCE]
    for label, row in rows.items():
        runs = sp["runs"][label]
        row.update(runs=runs, parameters_vs_full=row["parameters"] / ref["parameters"] - 1,
                   file_bytes_vs_full_f16=row["file_bytes"] / ref["file_bytes"] - 1)
        for k in ("prompt_tokens_per_s", "gen_tokens_per_s"):
            row[k] = statistics.median(runs[k])
            # round by round against the reference: both ran in the same round, moments apart
            row[f"{k}_vs_full_f16"] = statistics.median(a / b for a, b in zip(runs[k], sp["runs"][REFERENCE][k])) - 1
    lines = ["| model | params | Δparams | MB | ppl | prompt tok/s | Δ | gen tok/s | Δ |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['label']} | {r['parameters'] / 1e6:.1f}M | {100 * r['parameters_vs_full']:+.1f}% | "
                     f"{r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | {r['prompt_tokens_per_s']:.0f} | "
                     f"{100 * r['prompt_tokens_per_s_vs_full_f16']:+.1f}% | {r['gen_tokens_per_s']:.1f} | "
                     f"{100 * r['gen_tokens_per_s_vs_full_f16']:+.1f}% |")
    print("\n".join(lines))
    save(name, {"benchmark": "structured", "model": args.model, "machine": machine(),
                "command": shlex.join(["bench/structured.py", *sys.argv[1:]]),
                "pruning": {"drop_layers": args.drop_layers, "prune_mlp": args.prune_mlp},
                "protocol": {**text.protocol(), **wins.protocol(), "perplexity": "llama.cpp, kv f32, exp(mean NLL)",
                             **sp["speed_protocol"], "extra_bufts": args.extra_bufts, "build": build,
                             "loadavg_speed": [load_before, os.getloadavg()],
                             "calibration": {"text": args.calib, "samples": args.calib_samples, "length": args.calib_len}},
                "results": list(rows.values()), "table": lines})


if __name__ == "__main__":
    sys.exit(main())
