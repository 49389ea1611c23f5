"""What the peer benchmarks (peer_llmcompressor.py, peer_autoround.py) share.

Each runs a peer quantizer in the peer's own venv, one configuration per worker process, on
sizewise's own calibration token ids, and evaluates the dense models it writes with sizewise's
evaluator. This module holds the orchestrator's side of that: the calibration ids saved as
safetensors, a worker launched and measured with os.wait4 (its own wall time, CPU time, peak RSS)
while the machine's load is sampled, the finished-marker that makes runs resumable, the
stored-bits arithmetic, and the evaluation and accumulating save of the results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_FILE = "peer_run.json"          # written last into a model directory: marks it finished
STOP_GAP_S = 5.0                    # a 1 s polling loop that wakes later than this was itself stopped

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def process_state(pid: int) -> str:
    """One-letter state of a process from /proc (R, S, D, T stopped, ...), '' if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""




def lower_priority(niceness: int = 10) -> None:
    """The machine is shared: run this process and its workers at nice >= `niceness`."""
    os.nice(max(0, niceness - os.nice(0)))


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_bytes(directory: Path, owner) -> dict[str, dict]:
    """Bytes of the tensors in a directory's safetensors files, per owning module:
    {module: {suffix: {"dtype", "bytes"}}}; `owner(key)` names the module of a key or None to skip it."""
    from safetensors import safe_open

    out: dict[str, dict] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                module = owner(key)
                if module is None:
                    continue
                t = sf.get_slice(key)
                out.setdefault(module, {})[key.rsplit(".", 1)[1]] = {
                    "dtype": t.get_dtype(), "bytes": numel(t.get_shape()) * DTYPE_BYTES[t.get_dtype()]}
    return out


def draw_samples(model: str, calib: str, n: int, length: int, seed: int, path: Path) -> dict:
    """sizewise's calibration token ids, exactly as `sizewise compress` draws them, saved as safetensors."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from sizewise import api, builtins
    from sizewise.sources import Source

    float_dir = builtins.fetch_model(model)
    tokenizer = AutoTokenizer.from_pretrained(float_dir, trust_remote_code=False)  # as sources._load_hf
    samples, proto = api._calibration(Source(None, tokenizer, {}), api.CalibConfig(
        text=calib, samples=n, length=length, seed=seed), progress=False)
    samples = samples.to(torch.long).contiguous()
    digest = hashlib.sha256(samples.numpy().tobytes()).hexdigest()
    if not (path.is_file() and torch.equal(load_file(path)["input_ids"], samples)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"input_ids": samples}, str(tmp), metadata={"text_sha256": proto["sha256"], "ids_sha256": digest})
        tmp.replace(path)
    return {**proto, "token_ids_sha256": digest, "file": str(path), "float_dir": str(float_dir)}


def shape_table(model: str) -> list[tuple[int, int]]:
    """(rows, cols) of every decoder linear of the float model, from its safetensors header."""
    from safetensors import safe_open

    from sizewise import builtins

    cols = []
    for f in sorted(Path(builtins.fetch_model(model)).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k.startswith("model.layers.") and k.endswith("_proj.weight"):
                    cols.append(tuple(sf.get_slice(k).get_shape()))
    return cols


def bits_from_scheme(bits: int, group, cols: list[tuple[int, int]], scale_bits: int, zero_bits: int) -> float:
    """Bits per weight of the linears for b-bit codes plus one scale and one zero per group."""
    total = sum(r * c for r, c in cols)
    per_group = scale_bits + zero_bits
    groups = sum(r * (1 if group == "channel" else c // int(group)) for r, c in cols)
    return bits + per_group * groups / total


# --- a configuration's staging, worker process and finished-marker ------------------------------


def finished(final: Path) -> dict | None:
    """The run record of a model directory that was completed, else None."""
    return json.loads((final / RUN_FILE).read_text()) if (final / RUN_FILE).is_file() else None


def clear(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            shutil.rmtree(p)


def publish(tmp: Path, final: Path, row: dict) -> None:
    """Mark a staged model directory finished and move it into place: it appears only once complete."""
    (tmp / RUN_FILE).write_text(json.dumps(row, indent=1, default=str))
    tmp.replace(final)


def launch(cmd: list[str], log_path: Path, timeout: float | None = None) -> dict:
    """Run a worker in its own process at the current niceness; its wall time, CPU time and peak RSS
    from os.wait4 (so they are its own), the machine's load sampled every 30 s, and the time it sat
    SIGSTOPped by someone else (another job on the shared machine timing its own work)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    row = {"loadavg_start": loadavg()}
    t0 = time.perf_counter()
    stopped_s, loads, last = 0.0, [], t0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        row["worker_pid"] = proc.pid
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            # Stopped time is in the wall time but nothing computes; a gap much longer than the
            # 1 s sleep means this process was stopped as well.
            now = time.perf_counter()
            if process_state(proc.pid) in ("T", "t") or now - last > STOP_GAP_S:
                stopped_s += now - last
            last = now
            if not loads or now - loads[-1][0] >= 30:
                loads.append((now, loadavg()[0]))
            if deadline is not None and now - stopped_s > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(1)
    row["returncode"] = os.waitstatus_to_exitcode(status)
    row["wall_s"] = time.perf_counter() - t0
    row["stopped_s"] = stopped_s
    row["wall_running_s"] = row["wall_s"] - stopped_s
    row["loadavg_1min_mean"] = sum(x for _, x in loads) / len(loads) if loads else None
    row["peak_rss_mb"] = usage.ru_maxrss / 1024
    row["cpu_s"] = usage.ru_utime + usage.ru_stime
    row["loadavg_end"] = loadavg()
    row["niceness"] = os.nice(0)
    row["log"] = str(log_path)
    return row


