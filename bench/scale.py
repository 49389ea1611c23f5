"""Scale: peak resident memory and wall time of sizewise on random-weight models with the shapes of
Qwen2.5-0.5B, Qwen2.5-1.5B and Llama-3-8B (issue 15, "Scale, measured").

    python bench/scale.py [--shapes 0.5b,1.5b,8b] [--runs rtn-gguf,gptq,eval] [--dir /tmp/sizewise-scale] [--lazy]

Each model is written once (bf16 safetensors, sharded like Hugging Face's, one tensor generated and
one shard held at a time, so writing the 8B needs ~16 GB of disk and about 1 GB of memory) with the
SmolLM2 tokenizer (only tokenizing is needed; ids stay below every config's vocabulary). Each run is
its own `sizewise` process; its peak RSS comes from the kernel (`os.wait4`'s ru_maxrss, which counts
memory-mapped weight pages once touched) and its estimate is the `peak memory ≈` line it prints.

Runs: RTN 4-bit (Q4_0) to GGUF and one evaluation window of 1024 tokens for every shape; GPTQ 4-bit
(16 samples x 512 tokens) for the 0.5B and 1.5B; one evaluation window of a Gemma-3-270M shape (262k
vocabulary, `--shapes 270m`). Targets (issue 15): RTN→GGUF ≤ 6 GB at 8B, GPTQ ≤ 4 GB at 1.5B,
evaluation ≤ 6 GB, and the 270M's evaluation within 1 GB of its float32 weights. Results → bench/results/scale.json (+ scale.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, SIZEWISE, cpu_model, save

TOKENIZER_DIR = Path.home() / ".cache" / "sizewise" / "models" / "smollm2-135m"
TEXT = "enwiki-sample"
SHARD_BYTES = 1 << 30        # each shard is built in memory alone (plus its serialized bytes)

SHAPES = {   # the published configs' shapes (random weights)
    "0.5b": ("Qwen2.5-0.5B", "qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                            max_position_embeddings=32768, rope_theta=1000000.0,
                                            rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "1.5b": ("Qwen2.5-1.5B", "qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                            num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                            max_position_embeddings=32768, rope_theta=1000000.0,
                                            rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "270m": ("Gemma-3-270M", "gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                                   num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                                   vocab_size=262144, max_position_embeddings=32768,
                                                   sliding_window=512, query_pre_attn_scalar=256,
                                                   tie_word_embeddings=True)),
    "8b": ("Meta-Llama-3-8B", "llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                             tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)),
}
RUNS = {   # run -> shapes it is measured on, and the target (bytes) where it sets one
    "rtn-gguf": (("0.5b", "1.5b", "8b"), {"8b": 6e9}),
    "gptq": (("0.5b", "1.5b"), {"1.5b": 4e9}),
    "eval": (("270m", "0.5b", "1.5b", "8b"), {"0.5b": 6e9, "1.5b": 6e9, "8b": 6e9}),   # 8B: layers streamed (`lazy`)
}
# A model that fits evaluates within 1 GB of its float32 weights whatever its vocabulary (issue 15): the
# 262k-vocabulary 270M shape is the case (its logits per window alone would be 1 GB in float32).
WITHIN_FLOAT32 = {("eval", "270m"): 1e9}


def _config(shape: str, as_llama: bool = False):
    import torch
    import transformers as tf

    _, model_type, kw = SHAPES[shape]
    config = tf.AutoConfig.for_model("llama" if as_llama else model_type, **kw)
    config.dtype = torch.bfloat16
    return config


def write_model(shape: str, out: Path, seed: int = 0, as_llama: bool = False) -> dict:
    """A random-weight bf16 model of `shape` at `out`, one tensor and one shard at a time."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    if (out / "config.json").is_file():
        return json.loads((out / "scale_model.json").read_text())
    config = _config(shape, as_llama)
    with torch.device("meta"):                        # names and shapes only
        import transformers as tf
        meta = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # tied tensors once (the head shares the embedding's parameter), as save_pretrained writes them
    shapes = {name: tuple(t.shape) for name, t in meta.named_parameters()}
    split = split_state_dict_into_shards_factory({n: 2 * _numel(s) for n, s in shapes.items()},
                                                 get_storage_size=lambda n: n, max_shard_size=SHARD_BYTES,
                                                 filename_pattern="model{suffix}.safetensors")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: _random(shapes[n], n, gen) for n in names}, str(tmp / filename), metadata={"format": "pt"})
    if split.is_sharded:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(2 * _numel(s) for s in shapes.values())},
             "weight_map": split.tensor_to_filename}, indent=2))
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZER_DIR / f, tmp / f)
    info = {"shape": shape, "like": SHAPES[shape][0], "model_type": config.model_type, "parameters": sum(_numel(s) for s in shapes.values()),
            "bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors")), "shards": len(split.filename_to_tensors)}
    (tmp / "scale_model.json").write_text(json.dumps(info))
    tmp.rename(out)
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random(shape, name: str, gen):
    """Norm gains 1, biases small, weights N(0, 0.02) rounded to bf16; generated a block of rows at a time."""
    import torch

    if len(shape) == 1:
        return (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // shape[1])
    for r in range(0, shape[0], rows):
        block = torch.randn((min(rows, shape[0] - r), shape[1]), generator=gen)
        out[r:r + rows] = (block * 0.02).to(torch.bfloat16)
    return out


def measure(cmd: list[str], lazy: bool = False) -> dict:
    """Run one sizewise command; its peak RSS (kernel's ru_maxrss of that child), wall time, estimate."""
    print("$", shlex.join(cmd[2:]), file=sys.stderr, flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"),
                                     **({"SIZEWISE_LAZY": "1"} if lazy else {})})
        _, status, usage = os.wait4(proc.pid, 0)       # this child's own rusage (Popen.wait would discard it)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read()
    estimate = re.search(r"peak memory ≈ ([0-9.]+) GB", err)
    row = {"command": "sizewise " + shlex.join(cmd[3:]), "exit": code, "wall_s": round(wall, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024), "estimate_gb": float(estimate.group(1)) if estimate else None,
           "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}     # wall times need a quiet machine
    if code != 0:
        row["error"] = (err.strip().splitlines() or [""])[-1]
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def commands(run: str, model: Path, work: Path) -> list[str]:
    if run == "rtn-gguf":
        out = work / f"{model.name}.q4_0.gguf"
        return SIZEWISE + ["compress", str(model), "-o", str(out), "--format", "gguf", "--method", "rtn", "--bits", "4",
                           "--group-size", "32", "--sym", "--force", "--quiet"]
    if run == "gptq":
        return SIZEWISE + ["compress", str(model), "-o", str(work / f"{model.name}.gptq"), "--method", "gptq",
                           "--bits", "4", "--group-size", "64", "--calib", TEXT, "--calib-samples", "16",
                           "--calib-len", "512", "--force", "--quiet"]
    if run == "eval":
        return SIZEWISE + ["eval", str(model), "--text", TEXT, "--ctx", "1024", "--windows", "1", "--json", "--quiet"]
    raise ValueError(run)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in RUNS:
        pts = sorted((r["parameters"] / 1e9, r["peak_rss_mb"] / 1e3) for r in rows if r["run"] == run and r["exit"] == 0)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=run)
    ax.ticklabel_format(useOffset=False)
    ax.margins(0.1)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak resident memory (GB)")
    ax.set_title("sizewise on random-weight models (bf16)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.5b,1.5b,8b")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sizewise-scale"), help="models and outputs (8B: ~16 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the written models for another run")
    ap.add_argument("--as-llama", action="store_true",
                    help="write every shape as a Llama (Qwen2.5's shapes without its q/k/v biases), for a GGUF "
                         "export that does not take qwen2 yet")
    ap.add_argument("--lazy", action="store_true",
                    help="keep decoder layers on disk whatever the model's size (SIZEWISE_LAZY=1); rows say so")
    args = ap.parse_args()
    shapes, runs = args.shapes.split(","), args.runs.split(",")
    previous = RESULTS / "scale.json"
    model_type = (lambda shape: "llama") if args.as_llama else (lambda shape: SHAPES[shape][1])
    rows = [r for r in (json.loads(previous.read_text())["rows"] if previous.is_file() else [])
            if not (r["shape"] in shapes and r["run"] in runs and r.get("model_type") == model_type(r["shape"])
                    and r.get("lazy", False) == args.lazy)]
    for shape in shapes:
        model = args.dir / f"random-{shape}{'-llama' if args.as_llama else ''}"
        t0 = time.perf_counter()
        info = write_model(shape, model, as_llama=args.as_llama)
        print(f"{shape}: {info['parameters'] / 1e9:.2f}B parameters, {info['bytes'] / 1e9:.2f} GB in "
              f"{info['shards']} shards ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for run in runs:
            on, targets = RUNS[run]
            if shape not in on:
                continue
            row = {"shape": shape, "like": info["like"], "model_type": info.get("model_type"),
                   "parameters": info["parameters"], "run": run,
                   **({"lazy": True} if args.lazy else {}), **measure(commands(run, model, args.dir), args.lazy)}
            if (run, shape) in WITHIN_FLOAT32:
                targets = {shape: 4 * info["parameters"] + WITHIN_FLOAT32[run, shape]}
            if shape in targets:
                row["target_mb"] = targets[shape] / 1e6
                row["meets_target"] = row["exit"] == 0 and row["peak_rss_mb"] <= targets[shape] / 1e6
            rows.append(row)
            save("scale", {"benchmark": "scale", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                           "machine": platform.machine(), "python": platform.python_version(), "rows": rows})
        if not args.keep:
            shutil.rmtree(model)
    plot(rows, RESULTS / "scale.png")


if __name__ == "__main__":
    main()
