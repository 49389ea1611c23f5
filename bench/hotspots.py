"""Two per-layer costs of a large model, measured alone (issue 15): the memory GPTQ's Hessian factor
needs for a wide input (Qwen2.5-1.5B's down_proj: 8960) and the time to bit-pack one 8B linear's codes.

    .venv/bin/python bench/hotspots.py [--width 8960] [--codes 58720256]

Peak memory is this process's resident set sampled every 10 ms while `hessian_factor` runs, above
what it held before; packing is the wall time of `pack_bits` for 4- and 3-bit codes.
Results → bench/results/hotspots.json with the CPU model.
"""

from __future__ import annotations

import argparse
import threading
import time

from common import cpu_model, save


def _rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def factor_peak(width: int) -> dict:
    """Peak RSS above the start while factoring a random XᵀX of `width`, and its time."""
    import torch
    from sizewise.quant.gptq import hessian_factor

    x = torch.randn(2 * width, width, generator=torch.Generator().manual_seed(0))
    xtx = x.t() @ x
    del x
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.01)

    base = _rss_mb()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    hessian_factor(xtx)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"width": width, "float64_h_mb": round(width * width * 8 / 2**20), "peak_above_start_mb": peak[0] - base,
            "seconds": round(seconds, 1)}


def pack_time(count: int) -> list[dict]:
    import numpy as np
    from sizewise.quant.pack import pack_bits, unpack_bits

    rows = []
    for bits in (4, 3):
        codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=count).astype(np.uint8)
        t0 = time.perf_counter()
        packed = pack_bits(codes, bits)
        t1 = time.perf_counter()
        assert np.array_equal(unpack_bits(packed, bits, count), codes)
        rows.append({"bits": bits, "codes": count, "pack_s": round(t1 - t0, 2),
                     "unpack_s": round(time.perf_counter() - t1, 2)})
    return rows


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8960, help="input width of the Hessian (1.5B down_proj: 8960)")
    ap.add_argument("--codes", type=int, default=14336 * 4096, help="codes to pack (an 8B MLP linear)")
    args = ap.parse_args()
    result = {"benchmark": "hotspots", "cpu": cpu_model(), "load_avg": round(os.getloadavg()[0], 2),
              "hessian_factor": factor_peak(args.width), "packing": pack_time(args.codes)}
    print(result)
    save("hotspots", result)


if __name__ == "__main__":
    main()
