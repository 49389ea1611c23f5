"""Sweep: many budgets from one sensitivity profile, uniform baselines, one side-by-side evaluation.

    from sizewise.sweep import sweep
    res = sweep("smollm2-135m", ["2.5", "3", "4bpw"], "out/sweep",
                CompressConfig(calib=CalibConfig(text="enwiki-sample")), quantizers=("rtn", "gptq"),
                uniform=["rtn:4:64", "gptq:3:64"], windows=16)

Every budget is checked against the exact size table before anything expensive runs. The model
is profiled once; each budget is a knapsack solve plus one compression. All artifacts are then
evaluated in one `api.compare` (same windows, reference computed once). The output directory is
assembled under a temporary name and renamed at the end, so a directory that exists is complete:

    OUT/b3bpw/ ...            one artifact per budget
    OUT/b3bpw.gguf            with format="gguf": the same weights as a GGUF (llama.cpp), per point
    OUT/uniform-rtn-w4g64/    one artifact per uniform baseline
    OUT/sweep.json            every point, the protocols, the timings
    OUT/report.md, OUT/ppl_vs_bits.png, OUT/bits_per_layer.png

With format="gguf" the candidates are llama.cpp's types (`allocate.gguf_candidate_set`), byte
budgets bound each point's .gguf file (`export.gguf_layout.GGUFLayout`), and uniform points must be ggml
types too (rtn:Q4_0, gptq:Q4_K). The evaluation reads the artifacts, whose GGUFs hold the same
stored weights bit for bit, and rounds every matmul's input as llama.cpp does for those types
(`runtime.llamacpp`): the perplexities are those llama.cpp should measure.
"""

from __future__ import annotations

import gc
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import allocate, artifact, data, memory, report
from .allocate import Budget
from .api import budget as api_budget
from .api import compression, evaluation
from .atomic import staged_dir
from .checkpoint import location
from .defaults import MEASURE_SAMPLES
from .arch import discover
from .errors import SizewiseError
from .evaluate import environment
from .plan import Plan
from .quant import methods
from .quant.formats import Format
from .quant.uniform import QuantFormat
from .sources import Source

_NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*")


def parse_budgets(budgets: str | list[str | Budget]) -> list[Budget]:
    """'2.5,3,3.5bpw,70MB' or a list; a bare number is bits per weight. Duplicates are refused."""
    items = budgets.split(",") if isinstance(budgets, str) else list(budgets)
    out: list[Budget] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise SizewiseError(f"empty budget in the list {budgets!r}")
        if isinstance(item, (str, int, float)) and _NUMBER.fullmatch(str(item)):
            item = f"{str(item).strip()}bpw"
        b = allocate.parse_budget(item)
        if any((b.kind, b.value) == (o.kind, o.value) for o in out):
            raise SizewiseError(f"budget {b.text} is listed twice")
        out.append(b)
    if not out:
        raise SizewiseError("no budgets given")
    return out


def budget_dir(b: Budget) -> str:
    """'b3.5bpw', 'b70MB': the budget as written, without spaces."""
    return "b" + re.sub(r"\s+", "", b.text)


def parse_uniform(spec: str, float_dtype: str = "float16") -> tuple[str, Format]:
    """'rtn:4:64' or 'gptq:3:channel' → (method, format): same format family as the allocator's
    candidates (asymmetric, integer zero, float16 scales), so the comparison is at equal overhead.
    'rtn:Q4_0', 'gptq:Q4_K': a llama.cpp type (`allocate.GGML_FORMATS`), as GGUF sweeps need."""
    parts = spec.split(":")
    if len(parts) == 2 and parts[1].strip().upper() in allocate.GGML_FORMATS:
        method = parts[0].strip()
        methods.parse(method)
        return method, allocate.GGML_FORMATS[parts[1].strip().upper()]
    if len(parts) != 3:
        raise SizewiseError(f"uniform point {spec!r} is not METHOD:BITS:GROUP (e.g. rtn:4:64, gptq:3:channel) "
                            f"or METHOD:GGML_TYPE (rtn:Q4_0; {', '.join(allocate.GGML_FORMATS)})")
    method, bits, group = (p.strip() for p in parts)
    methods.parse(method)
    try:
        b = int(bits)
        g = None if group in ("channel", "per-channel") else int(group)
    except ValueError:
        raise SizewiseError(f"uniform point {spec!r}: bits must be an integer and group an integer or 'channel'") from None
    return method, QuantFormat(b, g, symmetric=False, scale_dtype="float16", zero="int")


