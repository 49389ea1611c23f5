"""Issue #5's targets, read off bench/llamacpp.py's results: sizewise GGUFs vs llama.cpp's at each file size.

    .venv/bin/python bench/llamacpp_targets.py [--results llamacpp,llamacpp-arith]

For each llama.cpp type from Q2_K to Q5_K_M (and the smallest 4-bit file, Q4_0 with a 4-bit embedding),
the best sizewise GGUF no larger than that type's file must raise perplexity by at most a third of
llama.cpp's best variant there (with or without imatrix); at 77.6 MB by at most 8%, at 4.0 bits per
weight over the whole file by at most 12%. Every Δ is against the F32 perplexity of the run that
measured it. Results files are read in order; a label measured again in a later file replaces the
earlier row. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (size's name, llama.cpp labels whose file defines the size, the target: "third" or a fixed Δ)
SIZES = (("Q4_0, 4-bit emb.", ("Q4_0+imatrix+emb=Q4_0",), 0.08),
         ("Q2_K / Q3_K_S", ("Q2_K", "Q3_K_S"), "third"),
         ("Q4_0", ("Q4_0",), "third"),
         ("Q3_K_M", ("Q3_K_M",), "third"),
         ("Q4_K_S", ("Q4_K_S",), "third"),
         ("Q4_K_M", ("Q4_K_M",), "third"),
         ("Q5_K_M", ("Q5_K_M",), "third"))


def load(names: list[str]) -> tuple[dict, dict, int]:
    rows, params = {}, None
    for name in names:
        doc = json.loads((RESULTS / f"{name}.json").read_text())
        params = doc["protocol"]["parameters"]
        for r in doc["results"]:
            rows[r["label"]] = {**r, "delta": r["perplexity"] / doc["reference_perplexity"] - 1, "run": name}
    llama = {k: r for k, r in rows.items() if r["source"] == "llama.cpp"}
    ours = {k: r for k, r in rows.items() if r["source"] == "sizewise"}
    return llama, ours, params


def best_within(ours: dict, limit: int) -> dict | None:
    fits = [r for r in ours.values() if r["file_bytes"] <= limit]
    return min(fits, key=lambda r: r["perplexity"]) if fits else None


def table(llama: dict, ours: dict, params: int) -> str:
    lines = ["| size (llama.cpp type) | llama.cpp: each variant, ppl (Δ) | sizewise GGUF | its ppl (Δ) | target | met |",
             "|---|---|---|---|---|---|"]

    def line(name: str, limit: int, variants: str, target: float) -> None:
        mine = best_within(ours, limit)
        got = (f"{mine['label']}, {mine['file_bytes'] / 1e6:.1f} MB", f"{mine['perplexity']:.3f} ({100 * mine['delta']:+.3f}%)",
               "yes" if mine["delta"] <= target else "no") if mine else ("none fits", "", "no")
        lines.append(f"| {limit / 1e6:.1f} MB ({name}) | {variants} | {got[0]} | {got[1]} | ≤ {100 * target:+.3f}% | {got[2]} |")

    for name, labels, target in SIZES:
        base = [llama[k] for k in labels if k in llama]
        if not base:
            continue
        limit = min(r["file_bytes"] for r in base)
        same = sorted((r for r in llama.values() if any(r["label"].startswith(k) for k in labels)
                       and ("emb=" in r["label"]) == ("emb=" in labels[0])), key=lambda r: r["label"])
        variants = "; ".join(f"{r['label']} {r['file_bytes'] / 1e6:.1f} MB {r['perplexity']:.3f} ({100 * r['delta']:+.2f}%)"
                             for r in same)
        line(name, limit, variants, target if target != "third" else min(r["delta"] for r in same) / 3)
    line("4.0 bpw over the whole file", params * 4 // 8, "none", 0.12)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="llamacpp,llamacpp-arith", help="results JSONs under bench/results, in order")
    args = ap.parse_args()
    print(table(*load([n for n in args.results.split(",") if n])))


if __name__ == "__main__":
    main()
