"""The peer, AutoRound (auto-round on PyPI), on exactly our calibration samples, evaluated with our evaluator.

    nice -n 10 .venv/bin/python bench/peer_autoround.py [--model smollm2-135m] [--only rtn-w4-g64,...]
        [--force] [--windows 16] [--samples 128] [--length 512] [--iters N] [--smoke] [--no-eval]

- The orchestrator (project venv) creates AutoRound's own venv at out/autoround-venv if it is
  missing (torch pinned and installed first, then auto-round and transformers pinned, after a
  `pip install --dry-run` shows that they leave torch alone), draws sizewise's calibration token
  ids (bench/peer_common.draw_samples: `sizewise compress --calib enwiki-sample`, 128 x 512, seed 0),
  launches one worker per configuration under that venv (wall time and peak RSS of its own
  process from os.wait4), evaluates the finished models in one `api.compare` call against the
  float model and writes bench/results/peer_autoround[-MODEL].json.
- The worker (`--worker`, AutoRound's venv) loads the float HF directory in float32 on CPU, runs
  `AutoRound(...).quantize_and_save(format="auto_round")` on those ids, counts the stored bits per
  weight from that packed save, loads it back through AutoRound's own CPU inference backend, reads
  each linear's weight as its kernel computes it (the kernel applied to the identity), and writes
  those dequantized weights as a plain dense float32 HF directory (no quantization_config) that
  transformers loads; the other parameters are the float model's.

Configurations (labels without the `ar-` prefix): its RTN mode (iters=0, disable_opt_rtn=True:
its CLI's `rtn` recipe), its default SignRound tuning at 4 and 3 bits (iters 200, or --iters),
and its AutoScheme (mixed bits among W2/W3/W4/W8 at group 64) at 3.5 average bits. Its default
scheme is kept (symmetric integers, scales in float16); the group is 64 because SmolLM2's
576-wide rows do not split into its default 128.

Resumable: a configuration whose out/autoround/<label>/ holds a finished model is not run again
unless --force; a failing one is recorded with its one-line error and the others go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc
from common import cpu_model, per_model

VENV = pc.ROOT / "out" / "autoround-venv"
PYTHON = VENV / "bin" / "python"
PINS = ["auto-round==0.16.1", "transformers==5.23.0"]   # transformers as in the project venv
TORCH_PIN = "torch==2.13.0"                                # the CPU wheel; unpinned pulls CUDA
PREFIX = "ar-"
CALIB_NAME = "sizewise-calibration"   # AutoScheme takes only a dataset name: this one is ours

# label -> AutoRound options (everything else at its defaults)
CONFIGS = {
    "rtn-w4-g64": {"bits": 4, "group_size": 64, "iters": 0, "disable_opt_rtn": True},
    "rtn-w3-g64": {"bits": 3, "group_size": 64, "iters": 0, "disable_opt_rtn": True},
    "tuned-w4-g64": {"bits": 4, "group_size": 64},
    "tuned-w3-g64": {"bits": 3, "group_size": 64},
    "autoscheme-3.5": {"avg_bits": 3.5, "options": [2, 3, 4, 8], "group_size": 64},
}


# --- worker (AutoRound's venv) -----------------------------------------------------------------


class _Shards:
    """The float checkpoint's tensors by name across all its safetensors files (Qwen's has three)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        files = [safe_open(f, "pt") for f in sorted(directory.glob("*.safetensors"))]
        self.where = {k: f for f in files for k in f.keys()}

    def keys(self):
        return self.where.keys()

    def get_tensor(self, name: str):
        return self.where[name].get_tensor(name)

    def get_slice(self, name: str):
        return self.where[name].get_slice(name)


