"""Micro-benchmark of sizewise.lossless: size vs raw and the entropy bound, encode/decode speed.

Weights are synthetic, shaped like a small LLM (~27M values): Gaussian with std 1/sqrt(fan_in),
and a "real-like" set with heavy tails (Student-t, 4 dof) and log-normal per-row scales, which is
what trained weights look like to an exponent histogram. Integer codes come from RTN-quantizing
Gaussian weights to 4 (and 2, 3) bits. Also times the Huffman decoders that are installed, on the
same exponent stream, so the choice of coder can be rechecked on any machine.

    .venv/bin/python bench/lossless_codec.py [--threads 2] [--scale 1.0] [--repeats 5]

Writes bench/results/lossless_codec.json. Timings are medians of `repeats` runs in one process;
the machine is shared, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sizewise.lossless import backend, coded_stats, decode_codes, decode_float, encode_codes, encode_float
from sizewise.lossless.coder import entropy_bits
from sizewise.lossless.planes import split_bf16

RESULTS = Path(__file__).parent / "results" / "lossless_codec.json"


def model_shapes(scale: float) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-like decoder: vocab 32000, hidden 384, MLP 1024, 8 layers (~27M weights at scale 1)."""
    vocab, hidden, mlp, layers = int(32000 * scale), 384, 1024, 8
    shapes = [("embed_tokens", (vocab, hidden))]
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            shapes.append((f"layers.{i}.attn.{name}_proj", (hidden, hidden)))
        shapes += [(f"layers.{i}.mlp.gate_proj", (mlp, hidden)), (f"layers.{i}.mlp.up_proj", (mlp, hidden)),
                   (f"layers.{i}.mlp.down_proj", (hidden, mlp)), (f"layers.{i}.input_layernorm", (hidden,))]
    return shapes