def uniform_dir(method: str, fmt: Format) -> str:
    """'uniform-rtn-w4g64' (the default family) or 'uniform-rtn-Q4_0' (a llama.cpp type)."""
    ggml = next((t for t, f in allocate.GGML_FORMATS.items() if f == fmt), None)
    if ggml is not None:
        return f"uniform-{method}-{ggml}"
    return f"uniform-{method}-w{fmt.bits}{'g' + str(fmt.group_size) if fmt.group_size else 'ch'}"


def read_peers(peers) -> list[dict]:
    """Points from JSON files (each a list of {"label", "bits_per_weight", "perplexity"}), or dicts."""
    out = []
    for p in peers:
        if isinstance(p, dict):
            rows, where = [p], "a peer point"
        else:
            where = str(p)
            try:
                rows = json.loads(Path(p).read_text())
            except FileNotFoundError:
                raise SizewiseError(f"no peer results file at {p}") from None
            except json.JSONDecodeError as e:
                raise SizewiseError(f"peer results file {p} is not JSON: {e}") from None
            if not isinstance(rows, list):
                raise SizewiseError(f"peer results file {p} must hold a list of "
                                    '{"label", "bits_per_weight", "perplexity"}')
        for r in rows:
            ok = (isinstance(r, dict) and isinstance(r.get("label"), str)
                  and all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) and r[k] > 0
                          for k in ("bits_per_weight", "perplexity")))
            if not ok:
                raise SizewiseError(f"{where}: every peer point needs a label and positive bits_per_weight "
                                    f"and perplexity, got {json.dumps(r)[:120]}")
            out.append({**r, "source": where})
    return out


def _bits(c) -> int:
    """Code bits of a choice; a float choice counts its dtype's bits (16 for float16)."""
    return c.format.bits


def _choice_label(c) -> str:
    return f"{c.method} {c.format.label}" if c.format.quantized else c.format.label


