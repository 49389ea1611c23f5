"""Pruning and low-rank factors against their baselines (issue 16's targets), on one model.

    .venv/bin/python bench/pruning.py [--model smollm2-135m] [--windows 64] [--only sparsegpt-2:4,...]

Pruning alone (kept weights in float16): magnitude, Wanda and SparseGPT at 50% (per-row bitmap mask)
and 2:4 (indices), each with its exact stored bits per weight. Low-rank compensation: GPTQ 3-bit g64
plus rank-8/16 float16 factors, beside the GPTQ configurations around them in stored bits and no
factors (3-bit g32 and g24, 4-bit per channel, 4-bit g128 or g192, whichever tiles the model's inputs,
4-bit g64). Calibration: 128 x 512 tokens of enwiki-sample (float32 passes unless --calib-dtype
bfloat16); evaluation: the first N windows of 1024 tokens of WikiText-2 test, every result against the
float model on the same windows. Each compress is its own process (wall time, peak memory, load
average recorded). Results: bench/results/pruning[-MODEL].json, where a run with --only replaces the rows
of its labels and keeps the others when the protocol (text, ctx, windows) is the same; reports under
out/bench/pruning[-MODEL].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS, ROOT, compress, cpu_model, per_model, save, summary, table

import sizewise

CALIB = ["--calib", "enwiki-sample", "--calib-samples", "128", "--calib-len", "512"]

CONFIGS = {   # label -> compress flags
    **{f"{m}-{s}": ["--method", m, "--sparsity", s] for s in ("50%", "2:4") for m in ("magnitude", "wanda", "sparsegpt")},
    "gptq-w3-g64-r8": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--lowrank", "8"],
    "gptq-w3-g64-r16": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--lowrank", "16"],
    "gptq-w3-g64": ["--method", "gptq", "--bits", "3", "--group-size", "64"],
    "gptq-w3-g32": ["--method", "gptq", "--bits", "3", "--group-size", "32"],
    "gptq-w3-g24": ["--method", "gptq", "--bits", "3", "--group-size", "24"],
    "gptq-w4-pc": ["--method", "gptq", "--bits", "4", "--group-size", "channel"],
    "gptq-w4-g128": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "gptq-w4-g192": ["--method", "gptq", "--bits", "4", "--group-size", "192"],
    "gptq-w4-g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
}


def group(flags: list[str]) -> str:
    return flags[flags.index("--group-size") + 1] if "--group-size" in flags else "channel"


def made(model: str, out: Path, flags: list[str]) -> dict:
    """Compress in its own process; the flags go beside the artifact so that --reuse knows what it is."""
    manifest = compress(model, out, flags)
    (out.parent / f"{out.name}.flags.json").write_text(json.dumps({"model": model, "flags": flags, "manifest": manifest}))
    return manifest


def reused(out: Path, flags: list[str]) -> dict | None:
    """The manifest (as `compress` returned it) of an artifact made earlier with these flags, else None."""
    side = out.parent / f"{out.name}.flags.json"
    try:
        made = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if made["flags"] != flags or not (out / "manifest.json").is_file():
        return None
    print(f"reusing {out}", file=sys.stderr)
    return made["manifest"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikitext2-test")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated labels (default: all)")
    ap.add_argument("--calib-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="calibration passes (bfloat16: about 3x faster on CPUs with bf16 units; its artifacts get "
                         "a .bfloat16 suffix, each row records its dtype)")
    ap.add_argument("--reuse", action="store_true", help="evaluate artifacts this bench made earlier with the same flags")
    args = ap.parse_args()

    cfg = sizewise.sources.load(args.model).model.config
    widths = {cfg.hidden_size, cfg.intermediate_size}
    tiles = {k for k, flags in CONFIGS.items()          # group sizes that divide every linear's input size
             if group(flags) == "channel" or all(w % int(group(flags)) == 0 for w in widths)}
    # in the order --only lists them (the first finish first when time runs short)
    wanted = [k for k in (args.only.split(",") if args.only else CONFIGS) if k in tiles]
    if args.only and set(args.only.split(",")) - set(CONFIGS):
        sys.exit(f"unknown labels in --only: {', '.join(sorted(set(args.only.split(',')) - set(CONFIGS)))}; "
                 f"labels: {', '.join(CONFIGS)}")
    if not wanted:
        sys.exit(f"no configuration matches --only {args.only}; labels: {', '.join(CONFIGS)}")
    name = per_model("pruning", args.model)
    out = ROOT / "out" / "bench" / name
    # '%' and ':' stay out of directory names
    suffix = "" if args.calib_dtype == "float32" else f".{args.calib_dtype}"
    dirs = {k: k.replace("%", "pct").replace(":", "of") + suffix for k in wanted}
    calib = [*CALIB, "--calib-dtype", args.calib_dtype]
    manifests = {k: (args.reuse and reused(out / dirs[k], [*CONFIGS[k], *calib]))
                 or made(args.model, out / dirs[k], [*CONFIGS[k], *calib]) for k in wanted}
    res = sizewise.api.compare(args.model, [out / d for d in dirs.values()], args.text, ctx=1024,
                               windows=args.windows, out=out / "report", overwrite=True)   # this run's own report
    ref = res["reference"]["perplexity"]
    rows = [{"label": k, **summary(m), **{x: res["candidates"][dirs[k]][x] for x in ("perplexity", "kl", "top1_agreement")}}
            for k, m in manifests.items()]
    print(f"float perplexity {ref:.3f} ({args.windows} windows)\n" + table(rows, ref))
    save(name, {"benchmark": "pruning", "model": args.model, "cpu": cpu_model(),
                "reference_perplexity": ref, "protocol": res["protocol"], "results": merged(name, res["protocol"], rows),
                "report": res["report"]})


def merged(name: str, protocol: dict, rows: list[dict]) -> list[dict]:
    """Earlier rows of other labels measured on the same windows, then these rows (a partial run adds to the file)."""
    try:
        old = json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return rows
    same = all(old.get("protocol", {}).get(k) == protocol.get(k) for k in ("sha256", "ctx", "stride", "windows", "bos"))
    new = {r["label"] for r in rows}
    return [r for r in old.get("results", []) if same and r["label"] not in new] + rows


if __name__ == "__main__":
    sys.exit(main())
