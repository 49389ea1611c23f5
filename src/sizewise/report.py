"""Reports: a Markdown table and plots comparing compressed models with their reference."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _rows(results: dict) -> list[dict]:
    ref = results["reference"]
    rows = [{"label": "reference (float)", "bits_per_weight": ref.get("bits_per_weight"),
             "file_mb": ref.get("file_mb"), "perplexity": ref["perplexity"], "kl": 0.0, "top1_agreement": 1.0,
             "method": "float", "format": ref.get("format", "")}]
    for label, r in results["candidates"].items():
        rows.append({"label": label, **{k: r.get(k) for k in
                     ("bits_per_weight", "file_mb", "perplexity", "kl", "top1_agreement", "method", "format")}})
    for row in rows:
        row["delta_ppl_pct"] = 100 * (row["perplexity"] / ref["perplexity"] - 1)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["bits_per_weight"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "perplexity", "perplexity (lower is better)"),
                           (axes[1], "kl", "KL(float ‖ model), nats/token")):
        for r in pts:
            ax.scatter(r["bits_per_weight"], r[key], s=40)
            ax.annotate(r["label"], (r["bits_per_weight"], r[key]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("bits per weight (linear layers, every stored bit)")
        ax.set_title(title)
        if all(r[key] > 0 for r in pts):
            ax.set_yscale("log")      # quality spans orders of magnitude between 8 and 2 bits
        ax.grid(alpha=0.3)
    ref = rows[0]
    axes[0].axhline(ref["perplexity"], color="grey", ls="--", lw=1, label=f"float {ref['perplexity']:.2f}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, rows: list[dict], plot_name: str) -> str:
    p = results["protocol"]
    lines = [
        "# sizewise comparison", "",
        f"Reference: `{results['reference_spec']}`. Text: `{p['text']}` (sha256 `{p['sha256'][:16]}`), "
        f"{p['windows']} windows of {p['ctx']} tokens, stride {p['stride']}, {p['tokens_scored']} tokens scored, "
        f"BOS {p['bos']}. torch {p['torch']}, transformers {p['transformers']}, {p['threads']} threads.", "",
        "| model | method | format | bits/weight (linear) | packed MB | perplexity | Δ ppl | KL | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpw = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        mb = "" if r["file_mb"] is None else f"{r['file_mb']:.1f}"
        lines.append(f"| {r['label']} | {r['method'] or ''} | {r['format'] or ''} | {bpw} | {mb} | {r['perplexity']:.3f} | "
                     f"{r['delta_ppl_pct']:+.1f}% | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% |")
    lines += ["", f"![perplexity and KL against bits per weight]({plot_name})", ""]
    return "\n".join(lines)


def write(results: dict, out: str | Path) -> Path:
    """Write results.json, report.md and a plot into `out` (atomically, as a directory)."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = _rows(results)
    plot(rows, tmp / "ppl_vs_bits.png")
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    (tmp / "report.md").write_text(markdown(results, rows, "ppl_vs_bits.png"))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out / "report.md"
