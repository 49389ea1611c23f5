"""A recipe is everything one compression run does, as data: JSON in, JSON out, the same object the
CLI builds from its flags and a notebook user passes to `api.run`.

    transforms    the method's prefix: rotate+ (Hadamard rotation), awq+ (AWQ scales), applied first
    quantizer     the method's last part (rtn, rtn-mse, gptq; pruning: sparsegpt, sparsegpt+gptq, wanda,
                  magnitude; svd), with typed options (`options`); sparsity and low-rank factors are
                  part of the format (`methods.format_for`: a sparse format, a low-rank one)
    what to store one uniform `format` (minus `skip` globs), a `plan` (per-layer choices), or a
                  `budget` the allocator meets by choosing among the listed quantizers per layer
    calibration   `calib`; the allocator's samples (`fisher_samples`, `measure_samples`)
    output        "artifact" (a directory) or "gguf" (a file llama.cpp runs)
    structured    layers, MLP channels and heads removed first (`prune.StructuredConfig`): a smaller
                  dense model, which the rest of the recipe then quantizes

    sizewise compress MODEL --recipe recipe.json -o out/x        # a recipe saved by an earlier run
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .defaults import MEASURE_SAMPLES
from .errors import SizewiseError
from .plan import Choice, Plan
from .prune.config import StructuredConfig
from .quant import methods
from .quant.formats import TORCH_DTYPES, Format
from .quant.registry import format_from_dict
from .quant.uniform import QuantFormat

RECIPE_VERSION = 2          # 2: `sequential`


def _plain(x):
    """A JSON value: paths (a calibration text given as a Path) as strings."""
    return os.fspath(x) if isinstance(x, os.PathLike) else x
OUTPUTS = ("artifact", "gguf")


@dataclass
class CalibConfig:
    """Calibration data for methods that need it. `text=None`: the model generates its own samples."""

    text: str | None = None
    samples: int = 128
    length: int = 512
    seed: int = 0
    batch: int = 8
    offload: str | None = None       # directory for the activation buffer (memory-mapped)
    # dtype of calibration forward passes: "auto" (bfloat16 where native: GPTQ on SmolLM2 2.8x faster
    # than float32 at equal perplexity, bench/results/budget.json), "float32" or "bfloat16"
    dtype: str = "auto"

    def check(self) -> "CalibConfig":
        """Counts are positive (a zero batch would loop forever or divide by zero); one line otherwise."""
        for name, least in (("samples", 1), ("length", 2), ("batch", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise SizewiseError(f"calibration {name} must be an integer >= {least}, got {v!r}")
        if self.offload is not None and os.path.exists(self.offload) and not os.path.isdir(self.offload):
            raise SizewiseError(f"--offload {self.offload} is not a directory")
        return self

    def resolved(self, device) -> "CalibConfig":
        """This config with "auto" replaced by the dtype chosen for `device` (see `auto_calib_dtype`)."""
        return self if self.dtype != "auto" else replace(self, dtype=auto_calib_dtype(device))


def auto_calib_dtype(device) -> str:
    """bfloat16 where the hardware computes it natively (CUDA with bf16; x86 CPUs with AVX512-BF16 or
    AMX, read from /proc/cpuinfo), else float32: emulated bf16 would be slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