def make_weights(kind: str, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in model_shapes(scale):
        if len(shape) == 1:  # norms: around 1, what trained models have
            w = 1 + 0.1 * torch.randn(shape, generator=g)
        elif kind == "gaussian":
            w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        else:
            t = torch.distributions.StudentT(4.0).sample(shape)
            rows = torch.exp(0.5 * torch.randn(shape[0], 1, generator=g))
            w = t * rows / shape[-1] ** 0.5
        out[name] = w.to(torch.bfloat16)
    return out


def timed(fn, repeats: int) -> tuple[dict, object]:
    """Median and best wall time, and median CPU time of the process (all threads), of `repeats` runs.

    CPU seconds say what the code costs when other jobs share the cores; wall seconds what a user saw.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": statistics.median(walls), "best_wall_s": min(walls), "cpu_s": statistics.median(cpus)}, result


def speeds(nbytes: int, t: dict) -> dict:
    """MB/s from wall (median and best) and per CPU-second."""
    return {"MBps": nbytes / t["wall_s"] / 1e6, "best_MBps": nbytes / t["best_wall_s"] / 1e6,
            "MB_per_cpu_s": nbytes / t["cpu_s"] / 1e6 if t["cpu_s"] > 0 else None}


def over_tensors(fn, items: dict, threads: int) -> dict:
    """fn applied to every tensor, tensors spread over a pool (largest first): whole-model throughput."""
    keys = sorted(items, key=lambda k: -len(items[k]) if isinstance(items[k], bytes) else -items[k].numel())
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(keys, pool.map(lambda k: fn(items[k]), keys)))


def bench_floats(weights: dict[str, torch.Tensor], threads: int, repeats: int) -> dict:
    raw_bytes = sum(2 * w.numel() for w in weights.values())
    enc_t, packed = timed(lambda: {k: encode_float(w, threads=threads) for k, w in weights.items()}, max(1, repeats // 2))
    encm_t, _ = timed(lambda: over_tensors(lambda w: encode_float(w, threads=1), weights, threads), max(1, repeats // 2))
    dec_t, decoded = timed(lambda: {k: decode_float(d, threads=threads) for k, d in packed.items()}, repeats)
    decm_t, _ = timed(lambda: over_tensors(lambda d: decode_float(d, threads=1), packed, threads), repeats)
    dec1_t, _ = timed(lambda: {k: decode_float(d, threads=1) for k, d in packed.items()}, repeats)
    big = max(weights, key=lambda k: weights[k].numel())
    decb_t, _ = timed(lambda: decode_float(packed[big], threads=threads), repeats)
    for k, w in weights.items():
        assert torch.equal(decoded[k].view(torch.int16), w.view(torch.int16)), k
    stats = [coded_stats(d) for d in packed.values()]
    numel = sum(s["numel"] for s in stats)
    coded = sum(s["coded_bits"] for s in stats)
    # One global histogram over every exponent: the bound for a single static code.
    exps = np.concatenate([split_bf16(w.reshape(-1).view(torch.int16).numpy().view(np.uint16))[0] for w in weights.values()])
    return {
        "numel": numel,
        "raw_MB": raw_bytes / 1e6,
        "packed_MB": coded / 8e6,
        "ratio": coded / (16 * numel),
        "bits_per_value": coded / numel,
        "exponent_bits_per_value": sum(s["symbol_bits"] for s in stats) / numel,
        "exponent_entropy_bound_per_block": sum(s["entropy_bound_bits"] for s in stats) / numel,
        "exponent_entropy_global": entropy_bits(exps) / numel,
        "bound_bits_per_value": sum(s["entropy_bound_bits"] + s["plain_bits"] for s in stats) / numel,
        "best_ratio_possible": sum(s["entropy_bound_bits"] + s["plain_bits"] for s in stats) / (16 * numel),
        "encode_per_tensor_threads": speeds(raw_bytes, enc_t),
        "encode_tensors_over_pool": speeds(raw_bytes, encm_t),
        "decode_per_tensor_threads": speeds(raw_bytes, dec_t),
        "decode_tensors_over_pool": speeds(raw_bytes, decm_t),
        "decode_1_thread": speeds(raw_bytes, dec1_t),
        f"decode_largest_tensor_{big}_{weights[big].numel()}_values": speeds(2 * weights[big].numel(), decb_t),
        "n_tensors": len(weights),
    }


def rtn_codes(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """Asymmetric min/max RTN per group of `group` inputs (per row when None)."""
    rows = w.reshape(-1, group) if group else w
    lo, hi = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    return np.clip(np.round((rows - lo) / scale), 0, 2**bits - 1).astype(np.uint8).reshape(w.shape)


def bench_codes(threads: int, repeats: int, seed: int, numel_rows: int) -> list[dict]:
    w = np.random.default_rng(seed).standard_normal((numel_rows, 4096)).astype(np.float32)
    out = []
    for bits, group in [(4, 128), (4, None), (3, 128), (2, 64)]:
        codes = rtn_codes(w, bits, group)
        enc_t, data = timed(lambda: encode_codes(codes, bits, threads=threads), 1)
        dec_t, back = timed(lambda: decode_codes(data, threads=threads), repeats)
        assert np.array_equal(back, codes)
        s = coded_stats(data)
        out.append({
            "bits": bits,
            "rtn_group": group or "row",
            "numel": codes.size,
            "codes_per_symbol": s["values_per_symbol"],
            "entropy_per_code": entropy_bits(codes.reshape(-1)) / codes.size,
            "bound_of_coded_symbols_per_code": s["entropy_bound_bits_per_value"],
            "coded_bits_per_code": s["bits_per_value"],
            "saving_vs_plain": 1 - s["bits_per_value"] / bits,
            "encode_Mcodes_per_s": codes.size / enc_t["wall_s"] / 1e6,
            "decode_Mcodes_per_s": codes.size / dec_t["wall_s"] / 1e6,
            "decode_Mcodes_per_cpu_s": codes.size / dec_t["cpu_s"] / 1e6 if dec_t["cpu_s"] else None,
        })
    return out


def bench_decoders(weights: dict[str, torch.Tensor], repeats: int) -> dict:
    """Decode speed of one 1M-symbol exponent block with each installed coder (single thread)."""
    w = next(iter(weights.values())).reshape(-1)[: 1 << 20]
    sym = split_bf16(w.view(torch.int16).numpy().view(np.uint16))[0]
    n = sym.size
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    stream = c.compress(sym) + c.flush()
    res = {"entropy_bits_per_symbol": entropy_bits(sym) / n}

    def record(name, bits, fn):
        t, out = timed(fn, max(repeats, 10))
        assert np.array_equal(np.frombuffer(out, np.uint8) if isinstance(out, bytes) else out, sym), name
        res[name] = {"bits_per_symbol": bits, "decode_Msym_per_s": n / t["wall_s"] / 1e6,
                     "best_Msym_per_s": n / t["best_wall_s"] / 1e6,
                     "Msym_per_cpu_s": n / t["cpu_s"] / 1e6 if t["cpu_s"] else None}

    huff_bits = 8 * len(stream) / n
    record("deflate_huffman_only/zlib", huff_bits, lambda: zlib.decompress(stream, -15, n))
    try:
        from isal import isal_zlib
        record("deflate_huffman_only/isal", huff_bits, lambda: isal_zlib.decompress(stream, -15, n))
    except ImportError:
        res["deflate_huffman_only/isal"] = "not installed"
    try:
        import deflate
        record("deflate_huffman_only/libdeflate", huff_bits, lambda: deflate.deflate_decompress(stream, n))
    except ImportError:
        res["deflate_huffman_only/libdeflate"] = "not installed"
    try:
        import constriction
        counts = np.bincount(sym, minlength=256).astype(np.float64)
        model = constriction.stream.model.Categorical(counts, perfect=False)
        enc = constriction.stream.stack.AnsCoder()
        enc.encode_reverse(sym.astype(np.int32), model)
        words = enc.get_compressed()
        record("constriction_ans", 32 * words.size / n,
               lambda: constriction.stream.stack.AnsCoder(words).decode(model, n).astype(np.uint8))
    except ImportError:
        res["constriction_ans"] = "not installed"
    try:
        import zstandard
        # Not a pure entropy coder: LZ matches plus Huffman literals; kept as a reference point.
        zs = zstandard.ZstdCompressor(level=1).compress(sym.tobytes())
        dctx = zstandard.ZstdDecompressor()
        record("zstd_level1", 8 * len(zs) / n, lambda: dctx.decompress(zs))
    except ImportError:
        res["zstd_level1"] = "not installed"
    return res


def package_versions(names) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="vocab scale: 1.0 gives ~27M weights")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    result = {
        "protocol": {
            "model": "synthetic Llama-like shapes: vocab 32000*scale, hidden 384, mlp 1024, 8 layers, bf16",
            "scale": args.scale, "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
            "timing": "median of repeats, one process, wall clock", "decoder_backend": backend(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus_available": len(os.sched_getaffinity(0)),
            "load_average_at_start": os.getloadavg(),
            "coder_packages": package_versions(("isal", "deflate", "constriction", "zstandard")),
        },
    }
    for kind in ("gaussian", "real_like"):
        weights = make_weights(kind, args.scale, args.seed)
        result[f"bf16_{kind}"] = bench_floats(weights, args.threads, args.repeats)
        print(kind, json.dumps(result[f"bf16_{kind}"], indent=1))
        if kind == "gaussian":
            result["decoders_one_block"] = bench_decoders(weights, args.repeats)
            print(json.dumps(result["decoders_one_block"], indent=1))
        del weights
    result["rtn_codes"] = bench_codes(args.threads, args.repeats, args.seed, numel_rows=max(1, int(2048 * args.scale)))
    print(json.dumps(result["rtn_codes"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
