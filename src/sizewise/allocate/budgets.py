"""Budgets: bits per weight over the decoder linears ("3.5bpw") or a file size ("70MB"), exact
(`Fraction`), and the check that a budget is reachable with a size table's candidates."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from ..errors import SizewiseError
from .sizes import LayerSizes, SizeTable

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Budget:
    """"3.5bpw": average stored bits per weight over the decoder linears (scales and zeros included).
    "70MB": the whole output file, as the size table's layout counts it: the packed artifact file,
    or the GGUF file (MB = 10⁶ bytes; MiB = 2²⁰; also kB, GB, KiB, GiB, B)."""

    text: str
    kind: str                 # "bpw" or "bytes"
    value: Fraction           # bits per weight, or bytes
    unit: str = ""            # the unit as written, for messages

    def capacity(self, sizes: SizeTable) -> int:
        """The knapsack capacity, exactly: linear bits for bpw, linear-layer file bytes for files."""
        if self.kind == "bpw":
            return math.floor(self.value * sizes.linear_params)
        return math.floor(self.value) - sizes.fixed_file_bytes

    def weights(self, layer: LayerSizes) -> tuple[int, ...]:
        return layer.bits if self.kind == "bpw" else layer.file_bytes

    def describe(self) -> str:
        return f"{float(self.value):g} bits/weight" if self.kind == "bpw" else f"{self.text} ({int(self.value):,} bytes)"


def parse_budget(text: str | Budget) -> Budget:
    """'3.5bpw', '3.25 bpw', '70MB', '70 MiB', '1.2GB', '123456789B'."""
    if isinstance(text, Budget):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]+)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit not in _UNITS and unit != "bpw"):
        raise SizewiseError(f"budget {text!r} is not understood; write bits per weight (3.5bpw) or a file size "
                            "(70MB = 70·10⁶ bytes, 70MiB = 70·2²⁰ bytes; also kB, GB, KiB, GiB)")
    value = Fraction(m.group(1))    # exact: '3.1bpw' is 31/10, never a binary approximation
    if value <= 0:
        raise SizewiseError(f"budget {text!r} must be positive")
    if unit == "bpw":
        return Budget(str(text).strip(), "bpw", value, "bpw")
    return Budget(str(text).strip(), "bytes", value * _UNITS[unit], m.group(2))


def _show_range(budget: Budget, sizes: SizeTable) -> str:
    """The reachable range in the budget's own unit, rounded inwards so both ends are reachable."""
    def inwards(lo: Fraction, hi: Fraction) -> tuple[str, str]:
        d = max(2, 3 - math.floor(math.log10(float(hi))))          # at least 4 significant digits
        return f"{math.ceil(lo * 10**d) / 10**d:.{d}f}", f"{math.floor(hi * 10**d) / 10**d:.{d}f}"

    if budget.kind == "bpw":
        lo, hi = sizes.reachable_bits()
        a, b = inwards(Fraction(lo, sizes.linear_params), Fraction(hi, sizes.linear_params))
        return f"{a} to {b} bits/weight"
    lo, hi = sizes.reachable_bytes()
    unit = budget.unit if budget.unit.lower() in _UNITS and budget.unit.lower() != "b" else "MB"  # bytes: in full after
    a, b = inwards(Fraction(lo, _UNITS[unit.lower()]), Fraction(hi, _UNITS[unit.lower()]))
    return f"{a} {unit} to {b} {unit} ({lo:,} to {hi:,} bytes)"


def check_budget(budget: Budget | str, sizes: SizeTable) -> int:
    """The knapsack capacity, or a one-line error naming the reachable range."""
    budget = parse_budget(budget)
    cap = budget.capacity(sizes)
    if budget.kind == "bpw":
        (lo, hi), exact = sizes.reachable_bits(), budget.value * sizes.linear_params
        what = "bits per weight over the decoder linears"
    else:
        (lo, hi), exact = sizes.reachable_bytes(), budget.value
        what = f"{sizes.layout.noun} size"
        lo, hi = lo - sizes.fixed_file_bytes, hi - sizes.fixed_file_bytes
        exact -= sizes.fixed_file_bytes
    if cap < lo:
        raise SizewiseError(f"budget {budget.text} is below the smallest reachable {what} with these candidates; "
                            f"reachable: {_show_range(budget, sizes)}")
    if exact > hi:
        raise SizewiseError(f"budget {budget.text} is above the largest reachable {what} with these candidates "
                            f"(everything at its largest option); reachable: {_show_range(budget, sizes)}")
    return cap
