"""RTN baseline on SmolLM2-135M: 8, 4 and 3 bits, group 64 and per-channel.

    .venv/bin/python bench/rtn.py [--windows 64] [--ctx 1024]

Writes bench/results/rtn.json (and a report with a plot under out/bench/rtn/report).
"""

from __future__ import annotations

import argparse
import sys

from common import ROOT, compress, save, summary, table

import sizewise

CONFIGS = [(bits, group) for bits in (8, 4, 3) for group in ("64", "channel")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikitext2-test")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args()

    out = ROOT / "out" / "bench" / "rtn"
    manifests = {}
    for bits, group in CONFIGS:
        label = f"rtn-w{bits}-{'g' + group if group != 'channel' else 'pc'}"
        manifests[label] = compress(args.model, out / label, ["--method", "rtn", "--bits", str(bits), "--group-size", group])
    res = sizewise.api.compare(args.model, [out / k for k in manifests], args.text, ctx=args.ctx,
                               windows=args.windows, out=out / "report")
    ref_ppl = res["reference"]["perplexity"]
    rows = [{"label": k, **summary(m), **{x: res["candidates"][k][x] for x in ("perplexity", "kl", "top1_agreement")}}
            for k, m in manifests.items()]
    print(f"float perplexity {ref_ppl:.3f}\n" + table(rows, ref_ppl))
    save("rtn", {"benchmark": "rtn", "model": args.model, "reference_perplexity": ref_ppl,
                 "protocol": res["protocol"], "results": rows, "report": res["report"]})


if __name__ == "__main__":
    sys.exit(main())
