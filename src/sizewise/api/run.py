"""`run`: everything a recipe says, in one call: compress to one format, a plan or a budget, and write
the artifact or the GGUF file. The CLI's `compress` only builds the recipe from its flags."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..atomic import check_target, claim
from ..checkpoint import location
from ..errors import SizewiseError
from ..recipe import Recipe
from ..sources import Source
from .compression import Result, compress
from .entry import compress_to_budget
from .exporting import export


def run(model: str | Path | Source, recipe: Recipe, out: str | Path, *, overwrite: bool = False,
        progress: bool = True, allow_pickle: bool = False, resume: bool = True,
        restart: bool = False, keep_model: bool = True) -> tuple[Result, object | None]:
    """Compress `model` as `recipe` says and write `out` (an artifact directory, or with
    `recipe.output == "gguf"` a .gguf file). Returns (Result, the allocation if a budget chose the
    plan); `Result.exported` describes a GGUF written.

    With `resume`, each finished decoder layer of the compression is kept in `checkpoint.location(out)`
    and a stopped run resumes from it; `restart` discards one first. With a budget, so is the
    profiling pass, in `checkpoint.location(out, "profile")`. `keep_model=False`: the compressed model is
    not kept in memory as it is written (`Result.model` None; budgets keep it: their plans are measured)."""
    recipe.check()
    resumable = {"checkpoint": location(out) if resume else None, "restart": restart}
    if recipe.output == "gguf":
        return _run_gguf(model, recipe, Path(out), overwrite, progress, allow_pickle, resumable,
                         location(out, "profile") if resume else None, keep_model)
    if recipe.budget is not None:
        return _to_budget(model, recipe, out, overwrite=overwrite, progress=progress, allow_pickle=allow_pickle,
                          profile_checkpoint=location(out, "profile") if resume else None, **resumable)
    return compress(model, recipe, out, overwrite=overwrite, progress=progress, allow_pickle=allow_pickle,
                    keep_model=keep_model, **resumable), None


def _to_budget(model, recipe: Recipe, out, **kwargs):
    from ..allocate import gguf_candidate_set

    pipeline, quantizers = recipe.budget_methods()
    gguf = kwargs.get("gguf")
    return compress_to_budget(model, recipe.budget, replace(recipe, method=pipeline), out, quantizers=quantizers,
                              fisher_samples=recipe.fisher_samples, measure_samples=recipe.measure_samples,
                              candidates=gguf_candidate_set(quantizers, recipe.float_dtype) if gguf else None,
                              layout="gguf" if gguf else "artifact", **kwargs)


def _run_gguf(model, recipe: Recipe, out: Path, overwrite: bool, progress: bool, allow_pickle: bool, resumable: dict,
              profile_checkpoint, keep_model: bool = True):
    """The artifact is built in a temporary directory beside the output, exported, dropped."""
    if out.suffix != ".gguf":
        raise SizewiseError(f"with --format gguf, -o names the file to write (model.gguf), got {out}")
    check_target(out, overwrite=overwrite, kind="file")
    if recipe.budget is None:          # fail before any work if the file could not hold the formats exactly
        fmts = [c.format for c in recipe.plan.choices] if recipe.plan else [recipe.format]
        bad = [f for f in fmts if f.ggml_type is None]
        if bad:
            raise SizewiseError(f"GGUF cannot hold {bad[0].label} exactly; use --group-size 32 with --sym "
                                "(Q4_0/Q5_0/Q8_0) or --zero float16 (Q4_1/Q5_1); sparse weights need float16 or --sym "
                                "kept values, and factors alone (svd) have no GGUF form")
    with claim(out, overwrite=overwrite, kind="file") as area:   # the artifact lives in the staging area
        art = area / "artifact"
        if recipe.budget is not None:   # a byte budget bounds the .gguf file itself (checked after writing)
            res, alloc = _to_budget(model, recipe, art, progress=progress, allow_pickle=allow_pickle, gguf=out,
                                    overwrite=overwrite, profile_checkpoint=profile_checkpoint, **resumable)
        else:
            res, alloc = compress(model, recipe, art, progress=progress, allow_pickle=allow_pickle,
                                  keep_model=keep_model, **resumable), None
            res.exported = export(art, out, format="gguf", overwrite=overwrite)
    return res, alloc
