"""Compressing to a size budget, above the allocator: load the model, size the output file (the
artifact, or the GGUF exported from it), check the budget, profile (cached), choose among measured
plans, compress with the plan and check the sizes.

    from sizewise.api.budget import plan_for_budget
    alloc = plan_for_budget("smollm2-135m", "3.5bpw", calib=CalibConfig(text="enwiki-sample"))
    print(render(alloc)); Path("plan.json").write_text(alloc.plan.to_json())   # allocate.render

The pieces are separate so that a sweep over budgets profiles once:

    sizes = size_table(model, arch, cands, layout=file_layout("gguf", src))   # allocate.size_table
    check_budget(budget, sizes)                   # one-line error before any expensive work
    prof = cached_profile(src, arch, calib, cands)
    alloc = choose_measured(src, arch, calib, prof, sizes, budget)   # the knapsack's plan, checked by measurement

Costs stop adding up when many layers are coarse, so `choose_measured` measures the knapsack's plan
next to the knapsack without its lowest bit widths and the best uniform plan, on held-out
calibration samples, and keeps the least measured KL (`allocate.plan_variants`, `measure_plans`).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import artifact, builtins, data, engine, memory
from ..allocate import (PROFILE_VERSION, Allocation, Budget, Candidate, Profile, SizeTable, SolvedCache,
                        add_table_costs, allocate, budget_candidates, check_budget, gguf_candidate_set,
                        has_table_costs, measure_plans, option_variants, parse_budget, plan_variants, profile_model,
                        size_table)
from ..allocate import file_layout as _allocator_layout
from ..allocate.profile import needs_head_stats
from ..arch import Architecture, discover
from ..defaults import MEASURE_SAMPLES
from ..atomic import write_text
from ..checkpoint import NotesCheckpoint, versions
from ..data import tensor_sha256
from ..errors import SizewiseError
from ..plan import Plan
from ..quant import methods
from ..quant.formats import TORCH_DTYPES
from .compression import CalibConfig, CompressConfig, _calibration, _source, compress, rotate_source
from .exporting import export


def file_layout(layout, src=None):
    """"artifact" or "gguf" (for `src`, a loaded Source: `export.gguf_layout.GGUFLayout.for_source`),
    or a layout object as it is (`allocate.file_layout`)."""
    if layout == "gguf" and src is not None:
        from ..export.gguf_layout import GGUFLayout

        return GGUFLayout.for_source(src)
    return _allocator_layout(layout)


def write_gguf(layout, artifact_dir, out, overwrite: bool = False) -> dict:
    """`api.export` of the artifact to GGUF, with the metadata a `GGUFLayout` counted."""
    return export(artifact_dir, out, format="gguf", overwrite=overwrite, **layout.export_args)


def _profile_key(src_info: dict, calib, text_sha: str | None, candidates, options, fisher_samples: int,
                 arithmetic: str | None, transforms: dict | None = None) -> str:
    d = {"v": PROFILE_VERSION, "model": src_info.get("sha256"), "transforms": transforms or {}, "text": text_sha,
         "samples": calib.samples, "length": calib.length, "seed": calib.seed, "dtype": calib.dtype,
         "fisher_samples": fisher_samples, "options": options or {}, "candidates": [c.to_dict() for c in candidates], "arithmetic": arithmetic}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]


def cached_profile(src, arch: Architecture, calib, candidates: tuple[Candidate, ...], *, options: dict | None = None,
                   fisher_samples: int = 8, cache: bool = True, progress: bool = True,
                   keep_stats: bool = False, tables: bool = True, arithmetic: str | None = None,
                   checkpoint: str | Path | None = None, restart: bool = False) -> Profile:
    """`profile_model` on the source's calibration samples, cached per model + calibration + candidates
    (+ the arithmetic whose input rounding the costs include: the layout's, e.g. llama.cpp's for a GGUF).

    The cache (under `builtins.cache_dir()/profiles`) lets a sweep over budgets profile once. A
    profile read from the cache has no statistics (`profile.stats` is None) even with `keep_stats`.
    `tables`: also measure the token tables' candidates (byte budgets need them; measured once,
    when first asked for, and added to the cached profile).
    `checkpoint` (a directory): the profiling pass keeps each layer's measurements there and a stopped
    one resumes from it (`restart` discards it first); removed once the profile is made.
    """
    text_sha = data.read_text(calib.text).sha256 if calib.text is not None else None
    key = _profile_key(src.info, calib, text_sha, candidates, options, fisher_samples, arithmetic, src.transforms)
    path = builtins.cache_dir() / "profiles" / f"{key}.json"
    prof = None
    if cache and src.info.get("sha256") and path.is_file():
        try:
            prof = Profile.from_json(path.read_text())
        except (SizewiseError, json.JSONDecodeError, KeyError):
            pass                                  # stale or damaged: profile again
        if prof is not None and (not tables or has_table_costs(prof, arch)):
            return prof
    samples, calib_proto = _calibration(src, calib, progress)
    if prof is not None:                          # cached, but without the tables this budget needs
        add_table_costs(prof, src.model, arch, samples, batch=calib.batch, options=options, progress=progress,
                        compute_dtype=TORCH_DTYPES[calib.dtype], text_given=calib.text is not None)
        if cache and src.info.get("sha256"):
            write_text(path, prof.to_json())
        return prof
    kept = None
    if checkpoint is not None:
        parts = {"profile": key, "calibration tokens": tensor_sha256(samples), **versions()}
        kept = NotesCheckpoint(Path(checkpoint), parts, len(arch.layers), {}, restart=restart)
    with kept or nullcontext():
        prof = profile_model(src.model, arch, samples, candidates, options=options, fisher_samples=fisher_samples,
                             seed=calib.seed, batch=calib.batch, compute_dtype=TORCH_DTYPES[calib.dtype],
                             offload=Path(calib.offload) if calib.offload else None, progress=progress,
                             keep_stats=keep_stats, tables=tables, arithmetic=arithmetic,
                             checkpoint=kept, text_given=calib.text is not None)
        prof.protocol.update(model=src.info.get("spec"), model_sha256=src.info.get("sha256"),
                             calibration=calib_proto)
        if cache and src.info.get("sha256"):
            write_text(path, prof.to_json())
    return prof


def profile_statistics(src, arch: Architecture, calib, profile: Profile, progress: bool = True) -> dict | None:
    """The linears' input statistics the profile was made from (and the head's, if calibrated
    candidates may quantize it): kept ones, or one float pass again.

    None when no candidate reads calibration data (`methods.calibrates`: as `compress` decides).
    """
    if not any(c.method != "float" and methods.calibrates(c.method, c.format, calib.text is not None)
               for c in profile.candidates):
        return None
    if profile.stats is None:
        samples, _ = _calibration(src, calib, progress)
        profile.stats, _ = engine.statistics(src.model, arch, samples, batch=calib.batch,
                                             offload=Path(calib.offload) if calib.offload else None,
                                             progress=progress, compute_dtype=TORCH_DTYPES[calib.dtype],
                                             head=needs_head_stats(arch, profile.candidates))
    return profile.stats


def choose_measured(src, arch: Architecture, calib, profile: Profile, sizes: SizeTable, budget: Budget | str, *,
                    options: dict | None = None, samples: int = MEASURE_SAMPLES, progress: bool = True,
                    cache: SolvedCache | None = None) -> Allocation:
    """`plan_variants` for the budget, each measured (KL against the float model on `samples`
    held-out calibration samples, drawn with the next seed); the least measured KL wins.

    The knapsack is exact for its additive prediction, but real costs stop adding up when many
    layers are coarse: this keeps the allocation from ever losing to a plan it could have made.
    The winner is then measured with each option of `allocate.option_variants` flipped (GPTQ's clip
    search off, unless `options` sets it); the plan keeps the better (`Plan.options`).
    """
    allocs = plan_variants(profile, sizes, budget)
    if samples < 1 or (len(allocs) == 1 and not option_variants(allocs[0].plan, options)):
        return allocs[0]
    stats = profile_statistics(src, arch, calib, profile, progress)
    cache = SolvedCache() if cache is None else cache
    held = cache.held_out((calib.text, samples, calib.length, calib.seed + 1),
                          lambda: _calibration(src, replace(calib, samples=samples, seed=calib.seed + 1), progress)[0])
    t0 = time.perf_counter()

    def measure(plans, extra=None):
        return measure_plans(src.model, arch, plans, held, stats=stats, options={**(options or {}), **(extra or {})},
                             batch=calib.batch, progress=progress, cache=cache.with_options(extra or {}),
                             text_given=calib.text is not None)

    kls = measure(allocs)
    best = allocs[int(np.argmin(kls))]
    rows = [{"how": a.note, "bits_per_weight": a.bits_per_weight, "predicted_kl": a.predicted_total,
             "measured_kl": kl, "chosen": a is best} for a, kl in zip(allocs, kls)]
    chosen_kl, chosen = min(kls), rows[int(np.argmin(kls))]
    # the best plan again with each method option measured both ways (GPTQ's clip search off), its
    # weights solved again from the same statistics; the plan keeps the options of the least KL
    for extra in option_variants(best.plan, options):
        kl = measure([best], extra)[0]
        rows.append({"how": best.note, "options": extra, "bits_per_weight": best.bits_per_weight,
                     "predicted_kl": best.predicted_total, "measured_kl": kl, "chosen": False})
        if kl < chosen_kl:
            chosen["chosen"], rows[-1]["chosen"], chosen_kl, chosen = False, True, kl, rows[-1]
            best.plan = Plan(best.plan.choices, extra)
    best.measured = rows
    best.profile_protocol = {**best.profile_protocol, "measure": {
        "samples": samples, "length": calib.length, "seed": calib.seed + 1, "tokens": int(held.numel()),
        "weights": "solved at once from the float model's statistics", "measure_s": time.perf_counter() - t0}}
    return best


def plan_for_budget(model, budget: str | Budget, *, calib=None, quantizers: tuple[str, ...] = ("rtn",),
                    candidates: tuple[Candidate, ...] | None = None, float_dtype: str = "float16",
                    options: dict | None = None, fisher_samples: int = 8, cache: bool = True,
                    measure_samples: int = MEASURE_SAMPLES, progress: bool = True, allow_pickle: bool = False,
                    layout="artifact", checkpoint: str | Path | None = None, restart: bool = False,
                    rotate: bool = False) -> Allocation:
    """Load MODEL (a spec or `Source`), check the budget from shapes alone, profile (cached), allocate.

    With `measure_samples` > 0 the knapsack's plan is checked against a few alternatives by
    measurement (`choose_measured`); 0 trusts the prediction alone. `layout`: the output file a byte
    budget bounds, "artifact" (the packed file) or "gguf" (the GGUF exported from it; the candidates
    must then be ggml types, by default `gguf_candidate_set(quantizers)`), or a layout object.
    `checkpoint`, `restart`: the profiling pass's (`cached_profile`). `rotate`: the model is rotated first
    (`api.compression.rotate_source`, in place) and profiled rotated: the plan is for the rotated model.
    """
    return _allocated(model, budget, calib=calib, quantizers=quantizers, candidates=candidates,
                      float_dtype=float_dtype, options=options, fisher_samples=fisher_samples, cache=cache,
                      measure_samples=measure_samples, progress=progress, allow_pickle=allow_pickle, layout=layout,
                      checkpoint=checkpoint, restart=restart, rotate=rotate)[0]


def _allocated(model, budget: str | Budget, *, calib, quantizers, candidates, float_dtype, options, fisher_samples,
               cache, measure_samples, progress, allow_pickle, layout, checkpoint, restart, solve: bool = False,
               rotate: bool = False):
    """`plan_for_budget`'s work; with `solve` it also returns what compressing the plan can reuse: the
    float model's statistics (`profile_statistics`) and the weights measuring the plans solved from them.
    Returns (Allocation, statistics or None, solved weights)."""
    budget = parse_budget(budget)                       # a typo fails before anything loads
    src = _source(model, allow_pickle)
    calib = (calib or CalibConfig()).resolved(next(src.model.parameters()).device)
    if rotate:         # before sizing: an untied head is a new table; before the estimate: float32 now
        rotate_source(src, calib.seed)
    arch = discover(src.model)
    layout = file_layout(layout, src)
    cands = candidates or (gguf_candidate_set(quantizers, float_dtype) if layout.kind == "gguf"
                           else budget_candidates(quantizers, float_dtype))
    sizes = size_table(src.model, arch, cands, float_dtype, layout)
    check_budget(budget, sizes)                         # before any expensive work
    keep = measure_samples > 0 or solve
    memory.require(memory.peak_memory(src.model, task="plan", calibrated=True, batch=calib.batch,
                                      samples=0 if calib.offload else calib.samples, length=calib.length,
                                      kept_statistics=keep, measure_samples=measure_samples))
    prof = cached_profile(src, arch, calib, cands, options=options, fisher_samples=fisher_samples, cache=cache,
                          progress=progress, keep_stats=keep, tables=budget.kind == "bytes",
                          arithmetic=layout.arithmetic, checkpoint=checkpoint, restart=restart)
    solved = SolvedCache()
    if measure_samples > 0:
        alloc = choose_measured(src, arch, calib, prof, sizes, budget, options=options, samples=measure_samples,
                                progress=progress, cache=solved)
    else:
        alloc = allocate(prof, sizes, budget)
    if not solve:
        return alloc, None, {}
    return alloc, profile_statistics(src, arch, calib, prof, progress), solved.solved_weights(alloc.plan.options)


def compress_to_budget(model, budget: str | Budget, out: str | Path | None = None, config=None, *,
                       quantizers: tuple[str, ...] = ("rtn",), candidates: tuple[Candidate, ...] | None = None,
                       fisher_samples: int = 8, cache: bool = True, overwrite: bool = False,
                       measure_samples: int = MEASURE_SAMPLES, progress: bool = True, allow_pickle: bool = False,
                       layout="artifact", gguf: str | Path | None = None, checkpoint: str | Path | None = None,
                       profile_checkpoint: str | Path | None = None, restart: bool = False):
    """Allocate for the budget, then `api.compress` with that plan. Returns (Result, Allocation).
    `checkpoint`, `restart`: as `api.compress`'s, for that last step; `profile_checkpoint`: the
    profiling pass's (`cached_profile`).

    Unless `config.sequential` says otherwise (`Recipe.solves_sequentially`), the plan is solved from
    the float statistics the profile kept, reusing the weights its measurement solved (what the measured
    KL was of, and what `sweep` writes for the same budget): no calibration pass after profiling.
    Sequentially, each layer observes the compressed outputs of the layers before it: one more pass,
    as long as a uniform GPTQ run.

    The artifact's manifest gets an "allocation" entry (budget, predicted KL per layer, profile protocol).
    With `layout="gguf"` a byte budget bounds the GGUF file, which `gguf` names (the artifact `out`
    is then exported to it and its size checked; see `compress_allocation`).
    """
    config = config or CompressConfig()
    budget = parse_budget(budget)
    if out is not None:
        artifact.check_output(Path(out), overwrite)
    src = _source(model, allow_pickle)
    alloc, stats, solved = _allocated(src, budget, calib=config.calib, quantizers=quantizers, candidates=candidates,
                                      float_dtype=config.float_dtype, options=config.options,
                                      fisher_samples=fisher_samples, cache=cache, measure_samples=measure_samples,
                                      progress=progress, allow_pickle=allow_pickle, layout=layout,
                                      checkpoint=profile_checkpoint, restart=restart,
                                      solve=not config.solves_sequentially,
                                      rotate=methods.parse(config.method).rotate)
    return compress_allocation(src, alloc, out, config, overwrite=overwrite, progress=progress, gguf=gguf,
                               checkpoint=checkpoint, restart=restart, stats=stats, solved=solved), alloc


def compress_allocation(model, alloc: Allocation, out: str | Path | None = None, config=None, *,
                        overwrite: bool = False, progress: bool = True, allow_pickle: bool = False,
                        stats: dict | None = None, solved: dict | None = None, gguf: str | Path | None = None,
                        checkpoint: str | Path | None = None, restart: bool = False):
    """`api.compress` with the allocation's plan; the manifest records the allocation, sizes checked.

    Separate from `compress_to_budget` so that a sweep allocates many budgets from one profile
    (and, with the profile's `stats`, solves each plan without calibration passes).

    For an allocation sized as a GGUF (`alloc.layout` a `GGUFLayout`), `gguf` names the file: the
    artifact `out` is exported to it with the metadata the layout counted, and the file's size is
    checked against the allocation's (`res.exported`: the export's path, bytes and tensor types).
    """
    config = config or CompressConfig()
    is_gguf = alloc.layout.kind == "gguf"
    if gguf is not None and (not is_gguf or out is None):
        raise SizewiseError("writing a GGUF needs an allocation sized as one (layout='gguf') and an artifact "
                            "directory to export from")
    res = compress(_source(model, allow_pickle), replace(config, plan=alloc.plan), out,
                   overwrite=overwrite, progress=progress, stats=stats, solved=solved, checkpoint=checkpoint,
                   restart=restart)
    res.manifest["allocation"] = alloc.summary()
    if out is not None:
        t = res.manifest["totals"]
        if t["linear_stored_bits"] != alloc.linear_bits or (not is_gguf and t["file_bytes"] > alloc.file_bytes):
            raise SizewiseError(f"internal error: the artifact's size ({t['linear_stored_bits']} bits, "
                                f"{t['file_bytes']} bytes) differs from the allocation's; please report this")
        write_text(Path(out) / artifact.MANIFEST, json.dumps(res.manifest, indent=1))
    if gguf is not None:
        res.exported = write_gguf(alloc.layout, out, gguf, overwrite=overwrite)
        size = res.exported["bytes"]
        if size > alloc.file_bytes or (alloc.budget.kind == "bytes" and size > alloc.budget.value):
            Path(gguf).unlink(missing_ok=True)
            raise SizewiseError(f"internal error: the GGUF file {gguf} has {size:,} bytes, more than the "
                                f"{alloc.file_bytes:,} allocated for budget {alloc.budget.describe()}; please report this")
    return res
