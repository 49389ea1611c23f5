"""What GPTQ's clip search does to KL and to perplexity, per model (issue 17: on Qwen2.5-Coder GPTQ
halves RTN's KL to the float model yet ends with a higher perplexity).

    .venv/bin/python bench/clip_effect.py [--model qwen2.5-coder-0.5b] [--bits 3] [--windows 4]

On the first --windows windows of wikitext2-test (ctx 1024), against the float model, each result's
KL (nats/token) and ΔNLL = ln(perplexity / float perplexity), the log-likelihood the *true* next token
loses; for a perturbation unrelated to the text the two are about equal.

  - GPTQ int{bits} g64, clip search on (the default) and off (`--no-clip-search`): `sizewise compress`
    artifacts under out/bench/clip_effect-MODEL/ (kept; delete them to recompute);
  - RTN int{bits} g64, its grid fitted to each group's min/max, or clipped by `quant.refine.mse_clip`
    with the error raised to the power 2 (what GPTQ's search uses) or 4, and the clip ratio searched
    down to 0.5 or 0.8: set in memory on a copy of the float model.

Results: bench/results/clip_effect[-MODEL][-bBITS].json with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import sizewise
from common import ROOT, compress, cpu_model, per_model, save
from sizewise import lazy
from sizewise.arch import discover
from sizewise.quant import grid, refine
from sizewise.quant.uniform import QuantFormat
from sizewise.sources import load

RTN_VARIANTS = {"min/max": None, "clip, error^2, down to 0.5": (2.0, 0.5), "clip, error^2, down to 0.8": (2.0, 0.8),
                "clip, error^4, down to 0.5": (4.0, 0.5)}


def _measured(result: dict, float_ppl: float) -> dict:
    return {"perplexity": result["perplexity"], "kl": result["kl"], "top1_agreement": result.get("top1_agreement"),
            "delta_nll": math.log(result["perplexity"] / float_ppl)}


def _rtn_in_place(src, fmt: QuantFormat, variant, originals: dict) -> None:
    for r in discover(src.model).all_linears():
        w = originals[r.weight_name]
        clip = 1.0
        if variant is not None:
            norm, lowest = variant
            clip = refine.mse_clip(w, fmt, grid=tuple(c for c in refine.DEFAULT_CLIP_GRID if c >= lowest), norm=norm)
        wg = grid.grouped(w, fmt)
        scale, zero = grid.fit(wg, fmt, clip)
        r.set_weight(grid.round_trip(wg, scale[..., None], None if zero is None else zero[..., None], fmt)
                     .reshape(w.shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib", default="enwiki-sample")
    args = ap.parse_args()
    os.environ[lazy.ENV] = "0"          # the RTN variants set every linear in place: the whole model in memory
    name = per_model("clip_effect", args.model) + f"-b{args.bits}"
    work = ROOT / "out" / "bench" / name
    ev = dict(text="wikitext2-test", ctx=1024, windows=args.windows, progress=False)
    reference = load(args.model)
    float_ppl = sizewise.evaluate(reference, **ev)["perplexity"]
    results = {"model": args.model, "bits": args.bits, "group_size": 64, "windows": args.windows, "cpu": cpu_model(),
               "float_perplexity": float_ppl, "gptq": {}, "rtn": {}}
    for label, extra in (("clip search (default)", []), ("no clip search", ["--no-clip-search"])):
        out = work / ("gptq-clip" if not extra else "gptq-noclip")
        made = {"reused": True}
        if not (out / "manifest.json").is_file():
            made = {"command": compress(args.model, out, ["--method", "gptq", "--bits", str(args.bits), "--group-size",
                                                          "64", "--calib", args.calib, *extra])["command"]}
        manifest = json.loads((out / "manifest.json").read_text())
        made.update(created=manifest["created"], options=manifest["method"]["effective_options"],
                    calibration=manifest["calibration"])
        results["gptq"][label] = {"artifact": str(out.relative_to(ROOT)), **made,
                                  **_measured(sizewise.evaluate(str(out), against=reference, **ev), float_ppl)}
        print(label, results["gptq"][label], file=sys.stderr, flush=True)
    src = load(args.model)
    fmt = QuantFormat(args.bits, 64, symmetric=False, scale_dtype="float16", zero="int")
    originals = {r.weight_name: r.weight() for r in discover(src.model).all_linears()}
    for label, variant in RTN_VARIANTS.items():
        t0 = time.perf_counter()
        _rtn_in_place(src, fmt, variant, originals)
        results["rtn"][label] = {"fit_s": round(time.perf_counter() - t0, 1),
                                 **_measured(sizewise.evaluate(src, against=reference, **ev), float_ppl)}
        print(label, results["rtn"][label], file=sys.stderr, flush=True)
    save(name, results)


if __name__ == "__main__":
    sys.exit(main())
