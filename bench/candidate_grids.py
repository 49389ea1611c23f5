"""What leaving GPTQ grids out of a budget's candidates would cost, from a cached profile (issue 17):
the knapsack's predicted KL at 2.5-5 bits per weight with each restricted candidate set, relative to
all candidates. No solving: the profile already priced every candidate on every linear.

    .venv/bin/python bench/candidate_grids.py MODEL PROFILE.json [--tag NAME]

PROFILE.json: a profile made with every GPTQ grid, e.g. the one `bench/default_cost.py` caches in
out/bench/default_cost[-MODEL]-TAG/cache/profiles/ (a 24-grid run predating BUDGET_GPTQ_*). RTN's
grids beside GPTQ's were not profiled there, so "without" rows are upper bounds on the loss.
Results -> bench/results/candidate_grids[-MODEL].json.
"""

from __future__ import annotations

import argparse
import collections
import json

from common import cpu_model, per_model, save

BUDGETS = ("2.5bpw", "3bpw", "3.5bpw", "4bpw", "5bpw")


def _bits(c):
    return getattr(c.format, "bits", None)


def _group(c):
    return getattr(c.format, "group_size", 0)


RULES = {
    "all": lambda c: True,
    "no gptq 8-bit": lambda c: not (c.method == "gptq" and _bits(c) == 8),
    "no g32": lambda c: _group(c) != 32,
    "no gptq 8-bit, no g32 (BUDGET_GPTQ_*)": lambda c: not (c.method == "gptq" and (_bits(c) == 8 or _group(c) == 32)),
    "no 2-bit per-channel/g128": lambda c: not (_bits(c) == 2 and _group(c) in (None, 128)),
    "no per-channel at <= 3 bits": lambda c: not ((_bits(c) or 9) <= 3 and _group(c) is None),
    "no gptq 8-bit, no g128": lambda c: not (c.method == "gptq" and _bits(c) == 8) and _group(c) != 128,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("profile")
    args = ap.parse_args()

    from sizewise import allocate, sources
    from sizewise.allocate.profile import PROFILE_VERSION, Profile
    from sizewise.arch import discover

    d = json.loads(open(args.profile).read())
    made_by = d.get("profile_version")
    d["profile_version"] = PROFILE_VERSION          # costs of quantizers are the same in versions 5 and 6
    prof = Profile.from_json(json.dumps(d))
    src = sources.load(args.model)
    arch = discover(src.model)
    sizes = allocate.size_table(src.model, arch, prof.candidates)
    base = {b: allocate.allocate(prof, sizes, b) for b in BUDGETS}
    chosen = {b: collections.Counter(f"{c.method} {c.format.label}" for c in a.plan.choices).most_common(6)
              for b, a in base.items()}
    rows = []
    for name, ok in RULES.items():
        rel = {b: allocate.allocate(prof, sizes, b, allowed=ok).predicted_total / base[b].predicted_total
               for b in BUDGETS}
        rows.append({"candidates": name, "gptq_grids": sum(1 for c in prof.candidates if ok(c) and c.method == "gptq"),
                     "predicted_kl_relative": rel})
        print(f"{name:40s}", " ".join(f"{rel[b]:.4f}" for b in BUDGETS))
    save(per_model("candidate_grids", args.model), {
        "benchmark": "candidate_grids", "model": args.model, "cpu": cpu_model(), "profile": args.profile,
        "profile_version": made_by, "budgets": list(BUDGETS), "chosen_with_all": chosen, "rows": rows})


if __name__ == "__main__":
    main()