def worker(spec_path: Path) -> None:
    import resource

    import auto_round
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(spec_path.read_text())
    opts = dict(spec["options"])
    out, out_c = Path(spec["out"]), Path(spec["out_compressed"])
    record = {"loadavg_worker_start": pc.loadavg(), "threads": torch.get_num_threads(),
              "versions": {"auto_round": auto_round.__version__, "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__}, "workarounds": []}
    model = AutoModelForCausalLM.from_pretrained(spec["float_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["float_dir"])
    ids = load_file(spec["calib"])["input_ids"]
    n, length = ids.shape
    samples = [ids[i: i + 1] for i in range(n)]   # one (1, length) tensor per sample, as its calib loop takes

    kwargs = {"dataset": samples, "nsamples": n, "seqlen": length, "device_map": "cpu", "seed": 0}
    for k in ("iters", "lr", "batch_size", "disable_opt_rtn"):
        if k in opts:
            kwargs[k] = opts[k]
    if "avg_bits" in opts:
        from auto_round import AutoScheme
        from auto_round.auto_scheme import delta_loss
        from auto_round.schemes import QuantizationScheme

        # AutoScheme scores layers on calibration it draws from a dataset *name* (a hub download), and
        # then requires the compressor's dataset to be a name too: the name CALIB_NAME gives ours
        # (the first `nsamples` of our samples, in its batches) to both of its loaders.
        import auto_round.calib_dataset as calib_dataset

        original = calib_dataset.get_dataloader

        def ours(tok, seqlen, dataset_name=None, seed=42, bs=8, nsamples=512, **kw):
            if dataset_name != CALIB_NAME:
                return original(tok, seqlen, dataset_name, seed, bs, nsamples, **kw)
            take = ids[:nsamples, :seqlen]
            return [{"input_ids": take[i: i + bs], "attention_mask": torch.ones_like(take[i: i + bs])}
                    for i in range(0, take.shape[0], bs)]

        calib_dataset.get_dataloader = delta_loss.get_dataloader = ours
        kwargs["dataset"] = CALIB_NAME
        record["workarounds"].append(f"auto_round.calib_dataset.get_dataloader answers the name {CALIB_NAME!r} with "
                                     "our calibration ids (AutoScheme accepts only a dataset name)")
        options = [QuantizationScheme(bits=b, group_size=opts["group_size"], sym=True) for b in opts["options"]]
        scheme = AutoScheme(avg_bits=opts["avg_bits"], options=options,
                            seqlen=min(length, opts.get("autoscheme_seqlen", length)),
                            nsamples=opts.get("autoscheme_nsamples"))
        ar = AutoRound(model, tokenizer, scheme=scheme, **kwargs)
    else:
        ar = AutoRound(model, tokenizer, scheme="W4A16", bits=opts["bits"], group_size=opts["group_size"], **kwargs)
    qc = ar.quantize_config
    record["autoround_kwargs"] = {k: v for k, v in kwargs.items() if not isinstance(v, list)}
    record["algorithm"] = {"class": type(qc).__name__,
                           **{k: getattr(qc, k) for k in ("iters", "lr", "nsamples", "seqlen", "batch_size",
                                                          "disable_opt_rtn", "sym", "bits", "group_size")
                              if isinstance(getattr(qc, k, None), (int, float, bool, str))}}
    record["algorithm"].update({k: getattr(ar, k) for k in ("nsamples", "seqlen", "batch_size", "iters", "lr")
                                if isinstance(getattr(ar, k, None), (int, float, bool, str))})
    t0 = time.perf_counter()
    ar.quantize_and_save(output_dir=str(out_c), format="auto_round")
    record["quantize_s"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["peak_rss_mb_quantize"] = usage.ru_maxrss / 1024
    record["cpu_s_quantize"] = usage.ru_utime + usage.ru_stime   # loading included; read-back excluded
    record["calibration_used"] = None if opts.get("disable_opt_rtn") else {"samples": n, "length": length}
    del ar, model
    # quantize_and_save names its own subfolder; its `fake` format keeps float weights (quantized at
    # load time), so the dequantized weights are read back from the packed save through its runtime.
    packed = next(iter({p.parent for p in out_c.rglob("quantization_config.json")}), None)
    if packed is None:
        raise RuntimeError(f"no packed save under {out_c}")
    record["packed_dir"] = str(packed)
    record["packed_quantization_config"] = json.loads((packed / "quantization_config.json").read_text())

    float_file = _Shards(Path(spec["float_dir"]))
    float_shapes = {k[: -len(".weight")]: tuple(float_file.get_slice(k).get_shape()) for k in float_file.keys()
                    if k.startswith("model.layers.") and k.endswith("_proj.weight")}
    t1 = time.perf_counter()
    qmodel = AutoModelForCausalLM.from_pretrained(packed, device_map="cpu").eval()   # its CPU inference backend
    dense, checks = {}, {}
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if name not in float_shapes:
                continue
            rows, cols = float_shapes[name]
            bits, gs = int(mod.bits), int(mod.group_size)
            # Its kernel applied to the identity gives the weight it computes with (bias taken off).
            w = (mod(torch.eye(cols)) - mod(torch.zeros(1, cols))).T.float().contiguous()
            f = float_file.get_tensor(name + ".weight").float()
            srt = w.reshape(rows, cols // gs, gs).sort(dim=-1).values
            distinct = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)
            checks[name] = {"bits": bits, "group_size": gs, "max_distinct_per_group": int(distinct.max()),
                            "module": type(mod).__module__ + "." + type(mod).__name__,
                            "fp16_exact": bool(torch.equal(w.half().float(), w)),
                            "frac_changed_vs_float": float((w != f).float().mean()),
                            "rel_err_vs_float": float((w - f).norm() / f.norm())}
            dense[name + ".weight"] = w
    if set(checks) != set(float_shapes):
        raise RuntimeError(f"not quantized in the packed save: {sorted(set(float_shapes) - set(checks))[:3]}")
    bad = [k for k, c in checks.items() if c["max_distinct_per_group"] > 2 ** c["bits"]]
    if bad:
        raise RuntimeError(f"{len(bad)} linears have more distinct values per group than 2^bits, e.g. {bad[0]}")
    if min(c["frac_changed_vs_float"] for c in checks.values()) == 0:
        raise RuntimeError("some quantized weights equal the float ones")
    record["dequantize_s"] = time.perf_counter() - t1
    record["quantized_linears"] = len(checks)
    record["bits_histogram"] = {str(b): sum(1 for c in checks.values() if c["bits"] == b)
                                for b in sorted({c["bits"] for c in checks.values()})}
    record["checks_summary"] = {
        "max_distinct_vs_levels": max(c["max_distinct_per_group"] / 2 ** c["bits"] for c in checks.values()),
        "min_frac_changed_vs_float": min(c["frac_changed_vs_float"] for c in checks.values()),
        "mean_rel_err_vs_float": sum(c["rel_err_vs_float"] for c in checks.values()) / len(checks),
        "all_fp16_exact": all(c["fp16_exact"] for c in checks.values()),
        "runtime_modules": sorted({c["module"] for c in checks.values()}),
        "runtime_dtype": str(next(qmodel.parameters()).dtype)}

    # Stored bits: every tensor of a quantized linear in the packed save (codes, scales, zeros, ...).
    per_module = pc.tensor_bytes(packed, lambda k: k.rsplit(".", 1)[0] if k.rsplit(".", 1)[0] in checks else None)
    tensors: dict[str, dict] = {}
    for mod in per_module.values():
        for suffix, t in mod.items():
            tensors.setdefault(suffix, {"dtype": t["dtype"], "bytes": 0})["bytes"] += t["bytes"]
    linear_weights = sum(pc.numel(float_shapes[m]) for m in checks)
    record["packed_linear_tensors"] = tensors
    record["packed_bits_per_weight"] = 8 * sum(t["bytes"] for t in tensors.values()) / linear_weights
    record["packed_file_bytes"] = sum(f.stat().st_size for f in packed.glob("*.safetensors"))

    # A fresh plain model from the float config: float parameters, quantized linears dequantized.
    config = AutoConfig.from_pretrained(spec["float_dir"])
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            p.copy_(dense[name] if name in dense else float_file.get_tensor(name).float())
    out.mkdir(parents=True)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if "quantization_config" in json.loads((out / "config.json").read_text()):
        raise RuntimeError("dense save carries a quantization_config")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rp = dict(reloaded.named_parameters())
    mism = [k for k, v in dense.items() if not torch.equal(rp[k], v)]
    if mism:
        raise RuntimeError(f"reloaded dense model differs at {mism[0]}")
    probe = ids[:1, : min(length, 128)]
    with torch.no_grad():
        a, b = qmodel(input_ids=probe).logits.float(), reloaded(input_ids=probe).logits.float()
    record["dense_vs_autoround_runtime"] = {"tokens": probe.numel(), "max_abs_logit_diff": float((a - b).abs().max()),
                                            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    record["tied_embeddings"] = bool(config.tie_word_embeddings)
    record["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["loadavg_worker_end"] = pc.loadavg()
    (out / "peer_worker.json").write_text(json.dumps(record, indent=1, default=str))


# --- orchestrator (project venv) --------------------------------------------------------------


def ensure_venv() -> dict:
    """AutoRound's own venv: torch pinned first (the CPU wheel), then the pinned peer packages,
    refused if pip would replace torch."""
    if pc.python_ok(PYTHON) and subprocess.run([str(PYTHON), "-c", "import auto_round"], capture_output=True, check=False).returncode == 0:
        return venv_versions()
    pip = [str(PYTHON), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(pip + [TORCH_PIN], check=True)
    dry = subprocess.run([str(PYTHON), "-m", "pip", "install", "--dry-run", TORCH_PIN, *PINS],
                         capture_output=True, text=True, check=True).stdout
    would = next((x for x in dry.splitlines() if x.startswith("Would install")), "")
    if any(w.startswith(("torch-", "nvidia")) for w in would.split()[2:]):
        sys.exit(f"pip would replace torch in {VENV}: {would}")
    subprocess.run(pip + [TORCH_PIN, *PINS], check=True)
    return venv_versions()


def venv_versions() -> dict:
    code = "import json, torch, transformers, auto_round; print(json.dumps({'auto_round': auto_round.__version__, " \
           "'torch': torch.__version__, 'transformers': transformers.__version__}))"
    return json.loads(subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, check=True).stdout)


def run_config(label: str, opts: dict, calib: dict, out_root: Path, force: bool, timeout: float | None) -> dict:
    final, final_c = out_root / (PREFIX + label), out_root / (PREFIX + label + ".saved")
    row = {"label": PREFIX + label, "options": opts, "calib_ids_sha256": calib["token_ids_sha256"]}
    done = pc.finished(final)
    if done and not force:
        if done.get("options") == opts and done.get("calib_ids_sha256") == row["calib_ids_sha256"]:
            pc.log(f"[{row['label']}] finished earlier, kept (use --force to redo)")
            return {**done, "resumed": True}
        pc.log(f"[{row['label']}] finished earlier with other options or calibration: redoing")
    tmp, tmp_c = out_root / f".{PREFIX}{label}.tmp", out_root / f".{PREFIX}{label}.saved.tmp"
    pc.clear(final, final_c, tmp, tmp_c)
    spec = {"label": row["label"], "options": opts, "float_dir": calib["float_dir"], "calib": calib["file"],
            "out": str(tmp), "out_compressed": str(tmp_c)}
    spec_path = out_root / f".{PREFIX}{label}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = out_root / f"{PREFIX}{label}.log"
    pc.log(f"[{row['label']}] start, load {pc.loadavg()}, log {log_path}")
    row.update(pc.launch([str(PYTHON), str(Path(__file__).resolve()), "--worker", str(spec_path)], log_path, timeout))
    if row["returncode"] != 0 or not (tmp / "peer_worker.json").is_file():
        row["error"] = pc.last_error(log_path, row["returncode"])
        pc.log(f"[{row['label']}] FAILED: {row['error']}")
        return row
    row["worker"] = json.loads((tmp / "peer_worker.json").read_text())
    row["dir"] = str(final)
    tmp_c.replace(final_c)
    pc.publish(tmp, final, row)
    spec_path.unlink()
    pc.log(f"[{row['label']}] done in {row['wall_s']:.0f} s, peak {row['peak_rss_mb']:.0f} MB, load {row['loadavg_end']}")
    return row


def entry(r: dict, calib: dict, res: dict | None) -> dict:
    w = r.get("worker", {})
    e = {"label": r["label"], "options": r["options"], "algorithm": w.get("algorithm"),
         "calibration": ({**w["calibration_used"], "text": calib["text"], "text_sha256": calib["sha256"],
                          "token_ids_sha256": calib["token_ids_sha256"], "seed": calib["seed"]}
                         if w.get("calibration_used") else None),
         "bits_per_weight": w.get("packed_bits_per_weight"), "bits_histogram": w.get("bits_histogram"),
         "stored": {"tensors": w.get("packed_linear_tensors"), "file_bytes": w.get("packed_file_bytes"),
                    "quantization_config": w.get("packed_quantization_config")},
         **{k: r.get(k) for k in ("wall_s", "stopped_s", "wall_running_s", "cpu_s", "peak_rss_mb", "loadavg_start",
                                  "loadavg_1min_mean", "loadavg_end", "niceness", "dir")},
         "quantize_s": w.get("quantize_s"), "cpu_s_quantize": w.get("cpu_s_quantize"),
         "dequantize_s": w.get("dequantize_s"), "peak_rss_mb_quantize": w.get("peak_rss_mb_quantize"),
         "checks": w.get("checks_summary"), "workarounds": w.get("workarounds"), "versions": w.get("versions"),
         "resumed": r.get("resumed", False)}
    if "error" in r:
        e["error"] = r["error"]
    if res is not None and r["label"] in res["candidates"]:
        c = res["candidates"][r["label"]]
        e.update(perplexity=c["perplexity"], kl=c["kl"], top1_agreement=c["top1_agreement"])
    return e


def sizewise_side(model: str, ours: list[Path], res: dict | None) -> dict:
    """sizewise's own numbers beside AutoRound's: artifacts evaluated in this compare call (same
    windows), and the uniform GPTQ rows of bench/results/quantizers[-MODEL].json (their own windows)."""
    side = {"same_windows": [], "from_results": None}
    for d in ours:
        t = json.loads((d / "manifest.json").read_text())
        row = {"label": d.name, "bits_per_weight": t["totals"]["bits_per_weight"], "timing": t.get("timing")}
        if res is not None and d.name in res["candidates"]:
            row.update({k: res["candidates"][d.name][k] for k in ("perplexity", "kl", "top1_agreement")})
        side["same_windows"].append(row)
    path = pc.ROOT / "bench" / "results" / (per_model("quantizers", model) + ".json")
    if path.is_file():
        q = json.loads(path.read_text())
        side["from_results"] = {
            "file": str(path.relative_to(pc.ROOT)), "windows": (q.get("protocol") or {}).get("windows"),
            "reference_perplexity": q.get("reference_perplexity"),
            "rows": [{k: r.get(k) for k in ("label", "command", "bits_per_weight", "perplexity", "kl", "compress_wall_s",
                                            "peak_rss_mb", "load_avg")}
                     for r in q.get("results", []) if r.get("label") in ("gptq-w4-g64", "gptq-w3-g64")]}
    return side


def main() -> None:
    if pc.run_worker_if_asked(worker):
        return
    ap = pc.arg_parser(__doc__, "AutoRound", PREFIX, windows=16)
    ap.add_argument("--iters", type=int, default=None,
                    help="SignRound iterations for the tuned configs (its default 200; 50 with lr 5e-3 is its 'light' recipe)")
    ap.add_argument("--lr", type=float, default=None, help="SignRound learning rate (its default: 1/iters)")
    ap.add_argument("--ours", default="", help="comma-separated sizewise artifact directories to evaluate in the "
                    "same compare call (same windows), e.g. out/bench/quantizers/gptq-w4-g64.bfloat16")
    ap.add_argument("--eval-only", action="store_true",
                    help="run nothing: evaluate the selected configurations that finished earlier (and --ours)")
    ap.add_argument("--smoke", action="store_true",
                    help="plumbing check: 8 samples of 128 tokens, 2 iterations, 2 windows, under out/autoround-smoke")
    args = ap.parse_args()

    pc.lower_priority(10)
    name = PREFIX.rstrip("-") + "-smoke" if args.smoke else None
    out_root = pc.ROOT / "out" / ("autoround-smoke" if args.smoke else "autoround") / Path(args.model).name
    configs = {k: dict(v) for k, v in CONFIGS.items()}
    if args.smoke:
        args.samples, args.length, args.windows = 8, 128, 2
        args.iters = args.iters or 2
        configs["autoscheme-3.5"]["autoscheme_nsamples"] = 4
    for v in configs.values():
        if v.get("iters") != 0:
            for k in ("iters", "lr"):
                if getattr(args, k) is not None:
                    v[k] = getattr(args, k)
    wanted = [x for x in args.only.split(",") if x]
    unknown = set(wanted) - set(configs)
    if unknown:
        sys.exit(f"unknown configurations {sorted(unknown)}; known: {list(configs)}")
    versions = ensure_venv()
    out_root.mkdir(parents=True, exist_ok=True)
    calib = pc.draw_samples(args.model, args.calib, args.samples, args.length, args.seed,
                            out_root / f"calib-{args.calib}-{args.samples}x{args.length}-s{args.seed}.safetensors")
    pc.log(f"calibration: {args.samples} x {args.length} tokens of {args.calib}, ids sha256 {calib['token_ids_sha256'][:12]}")
    results = pc.ROOT / "bench" / "results" / (per_model("peer_autoround" + ("-smoke" if args.smoke else ""), args.model) + ".json")
    header = {"benchmark": "peer_autoround", "model": args.model, "cpu": cpu_model(), "versions": versions,
              "calibration": {k: v for k, v in calib.items() if k not in ("float_dir", "file")}}
    rows = []
    for label, opts in configs.items():
        if wanted and label not in wanted:
            continue
        if args.eval_only:   # only what finished earlier (same options and calibration) is evaluated
            done = pc.finished(out_root / (PREFIX + label))
            if done and done.get("options") == opts and done.get("calib_ids_sha256") == calib["token_ids_sha256"]:
                rows.append({**done, "resumed": True})
            continue
        try:
            rows.append(run_config(label, opts, calib, out_root, args.force, args.timeout))
        except Exception as e:  # noqa: BLE001 - one configuration's failure must not stop the others
            rows.append({"label": PREFIX + label, "options": opts, "error": f"{type(e).__name__}: {e}"})
        pc.save_results(results, {**header, "partial": True, "results": [entry(r, calib, None) for r in rows]})
    res = None
    finished = [r for r in rows if "error" not in r]
    ours = [Path(x) for x in args.ours.split(",") if x]
    if (finished or ours) and not args.no_eval:
        res = pc.evaluate(args.model, [out_root / r["label"] for r in finished] + ours, args.text, args.ctx, args.windows,
                          pc.ROOT / "out" / "bench" / (name or "peer_autoround") / Path(args.model).name / "report")
    entries = [entry(r, calib, res) for r in rows]
    header["sizewise"] = sizewise_side(args.model, ours, res)
    try:   # sizewise rows evaluated by earlier calls on the same windows are kept
        old = json.loads(results.read_text())
    except (OSError, ValueError):
        old = {}
    same = res is not None and all((old.get("protocol") or {}).get(k) == res["protocol"].get(k)
                                   for k in ("sha256", "ctx", "stride", "windows", "bos"))
    if same:
        done = {e["label"] for e in entries}         # other configurations measured on the same windows stay
        entries = [e for e in old.get("results", []) if e["label"] not in done] + entries
        mine = {r["label"] for r in header["sizewise"]["same_windows"]}
        header["sizewise"]["same_windows"] = [r for r in (old.get("sizewise") or {}).get("same_windows", [])
                                              if r["label"] not in mine] + header["sizewise"]["same_windows"]
    pc.save_results(results, {**header, "partial": False, "protocol": res["protocol"] if res else None,
                              "reference_perplexity": res["reference"]["perplexity"] if res else None,
                              "report": res.get("report") if res else None, "results": entries})
    pc.log(f"wrote {results}")
    if res is not None:
        ref = res["reference"]["perplexity"]
        print(f"float perplexity {ref:.3f} ({args.windows} windows of {args.ctx})")
        print("| config | bits/w stored | ppl | Δppl | KL | top-1 | wall s | cpu s | peak MB | load 1-min mean |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for e in entries:
            if "perplexity" not in e:
                print(f"| {e['label']} | failed: {e.get('error', 'not evaluated')} |")
                continue
            print(f"| {e['label']} | {e['bits_per_weight']:.4f} | {e['perplexity']:.3f} | {100 * (e['perplexity'] / ref - 1):+.1f}% | "
                  f"{e['kl']:.4f} | {100 * e['top1_agreement']:.1f}% | {pc.fmt(e['wall_s'])} | {pc.fmt(e['cpu_s'])} | "
                  f"{pc.fmt(e['peak_rss_mb'])} | {pc.fmt(e['loadavg_1min_mean'], '{:.2f}')} |")


if __name__ == "__main__":
    sys.exit(main())
