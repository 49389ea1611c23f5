"""Reports: a Markdown table and plots comparing compressed models with their reference."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import staged_dir
from .quant.formats import DTYPE_BITS


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


def write(results: dict, out: str | Path, overwrite: bool = False) -> Path:
    """Write results.json, report.md and a plot into `out` (atomically, as a directory; an existing
    non-empty `out` only with `overwrite`)."""
    out = Path(out)
    with staged_dir(out, overwrite=overwrite) as tmp:
        rows = _rows(results)
        plot(rows, tmp / "ppl_vs_bits.png")
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / "report.md").write_text(markdown(results, rows, "ppl_vs_bits.png"))
    return out / "report.md"


# --- sweeps (sizewise.sweep) ----------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _allocated(result: dict) -> list[dict]:
    return sorted((p for p in result["points"] if p["kind"] == "allocated"), key=lambda p: p["bits_per_weight"])


def plot_sweep(result: dict, path: Path) -> None:
    """Perplexity against bits per weight (log y): allocated points as a line, uniform and peer points as markers."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    alloc = _allocated(result)
    ax.plot([p["bits_per_weight"] for p in alloc], [p["perplexity"] for p in alloc], "o-", color="C0",
            label="allocated (sizewise budget)")
    for p in alloc:
        ax.annotate(p["budget"], (p["bits_per_weight"], p["perplexity"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    markers = "s^vD<>ph*"
    uniform = [p for p in result["points"] if p["kind"] == "uniform"]
    for k, method in enumerate(dict.fromkeys(p["method"] for p in uniform)):
        pts = [p for p in uniform if p["method"] == method]
        ax.scatter([p["bits_per_weight"] for p in pts], [p["perplexity"] for p in pts], marker=markers[k % len(markers)],
                   s=50, color=f"C{1 + k}", label=f"uniform {method}", zorder=3)
        for p in pts:
            ax.annotate(p["format"].split(" asym")[0], (p["bits_per_weight"], p["perplexity"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    for p in result["peers"]:
        ax.scatter(p["bits_per_weight"], p["perplexity"], marker="X", s=60, color="grey", zorder=3)
        ax.annotate(p["label"], (p["bits_per_weight"], p["perplexity"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points", color="dimgrey")
    if result["peers"]:
        ax.scatter([], [], marker="X", color="grey", label="peers (as reported, not measured here)")
    ref = result["reference"]["perplexity"]
    ax.axhline(ref, color="grey", ls="--", lw=1, label=f"float {ref:.2f}")
    ax.set_yscale("log")          # perplexity spans orders of magnitude between 5 and 2 bits
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    lo, hi = ax.get_ylim()
    if hi / lo < 10:              # under a decade there may be no major tick: label the minor ones
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("bits per weight (linear layers, every stored bit)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{Path(result['model']).name}: perplexity against size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layer_heatmap(result: dict, path: Path, rows: list[list], levels: list, colors, legend: str,
                   title: str) -> None:
    """One row per allocated point (by size), one column per decoder linear (model order), one discrete
    color per level in `levels` (`rows` hold levels)."""
    import re

    import numpy as np
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    alloc = _allocated(result)
    index = np.array([[levels.index(v) for v in row] for row in rows])     # discrete colors: one per level present
    names = result["linears"]
    fig, ax = plt.subplots(figsize=(min(18, 4 + 0.08 * len(names) + (0.25 * len(names) if len(names) <= 32 else 0)),
                                    1.6 + 0.4 * len(alloc)))
    im = ax.imshow(index, aspect="auto", cmap=ListedColormap(colors), vmin=-0.5, vmax=len(levels) - 0.5,
                   interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, ticks=range(len(levels)), pad=0.01)
    bar.ax.set_yticklabels([str(v) for v in levels])
    bar.set_label(legend)
    ax.set_yticks(range(len(alloc)), [f"{p['budget']} ({p['bits_per_weight']:.2f})" for p in alloc])
    short = [n.removesuffix(".weight") for n in names]
    if len(names) <= 32:
        ax.set_xticks(range(len(names)), [".".join(s.split(".")[-3:]) for s in short], rotation=90, fontsize=7)
    else:        # one tick per decoder layer, at its first linear
        layer = [re.search(r"\.(\d+)\.", s) for s in short]
        starts = [i for i, m in enumerate(layer) if m and (i == 0 or not layer[i - 1] or layer[i - 1][1] != m[1])]
        step = max(1, len(starts) // 30)
        ax.set_xticks(starts[::step], [layer[i][1] for i in starts[::step]], fontsize=7)
        ax.set_xlabel("decoder layer (linears in model order)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bits_heatmap(result: dict, path: Path) -> None:
    """Chosen code bits per decoder linear (columns, in model order) for each budget (rows)."""
    import numpy as np

    rows = [p["bits"] for p in _allocated(result)]
    levels = sorted({b for row in rows for b in row})
    _layer_heatmap(result, path, rows, levels, _pyplot().get_cmap("viridis")(np.linspace(0, 1, len(levels))),
                   f"bits per code ({result['float_dtype']} kept = {DTYPE_BITS[result['float_dtype']]})",
                   "bits chosen per linear layer")


# fixed colors, so that every sweep's plot reads the same
KIND_COLORS = {"quant": "#4c72b0", "sparse": "#dd8452", "low-rank": "#55a868", "sparse+low-rank": "#c44e52",
               "float": "#8c8c8c"}


def plot_kinds_heatmap(result: dict, path: Path) -> None:
    """Which kind of compression (quantization, pruning, low-rank factors) each decoder linear got, per budget."""
    rows = [p["kinds"] for p in _allocated(result)]
    levels = [k for k in KIND_COLORS if any(k in row for row in rows)]
    levels += sorted({k for row in rows for k in row} - set(levels))
    _layer_heatmap(result, path, rows, levels, [KIND_COLORS.get(k, "#000000") for k in levels], "kind",
                   "kind of compression chosen per linear layer")


def sweep_table(result: dict) -> str:
    """One Markdown row per point: float reference, allocated budgets by size, uniform baselines, peers.
    A GGUF sweep adds each point's .gguf file and its exact size in bytes."""
    ref = result["reference"]["perplexity"]
    gguf = result.get("format") == "gguf"
    extra = " GGUF file | GGUF bytes |" if gguf else ""
    blank = " | |" if gguf else ""
    lines = ["| point | budget | bits/weight (linear) | packed MB |" + extra + " predicted KL | perplexity | Δ ppl | KL "
             "| top-1 agree | compress s |", "|---|---|---|---|" + "---|---|" * gguf + "---|---|---|---|---|---|",
             f"| float (reference) | | | |{blank} | {ref:.3f} | | | | |"]
    for kind in ("allocated", "uniform"):
        for p in sorted((p for p in result["points"] if p["kind"] == kind), key=lambda p: p["bits_per_weight"]):
            pred = "" if p["predicted_kl"] is None else f"{p['predicted_kl']:.4g}"
            files = f" {p['gguf']} | {p['gguf_bytes']:,} |" if gguf else ""
            lines.append(f"| {p['label']} | {p['budget'] or ''} | {p['bits_per_weight']:.3f} | {p['file_bytes'] / 1e6:.2f} |"
                         f"{files} {pred} | {p['perplexity']:.3f} | {100 * (p['perplexity'] / ref - 1):+.1f}% | "
                         f"{p['kl']:.4g} | {100 * p['top1_agreement']:.1f}% | {p['compress_s']:.1f} |")
    for p in result["peers"]:
        lines.append(f"| {p['label']} (peer) | | {p['bits_per_weight']:.3f} | |{blank} | {p['perplexity']:.3f} | | | | |")
    if result.get("joint"):
        lines += [""] + [f"{p['label']}: {p['kinds_chosen']}" for p in _allocated(result)]
    return "\n".join(lines)


def write_sweep(result: dict, out: Path) -> None:
    """report.md, ppl_vs_bits.png and bits_per_layer.png into the directory `out` (the sweep writes it atomically)."""
    plot_sweep(result, out / "ppl_vs_bits.png")
    plot_bits_heatmap(result, out / "bits_per_layer.png")
    if result.get("joint"):
        plot_kinds_heatmap(result, out / "kinds_per_layer.png")
    e, prof, t = result["evaluation"], result["profile"], result["timing"]
    cal = prof.get("calibration") or {}
    cal_text = cal.get("text") or "text the model generates itself"
    lines = [
        f"# sizewise sweep: {result['model']}", "",
        f"Evaluation: `{e['text']}` (sha256 `{e['sha256'][:16]}`), {e['windows']} windows of {e['ctx']} tokens, "
        f"stride {e['stride']}, {e['tokens_scored']} tokens scored, BOS {e['bos']}; every point on the same windows, "
        f"KL and top-1 agreement against the float model. torch {e['torch']}, transformers {e['transformers']}, "
        f"{e['threads']} threads.", "",
        f"Allocation: {len(result['candidates'])} candidates per layer ({', '.join(result['quantizers'])} over "
        f"{'llama.cpp types' if result.get('format') == 'gguf' else 'bit-widths and group sizes'}, or "
        f"{result['float_dtype']}; listed in sweep.json); one sensitivity profile "
        f"({cal.get('samples')} x {cal.get('length')} calibration tokens of {cal_text}, "
        f"{prof.get('fisher_samples')} Fisher samples) shared by every budget. Predicted KL is the profile's "
        "proxy (nats/token); measured KL is KL(float ‖ model).", "",
        *(["GGUF: every point is also written as POINT.gguf (llama.cpp), holding its artifact's stored weights "
           "bit for bit; candidates are llama.cpp's types, and byte budgets bound the .gguf file.", ""]
          if result.get("format") == "gguf" else []),
        f"Time: profile {t['profile_s']:.1f} s in this run (computing it took {prof.get('profile_s', 0):.1f} s; "
        "it is cached per model and calibration), compress "
        f"{sum(t['compress_s'].values()):.1f} s in all, evaluation {t['eval_s']:.1f} s, total {t['total_s']:.1f} s.", "",
        result["table"], "",
        "![perplexity against bits per weight](ppl_vs_bits.png)", "",
    ]
    if result["peers"]:
        lines[-2:-2] = [f"Peer points are read as given from {', '.join(sorted({p['source'] for p in result['peers']}))}; "
                        "they were not measured in this run, so their protocol may differ.", ""]
    lines += ["![bits chosen per linear layer, per budget](bits_per_layer.png)", ""]
    if result.get("joint"):
        lines += ["Pruning and low-rank candidates were offered too (sweep.json lists them); the kinds the "
                  "allocator chose per layer:", "",
                  "![kind of compression chosen per linear layer, per budget](kinds_per_layer.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
