"""Budget allocator on a real model: proxy validation, knapsack facts, allocated vs uniform at equal size.

    python bench/allocate.py [--model smollm2-135m] [--calib-samples 16] [--calib-len 256]

Writes bench/results/allocate_<model>.json. Small by default (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save  # noqa: E402
from proxy_validation import proxy_pairs, spearman, validate_proxy  # noqa: E402

from sizewise import CalibConfig, CompressConfig, compress  # noqa: E402
from sizewise import allocate as A  # noqa: E402
from sizewise import data  # noqa: E402
from sizewise.api.budget import cached_profile  # noqa: E402
from sizewise.arch import discover  # noqa: E402
from sizewise.evaluate import environment, evaluate_many  # noqa: E402
from sizewise.plan import Plan  # noqa: E402
from sizewise.quant.formats import QuantFormat  # noqa: E402
from sizewise.sources import load  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--fisher-samples", type=int, default=8)
    ap.add_argument("--eval-text", default="wikitext2-test")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--uniform", default="3,64", help="BITS,GROUP of the uniform RTN plan to match in size")
    ap.add_argument("--compare-only", action="store_true", help="only add an allocated-vs-uniform comparison "
                    "to the existing results (the profile comes from the cache)")
    args = ap.parse_args()
    out = RESULTS / f"allocate_{args.model}.json"
    result = json.loads(out.read_text()) if args.compare_only else {"args": vars(args), "environment": environment()}

    src = load(args.model)
    arch = discover(src.model)
    cands = A.candidate_set()
    sizes = A.size_table(src.model, arch, cands)
    calib = CalibConfig(text=args.calib, samples=args.calib_samples, length=args.calib_len)
    t0 = time.perf_counter()
    prof = cached_profile(src, arch, calib, cands, fisher_samples=args.fisher_samples, progress=False)
    if args.compare_only:
        return side_by_side(args, src, arch, cands, sizes, prof, result)
    result["profile_s"] = time.perf_counter() - t0
    result["profile_protocol"] = prof.protocol
    result["reachable"] = {"bits_per_weight": [b / sizes.linear_params for b in sizes.reachable_bits()],
                           "file_bytes": list(sizes.reachable_bytes())}
    log(f"profiled {len(prof.layers)} layers x {len(cands)} candidates in {result['profile_s']:.0f} s")

    # proxy validation on held-out sequences from the evaluation text
    text = data.read_text(args.eval_text)
    held = data.calibration_samples(data.tokenize(src.tokenizer, text), 4, args.calib_len, seed=123)
    i3 = next(i for i, c in enumerate(cands) if c.method == "rtn" and c.format == QuantFormat(3, 64))
    checks = {}
    for name, pairs in (("random", proxy_pairs(prof, args.pairs, seed=0)),
                        ("int3_g64_across_layers", proxy_pairs(prof, args.pairs, seed=1, candidate=i3))):
        t0 = time.perf_counter()
        v = validate_proxy(src.model, arch, prof, held, pairs=pairs)
        # the same pairs ranked by the unweighted layer-output error (no Fisher importance)
        raw = [prof.by_name[r["layer"]].errors[cands.index(next(c for c in cands if c.label == r["candidate"]))]
               for r in v["pairs"]]
        v["spearman_unweighted_error"] = spearman(raw, [r["measured"] for r in v["pairs"]])
        v["validate_s"] = time.perf_counter() - t0
        checks[name] = v
        result["validation"] = checks
        save(f"allocate_{args.model}", result)          # partial results survive a later failure
        log(f"proxy {name}: spearman {v['spearman']:.3f} (unweighted error {v['spearman_unweighted_error']:.3f}), "
            f"median measured/predicted {v['median_ratio']:.2f}")
    result["validation"] = checks

    # knapsack facts at a few budgets
    result["allocations"] = {}
    for budget in ("2.5bpw", "3.25bpw", "4bpw", "5bpw", "100MB", "96MiB"):
        t0 = time.perf_counter()
        alloc = A.allocate(prof, sizes, budget)
        result["allocations"][budget] = {**{k: v for k, v in alloc.summary().items() if k not in ("predicted", "profile")},
                                         "allocate_s": time.perf_counter() - t0}
        log(f"{budget}: {alloc.bits_per_weight:.4f} bpw, file <= {alloc.file_bytes / 1e6:.2f} MB, predicted KL "
            f"{alloc.predicted_total:.4g}, {alloc.states} states, {time.perf_counter() - t0:.2f} s")
    print(A.render(A.allocate(prof, sizes, "3.25bpw")))

    side_by_side(args, src, arch, cands, sizes, prof, result)


def side_by_side(args, src, arch, cands, sizes, prof, result) -> None:
    """Allocated vs uniform RTN at exactly the uniform plan's size, measured on the same windows."""
    bits, group = (int(x) for x in args.uniform.split(","))
    uniform_fmt = QuantFormat(bits, group)
    iu = cands.index(next(c for c in cands if c.method == "rtn" and c.format == uniform_fmt))
    uniform = Plan.uniform(arch, "rtn", uniform_fmt)
    ubits = sum(uniform_fmt.stored_bits(*r.shape) for r in arch.all_linears())
    alloc = A.allocate(prof, sizes, A.Budget(f"uniform int{bits} g{group}", "bpw", Fraction(ubits, sizes.linear_params)))
    ulabel = f"uniform rtn int{bits} g{group}"
    models = {}
    for label, plan in ((ulabel, uniform), ("allocated (same bits)", alloc.plan)):
        models[label] = compress(load(args.model), CompressConfig(plan=plan), progress=False).model
    text = data.read_text(args.eval_text)
    tokens = data.tokenize(src.tokenizer, text)
    wins = data.eval_windows(tokens, args.eval_ctx, None, args.eval_windows, data.wants_bos(src.model, src.tokenizer))
    ev = evaluate_many(models, wins, text, reference=src.model, progress=False)
    entry = {
        "linear_bits": {ulabel: ubits, "allocated (same bits)": alloc.linear_bits},
        "predicted_kl": {ulabel: sum(prof.by_name[r.weight_name].costs[iu] for r in arch.all_linears()),
                         "allocated (same bits)": alloc.predicted_total},
        **{label: {k: v for k, v in r.items() if k not in ("per_window", "protocol")} for label, r in ev.items()},
        "protocol": ev["reference"]["protocol"]}
    result.setdefault("side_by_side", {})[f"int{bits}_g{group}"] = entry
    for label in models:
        r = ev[label]
        log(f"{label}: {entry['linear_bits'][label] / sizes.linear_params:.4f} bpw, "
            f"ppl {r['perplexity']:.3f} (float {ev['reference']['perplexity']:.3f}), KL {r['kl']:.4f}, "
            f"predicted {entry['predicted_kl'][label]:.4f}, top-1 {100 * r['top1_agreement']:.1f}%")
    save(f"allocate_{args.model}", result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
