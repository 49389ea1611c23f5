"""The peer, llm-compressor, on exactly our calibration samples, evaluated with our evaluator.

    nice -n 10 .venv/bin/python bench/peer_llmcompressor.py [--only gptq-w4-g64,rtn-w4-g64] [--force]
        [--windows 64] [--samples 128] [--length 512] [--smoke] [--no-eval]

Two halves in one file:

- the orchestrator (project venv) draws the calibration token ids with sizewise's own code path
  (`api._calibration`, the one `sizewise compress --calib enwiki-sample` runs: same tokenizer, text,
  128 x 512, seed 0), saves them as .safetensors, and for each configuration launches the worker
  under the peer venv's python in its own process (wall time and peak RSS from os.wait4 on that
  process, so they are its own), then evaluates every finished peer model in one `api.compare`
  call against the float model, and writes bench/results/peer_llmcompressor.json;
- the worker (`--worker`, peer venv; imports only torch, transformers, datasets, safetensors and
  llmcompressor) loads the float HF directory in float32 on CPU, runs `llmcompressor.oneshot` with the
  configuration's recipe on those samples, and writes (1) a dense float32 model with the
  dequantized weights, loadable by plain transformers, to out/peer/<label>/, and (2) llm-compressor's
  own compressed save next to it (<label>.compressed/), from which the stored bits per weight and
  the scale / zero-point dtypes are read.

Resumable: a configuration whose out/peer/<label>/ holds a finished model (written in a temporary
directory and renamed into place only once complete) is not run again unless --force. A failing
configuration is recorded with its one-line error and the others go on. The whole run lowers its
own priority to nice 10 (the machine is shared); /proc/loadavg is recorded around every config.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (
    ROOT,
    STOP_GAP_S,
    arg_parser,
    bits_from_scheme,
    clear,
    draw_samples,
    evaluate,
    finished,
    fmt,
    last_error,
    launch,
    loadavg,
    lower_priority,
    numel,
    process_state,
    publish,
    run_worker_if_asked,
    save_results,
    shape_table,
    tensor_bytes,
)

PEER_PYTHON = ROOT / "out" / "peer-venv" / "bin" / "python"
PREFIX = "llmc-"
STOPPED_FILE = ".stopped.json"      # per label: seconds a worker sat stopped, from --monitor

# (label, method, bits, group size or "channel"), in the order they are run.
CONFIGS = [
    ("gptq-w4-g64", "gptq", 4, 64),
    ("rtn-w4-g64", "rtn", 4, 64),
    ("gptq-w3-g64", "gptq", 3, 64),
    ("rtn-w3-g64", "rtn", 3, 64),
    ("awq-w3-g64", "awq", 3, 64),
    ("gptq-w4-pc", "gptq", 4, "channel"),
    ("rtn-w4-pc", "rtn", 4, "channel"),     # cheap; also exercises the per-channel path in a smoke run
]


def weights_args(bits: int, group) -> dict:
    """The weight scheme, matched to sizewise's: int, asymmetric (integer zero), groups of 64 or per row."""
    args = {"num_bits": bits, "type": "int", "symmetric": False}
    if group == "channel":
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=int(group))
    return args


def recipe_spec(method: str, bits: int, group) -> list[dict]:
    """The recipe as data: a list of (modifier class, kwargs); the worker instantiates exactly this."""
    quant = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_args(bits, group)}},
             "ignore": ["lm_head"]}
    if method == "gptq":   # block_size, dampening_frac (0.01) and actorder ("static") left at their defaults
        return [{"modifier": "GPTQModifier", "kwargs": quant}]
    if method == "rtn":
        return [{"modifier": "QuantizationModifier", "kwargs": quant}]
    if method == "awq":    # default mappings for the architecture (Llama), default n_grid / duo_scaling
        return [{"modifier": "AWQModifier", "kwargs": {}}, {"modifier": "QuantizationModifier", "kwargs": quant}]
    raise ValueError(f"unknown method {method!r}")


# --- worker (peer venv) ----------------------------------------------------------------------


