"""Shared benchmark plumbing: compress each configuration in its own process (so wall time and
peak memory are its own), then evaluate every result side by side on the same windows."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIZEWISE = [sys.executable, "-m", "sizewise.cli"]


def compress(model: str, out: Path, args: list[str]) -> dict:
    """Run `sizewise compress` in a subprocess; return its manifest (timing includes model loading)."""
    cmd = SIZEWISE + ["compress", model, "-o", str(out), "--force", "--quiet", *args]
    print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    subprocess.run(cmd, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["timing"]["process_wall_s"] = time.perf_counter() - t0
    # times are only comparable on a quiet machine: record how busy it was (1-min load, start and end)
    manifest["load_avg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    manifest["command"] = "sizewise " + shlex.join(cmd[3:])
    return manifest


def cpu_model() -> str:
    """The CPU's model name and whether it computes bf16 natively (timings differ several-fold)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(native) if native else 'no bf16 units'}, {os.cpu_count()} CPUs)"


def summary(manifest: dict) -> dict:
    t = manifest["totals"]
    return {"command": manifest["command"], "bits_per_weight": t["bits_per_weight"],
            "bits_per_weight_model": t["bits_per_weight_model"], "file_bytes": t["file_bytes"],
            "compress_wall_s": manifest["timing"]["process_wall_s"],
            "engine_s": manifest["timing"].get("engine_s"), "peak_rss_mb": manifest["timing"]["peak_rss_mb"],
            "calib_dtype": (manifest.get("calibration") or {}).get("dtype"),
            "load_avg": manifest.get("load_avg")}


def machine() -> dict:
    """The CPU the numbers were measured on, and how busy it was (1-min load)."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2)}


def per_model(name: str, model: str) -> str:
    """Results and output names per model: the default model keeps the bare name (older results)."""
    if model == "smollm2-135m":
        return name
    return f"{name}-{Path(model).stem if model.endswith('.gguf') else Path(model).name}"


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)
    return path


def table(rows: list[dict], ref_ppl: float) -> str:
    lines = ["| config | bits/w (linear) | MB | ppl | Δppl | KL | top-1 | compress s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
                     f"{100 * (r['perplexity'] / ref_ppl - 1):+.1f}% | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['compress_wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)