@dataclass
class Recipe:
    method: str = "rtn"                             # [rotate+][awq+]QUANTIZER; with a budget, QUANTIZERS comma-separated
    format: Format = field(default_factory=lambda: QuantFormat(4, 64))
    options: dict = field(default_factory=dict)     # method options, e.g. {"act_order": False} (checked: `check`)
    skip: tuple[str, ...] = ()                      # globs of linear names kept in float
    float_dtype: str = "float16"                    # storage of every weight not quantized
    plan: Plan | None = None                        # when given, overrides format/skip
    calib: CalibConfig = field(default_factory=CalibConfig)
    budget: str | None = None                       # "3.5bpw", "70MB": the allocator chooses per layer
    fisher_samples: int = 8                         # with a budget: samples for the importance pass
    measure_samples: int = MEASURE_SAMPLES          # with a budget: held-out samples to measure plans on
    output: str = "artifact"                        # "artifact" or "gguf"
    structured: StructuredConfig | None = None      # layers, MLP channels, heads removed before quantizing
    # how calibrated layers are solved: True, each from inputs through the layers before it already
    # compressed (a pass per layer); False, every layer from one pass over the float model (what a
    # budget's profile has already observed); None: True for one format or a plan, False with a budget
    sequential: bool | None = None

    # --- what the run does --------------------------------------------------------------------

    @staticmethod
    def default_budget_method(calib_text: str | None) -> str:
        """What a budget chooses among when no method is named: with calibration text the calibrated
        GPTQ beside RTN (on both real models GPTQ wins most layers at 3-4 bits), without it data-free RTN
        (self-generated samples serve the sensitivity profile, not as data to fit weights to)."""
        return "rtn,gptq" if calib_text else "rtn"

    @property
    def solves_sequentially(self) -> bool:
        """`sequential` resolved: by default a budget's plan is solved from the float statistics its profile
        holds, unless AWQ changes the model first."""
        if self.sequential is not None:
            return self.sequential
        return self.budget is None or self.pipeline.awq or self.structured is not None

    @property
    def pipeline(self) -> methods.Pipeline:
        """The transforms and the quantizer (for a budget: the transforms the quantizers share)."""
        return methods.parse(self.budget_methods()[0] if self.budget is not None else self.method)

    def budget_methods(self) -> tuple[str, tuple[str, ...]]:
        """With a budget: (pipeline the plan is applied with, quantizers the allocator chooses among).

        "awq+gptq,awq+rtn" -> (awq+rtn, ("gptq", "rtn")): the plan is chosen on the float model, then
        applied with AWQ's scales searched for each layer's chosen format. "rotate+gptq,rotate+rtn" ->
        (rotate+rtn, ("gptq", "rtn")): the model is rotated before it is profiled, so the plan is
        chosen for the rotated model.
        """
        pipes = [methods.parse(m) for m in self.method.split(",") if m.strip() != methods.LOWRANK]
        if not pipes:
            raise SizewiseError(f"--method {self.method}: {methods.LOWRANK} corrects a quantizer's grid: list one "
                                f"too (e.g. gptq,{methods.LOWRANK})")
        if len({(p.rotate, p.awq) for p in pipes}) > 1:
            raise SizewiseError(f"--method {self.method}: every quantizer must share the same transforms "
                                "(e.g. awq+gptq,awq+rtn)")
        lowrank = (methods.LOWRANK,) if methods.LOWRANK in (m.strip() for m in self.method.split(",")) else ()
        prefix = ("rotate+" if pipes[0].rotate else "") + ("awq+" if pipes[0].awq else "")
        return prefix + "rtn", tuple(p.quantizer for p in pipes) + lowrank

    def check(self) -> "Recipe":
        """Every field names something that exists and fits the others; one-line error otherwise."""
        if self.float_dtype not in TORCH_DTYPES:
            raise SizewiseError(f"float dtype must be one of {sorted(TORCH_DTYPES)}, got {self.float_dtype!r}")
        if self.output not in OUTPUTS:
            raise SizewiseError(f"unknown output {self.output!r}; available: {', '.join(OUTPUTS)}")
        self.calib.check()
        for name, least in (("fisher_samples", 1), ("measure_samples", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise SizewiseError(f"{name} must be an integer >= {least}, got {v!r}")
        if self.budget is not None and (self.plan is not None or self.skip):
            raise SizewiseError("--budget chooses every layer's format itself; drop --plan and --skip")
        if self.structured is not None and self.budget is not None:
            raise SizewiseError("structured pruning does not combine with --budget yet: prune to an artifact, "
                                "then compress that artifact to the budget")
        if self.structured is not None:
            self.structured.check()
        if self.sequential not in (None, True, False):
            raise SizewiseError(f"sequential must be true, false or null, got {self.sequential!r}")
        if self.sequential is False and (self.pipeline.awq or self.structured is not None):
            raise SizewiseError("AWQ and structured pruning change the model layer by layer as it is solved: they "
                                "are solved sequentially, not from the float model's statistics")
        quantizers = self.budget_methods()[1] if self.budget is not None else (self.pipeline.quantizer,)
        if self.budget is not None:
            kinds = methods.split_budget_methods(quantizers)
            if kinds.joint and self.pipeline.awq:
                raise SizewiseError("awq+ does not combine with pruning or low-rank candidates under --budget")
            if kinds.joint and self.output == "gguf":
                raise SizewiseError("--budget with --format gguf chooses among llama.cpp's types; pruning and "
                                    "low-rank candidates are for the artifact")
            quantizers = kinds.quantizers + kinds.pruners + (("svd",) if kinds.svd else ())
        used = {methods.get(q).name for q in quantizers} | (self.plan.methods() if self.plan else set())
        for name in used:
            methods.get(name)
        if self.plan is None and self.budget is None:
            methods.check_format(self.pipeline.quantizer, self.format)
        methods.check_options(self.options)
        return self

    # --- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {"recipe_version": RECIPE_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "format":
                v = v.to_dict()
            elif f.name == "plan":
                v = None if v is None else [c.to_dict() for c in v.choices]
            elif f.name == "calib":
                v = {g.name: _plain(getattr(v, g.name)) for g in fields(v)}
            elif f.name == "skip":
                v = list(v)
            elif f.name == "structured":
                v = None if v is None else v.to_dict()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise SizewiseError("a recipe is a JSON object")
        d = dict(d)
        if d.pop("recipe_version", RECIPE_VERSION) > RECIPE_VERSION:
            raise SizewiseError("the recipe was written by a newer sizewise")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SizewiseError(f"unknown recipe field(s): {', '.join(unknown)}")
        try:
            if "format" in d:
                d["format"] = format_from_dict(d["format"])
            if d.get("plan") is not None:
                d["plan"] = Plan([Choice.from_dict(c) for c in d["plan"]])
            if "calib" in d:
                d["calib"] = CalibConfig(**d["calib"])
            if "skip" in d:
                d["skip"] = tuple(d["skip"])
            if d.get("structured") is not None:
                d["structured"] = StructuredConfig.from_dict(d["structured"])
            return cls(**d).check()
        except (TypeError, KeyError, AttributeError) as e:
            raise SizewiseError(f"not a sizewise recipe: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise SizewiseError(f"no recipe file at {path}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise SizewiseError(f"{path} is not JSON: {e}") from None
