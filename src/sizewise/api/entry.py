"""The budget entry points as the public API takes them (one `CompressConfig`), and `sweep`.

Thin wrappers over `api.budget` and `sizewise.sweep`. They live apart from the modules that
`sizewise.sweep` imports, so that nothing imports back: sweep → api.budget, api.entry → sweep.
"""

from __future__ import annotations

from pathlib import Path

from ..defaults import MEASURE_SAMPLES
from ..sources import Source
from . import budget as _budget
from .compression import CompressConfig


def plan_for_budget(model: str | Path | Source, budget: str, config: CompressConfig | None = None, *,
                    quantizers: tuple[str, ...] = ("rtn",), fisher_samples: int = 8, measure_samples: int = MEASURE_SAMPLES,
                    progress: bool = True, allow_pickle: bool = False, layout: str = "artifact",
                    checkpoint: str | Path | None = None, restart: bool = False):
    """The plan of least predicted KL whose exact size fits `budget` ("3.5bpw", "70MB", "64MiB").

    Uses config.calib, config.float_dtype and config.options; returns an `allocate.Allocation`
    (.plan, .predicted per layer; `allocate.render` prints it). Profiling is cached per model and
    calibration settings, so asking again for another budget is fast. `layout="gguf"`: only
    llama.cpp's types, and a byte budget bounds the .gguf file the plan exports to. `checkpoint` (a
    directory, `checkpoint.location(out, "profile")` for the CLI): a stopped profiling pass resumes
    from it; `restart` discards it.
    """
    config = config or CompressConfig()
    return _budget.plan_for_budget(model, budget, calib=config.calib, quantizers=quantizers,
                                   float_dtype=config.float_dtype, options=config.options,
                                   fisher_samples=fisher_samples, measure_samples=measure_samples,
                                   progress=progress, allow_pickle=allow_pickle, layout=layout,
                                   checkpoint=checkpoint, restart=restart)


def compress_to_budget(model: str | Path | Source, budget: str, config: CompressConfig | None = None,
                       out: str | Path | None = None, *, quantizers: tuple[str, ...] = ("rtn",),
                       fisher_samples: int = 8, measure_samples: int = MEASURE_SAMPLES, overwrite: bool = False,
                       progress: bool = True, allow_pickle: bool = False, candidates=None,
                       layout: str = "artifact", gguf: str | Path | None = None,
                       checkpoint: str | Path | None = None, profile_checkpoint: str | Path | None = None,
                       restart: bool = False):
    """`plan_for_budget`, then `compress` with that plan. Returns (Result, Allocation).

    `candidates` (e.g. `allocate.gguf_candidate_set()`) replaces the default candidate set.
    `layout="gguf"`: a byte budget bounds the GGUF file `gguf`, exported from the artifact `out`
    (the candidates must then be ggml types: `allocate.gguf_candidate_set`). `checkpoint` and
    `profile_checkpoint`: where the compression and the profiling keep finished layers to resume."""
    return _budget.compress_to_budget(model, budget, out, config, quantizers=quantizers, candidates=candidates,
                                      fisher_samples=fisher_samples,
                                      measure_samples=measure_samples, overwrite=overwrite, progress=progress,
                                      allow_pickle=allow_pickle, layout=layout, gguf=gguf, checkpoint=checkpoint,
                                      profile_checkpoint=profile_checkpoint, restart=restart)


def sweep(model: str | Path, budgets, out: str | Path, config: CompressConfig | None = None, **kwargs) -> dict:
    """Compress to every budget from one profile, plus uniform baselines, evaluate all, write a report.

    See `sizewise.sweep.sweep` for the keyword arguments (quantizers, uniform, peers, text, ctx, windows, ...).
    """
    from ..sweep import sweep as _sweep

    return _sweep(model, budgets, out, config, **kwargs)
