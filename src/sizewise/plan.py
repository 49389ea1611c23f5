"""A plan is data: one row per weight saying which method and stored format it gets.

Plans are written by hand, by `Plan.uniform`, or by the budget allocator, and applied by
`api.compress`. They round-trip through JSON unchanged. A plan may also carry method options
(`Plan.options`): those its weights were measured with when the allocator chose between them
(GPTQ's clip search on or off), so that applying the plan solves the weights it chose.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from .arch import Architecture
from .errors import SizewiseError
from .quant.formats import FloatFormat, Format
from .quant.methods import check_options
from .quant.registry import format_from_dict
from .quant.uniform import QuantFormat


@dataclass(frozen=True)
class Choice:
    name: str          # weight name in the model's state dict, e.g. "model.layers.0.mlp.up_proj.weight"
    method: str        # "rtn", "gptq", ... or "float" for a weight kept in floating point
    format: Format

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "format": self.format.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Choice":
        return cls(d["name"], d["method"], format_from_dict(d["format"]))


@dataclass
class Plan:
    choices: list[Choice]
    options: dict = field(default_factory=dict)     # method options it was chosen with; a run's own win

    def __post_init__(self):
        check_options(self.options)
        self.by_name = {c.name: c for c in self.choices}
        if len(self.by_name) != len(self.choices):
            raise SizewiseError("plan names a weight twice")

    @classmethod
    def uniform(cls, arch: Architecture, method: str, fmt: QuantFormat, *,
                skip: tuple[str, ...] = (), float_dtype: str = "float16") -> "Plan":
        """Every decoder linear gets (method, fmt) unless its name matches a `skip` glob."""
        choices = []
        for ref in arch.all_linears():
            keep = any(fnmatch.fnmatchcase(ref.name, p) or fnmatch.fnmatchcase(ref.weight_name, p) for p in skip)
            if not keep:
                fmt.check(ref.shape[1], ref.name)
            choices.append(Choice(ref.weight_name, "float", FloatFormat(float_dtype)) if keep
                           else Choice(ref.weight_name, method, fmt))
        return cls(choices)

    def methods(self) -> set[str]:
        return {c.method for c in self.choices} - {"float"}

    def to_json(self) -> str:
        d = {"plan_version": 1, "choices": [c.to_dict() for c in self.choices]}
        if self.options:
            d["options"] = self.options
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            return cls([Choice.from_dict(c) for c in d["choices"]], d.get("options", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SizewiseError(f"not a sizewise plan: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise SizewiseError(f"no plan file at {path}")
        return cls.from_json(p.read_text())

    def check(self, arch: Architecture) -> None:
        """Every decoder linear is covered, every format fits its weight, and any other weight named
        is a token table (embedding or untied head); only the one that computes the logits (the head,
        or the embedding tied to it) may take a calibrated method. Tables not named stay float."""
        from .quant import methods

        refs = {r.weight_name: r for r in arch.all_linears()}
        missing = sorted(set(refs) - set(self.by_name))
        if missing:
            raise SizewiseError(f"plan does not cover {len(missing)} linear weights, e.g. {missing[0]}")
        for c in self.choices:
            if c.method != "float":
                methods.check_format(c.method, c.format)
            if c.name in refs:
                c.format.check(refs[c.name].shape[1], c.name)
            elif c.name in arch.tables:
                if c.method != "float":
                    if methods.get(c.method).needs_calibration and c.name != arch.head_table:
                        raise SizewiseError(f"{c.name} is an input embedding: its method must be data-free "
                                            f"(rtn, rtn-mse), not {c.method}")
                    c.format.check(arch.tables[c.name][1], c.name)
            else:
                raise SizewiseError(f"plan names {c.name}, which is neither a decoder linear nor a token table "
                                    f"({', '.join(arch.tables) or 'none'})")

    def tables(self, arch: Architecture) -> list[Choice]:
        """The plan's choices for token tables (embedding, untied head) that are quantized."""
        return [c for c in self.choices if c.name in arch.tables and c.method != "float"]
