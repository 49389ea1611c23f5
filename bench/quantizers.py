"""Quantizers side by side on one model (default SmolLM2-135M): RTN, RTN+MSE clipping, GPTQ, AWQ and rotations.

    .venv/bin/python bench/quantizers.py [--windows 64] [--only gptq-w4-g64,rtn-w4-g64] [--calib-dtype float32]

Calibration: 128 x 512 tokens of enwiki-sample (= ../shared/data/wiki-calib); evaluation: the first
N windows of 1024 tokens of wiki.test.txt. Every configuration is compressed in its own process
(its wall time, peak memory and the machine's load average are recorded) and all are evaluated
together against the float model on the same windows. Results accumulate in
bench/results/quantizers[-MODEL].json (a run replaces rows of the same label and calibration dtype);
reports go under out/bench/quantizers.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, ROOT, compress, per_model, save, summary, table

import sizewise

# the settings, then the uniform points the budget benchmark compares with (bench/budget.py)
SETTINGS = [("4", "64"), ("4", "channel"), ("3", "64"), ("3", "32"), ("2", "32"), ("2", "64"), ("4", "32")]
METHODS = ["rtn", "rtn-mse", "gptq", "awq", "awq+gptq", "rotate+gptq"]


def label(method: str, bits: str, group: str) -> str:
    return f"{method}-w{bits}-{'pc' if group == 'channel' else 'g' + group}"


def reused(path, flags: list[str]) -> dict | None:
    """The manifest of an artifact already made with these flags (--reuse), else None."""
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    want = dict(zip(flags[::2], flags[1::2]))
    c, meth, fmt = m.get("calibration") or {}, m["method"], m["method"]["format"] or {}
    same = (meth["name"] == want["--method"] and str(fmt.get("bits")) == want["--bits"]
            and str(fmt.get("group_size") or "channel") == want["--group-size"] and fmt.get("symmetric") is False
            and c.get("samples") == int(want["--calib-samples"]) and c.get("length") == int(want["--calib-len"])
            and c.get("dtype") == want["--calib-dtype"] and c.get("seed") == 0)
    if not same:
        return None
    m["timing"]["process_wall_s"] = m["timing"]["wall_s"]      # the process's own wall time was not recorded
    m["command"] = "sizewise compress MODEL " + " ".join(flags) + " (reused artifact)"
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--calib-samples", default="128")
    ap.add_argument("--calib-len", default="512")
    ap.add_argument("--calib-dtype", default="float32")
    ap.add_argument("--text", default="wikitext2-test")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--reuse", action="store_true", help="evaluate artifacts already made with the same settings")
    args = ap.parse_args()

    wanted = set(filter(None, args.only.split(",")))
    out = ROOT / "out" / "bench" / per_model("quantizers", args.model)
    calib = ["--calib", args.calib, "--calib-samples", args.calib_samples, "--calib-len", args.calib_len,
             "--calib-dtype", args.calib_dtype]
    manifests = {}
    for bits, group in SETTINGS:
        for method in METHODS:
            name = label(method, bits, group)
            if wanted and name not in wanted:
                continue
            flags = ["--method", method, "--bits", bits, "--group-size", group, *calib]
            manifests[name] = (args.reuse and reused(out / f"{name}.{args.calib_dtype}", flags)) or \
                compress(args.model, out / f"{name}.{args.calib_dtype}", flags)
    if not manifests:
        sys.exit(f"no configuration matches --only {args.only}")
    dirs = {k: f"{k}.{args.calib_dtype}" for k in manifests}
    res = sizewise.api.compare(args.model, [out / d for d in dirs.values()], args.text, ctx=1024,
                               windows=args.windows, out=out / f"report.{args.calib_dtype}", overwrite=True)   # this run's own
    ref_ppl = res["reference"]["perplexity"]
    rows = [{"label": k, **summary(m), **{x: res["candidates"][dirs[k]][x] for x in ("perplexity", "kl", "top1_agreement")}}
            for k, m in manifests.items()]
    print(f"float perplexity {ref_ppl:.3f}\n" + table(rows, ref_ppl))
    # runs of subsets accumulate in one file: rows of the same label and calibration dtype are replaced
    path = RESULTS / f"{per_model('quantizers', args.model)}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    same = old.get("protocol", {}).get("windows") == res["protocol"].get("windows") and \
        old.get("model") == args.model and old.get("reference_perplexity") == ref_ppl
    new_keys = {(r["label"], r["calib_dtype"]) for r in rows}
    kept = [r for r in old.get("results", []) if same and (r["label"], r.get("calib_dtype")) not in new_keys]
    save(per_model("quantizers", args.model), {"benchmark": "quantizers", "model": args.model, "reference_perplexity": ref_ppl,
                        "protocol": res["protocol"], "calibration": manifests[next(iter(manifests))].get("calibration"),
                        "results": kept + rows, "reports": sorted(set(old.get("reports", []) if same else []) | {res["report"]})})


if __name__ == "__main__":
    sys.exit(main())