def sweep(model: str | Path, budgets: str | list[str | Budget], out: str | Path,
          config: compression.CompressConfig | None = None, *, quantizers: tuple[str, ...] = ("rtn",),
          uniform: list[str] | tuple[str, ...] = (), peers: list = (), text: str | Path = "wikitext2-test",
          ctx: int = 1024, stride: int | None = None, windows: int | None = None, fisher_samples: int = 8,
          cache: bool = True, measure_samples: int = MEASURE_SAMPLES, sequential: bool = False, overwrite: bool = False,
          progress: bool = True, allow_pickle: bool = False, format: str = "artifact", resume: bool = True,
          restart: bool = False) -> dict:
    """Compress MODEL (a spec: path or built-in name) to every budget from one profile, plus the
    uniform baselines, evaluate them all against MODEL, and write OUT (see the module docstring).

    Returns the contents of sweep.json, plus "table" (the Markdown table) and "report" (its path).
    Each budget's plan is chosen as `compress --budget` chooses it (measured among variants unless
    `measure_samples` is 0). The profile's float-model statistics are reused to solve every plan
    at once (as `compress --budget` does); `sequential` instead runs the calibration passes again per
    budget, which propagates compressed outputs but costs one engine run per budget.
    `format="gguf"` also writes every point as POINT.gguf (see the module docstring).
    With `resume`, a stopped profiling pass resumes from `checkpoint.location(out, "profile")` (the
    profile itself is cached once made); `restart` discards that checkpoint first.
    """
    t_start = time.perf_counter()
    if isinstance(model, Source):      # compress() changes a loaded model in place: each point needs a fresh load
        raise SizewiseError("sweep takes a model spec (path or built-in name), not a loaded Source")
    config = config or compression.CompressConfig()
    out = Path(out)
    # everything that can be checked cheaply fails here, before the model loads
    artifact.check_output(out, overwrite)
    if format not in ("artifact", "gguf"):
        raise SizewiseError(f"unknown sweep format {format!r}; available: artifact, gguf")
    blist = parse_budgets(budgets)
    ulist = [parse_uniform(u, config.float_dtype) for u in uniform]
    if format == "gguf":

        for spec, (m, f) in zip(uniform, ulist):
            if f.ggml_type is None:
                raise SizewiseError(f"uniform point {spec} ({f.label}) has no exact GGUF type; with --format gguf "
                                    f"name a llama.cpp type: {m}:Q4_0, {m}:Q4_1, {m}:Q5_0, {m}:Q5_1, {m}:Q8_0, "
                                    f"{m}:Q2_K .. {m}:Q6_K")
    names = [budget_dir(b) for b in blist] + [uniform_dir(m, f) for m, f in ulist]
    if len(set(names)) != len(names):
        raise SizewiseError(f"two points would share a directory: {sorted(n for n in names if names.count(n) > 1)[0]}")
    peer_points = read_peers(peers)
    data.read_text(text)
    if config.calib.text is not None:
        data.read_text(config.calib.text)

    src = compression._source(model, allow_pickle)
    arch = discover(src.model)
    config = replace(config, calib=config.calib.resolved(next(src.model.parameters()).device))
    c = config.calib
    memory.require(memory.peak_memory(src.model, task="plan", calibrated=True, batch=c.batch, kept_statistics=True,
                                      samples=0 if c.offload else c.samples, length=c.length,
                                      measure_samples=measure_samples))
    if format == "gguf":
        cands = allocate.gguf_candidate_set(tuple(quantizers), float_dtype=config.float_dtype)
    else:
        cands = allocate.budget_candidates(tuple(quantizers), config.float_dtype)
    layout = api_budget.file_layout(format, src)      # what byte budgets bound: the artifact's file, or the .gguf
    sizes = allocate.size_table(src.model, arch, cands, config.float_dtype, layout)
    for b in blist:
        allocate.check_budget(b, sizes)              # one-line error with the reachable range
    for m, f in ulist:
        Plan.uniform(arch, methods.parse(m).quantizer, f, float_dtype=config.float_dtype)    # the format fits
    linears = [l.name for l in sizes.layers]
    linear_set = set(linears)           # byte budgets may also quantize token tables (kept out of the heatmap)

    def say(msg: str) -> None:
        if progress:
            print(f"sweep: {msg}", file=sys.stderr, flush=True)

    with staged_dir(out, overwrite=overwrite) as tmp:
        say(f"profiling {len(cands)} candidates on {len(linears)} linear layers (once, cached)")
        t0 = time.perf_counter()
        prof = api_budget.cached_profile(src, arch, config.calib, cands, options=config.options,
                                         fisher_samples=fisher_samples, cache=cache, progress=progress, keep_stats=True,
                                         tables=any(b.kind == "bytes" for b in blist), arithmetic=layout.arithmetic,
                                         checkpoint=location(out, "profile") if resume else None, restart=restart)
        stats = api_budget.profile_statistics(src, arch, config.calib, prof, progress)
        profile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        solved_cache = allocate.SolvedCache()      # solved weights and reference log-probs, shared by all budgets
        allocs = [api_budget.choose_measured(src, arch, config.calib, prof, sizes, b, options=config.options,
                                             samples=measure_samples, progress=progress, cache=solved_cache)
                  for b in blist]
        # the chosen plans' weights, reused (solved with each plan's own options: `Plan.options`)
        solved = [{} if sequential else solved_cache.solved_weights(a.plan.options) for a in allocs]
        del solved_cache
        choose_s = time.perf_counter() - t0
        src_info = src.info
        del src, arch                                 # each compression loads a fresh copy
        gc.collect()

        points, compress_s = [], {}
        for i, (b, alloc) in enumerate(zip(blist, allocs), 1):
            d = budget_dir(b)
            say(f"compressing {d} ({i}/{len(blist)}): predicted KL {alloc.predicted_total:.4g}")
            t0 = time.perf_counter()
            res = api_budget.compress_allocation(model, alloc, tmp / d, config, progress=progress,
                                                 allow_pickle=allow_pickle, stats=None if sequential else stats,
                                                 solved=solved[i - 1], gguf=tmp / f"{d}.gguf" if format == "gguf" else None)
            compress_s[d] = time.perf_counter() - t0
            points.append({"kind": "allocated", "label": d, "dir": d, "budget": b.text, "budget_kind": b.kind,
                           "budget_value": float(b.value), "predicted_kl": alloc.predicted_total,
                           "how": alloc.note, "options": alloc.plan.options, "measured_plans": alloc.measured,
                           "choices": [_choice_label(c) for c in alloc.plan.choices if c.name in linear_set],
                           "bits": [_bits(c) for c in alloc.plan.choices if c.name in linear_set],
                           "kinds": [c.format.compression for c in alloc.plan.choices if c.name in linear_set],
                           "kinds_chosen": allocate.kinds_line([c.format.compression for c in alloc.plan.choices
                                                                if c.name in linear_set]),
                           "tables": {c.name: _choice_label(c) for c in alloc.plan.choices if c.name not in linear_set},
                           **_gguf_fields(res.exported, d)})
        for i, (m, f) in enumerate(ulist, 1):
            d = uniform_dir(m, f)
            say(f"compressing {d} (uniform {i}/{len(ulist)})")
            t0 = time.perf_counter()
            compression.compress(model, replace(config, method=m, format=f, plan=None, skip=()), tmp / d,
                         progress=progress, allow_pickle=allow_pickle)
            exported = api_budget.write_gguf(layout, tmp / d, tmp / f"{d}.gguf") if format == "gguf" else None
            compress_s[d] = time.perf_counter() - t0
            points.append({"kind": "uniform", "label": d, "dir": d, "budget": None, "method": m,
                           "format": f.label, "predicted_kl": _predicted_uniform(prof, m, f),
                           **_gguf_fields(exported, d)})

        say(f"evaluating {len(points)} artifacts against {model} on the same windows")
        t0 = time.perf_counter()
        ref = compression._source(model, allow_pickle)
        res = evaluation.compare(ref, [tmp / p["dir"] for p in points], text, ctx=ctx, stride=stride, windows=windows,
                          progress=progress, arithmetic=layout.arithmetic)
        del ref
        eval_s = time.perf_counter() - t0

        for p in points:
            r, totals = res["candidates"][p["dir"]], artifact.read_manifest(tmp / p["dir"])["totals"]
            p.update(bits_per_weight=totals["bits_per_weight"], linear_stored_bits=totals["linear_stored_bits"],
                     file_bytes=totals["file_bytes"], perplexity=r["perplexity"], kl=r["kl"],
                     top1_agreement=r["top1_agreement"], compress_s=compress_s[p["dir"]])
        result = {
            "model": str(model), "source": src_info, "format": format, "file_layout": layout.describe(),
            "quantizers": list(quantizers), "float_dtype": config.float_dtype,
            "joint": any(c.format.compression not in ("quant", "float") for c in cands),
            "candidates": [c.label for c in cands], "linears": linears, "linear_params": sizes.linear_params,
            "profile": prof.protocol, "evaluation": res["protocol"],
            "reference": {"perplexity": res["reference"]["perplexity"]},
            "points": points, "peers": peer_points,
            "solved": "sequentially (calibration passes per budget)" if sequential else
                      "from the profile's float-model statistics, all layers at once",
            "timing": {"profile_s": profile_s, "choose_s": choose_s, "compress_s": compress_s, "eval_s": eval_s,
                       "total_s": time.perf_counter() - t_start},
            "environment": environment(),
        }
        result["table"] = report.sweep_table(result)
        report.write_sweep(result, tmp)
        (tmp / "sweep.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    say(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return {**result, "report": str(out / "report.md")}


def _gguf_fields(exported: dict | None, d: str) -> dict:
    """A point's GGUF file (relative to the sweep directory) and its bytes, if one was written."""
    return {} if exported is None else {"gguf": f"{d}.gguf", "gguf_bytes": exported["bytes"],
                                        "gguf_tensor_types": exported["tensor_types"]}


def _predicted_uniform(prof: allocate.Profile, method: str, fmt: QuantFormat) -> float | None:
    """The profile's predicted KL for a uniform point, when it is one of the profiled candidates."""
    cand = allocate.Candidate(method, fmt)
    if cand not in prof.candidates:
        return None
    i = prof.candidates.index(cand)
    costs = [l.costs[i] for l in prof.layers]
    return None if any(c is None for c in costs) else float(sum(costs))