def last_error(log_path: Path, rc: int) -> str:
    """The exception line of the worker's traceback, else its last line."""
    if rc < 0:
        return f"killed by signal {-rc}"
    lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    tb = [i for i, x in enumerate(lines) if x.startswith("Traceback")]
    if tb:
        tail = [x for x in lines[tb[-1]:] if not x.startswith(("File ", "Traceback", "^", "~"))]
        cands = [x for x in tail if ":" in x and x.split(":", 1)[0].replace(".", "").replace("_", "").isalnum()]
        if cands:
            return cands[-1][:500]
    return (lines[-1][:500] if lines else "") + f" (exit {rc})"


# --- evaluation and results --------------------------------------------------------------------


def evaluate(model: str, dirs: list[Path], text: str, ctx: int, windows: int, report: Path) -> dict:
    """Every finished peer model against the float model, with sizewise's evaluator, on one set of windows."""
    import sizewise

    return sizewise.api.compare(model, dirs, text, ctx=ctx, windows=windows, out=report,
                                overwrite=True)        # this run's own report (an earlier one may be there)


def save_results(path: Path, payload: dict) -> Path:
    """Write results; rows (payload["results"], keyed by label) of configurations not run now are
    kept from the file (a run with --only must not drop the others), as long as they were measured
    on the same windows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old and (payload.get("protocol") is None or old.get("protocol") in (None, payload["protocol"])):
        mine = {e["label"] for e in payload["results"]}
        kept = [e for e in old.get("results", []) if e["label"] not in mine]
        payload = {**old, **{k: v for k, v in payload.items() if v is not None}, "results": kept + payload["results"]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    return path


def run_worker_if_asked(worker) -> bool:
    """`SCRIPT --worker SPEC`: run the worker (in the peer's venv); a failure prints its traceback, exit 1."""
    if len(sys.argv) < 3 or sys.argv[1] != "--worker":
        return False
    try:
        worker(Path(sys.argv[2]))
    except Exception:  # noqa: BLE001 - the orchestrator reads the traceback from the log
        import traceback

        traceback.print_exc()
        sys.exit(1)
    return True


def arg_parser(doc: str, peer: str, prefix: str, windows: int):
    """The options every peer benchmark takes: model, calibration (sizewise's defaults), evaluation, selection."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="enwiki-sample")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default="wikitext2-test")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=windows)
    ap.add_argument("--only", default="", help=f"comma-separated labels (without the {prefix} prefix) to run")
    ap.add_argument("--force", action="store_true", help="redo configurations that already finished")
    ap.add_argument("--no-eval", action="store_true", help=f"only run {peer}; evaluate later")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    return ap


def fmt(x, f: str = "{:.0f}") -> str:
    return "-" if x is None else f.format(x)


def python_ok(python: Path) -> bool:
    return python.is_file() and subprocess.run([str(python), "-c", "pass"], capture_output=True, check=False).returncode == 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
