"""What the default budget run costs next to one uniform GPTQ run (issue 17, part 7's target: at most 3x).

    .venv/bin/python bench/default_cost.py [--model smollm2-135m] [--tag after] [--src DIR] [--windows 16]

Each command runs in its own process with a fresh profile cache (so nothing is reused between runs or
from earlier ones); its CPU time (user + sys of that child, `os.wait4`), wall time and the 1-minute load
average are recorded: wall times on a shared machine are noisy, CPU times much less so.

  - uniform:  compress MODEL --method gptq --bits 4 --group-size 64 --calib TEXT
  - budget:   compress MODEL --budget 3.5bpw --calib TEXT             (the default: rtn,gptq candidates)
  - rtn:      compress MODEL --method rtn --bits 4 --group-size 64    (the baseline the budget must beat)
  - budget-rtn-size: compress MODEL --budget 4.3125bpw --calib TEXT (the default at that baseline's size)
  - budget-noclip: compress MODEL --budget 3.5bpw --calib TEXT --no-clip-search
  - budget-rotate: compress MODEL --budget 3.5bpw --method rotate+gptq,rotate+rtn --calib TEXT
then `eval` of each on the first --windows windows of wikitext2-test, against the float model.

`--src` runs another checkout's `src/` (e.g. a `git archive` of main for "before"); results go to
bench/results/default_cost[-MODEL]-TAG.json with the CPU model and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, RESULTS, cpu_model, per_model, save

RUNS = {
    "uniform": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--calib", "{calib}"],
    "budget": ["--budget", "3.5bpw", "--calib", "{calib}"],
    "rtn": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
    "budget-rtn-size": ["--budget", "4.3125bpw", "--calib", "{calib}"],   # the default at RTN w4g64's size
    # the default with GPTQ's clip search off (on Qwen2.5-Coder the search raises perplexity: bench/clip_effect.py)
    "budget-noclip": ["--budget", "3.5bpw", "--calib", "{calib}", "--no-clip-search"],
    # the model rotated before it is profiled (the Hadamard rotation is Qwen2.5-Coder's best uniform method)
    "budget-rotate": ["--budget", "3.5bpw", "--method", "rotate+gptq,rotate+rtn", "--calib", "{calib}"],
}


def run(cmd: list[str], env: dict) -> dict:
    """One sizewise command in its own process: exit code, wall and CPU seconds, peak RSS, stdout."""
    print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)       # this child's own rusage
        code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row = {"command": "sizewise " + shlex.join(cmd[3:]), "exit": code, "wall_s": round(wall, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "user_s": round(usage.ru_utime, 1),
           "sys_s": round(usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
           "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if code != 0:
        row["error"] = (stderr.strip().splitlines() or [""])[-1]
    print(json.dumps(row), file=sys.stderr, flush=True)
    row["stdout"] = stdout
    return row


def fresh_cache(work: Path) -> Path:
    """A cache directory with the downloaded models and texts but no profiles."""
    src = Path(os.environ.get("SIZEWISE_CACHE") or Path.home() / ".cache" / "sizewise").expanduser()
    cache = work / "cache"
    if cache.exists():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    cache.mkdir(parents=True)
    for sub in ("models", "texts", "gguf"):
        if (src / sub).exists():
            (cache / sub).symlink_to(src / sub)
    return cache


def truncated(model: str, layers: int, work: Path) -> str:
    """A copy of MODEL (a built-in name or HF directory) with only its first `layers` decoder layers: the
    costs per layer, for a quick comparison on a busy machine (its quality means nothing)."""
    src = Path(model)
    if not (src / "config.json").is_file():          # a built-in name: its cached download
        src = Path(os.environ.get("SIZEWISE_CACHE") or Path.home() / ".cache" / "sizewise").expanduser() / "models" / model
    out = work / f"first{layers}"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):        # per-layer attention kinds (Qwen2, Gemma): as many
        config["layer_types"] = config["layer_types"][:layers]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--windows", default="16")
    ap.add_argument("--tag", default="after", help="results name suffix (before, after)")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the sizewise source tree to run")
    ap.add_argument("--runs", default=",".join(RUNS), help="which of " + ",".join(RUNS))
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--layers", type=int, default=None,
                    help="only the model's first N decoder layers (per-layer costs; no evaluation)")
    args = ap.parse_args()

    src = Path(args.src).resolve()
    name = per_model("default_cost", args.model) + (f"-first{args.layers}" if args.layers else "")
    work = ROOT / "out" / "bench" / f"{name}-{args.tag}"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "SIZEWISE_CACHE": str(fresh_cache(work))}
    sw = [sys.executable, "-m", "sizewise.cli"]
    model = truncated(args.model, args.layers, work) if args.layers else args.model
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"model": args.model, "layers": args.layers, "cpu": cpu_model(), "cores": os.cpu_count(), "src": str(src),
               "commit": commit or None, "calib": args.calib, "windows": int(args.windows), "runs": {}}
    for run_name in args.runs.split(","):
        out = work / run_name
        flags = [f.format(calib=args.calib) for f in RUNS[run_name]]
        row = run(sw + ["compress", model, "-o", str(out), "--force", "--quiet", *flags], env)
        row.pop("stdout")
        if row["exit"] == 0:
            manifest = json.loads((out / "manifest.json").read_text())
            row["bits_per_weight"] = manifest["totals"]["bits_per_weight"]
            row["file_bytes"] = manifest["totals"]["file_bytes"]
            alloc = manifest.get("allocation") or {}
            if alloc:
                row["profile_s"] = (alloc.get("profile") or {}).get("profile_s")
                row["measure_s"] = ((alloc.get("profile") or {}).get("measure") or {}).get("measure_s")
            if not args.no_eval and not args.layers:
                ev = run(sw + ["eval", str(out), "--text", "wikitext2-test", "--windows", args.windows,
                               "--against", model, "--json", "--quiet"], env)
                if ev["exit"] == 0:
                    r = json.loads(ev["stdout"])
                    row["eval"] = {k: r.get(k) for k in ("perplexity", "kl", "top1_agreement")}
                    row["eval_cpu_s"], row["eval_wall_s"] = ev["cpu_s"], ev["wall_s"]
                else:
                    row["eval_error"] = ev.get("error")
        results["runs"][run_name] = row
        save(f"{name}-{args.tag}", results)
    runs = results["runs"]
    for b in ("budget", "budget-rotate"):   # the default's cost, in whichever form the model gets it
        if "uniform" in runs and b in runs and runs["uniform"]["exit"] == 0 and runs[b]["exit"] == 0:
            key = b.replace("-", "_")
            results[f"{key}_over_uniform_cpu"] = round(runs[b]["cpu_s"] / runs["uniform"]["cpu_s"], 2)
            results[f"{key}_over_uniform_wall"] = round(runs[b]["wall_s"] / runs["uniform"]["wall_s"], 2)
            save(f"{name}-{args.tag}", results)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
