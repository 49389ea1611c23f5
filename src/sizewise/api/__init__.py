"""The public Python API: compress(), evaluate(), info(). The CLI is a thin layer over these.

    import sizewise
    from sizewise import CompressConfig, CalibConfig, QuantFormat
    sizewise.compress("smollm2-135m", CompressConfig(method="gptq", format=QuantFormat(4, 64),
                      calib=CalibConfig(text="enwiki-sample")), out="out/w4g64")
    sizewise.evaluate("out/w4g64", text="wikitext2-test", windows=64, against="smollm2-135m")

This package face only re-exports. The modules behind it, each importing only those before it:
    compression   CalibConfig, CompressConfig, Result, compress (and loading sources, calibration samples)
    inspection    info
    evaluation    evaluate, compare
    exporting     export
    budget        compressing to a size budget above the allocator: cached profiles, measured plans
    entry         plan_for_budget and compress_to_budget taking a CompressConfig, and sweep
    run           everything a Recipe says: one format, a plan or a budget, to an artifact or a GGUF
Inside the package, modules import each other, never this face; `sizewise.sweep` imports the
modules it needs, and only `entry.sweep` imports `sizewise.sweep` (lazily).
"""

from .compression import (CalibConfig, CompressConfig, Result, _calibration, _peak_rss_mb, _source, auto_calib_dtype,
                          compress)
from .entry import compress_to_budget, plan_for_budget, sweep
from .evaluation import _llamacpp_roundings, compare, evaluate
from .exporting import _export_float, export
from .inspection import _artifact_info, info
from .run import run
from ..recipe import Recipe

__all__ = ["CalibConfig", "CompressConfig", "Recipe", "Result", "run", "auto_calib_dtype", "compare", "compress", "compress_to_budget",
           "evaluate", "export", "info", "plan_for_budget", "sweep"]
