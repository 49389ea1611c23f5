"""Same behaviour across a refactor: compress SmolLM2 four ways and hash what came out.

    .venv/bin/python bench/same_behaviour.py --label after            # this checkout
    .venv/bin/python bench/same_behaviour.py --label after --reuse    # hash what an interrupted run wrote
    PYTHONPATH=OTHER/src .venv/bin/python bench/same_behaviour.py --label before   # another checkout

Each run writes bench/results/same_behaviour-LABEL.json: per configuration the SHA-256 of the
artifact's dequantized weights (every tensor, sorted by name, float32 bytes), of its packed
tensors (each stored tensor's bytes), of its plan, and of the GGUF file's bytes. Two labels are
compared with --compare A B. The configurations are the restructure issue's: RTN w4g64, GPTQ
w3g64, a 3.5 bpw plan and a 78 MB GGUF budget; calibration is kept small so a run takes minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CALIB = ["--calib", "enwiki-sample", "--calib-samples", "32", "--calib-len", "256", "--fisher-samples", "4",
         "--measure-samples", "8"]
CONFIGS = {
    "rtn-w4g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
    "gptq-w3g64": ["--method", "gptq", "--bits", "3", "--group-size", "64", *CALIB[:6]],
    "plan-3.5bpw": ["--budget", "3.5bpw", "--method", "rtn,gptq", *CALIB],
    "gguf-78MB": ["--budget", "78MB", "--format", "gguf", "--method", "rtn,gptq", *CALIB],
}


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def hashes(out: Path) -> dict:
    if out.suffix == ".gguf":
        return {"gguf_sha256": _sha([out.read_bytes()]), "bytes": out.stat().st_size}
    from safetensors import safe_open

    from sizewise import artifact

    weights = artifact.load_weights(out)
    dense = _sha(name.encode() + weights[name].float().contiguous().numpy().tobytes() for name in sorted(weights))
    with safe_open(str(out / "packed.safetensors"), framework="pt") as f:
        packed = _sha(k.encode() + f.get_tensor(k).contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                      for k in sorted(f.keys()))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"dequantized_sha256": dense, "packed_tensors_sha256": packed,
            "plan_sha256": _sha([json.dumps(manifest["plan"], sort_keys=True).encode()]),
            "bits_per_weight": manifest["totals"]["bits_per_weight"]}


def run(label: str, model: str, only: list[str] | None, reuse: bool = False) -> Path:
    work = ROOT / "out" / "bench" / f"same_behaviour-{label}"
    res = {"label": label, "model": model, "python_path": sys.path[:3], "results": {}}
    for name, args in CONFIGS.items():
        if only and name not in only:
            continue
        out = work / (f"{name}.gguf" if "gguf" in args else name)
        cmd = [sys.executable, "-m", "sizewise.cli", "compress", model, "-o", str(out), "--force", "--quiet", *args]
        wall = None
        if not (reuse and (out / "manifest.json" if out.is_dir() else out).exists()):
            print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
        res["results"][name] = {"command": "sizewise " + shlex.join(cmd[3:]), "wall_s": wall, **hashes(out)}
    import sizewise
    res["sizewise"] = str(Path(sizewise.__file__).parent)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"same_behaviour-{label}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return path


def compare(a: str, b: str) -> int:
    ra, rb = (json.loads((RESULTS / f"same_behaviour-{x}.json").read_text())["results"] for x in (a, b))
    bad = 0
    for name in sorted(set(ra) | set(rb)):
        x, y = ra.get(name, {}), rb.get(name, {})
        keys = [k for k in ("dequantized_sha256", "packed_tensors_sha256", "plan_sha256", "gguf_sha256") if k in x or k in y]
        same = all(x.get(k) == y.get(k) for k in keys)
        bad += not same
        print(f"{name:14} {'identical' if same else 'DIFFERENT'} ({', '.join(keys)})")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", nargs="*", help="run only these configurations")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ap.add_argument("--reuse", action="store_true", help="hash outputs already written under this label instead of "
                    "compressing again (wall_s is then null)")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.label, args.model, args.only, args.reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
