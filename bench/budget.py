"""Budget allocation against the best uniform configuration at the same size (issue #4).

    .venv/bin/python bench/budget.py [--budgets 2.5,3,3.5,4,5] [--windows 64] [--calib-dtype bfloat16]

Runs `sizewise sweep` on SmolLM2-135M (quantizers rtn and gptq; calibration 128 x 512 tokens of
enwiki-sample; evaluation: the first 64 windows of 1024 tokens of wiki.test.txt), then compares
every budget with the best *uniform* configuration that fits it, taken from the quantizer
benchmark's results (bench/results/quantizers*.json: same model, calibration and windows; run
bench/quantizers.py first for the uniform points you want compared). Writes
bench/results/budget.json and the sweep's report under out/bench/budget/sweep.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

from common import RESULTS, ROOT, SIZEWISE, per_model, save


def uniform_points(model: str, calib_dtypes: set[str]) -> list[dict]:
    """Uniform configurations measured by bench/quantizers.py on the same model and protocol (best run per label)."""
    best: dict[str, dict] = {}
    for path in sorted(RESULTS.glob("quantizers*.json")) + [RESULTS / "rtn.json"]:
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        if res.get("model", "smollm2-135m") != model:
            continue
        for r in res["results"]:
            dtype = r.get("calib_dtype") or (res.get("calibration") or {}).get("dtype", "float32")
            if r["label"].startswith("rtn-") or dtype in calib_dtypes:
                if r["label"] not in best or r["perplexity"] < best[r["label"]]["perplexity"]:
                    best[r["label"]] = {**r, "source": path.name}
    return list(best.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,5")
    ap.add_argument("--method", default="rtn,gptq")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--calib-samples", default="128")
    ap.add_argument("--calib-len", default="512")
    ap.add_argument("--calib-dtype", default="bfloat16")
    ap.add_argument("--windows", default="64")
    ap.add_argument("--sequential", action="store_true", help="pass --sequential to the sweep")
    ap.add_argument("--uniform", default="gptq:2:64,gptq:2:32,gptq:3:64,gptq:3:32,gptq:4:64,gptq:4:32",
                    help="uniform points the sweep compresses (GPTQ, sequential) and evaluates with the budgets")
    args = ap.parse_args()

    out = ROOT / "out" / "bench" / per_model("budget", args.model)
    out.mkdir(parents=True, exist_ok=True)
    uniform = uniform_points(args.model, {args.calib_dtype, "float32"})
    peers = out / "uniform_points.json"
    peers.write_text(json.dumps([{"label": f"uniform {u['label']}", "bits_per_weight": u["bits_per_weight"],
                                  "perplexity": u["perplexity"]} for u in uniform]))
    cmd = SIZEWISE + ["sweep", args.model, "--budgets", args.budgets, "--method", args.method,
                      "--calib", args.calib, "--calib-samples", args.calib_samples, "--calib-len", args.calib_len,
                      "--calib-dtype", args.calib_dtype, "--windows", args.windows, "--peer", str(peers),
                      "-o", str(out / "sweep"), "--force", "--quiet"] + (["--sequential"] if args.sequential else []) \
        + (["--uniform", args.uniform] if args.uniform else [])
    print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    # the sweep's own uniform points (same run, same windows) join those of the quantizer benchmark
    for p in (p for p in sweep["points"] if p["kind"] == "uniform"):
        fmt = p["format"]
        uniform.append({"label": f"{p['method']}-{fmt} (sweep)", "bits_per_weight": p["bits_per_weight"],
                        "perplexity": p["perplexity"], "kl": p["kl"], "compress_wall_s": p["compress_s"],
                        "source": "sweep"})

    ref = sweep["reference"]["perplexity"]
    rows = []
    for p in (p for p in sweep["points"] if p["kind"] == "allocated"):
        manifest = json.loads((out / "sweep" / p["dir"] / "manifest.json").read_text())
        alloc = manifest["allocation"]
        fits = [u for u in uniform if u["bits_per_weight"] <= p["budget_value"]]
        best = min(fits, key=lambda u: u["perplexity"]) if fits else None
        rows.append({
            "budget": p["budget"], "bits_per_weight": p["bits_per_weight"], "file_bytes": p["file_bytes"],
            "perplexity": p["perplexity"], "kl": p["kl"], "top1_agreement": p["top1_agreement"],
            "predicted_kl": p["predicted_kl"], "how": p.get("how"), "measured_plans": p.get("measured_plans"),
            "size_equals_plan": manifest["totals"]["linear_stored_bits"] == alloc["linear_bits"]
                                and manifest["totals"]["file_bytes"] <= alloc["file_bytes_bound"],
            "within_budget": p["bits_per_weight"] <= p["budget_value"],
            "best_uniform": best and {k: best[k] for k in ("label", "bits_per_weight", "perplexity", "kl", "source")},
            "beats_best_uniform": best is None or p["perplexity"] <= best["perplexity"],
            "compress_s": p["compress_s"],
        })
    rtn4 = next((u for u in uniform if u["label"] == "rtn-w4-g64"), None)
    at35 = next((r for r in rows if r["budget"] in ("3.5", "3.5bpw")), None)
    gptq = [u for u in uniform if u["label"].startswith("gptq-") and u.get("compress_wall_s")]
    one_gptq = min((u["compress_wall_s"] for u in gptq), default=None)
    t = sweep["timing"]
    after_profile = t.get("choose_s", 0) + sum(t["compress_s"][p["dir"]] for p in sweep["points"] if p["kind"] == "allocated")
    lines = ["| budget | bits/w | MB | ppl | Δppl | KL | plan | best uniform that fits | its ppl | better? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best_uniform"]
        lines.append(f"| {r['budget']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
                     f"{100 * (r['perplexity'] / ref - 1):+.1f}% | {r['kl']:.4f} | {r['how']} | "
                     f"{b['label'] if b else '-'} ({b['bits_per_weight']:.3f}) | {b['perplexity'] if b else float('nan'):.3f} | "
                     f"{'yes' if r['beats_best_uniform'] else 'NO'} |")
    table = "\n".join(lines)
    print(f"float perplexity {ref:.3f}\n{table}")
    print(f"sweep after profiling: {after_profile:.0f} s (choosing {t.get('choose_s', 0):.0f} s + compressing); "
          f"one GPTQ run: {one_gptq and round(one_gptq)} s; profile {sweep['profile'].get('profile_s', 0):.0f} s; "
          f"evaluation {t['eval_s']:.0f} s")
    save(per_model("budget", args.model), {
        "benchmark": "budget", "model": args.model, "command": "sizewise " + shlex.join(cmd[3:]),
        "reference_perplexity": ref, "evaluation": sweep["evaluation"], "profile": sweep["profile"],
        "solved": sweep.get("solved"), "results": rows, "table": table,
        "at_3_5_vs_rtn_w4_g64": at35 and rtn4 and {"allocated": at35["perplexity"], "rtn_w4_g64": rtn4["perplexity"],
                                                   "lower": at35["perplexity"] < rtn4["perplexity"]},
        "sweep_cost": {"after_profile_s": after_profile, "one_gptq_run_s": one_gptq,
                       "ratio": one_gptq and after_profile / one_gptq, "profile_s": sweep["profile"].get("profile_s"),
                       "eval_s": t["eval_s"], "wall_s": wall},
        "uniform_points": uniform, "report": str(out / "sweep" / "report.md"),
    })


if __name__ == "__main__":
    sys.exit(main())