def worker(spec_path: Path) -> None:
    import resource

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(spec_path.read_text())
    out, out_c = Path(spec["out"]), Path(spec["out_compressed"])
    t_start = time.perf_counter()
    record = {"loadavg_worker_start": loadavg(), "threads": torch.get_num_threads(),
              "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__,
                           "compressed_tensors": __import__("compressed_tensors").__version__}}

    model = AutoModelForCausalLM.from_pretrained(spec["float_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["float_dir"])

    ids = load_file(spec["calib"])["input_ids"]
    n, length = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    recipe = []
    for m in spec["recipe"]:
        if m["modifier"] == "GPTQModifier":
            from llmcompressor.modifiers.gptq import GPTQModifier as cls
        elif m["modifier"] == "QuantizationModifier":
            from llmcompressor.modifiers.quantization import QuantizationModifier as cls
        elif m["modifier"] == "AWQModifier":
            from llmcompressor.modifiers.transform import AWQModifier as cls
        else:
            raise ValueError(f"unknown modifier {m['modifier']}")
        recipe.append(cls(**m["kwargs"]))
    record["workarounds"] = []
    if any(m["modifier"] == "AWQModifier" for m in spec["recipe"]) and not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations before every smoothing grid search
        # (IntermediatesCache.pin_memory, for faster host-to-device copies); on a machine without
        # an accelerator, pinning raises "Cannot access accelerator device when none is available".
        # With no device to copy to, not pinning changes nothing but that.
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        record["workarounds"].append("IntermediatesCache.pin_memory made a no-op (no accelerator: pinning "
                                     "raises in llm-compressor 0.14 AWQ on CPU; it only speeds host-to-device copies)")
    # Data-free RTN gets no calibration data (sizewise's RTN needs none either); the others get
    # every sample, one per batch (all are `length` long, so the truncating collator cuts nothing).
    calibrated = spec["method"] != "rtn"
    kwargs = dict(dataset=dataset, num_calibration_samples=n, max_seq_length=length,
                  shuffle_calibration_samples=False, batch_size=1) if calibrated else {}
    t0 = time.perf_counter()
    model = oneshot(model=model, processor=tokenizer, recipe=recipe, **kwargs)
    record["oneshot_s"] = time.perf_counter() - t0
    # Peak memory of loading + oneshot alone (the process peak below also covers the dense export).
    record["peak_rss_mb_oneshot"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probe = ids[:1, : min(length, 128)]
    with torch.no_grad():
        probe_logits = model(input_ids=probe).logits.float()   # llm-compressor's own (fake-quantized) forward
    record["calibration_used"] = {"samples": n, "length": length} if calibrated else None

    from llmcompressor.core import active_session
    try:
        record["recipe_yaml"] = active_session().lifecycle.recipe.yaml()
    except Exception as e:  # noqa: BLE001 - the yaml is informative only
        record["recipe_yaml"] = f"unavailable: {type(e).__name__}: {e}"

    # Dense weights: quantize-dequantize every quantized linear with its own stored scale / zero
    # (what its kernels compute), and check that this is what the in-memory weight already holds.
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    dense, checks, float_shapes = {}, {}, {}
    float_file = safe_open(next(Path(spec["float_dir"]).glob("*.safetensors")), "pt")
    with torch.no_grad():
        for name, mod in model.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            args = scheme.weights
            g_idx = getattr(mod, "weight_g_idx", None)
            if g_idx is not None and not torch.equal(g_idx, torch.arange(g_idx.numel()) // args.group_size):
                raise RuntimeError(f"{name}: non-contiguous groups (g_idx) are not handled")
            w = mod.weight.detach().float()
            wq = fake_quantize(w, mod.weight_scale, mod.weight_zero_point, args).float()
            cols = wq.shape[1]
            strategy = str(getattr(args.strategy, "value", args.strategy))
            gs = cols if strategy == "channel" else args.group_size
            srt = wq.reshape(wq.shape[0], cols // gs, gs).sort(dim=-1).values
            distinct = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)
            f = float_file.get_tensor(name + ".weight").float()
            float_shapes[name] = tuple(f.shape)
            checks[name] = {"max_distinct_per_group": int(distinct.max()), "levels": 2 ** args.num_bits,
                            "max_abs_inmemory_vs_qdq": float((w - wq).abs().max()),
                            "frac_changed_vs_float": float((wq != f).float().mean()),
                            "rel_err_vs_float": float((wq - f).norm() / f.norm()),
                            "scale_dtype": str(mod.weight_scale.dtype), "zero_dtype": str(mod.weight_zero_point.dtype)}
            dense[name + ".weight"] = wq
    if not checks:
        raise RuntimeError("no quantized linear found after oneshot")
    bad = [k for k, c in checks.items() if c["max_distinct_per_group"] > c["levels"]]
    if bad:
        raise RuntimeError(f"{len(bad)} linears have more distinct values per group than 2^bits, e.g. {bad[0]}")
    if max(c["frac_changed_vs_float"] for c in checks.values()) == 0:
        raise RuntimeError("quantized weights equal the float ones")
    record["quantized_linears"] = len(checks)
    record["checks_summary"] = {
        "max_distinct_per_group": max(c["max_distinct_per_group"] for c in checks.values()),
        "levels": max(c["levels"] for c in checks.values()),
        "max_abs_inmemory_vs_qdq": max(c["max_abs_inmemory_vs_qdq"] for c in checks.values()),
        "min_frac_changed_vs_float": min(c["frac_changed_vs_float"] for c in checks.values()),
        "mean_rel_err_vs_float": sum(c["rel_err_vs_float"] for c in checks.values()) / len(checks),
        "scale_dtypes": sorted({c["scale_dtype"] for c in checks.values()}),
        "zero_dtypes": sorted({c["zero_dtype"] for c in checks.values()})}

    # A fresh plain model from the float config, all non-quantized parameters (embeddings, norms,
    # possibly rescaled by AWQ) copied from the calibrated model, quantized linears dequantized.
    config = AutoConfig.from_pretrained(spec["float_dir"])
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    src = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in fresh.named_parameters(remove_duplicate=False):
            p.copy_(dense[name] if name in dense else src[name].detach().float())
    unused = set(dense) - {n for n, _ in fresh.named_parameters(remove_duplicate=False)}
    if unused:
        raise RuntimeError(f"dequantized weights not placed: {sorted(unused)[:3]}")
    record["tied_embeddings"] = bool(config.tie_word_embeddings)
    out.mkdir(parents=True)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    saved_cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved_cfg:
        raise RuntimeError("dense save carries a quantization_config")
    # Reload the dense save and check it holds the dequantized weights exactly.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rp = dict(reloaded.named_parameters())
    mism = [k for k, v in dense.items() if not torch.equal(rp[k], v)]
    if mism:
        raise RuntimeError(f"reloaded dense model differs at {mism[0]}")
    with torch.no_grad():
        dense_logits = reloaded(input_ids=probe).logits.float()
    record["dense_vs_llmcompressor_forward"] = {
        "tokens": probe.numel(), "max_abs_logit_diff": float((dense_logits - probe_logits).abs().max()),
        "argmax_agreement": float((dense_logits.argmax(-1) == probe_logits.argmax(-1)).float().mean())}
    del reloaded, fresh

    # llm-compressor's own compressed save (last: compressing may modify the model in place).
    try:
        model.save_pretrained(str(out_c), save_compressed=True)
        qcfg = json.loads((out_c / "config.json").read_text()).get("quantization_config")
        record["compressed_quantization_config"] = qcfg
        per_module = tensor_bytes(out_c, lambda k: k.rsplit(".", 1)[0] if k.rsplit(".", 1)[0] in checks else None)
        linear_bytes, linear_weights, tensors = 0, 0, {}
        for module, parts in per_module.items():
            for suffix, t in parts.items():
                linear_bytes += t["bytes"]
                tensors.setdefault(suffix, {"dtype": t["dtype"], "bytes": 0})["bytes"] += t["bytes"]
                if suffix in ("weight_packed", "weight"):
                    linear_weights += numel(float_shapes[module])
        record["compressed_linear_tensors"] = tensors
        record["compressed_bits_per_weight"] = 8 * linear_bytes / linear_weights if linear_weights else None
        record["compressed_file_bytes"] = sum(f.stat().st_size for f in out_c.glob("*.safetensors"))
    except Exception as e:  # noqa: BLE001 - the dense model is what is evaluated; note and go on
        record["compressed_save_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    record["worker_s"] = time.perf_counter() - t_start
    record["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["loadavg_worker_end"] = loadavg()
    (out / "peer_worker.json").write_text(json.dumps(record, indent=1))


# --- orchestrator (project venv) -------------------------------------------------------------


def run_config(label: str, method: str, bits: int, group, calib_info: dict, out_root: Path, force: bool,
               timeout: float | None) -> dict:
    final = out_root / (PREFIX + label)
    final_c = out_root / (PREFIX + label + ".compressed")
    row = {"label": PREFIX + label, "method": method, "bits": bits, "group_size": group,
           "recipe": recipe_spec(method, bits, group), "calib_ids_sha256": calib_info["token_ids_sha256"]}
    done = finished(final)
    if done and not force:
        if done.get("recipe") == row["recipe"] and (method == "rtn" or done.get("calib_ids_sha256") == row["calib_ids_sha256"]):
            print(f"[{row['label']}] finished earlier, kept (use --force to redo)", file=sys.stderr, flush=True)
            return {**done, "resumed": True}
        print(f"[{row['label']}] finished earlier with another recipe or calibration: redoing", file=sys.stderr)
    tmp, tmp_c = out_root / f".{PREFIX}{label}.tmp", out_root / f".{PREFIX}{label}.compressed.tmp"
    clear(final, final_c, tmp, tmp_c)
    spec = {"label": row["label"], "method": method, "recipe": row["recipe"], "float_dir": calib_info["float_dir"],
            "calib": calib_info["file"], "out": str(tmp), "out_compressed": str(tmp_c)}
    spec_path = out_root / f".{PREFIX}{label}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = out_root / f"{PREFIX}{label}.log"
    print(f"[{row['label']}] start, load {loadavg()}, log {log_path}", file=sys.stderr, flush=True)
    cmd = [str(PEER_PYTHON), str(Path(__file__).resolve()), "--worker", str(spec_path)]
    row.update(launch(cmd, log_path, timeout))
    rc = row.pop("returncode")
    if rc != 0 or not (tmp / "peer_worker.json").is_file():
        row["error"] = last_error(log_path, rc)
        print(f"[{row['label']}] FAILED: {row['error']}", file=sys.stderr, flush=True)
        return row
    row["worker"] = json.loads((tmp / "peer_worker.json").read_text())
    row["dir"] = str(final)
    if tmp_c.exists():
        tmp_c.replace(final_c)
    publish(tmp, final, row)
    spec_path.unlink()
    print(f"[{row['label']}] done in {row['wall_s']:.0f} s, peak {row['peak_rss_mb']:.0f} MB, "
          f"load {row['loadavg_end']}", file=sys.stderr, flush=True)
    return row


def monitor(orchestrator: int, out_root: Path) -> None:
    """Account the time workers of a running orchestrator sit SIGSTOPped (for runs started before
    the orchestrator did this itself): state T, or a polling gap meaning this monitor was stopped too."""
    path = out_root / STOPPED_FILE
    acc = json.loads(path.read_text()) if path.is_file() else {}
    last, last_write = time.perf_counter(), 0.0
    while process_state(orchestrator):
        time.sleep(1)
        now = time.perf_counter()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != orchestrator:
                    continue
                cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            spec = next((Path(x.decode()) for x in cmdline if x.endswith(b".spec.json")), None)
            if spec is None:
                continue
            label = spec.name.removeprefix(".").removesuffix(".spec.json")
            if label not in acc or acc[label]["pid"] != int(stat.parent.name):   # first sight (or a rerun)
                acc[label] = {"pid": int(stat.parent.name), "stopped_s": 0.0, "observed_s": 0.0}
                log = out_root / f"{label}.log"
                if fields[0] in ("T", "t") and log.is_file():
                    # Already stopped when first seen: it stopped when its log (progress bars, several
                    # lines a second while running) was last written.
                    acc[label]["stopped_s"] = acc[label]["pre_monitor_stopped_s"] = time.time() - log.stat().st_mtime
            entry = acc[label]
            entry["observed_s"] += now - last
            if fields[0] in ("T", "t") or now - last > STOP_GAP_S:
                entry["stopped_s"] += now - last
        last = now
        if now - last_write > 10:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(acc, indent=1))
            tmp.replace(path)
            last_write = now
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(acc, indent=1))
    tmp.replace(path)


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--monitor":
        monitor(int(sys.argv[2]), ROOT / "out" / "peer")
        return
    if run_worker_if_asked(worker):
        return
    ap = arg_parser(__doc__, "llm-compressor", PREFIX, windows=64)
    ap.add_argument("--smoke", action="store_true",
                    help="plumbing check: 4 samples, 2 windows, rtn-w4-g64 and rtn-w4-pc (or --only), under out/peer-smoke")
    args = ap.parse_args()

    lower_priority(10)   # shared machine: everything here and in the workers at nice >= 10
    if not PEER_PYTHON.is_file():
        sys.exit(f"no peer venv at {PEER_PYTHON}")
    out_root = ROOT / "out" / ("peer-smoke" if args.smoke else "peer")
    if args.smoke:
        args.samples, args.windows = 4, 2
        args.only = args.only or "rtn-w4-g64,rtn-w4-pc"
    wanted = [x for x in args.only.split(",") if x]
    unknown = set(wanted) - {c[0] for c in CONFIGS}
    if unknown:
        sys.exit(f"unknown configurations {sorted(unknown)}; known: {[c[0] for c in CONFIGS]}")
    configs = [c for c in CONFIGS if not wanted or c[0] in wanted]

    out_root.mkdir(parents=True, exist_ok=True)
    calib_info = draw_samples(args.model, args.calib, args.samples, args.length, args.seed,
                              out_root / f"calib-{args.calib}-{args.samples}x{args.length}-s{args.seed}.safetensors")
    print(f"calibration: {args.samples} x {args.length} tokens of {args.calib} (sha256 {calib_info['sha256'][:12]}), "
          f"ids sha256 {calib_info['token_ids_sha256'][:12]}", file=sys.stderr, flush=True)

    rows = []
    for label, method, bits, group in configs:
        try:
            row = run_config(label, method, bits, group, calib_info, out_root, args.force, args.timeout)
        except Exception as e:  # noqa: BLE001 - one configuration's failure must not stop the others
            row = {"label": PREFIX + label, "method": method, "bits": bits, "group_size": group,
                   "recipe": recipe_spec(method, bits, group), "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        write_results(args, calib_info, rows, None, out_root, partial=True)

    res = None
    done = [r for r in rows if "error" not in r]
    if done and not args.no_eval:
        res = evaluate(args.model, [out_root / r["label"] for r in done], args.text, args.ctx, args.windows,
                       ROOT / "out" / "bench" / ("peer-smoke" if args.smoke else "peer") / "report")
    write_results(args, calib_info, rows, res, out_root, partial=False)


def write_results(args, calib_info: dict, rows: list[dict], res: dict | None, out_root: Path, partial: bool) -> None:
    shapes = shape_table(args.model)
    monitored = json.loads((out_root / STOPPED_FILE).read_text()) if (out_root / STOPPED_FILE).is_file() else {}
    table_rows = []
    for r in rows:
        mon = monitored.get(r["label"])
        if (mon and r.get("wall_s") is not None and r.get("worker_pid") in (None, mon["pid"])
                and mon["stopped_s"] > (r.get("stopped_s") or 0)):
            r = {**r, "stopped_s": mon["stopped_s"], "stopped_from": "--monitor"}
            r["wall_running_s"] = r["wall_s"] - r["stopped_s"]
        w = r.get("worker", {})
        qcfg = w.get("compressed_quantization_config") or {}
        wargs = next(iter(qcfg.get("config_groups", {}).values()), {}).get("weights", {}) if qcfg else {}
        s = w.get("checks_summary", {})
        scale_bits = 16 if "float16" in str(s.get("scale_dtypes")) or "bfloat16" in str(s.get("scale_dtypes")) else 32
        entry = {
            "label": r["label"], "method": r["method"], "bits": r["bits"], "group_size": r["group_size"],
            "recipe": r["recipe"], "recipe_yaml": w.get("recipe_yaml"),
            "calibration": ({"samples": w["calibration_used"]["samples"], "length": w["calibration_used"]["length"],
                             "text": calib_info["text"], "text_sha256": calib_info["sha256"],
                             "token_ids_sha256": calib_info["token_ids_sha256"], "seed": calib_info["seed"]}
                            if w.get("calibration_used") else None),
            "wall_s": r.get("wall_s"), "stopped_s": r.get("stopped_s"), "stopped_from": r.get("stopped_from"), "wall_running_s": r.get("wall_running_s"),
            "oneshot_s": w.get("oneshot_s"), "cpu_s": r.get("cpu_s"), "loadavg_1min_mean": r.get("loadavg_1min_mean"),
            "peak_rss_mb": r.get("peak_rss_mb"), "peak_rss_mb_oneshot": w.get("peak_rss_mb_oneshot"),
            "dense_vs_llmcompressor_forward": w.get("dense_vs_llmcompressor_forward"), "loadavg_start": r.get("loadavg_start"),
            "loadavg_end": r.get("loadavg_end"), "niceness": r.get("niceness"),
            "stored": {"scale_dtype": s.get("scale_dtypes"), "zero_point_dtype_in_memory": s.get("zero_dtypes"),
                       "quantization_format": qcfg.get("format"), "weights_args": wargs or None,
                       "linear_tensors": w.get("compressed_linear_tensors"),
                       "file_bytes": w.get("compressed_file_bytes")},
            "bits_per_weight": w.get("compressed_bits_per_weight"),
            "bits_per_weight_scheme": bits_from_scheme(r["bits"], r["group_size"], shapes, scale_bits, r["bits"])
            if w else None,
            "bits_per_weight_scheme_fp16_scale": bits_from_scheme(r["bits"], r["group_size"], shapes, 16, r["bits"]),
            "checks": s or None, "workarounds": w.get("workarounds"), "dir": r.get("dir"), "resumed": r.get("resumed", False),
        }
        if "error" in r:
            entry["error"] = r["error"]
        if res is not None and r["label"] in res["candidates"]:
            c = res["candidates"][r["label"]]
            entry.update(perplexity=c["perplexity"], kl=c["kl"], top1_agreement=c["top1_agreement"])
        table_rows.append(entry)
    payload = {"benchmark": "peer_llmcompressor", "model": args.model, "partial": partial,
               "calibration": {k: v for k, v in calib_info.items() if k != "float_dir"},
               "reference_perplexity": res["reference"]["perplexity"] if res else None,
               "protocol": res["protocol"] if res else None, "report": res.get("report") if res else None,
               "results": table_rows}
    name = "peer_llmcompressor" + ("-smoke" if args.smoke else "")
    path = save_results(ROOT / "bench" / "results" / f"{name}.json", payload)
    if res is not None:
        ref = res["reference"]["perplexity"]
        print(f"float perplexity {ref:.3f}")
        print("| config | bits/w stored | ppl | Δppl | KL | top-1 | wall s | of which stopped s | cpu s | "
              "peak MB (oneshot / process) | load 1-min start / mean / end |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for e in table_rows:
            if "perplexity" not in e:
                print(f"| {e['label']} | failed: {e.get('error', 'not evaluated')} |")
                continue
            bpw = e["bits_per_weight"] or e["bits_per_weight_scheme"]
            print(f"| {e['label']} | {bpw:.4f} | {e['perplexity']:.3f} | {100 * (e['perplexity'] / ref - 1):+.1f}% | "
                  f"{e['kl']:.4f} | {100 * e['top1_agreement']:.1f}% | {fmt(e['wall_s'])} | {fmt(e['stopped_s'])} | "
                  f"{fmt(e['cpu_s'])} | {fmt(e['peak_rss_mb_oneshot'])} / {fmt(e['peak_rss_mb'])} | "
                  f"{e['loadavg_start'][0]:.2f} / {fmt(e['loadavg_1min_mean'], '{:.2f}')} / {e['loadavg_end'][0]:.2f} |")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
