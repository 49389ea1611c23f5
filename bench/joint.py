"""One allocator over quantization, pruning and low-rank factors against quantization alone (issue 16, part 4).

    .venv/bin/python bench/joint.py [--model smollm2-135m] [--budgets 2.5,3,3.5,4] [--windows 16]

Runs `sizewise sweep` twice on the same model, calibration and evaluation windows: once with the
quantizer alone (`--method gptq`) and once with pruning and low-rank candidates added
(`--method gptq,sparsegpt,lowrank`: 2:4 and 50% SparseGPT+GPTQ, GPTQ grids plus rank 8/16
factors; `allocate.budget_candidates`). Per budget: bits per weight, perplexity and KL of both, and
which kinds the joint allocator chose. Writes bench/results/joint.json (per_model) with the CPU
model; the sweeps' reports stay under out/bench/joint/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

from common import ROOT, SIZEWISE, machine, per_model, save


def sweep(model: str, method: str, out, args) -> tuple[dict, float, str]:
    cmd = SIZEWISE + ["sweep", model, "--budgets", args.budgets, "--method", method, "--calib", args.calib,
                      "--calib-samples", args.calib_samples, "--calib-len", args.calib_len,
                      "--calib-dtype", args.calib_dtype, "--windows", args.windows, "--measure-samples",
                      args.measure_samples, "--fisher-samples", args.fisher_samples, "-o", str(out), "--force", "--quiet"]
    print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads((out / "sweep.json").read_text()), time.perf_counter() - t0, "sizewise " + shlex.join(cmd[3:])


def seed_quant_profile(protocol: dict, quantizer: str) -> str | None:
    """Cache the quantization-only profile as the joint profile's columns for those candidates.

    Each candidate's cost is computed on its own from the same Fisher pass and statistics, so the
    columns are what profiling the smaller set computes (tests/test_joint.py checks it); this saves
    profiling the GPTQ candidates twice. Returns the cache file written, None if none matched (the
    quantization-only sweep then profiles on its own)."""
    from types import SimpleNamespace

    from sizewise import allocate, builtins
    from sizewise.api import budget as api_budget

    cal = protocol["calibration"]
    calib = SimpleNamespace(samples=cal["samples"], length=cal["length"], seed=protocol["seed"], dtype=cal["dtype"])
    src_info = {"sha256": protocol["model_sha256"]}
    joint_cands = None
    for path in sorted((builtins.cache_dir() / "profiles").glob("*.json"), key=lambda p: -p.stat().st_mtime):
        try:
            prof = allocate.Profile.from_json(path.read_text())
        except Exception:           # another version's, or damaged: not the one just made
            continue
        if prof.protocol.get("model_sha256") == protocol["model_sha256"] and prof.protocol.get("profile_s") == \
                protocol.get("profile_s"):
            joint_cands = prof.candidates
            break
    if joint_cands is None:
        return None
    key = api_budget._profile_key(src_info, calib, cal["sha256"], joint_cands, protocol["options"],
                                  protocol["fisher_samples"], protocol["arithmetic"])
    if (builtins.cache_dir() / "profiles" / f"{key}.json").resolve() != path.resolve():
        return None                     # the key is not rebuilt exactly: profile the smaller set instead
    want = allocate.candidate_set((quantizer,))
    cols = [prof.candidates.index(c) for c in want]
    for lp in prof.layers:
        lp.costs, lp.errors = [lp.costs[i] for i in cols], [lp.errors[i] for i in cols]
    sub = allocate.Profile(want, prof.layers, {**prof.protocol, "columns_of": path.name})
    target = builtins.cache_dir() / "profiles" / (api_budget._profile_key(
        src_info, calib, cal["sha256"], want, protocol["options"], protocol["fisher_samples"],
        protocol["arithmetic"]) + ".json")
    target.write_text(sub.to_json())
    return str(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--joint", default="sparsegpt,lowrank", help="what --method adds to the quantizer")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--calib-samples", default="128")
    ap.add_argument("--calib-len", default="512")
    ap.add_argument("--calib-dtype", default="bfloat16")
    ap.add_argument("--windows", default="16")
    ap.add_argument("--fisher-samples", default="8")
    ap.add_argument("--measure-samples", default="8", help="the sweeps' (0: the knapsack's plan, not measured)")
    args = ap.parse_args()

    # the default comparison keeps the bare name; others say what they compare
    name = "joint" if (args.quantizer, args.joint) == ("gptq", "sparsegpt,lowrank") else \
        f"joint-{args.quantizer}-{args.joint.replace(',', '-')}"
    out = ROOT / "out" / "bench" / per_model(name, args.model)
    out.mkdir(parents=True, exist_ok=True)
    at_start = machine()
    joint, joint_wall, joint_cmd = sweep(args.model, f"{args.quantizer},{args.joint}", out / "joint", args)
    seeded = seed_quant_profile(joint["profile"], args.quantizer)
    quant, quant_wall, quant_cmd = sweep(args.model, args.quantizer, out / "quant", args)

    ref = joint["reference"]["perplexity"]
    assert abs(quant["reference"]["perplexity"] - ref) < 1e-9, "the two sweeps evaluated different windows"
    by_budget = {p["budget"]: p for p in quant["points"] if p["kind"] == "allocated"}
    rows = []
    for p in (p for p in joint["points"] if p["kind"] == "allocated"):
        q = by_budget[p["budget"]]
        rows.append({"budget": p["budget"],
                     "quant": {k: q[k] for k in ("bits_per_weight", "file_bytes", "perplexity", "kl", "top1_agreement",
                                                 "predicted_kl", "how")},
                     "joint": {k: p[k] for k in ("bits_per_weight", "file_bytes", "perplexity", "kl", "top1_agreement",
                                                 "predicted_kl", "how", "kinds_chosen")},
                     "joint_choices": {n: c for n, c, k in zip(joint["linears"], p["choices"], p["kinds"])
                                       if k not in ("quant", "float")},
                     "joint_not_worse": p["perplexity"] <= q["perplexity"],
                     "joint_better": p["perplexity"] < q["perplexity"]})
    lines = ["| budget | quant-only bits/w | ppl | KL | joint bits/w | ppl | KL | kinds chosen (joint) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, j = r["quant"], r["joint"]
        lines.append(f"| {r['budget']} | {q['bits_per_weight']:.3f} | {q['perplexity']:.3f} | {q['kl']:.4f} | "
                     f"{j['bits_per_weight']:.3f} | {j['perplexity']:.3f} | {j['kl']:.4f} | "
                     f"{j['kinds_chosen'].removeprefix('kinds chosen: ')} |")
    table = "\n".join(lines)
    print(f"float perplexity {ref:.3f}\n{table}")
    save(per_model(name, args.model), {
        "benchmark": "joint", "model": args.model, "commands": {"quant": quant_cmd, "joint": joint_cmd},
        "reference_perplexity": ref, "evaluation": joint["evaluation"],
        "candidates": {"quant": len(quant["candidates"]), "joint": joint["candidates"]},
        "quant_profile": f"the joint profile's columns ({seeded})" if seeded else "profiled on its own",
        "profile": {"quant": quant["profile"], "joint": joint["profile"]},
        "timing": {"quant": {**quant["timing"], "wall_s": quant_wall}, "joint": {**joint["timing"], "wall_s": joint_wall}},
        "results": rows, "table": table, "machine": {"start": at_start, "end": machine()},
        "environment": joint["environment"], "report": str(out / "joint" / "report.md"),
    })


if __name__ == "__main__":
    main()
