"""Quantizers side by side on SmolLM2-135M: RTN, RTN+MSE clipping, GPTQ, AWQ and rotations.

    .venv/bin/python bench/quantizers.py [--windows 64] [--only gptq-w4-g64,rtn-w4-g64] [--calib-dtype bfloat16]

Calibration: 128 x 512 tokens of enwiki-sample (= ../shared/data/wiki-calib); evaluation: the first
N windows of 1024 tokens of wiki.test.txt. Every configuration is compressed in its own process
(its wall time and peak memory are its own) and all are evaluated together against the float model
on the same windows. Writes bench/results/quantizers.json and a report under out/bench/quantizers.
"""

from __future__ import annotations

import argparse
import sys

from common import ROOT, compress, save, summary, table

import sizewise

SETTINGS = [("4", "64"), ("4", "channel"), ("3", "64"), ("3", "32"), ("2", "32")]
METHODS = ["rtn", "rtn-mse", "gptq", "awq", "awq+gptq", "rotate+gptq"]


def label(method: str, bits: str, group: str) -> str:
    return f"{method}-w{bits}-{'pc' if group == 'channel' else 'g' + group}"


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
    args = ap.parse_args()

    wanted = set(filter(None, args.only.split(",")))
    out = ROOT / "out" / "bench" / "quantizers"
    calib = ["--calib", args.calib, "--calib-samples", args.calib_samples, "--calib-len", args.calib_len,
             "--calib-dtype", args.calib_dtype]
    manifests = {}
    for bits, group in SETTINGS:
        for method in METHODS:
            name = label(method, bits, group)
            if wanted and name not in wanted:
                continue
            manifests[name] = compress(args.model, out / name,
                                       ["--method", method, "--bits", bits, "--group-size", group, *calib])
    if not manifests:
        sys.exit(f"no configuration matches --only {args.only}")
    res = sizewise.api.compare(args.model, [out / k for k in manifests], args.text, ctx=1024,
                               windows=args.windows, out=out / "report")
    ref_ppl = res["reference"]["perplexity"]
    rows = [{"label": k, **summary(m), **{x: res["candidates"][k][x] for x in ("perplexity", "kl", "top1_agreement")}}
            for k, m in manifests.items()]
    print(f"float perplexity {ref_ppl:.3f}\n" + table(rows, ref_ppl))
    save("quantizers" if not wanted else "quantizers-subset",
         {"benchmark": "quantizers", "model": args.model, "reference_perplexity": ref_ppl,
          "protocol": res["protocol"], "calibration": manifests[next(iter(manifests))].get("calibration"),
          "results": rows, "report": res["report"]})


if __name__ == "__main__":
    sys.exit(main())
