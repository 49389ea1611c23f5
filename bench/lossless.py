"""Lossless packing of a real model: size vs BF16 and the entropy bound, bit-exact round trip,
decode and load speed, peak memory; and entropy coding of a 4-bit RTN artifact's codes.

    .venv/bin/python bench/lossless.py [--threads 2] [--repeats 3]

Writes bench/results/lossless.json (packed outputs under out/bench/lossless/). Loads run in child
processes so that their peak RSS is their own. Timings are medians of `repeats` runs on a shared
machine: compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from common import ROOT, save

import sizewise
from sizewise import artifact, sources
from sizewise import lossless as lm
from sizewise.api import CompressConfig
from sizewise.evaluate import environment
from sizewise.lossless import backend, decode_float
from sizewise.lossless.coder import entropy_bits
from sizewise.lossless.planes import split_bf16
from sizewise.quant.uniform import QuantFormat

OUT = ROOT / "out" / "bench" / "lossless"
NOTE = ("SmolLM2-135M comes from its built-in source, a Q4_1 GGUF dequantized to float32, here rounded to "
        "bfloat16. Its weights are 4-bit blocks (scale * q + min per 32 weights), not a trained bf16 model: see "
        "q4_structure for how many 32-weight blocks hold at most 16 distinct values. The codec codes exponents "
        "only (order-0, per block) and stores sign|mantissa bytes as they are; over the whole model those bytes "
        "still have ~8 bits of order-0 entropy (mantissa_byte_entropy_bits), as in trained models, so the packed "
        "size is what this codec gives; the block redundancy is left unexploited (a context model could use it), "
        "and the entropy bound reported is the bound for this codec's symbols, not for the weights.")


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Linux: make VmHWM (peak RSS) restart from the current RSS. A child's ru_maxrss starts at its
    parent's peak (it survives fork and exec), so it cannot be used here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_load(kind: str, path: str, threads: int) -> None:
    """Run in a child process: load one way, print timings and peak RSS as JSON."""
    import gc

    import accelerate
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    # Warm-up: import the modeling code and the tokenizer library (~150 MB that any loader pays once),
    # so that the peak measured below is the weights' own.
    config = transformers.AutoConfig.from_pretrained(path)
    with accelerate.init_empty_weights():
        transformers.AutoModelForCausalLM.from_config(config)
    transformers.AutoTokenizer.from_pretrained(path)
    gc.collect()
    _reset_peak()
    before = _status_mb("VmRSS")   # interpreter + torch + transformers imported: what every load pays anyway
    t0 = time.perf_counter()
    if kind == "packed":
        model, _, info = lm.load_packed_model(path, threads=threads)
        extra = {"decode_s": info["decode_s"], "decoded_bytes": info["decoded_bytes"]}
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        extra = {"mapped_load_s": time.perf_counter() - t0, "mapped_peak_rss_increase_mb": _status_mb("VmHWM") - before}
        # from_pretrained maps the safetensors file: pages are read (and count in RSS) only when
        # touched. Touch every weight so that time and memory compare with a load that decodes.
        for p in model.parameters():
            p.detach().view(torch.int16).max()
    wall = time.perf_counter() - t0
    params = {id(p): p for p in model.parameters()}
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    peak = _status_mb("VmHWM")
    print(json.dumps({"load_s": wall, "peak_rss_mb": peak, "rss_before_mb": before,
                      "peak_rss_increase_mb": peak - before, "rss_increase_after_mb": _status_mb("VmRSS") - before,
                      "model_param_mb": nbytes / 1e6, **extra}))


def run_child(kind: str, path, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_runs(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": len(runs)}


def pure_decode(packed_dir, threads: int, repeats: int) -> dict:
    """The codec alone: every coded float payload already in memory, decoded over `threads` threads."""
    manifest = lm.read_manifest(packed_dir)
    blob = (packed_dir / lm.WEIGHTS).read_bytes()
    payloads = [blob[e.offset: e.offset + e.nbytes] for e in manifest.tensors.values() if e.encoding == "float"]
    payloads.sort(key=len, reverse=True)
    out_bytes = sum(e.raw_nbytes for e in manifest.tensors.values() if e.encoding == "float")
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda d: decode_float(d, threads=1), payloads))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"bf16_bytes": out_bytes, "wall_s": wall, "best_wall_s": min(walls), "cpu_s": cpu,
            "MBps": out_bytes / wall / 1e6, "best_MBps": out_bytes / min(walls) / 1e6,
            "MB_per_cpu_s": out_bytes / cpu / 1e6, "runs": repeats}


def q4_structure(state: dict[str, torch.Tensor]) -> dict:
    """How much of the Q4_1 origin is left: distinct values per 32-weight block along rows."""
    blocks = at_most_16 = 0
    for t in state.values():
        if t.dim() == 2 and t.shape[1] % 32 == 0:
            v = t.reshape(-1, 32).view(torch.int16).sort(dim=1).values
            distinct = 1 + (v.diff(dim=1) != 0).sum(dim=1)
            blocks += distinct.numel()
            at_most_16 += int((distinct <= 16).sum())
    return {"blocks_of_32": blocks, "fraction_with_at_most_16_distinct_values": at_most_16 / blocks if blocks else None}


def hash_speed(state: dict[str, torch.Tensor]) -> dict:
    """sha256 over every tensor on one thread: the verification share of a load."""
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    t0 = time.perf_counter()
    for t in state.values():
        hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).digest()
    return {"bytes": nbytes, "MBps_1_thread": nbytes / (time.perf_counter() - t0) / 1e6}


def mantissa_stats(state: dict[str, torch.Tensor]) -> dict:
    """Order-0 entropy of the exponent and of the sign|mantissa byte over all bf16 weights."""
    exps, raws = [], []
    for t in state.values():
        if t.dtype == torch.bfloat16:
            e, r = split_bf16(t.reshape(-1).view(torch.int16).numpy().view(np.uint16))
            exps.append(e)
            raws.append(r)
    e, r = np.concatenate(exps), np.concatenate(raws)
    return {"exponent_entropy_bits": entropy_bits(e) / e.size, "mantissa_byte_entropy_bits": entropy_bits(r) / r.size,
            "values": int(e.size)}


def bench_float(args) -> dict:
    print("loading smollm2-135m ...", file=sys.stderr, flush=True)
    src = sources.load(args.model)
    ref = {n: t.detach().to(torch.bfloat16).contiguous() for n, t in src.model.state_dict().items()}
    bf16_dir = OUT / "bf16"
    if not (bf16_dir / "config.json").is_file():   # the dense BF16 model: the size to beat and a load baseline
        src.model.to(torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True)
        src.tokenizer.save_pretrained(bf16_dir)
    bf16_file = sum(p.stat().st_size for p in bf16_dir.glob("*.safetensors"))
    del src

    print("packing (float32 -> bfloat16, lossy, then bit-exact) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = lm.pack_model(args.model, OUT / "packed", dtype="bfloat16", allow_lossy=True, overwrite=True,
                        threads=args.threads)
    pack_s = time.perf_counter() - t0
    t = res["totals"]

    # The same packing from the saved BF16 directory is lossless: it must give the same bytes.
    res2 = lm.pack_model(bf16_dir, OUT / "packed-from-bf16", overwrite=True, threads=args.threads)
    same_payload = (OUT / "packed" / lm.WEIGHTS).read_bytes() == (OUT / "packed-from-bf16" / lm.WEIGHTS).read_bytes()

    print("checking the round trip ...", file=sys.stderr, flush=True)
    tensors, manifest = lm.load_packed_tensors(OUT / "packed", threads=args.threads)   # sha256-verified
    mism = [n for n, x in tensors.items() if not torch.equal(x.view(torch.int16), ref[n].view(torch.int16))]
    unpacked = lm.unpack_model(OUT / "packed", OUT / "unpacked", overwrite=True, threads=args.threads)
    from safetensors.torch import load_file
    plain = {}
    for f in unpacked["files"]:
        plain.update(load_file(str(OUT / "unpacked" / f)))
    mism_unpacked = [n for n, x in plain.items() if not torch.equal(x.view(torch.int16), ref[n].view(torch.int16))]
    ms = mantissa_stats(tensors)
    structure = q4_structure(tensors)
    sha = hash_speed(tensors)
    del tensors, plain

    print("timing loads ...", file=sys.stderr, flush=True)
    packed_loads = median_runs([run_child("packed", OUT / "packed", args.threads) for _ in range(args.repeats)])
    dense_loads = median_runs([run_child("dense", bf16_dir, args.threads) for _ in range(args.repeats)])
    decode = pure_decode(OUT / "packed", args.threads, args.repeats)
    by_kind = {}
    for name, e in res["tensors"].items():
        kind = ("embedding" if "embed" in name else "attention" if "self_attn" in name else
                "mlp" if "mlp" in name else "norm" if "norm" in name else "other")
        k = by_kind.setdefault(kind, {"tensors": 0, "raw_bytes": 0, "coded_bytes": 0, "bound_bytes": 0.0})
        k["tensors"] += 1
        k["raw_bytes"] += e["raw_nbytes"]
        k["coded_bytes"] += e["nbytes"]
        k["bound_bytes"] += e["entropy_bound_bits"] / 8
    for k in by_kind.values():
        k["ratio"] = k["coded_bytes"] / k["raw_bytes"]
        k["bound_ratio"] = k["bound_bytes"] / k["raw_bytes"]

    return {
        "note": NOTE,
        "source": res["source"],
        "lossy_step": res["lossy"],
        "bf16_bytes": t["raw_bytes"],
        "bf16_safetensors_file_bytes": bf16_file,
        "packed_bytes": t["file_bytes"],
        "packed_ratio": t["ratio"],
        "entropy_bound_bytes": t["entropy_bound_bytes"],
        "entropy_bound_ratio": t["bound_ratio"],
        "target_ratio": 0.70,
        "meets_target": t["ratio"] <= 0.70,
        "bits_per_param": t["bits_per_param"],
        "by_kind": by_kind,
        "tensors": t["tensors"],
        "params_stored": t["params"],
        **ms,
        "q4_structure": structure,
        "sha256_speed": sha,
        "round_trip": {"tensors_stored": len(manifest.tensors), "tied_not_stored": sorted(set(ref) - set(manifest.tensors)),
                       "mismatches_vs_reference_bf16": mism, "mismatches_after_unpack": mism_unpacked,
                       "bit_exact": not mism and not mism_unpacked,
                       "same_weights_file_when_packed_from_saved_bf16_dir": same_payload,
                       "lossless_pack_of_bf16_dir_lossy": res2["lossy"]},
        "pack_s": pack_s,
        "threads": args.threads,
        "load_packed": {**packed_loads, "decode_MBps": packed_loads["decoded_bytes"] / packed_loads["decode_s"] / 1e6,
                        "load_MBps": packed_loads["decoded_bytes"] / packed_loads["load_s"] / 1e6},
        "load_dense_bf16_from_pretrained": dense_loads,
        "pure_decode": decode,
    }


def bench_artifact(args) -> dict:
    out = OUT / "rtn-w4g64"
    if not artifact.is_artifact(out):
        print("compressing RTN 4-bit g64 ...", file=sys.stderr, flush=True)
        sizewise.compress(args.model, CompressConfig("rtn", QuantFormat(4, 64)), out, overwrite=True, progress=False)
    stats = lm.code_artifact_stats(out, threads=args.threads)
    res = lm.pack_artifact(out, OUT / "rtn-w4g64-packed", overwrite=True, threads=args.threads)
    dense = lm.load_packed_artifact(OUT / "rtn-w4g64-packed", threads=args.threads)
    expected = artifact.load_weights(out)
    equal = dense.keys() == expected.keys() and all(torch.equal(dense[k], expected[k]) for k in expected)
    tot = stats["totals"]
    return {
        "artifact": str(out.relative_to(ROOT)),
        "format": "int4 g64 asym (int zeros, float16 scales), RTN",
        "codes": tot["codes"],
        "nominal_bits_per_code": tot["nominal_bits_per_code"],
        "coded_bits_per_code": tot["coded_bits_per_code"],
        "entropy_bound_bits_per_code": tot["entropy_bound_bits_per_code"],
        "single_code_entropy_bits_per_code": tot["single_code_entropy_bits_per_code"],
        "bits_per_weight_linear_nominal": tot["bits_per_weight_nominal"],
        "bits_per_weight_linear_codes_coded": tot["bits_per_weight_coded"],
        "packed_safetensors_bytes": (out / artifact.PACKED).stat().st_size,
        "lossless_packed_bytes": res["totals"]["file_bytes"],
        "lossless_packed_ratio": res["totals"]["file_bytes"] / (out / artifact.PACKED).stat().st_size,
        "dense_weights_equal_artifact_load_weights": equal,
        "per_tensor": {n: {k: r[k] for k in ("coded_bits_per_code", "entropy_bound_bits_per_code", "single_code_entropy")}
                       for n, r in stats["tensors"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_load(args.child[0], args.child[1], args.threads)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    result = {"float_model": bench_float(args), "rtn_artifact": bench_artifact(args),
              "codec_backend": backend(), "environment": environment(),
              "machine_load_average": {"start": load_before, "end": os.getloadavg(),
                                       "note": "the machine was shared with another benchmark: speeds are noisy"}}
    save("lossless", result)
    f, a = result["float_model"], result["rtn_artifact"]
    print(f"bf16 {f['bf16_bytes'] / 1e6:.1f} MB -> packed {f['packed_bytes'] / 1e6:.1f} MB ({100 * f['packed_ratio']:.1f}%, "
          f"bound {100 * f['entropy_bound_ratio']:.1f}%), bit-exact {f['round_trip']['bit_exact']}; "
          f"decode {f['pure_decode']['MBps']:.0f} MB/s, load {f['load_packed']['load_s']:.2f} s "
          f"(dense {f['load_dense_bf16_from_pretrained']['load_s']:.2f} s), peak RSS +{f['load_packed']['peak_rss_increase_mb']:.0f} MB; "
          f"RTN w4: {a['coded_bits_per_code']:.3f} bits/code (bound {a['entropy_bound_bits_per_code']:.3f})", file=sys.stderr)


if __name__ == "__main__":
    main()
