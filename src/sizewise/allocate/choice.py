"""Choosing a plan: the knapsack's plan for a budget (`allocate`), uniform plans, the variants worth
measuring (`plan_variants`, and the method options worth measuring: `option_variants`), their measured KL (`measure_plans`), and the plan as a table (`render`).

Costs stop adding up when many layers are coarse (errors compound: at 3.3 bpw on SmolLM2 the
prediction was 0.79 nats, the measurement 1.29), so the knapsack's plan is measured next to the
knapsack without its lowest bit widths and the best uniform plan (`api.budget.choose_measured`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..arch import Architecture
from ..errors import SizewiseError
from ..lazy import held
from ..memory import reference_dtype
from ..plan import Plan
from ..quant import methods
from ..quant.formats import DTYPE_BITS, TORCH_DTYPES, FloatFormat
from .budgets import Budget, check_budget, parse_budget
from .cache import SolvedCache
from .candidates import Candidate, _choice, _dense, _solved_all
from .knapsack import solve_mckp
from .profile import Profile, _input_roundings, _kl_to, _log_probs
from .sizes import ARTIFACT, SizeTable


@dataclass
class Allocation:
    plan: Plan
    predicted: dict[str, float]        # predicted KL contribution (nats/token) per weight name
    budget: Budget
    capacity: int                      # knapsack capacity (bits, or linear-layer file bytes)
    used: int                          # knapsack weight of the plan, ≤ capacity
    linear_bits: int                   # Σ stored bits over the decoder linears, exact
    linear_params: int
    file_bytes: int                    # output file size (per the layout): artifact upper bound, GGUF exact
    states: int
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)    # (out, in) per weight name
    profile_protocol: dict = field(default_factory=dict)
    note: str = "knapsack"             # how the plan was made
    plan_float_dtype: str = "float16"  # storage of what the plan leaves unquantized
    measured: list[dict] = field(default_factory=list)   # plans measured for this budget, if any
    layout: object = ARTIFACT          # the output file `file_bytes` counts (ArtifactLayout, GGUFLayout)

    @property
    def bits_per_weight(self) -> float:
        return self.linear_bits / self.linear_params

    @property
    def predicted_total(self) -> float:
        return sum(self.predicted.values())

    def summary(self) -> dict:
        return {"budget": self.budget.text, "budget_kind": self.budget.kind, "capacity": self.capacity,
                "used": self.used, "linear_bits": self.linear_bits, "linear_params": self.linear_params,
                "bits_per_weight": self.bits_per_weight, "file_bytes_bound": self.file_bytes,
                "file_layout": self.layout.describe(),
                "predicted_kl": self.predicted_total, "predicted": self.predicted,
                "knapsack_states": self.states, "how": self.note, "options": self.plan.options,
                "measured_plans": self.measured,
                "profile": self.profile_protocol}


def _layer_options(profile: Profile, sizes: SizeTable, budget: Budget, allowed) -> tuple[list, list, list]:
    """Per layer: knapsack weights, predicted costs and option indices of the allowed candidates."""
    weights, costs, opts = [], [], []
    for layer in sizes.items(budget):
        lp = profile.by_name.get(layer.name)
        if lp is None or tuple(lp.shape) != tuple(layer.shape):
            raise SizewiseError(f"the sensitivity profile does not match this model (at {layer.name}); profile again")
        ok = [k for k, i in enumerate(layer.options)
              if lp.costs[i] is not None and (allowed is None or allowed(sizes.candidates[i]))]
        weights.append([budget.weights(layer)[k] for k in ok])
        costs.append([lp.costs[layer.options[k]] for k in ok])
        opts.append(ok)
    return weights, costs, opts


def _allocation(profile: Profile, sizes: SizeTable, budget: Budget, capacity: int, picks: list[int],
                states: int, note: str) -> Allocation:
    """The Allocation for one option index (into item.options) per knapsack item, exact sizes checked.

    Tables outside the knapsack stay float and are left out of the plan (which then keeps them float).
    """
    items = sizes.items(budget)
    choices, predicted, bits, fbytes = [], {}, 0, sizes.fixed_file_bytes
    for item, k in zip(items, picks):
        cand = sizes.candidates[item.options[k]]
        fbytes += item.file_bytes[k]
        predicted[item.name] = profile.by_name[item.name].costs[item.options[k]]
        if item in sizes.tables:
            if cand.method != "float":
                choices.append(_choice(item.name, cand))
            continue
        choices.append(_choice(item.name, cand))
        bits += cand.format.stored_bits(*item.shape)
    used = bits if budget.kind == "bpw" else fbytes - sizes.fixed_file_bytes
    if budget.kind == "bpw":
        fbytes += sum(sizes.table_float_bytes)
    # the guarantee, in exact integers: never over budget
    assert used <= capacity, (used, capacity)
    assert budget.kind != "bpw" or bits <= budget.value * sizes.linear_params
    assert budget.kind != "bytes" or fbytes <= budget.value
    return Allocation(Plan(choices), predicted, budget, capacity, used, bits, sizes.linear_params, fbytes,
                      states, {l.name: l.shape for l in sizes.layers + sizes.tables}, profile.protocol, note,
                      sizes.float_dtype, layout=sizes.layout)


def allocate(profile: Profile, sizes: SizeTable, budget: Budget | str, *, allowed=None,
             note: str = "knapsack") -> Allocation:
    """The plan of least predicted KL whose exact size fits the budget.

    `allowed(candidate) -> bool` restricts the candidates (e.g. none below 3 bits).
    """
    budget = parse_budget(budget)
    if tuple(profile.candidates) != tuple(sizes.candidates):
        raise SizewiseError("the sensitivity profile was made for a different candidate set; profile again")
    if profile.protocol.get("arithmetic") != sizes.layout.arithmetic:
        raise SizewiseError(f"the sensitivity profile prices {profile.protocol.get('arithmetic') or 'float'} "
                            f"arithmetic, a {sizes.layout.noun} runs in {sizes.layout.arithmetic or 'float'}; "
                            "profile again (profile_model(arithmetic=layout.arithmetic))")
    capacity = check_budget(budget, sizes)
    weights, costs, opts = _layer_options(profile, sizes, budget, allowed)
    if any(not w for w in weights):
        raise SizewiseError(f"no allowed candidate fits every layer ({note})")
    sol = solve_mckp(weights, costs, capacity)
    alloc = _allocation(profile, sizes, budget, capacity, [ok[j] for ok, j in zip(opts, sol.choice)],
                        sol.states, note)
    assert alloc.used == sol.weight, (alloc.used, sol.weight)
    return alloc


def uniform_allocations(profile: Profile, sizes: SizeTable, budget: Budget | str) -> list[Allocation]:
    """Every plan that gives all linears the same candidate and fits the budget, best predicted first."""
    budget = parse_budget(budget)
    capacity = check_budget(budget, sizes)
    out = []
    items = sizes.items(budget)
    tables = items[len(sizes.layers):]              # tables in the knapsack (byte budgets) stay float here
    floats = [next((k for k, i in enumerate(t.options) if sizes.candidates[i].method == "float"), None) for t in tables]
    if None in floats:
        return out
    for i, cand in enumerate(sizes.candidates):
        if cand.method == "float" or any(i not in l.options or profile.by_name[l.name].costs[i] is None
                                         for l in sizes.layers):
            continue
        picks = [l.options.index(i) for l in sizes.layers] + floats
        if sum(budget.weights(l)[k] for l, k in zip(items, picks)) <= capacity:
            out.append(_allocation(profile, sizes, budget, capacity, picks, 1, f"uniform {cand.label}"))
    return sorted(out, key=lambda a: a.predicted_total)


def _quantized_bits(c: Candidate) -> int:
    return 16 if c.method == "float" else c.format.bits


def plan_variants(profile: Profile, sizes: SizeTable, budget: Budget | str) -> list[Allocation]:
    """The plans worth measuring for a budget: the knapsack's, the knapsack's without its lowest
    bit widths (additive costs understate how errors compound when many layers are coarse), and
    the best uniform plan that fits. Duplicates are dropped."""
    budget = parse_budget(budget)
    out = [allocate(profile, sizes, budget)]
    for floor in sorted({_quantized_bits(c) for c in sizes.candidates if c.method != "float"})[1:3]:
        try:
            out.append(allocate(profile, sizes, budget, allowed=lambda c, f=floor: _quantized_bits(c) >= f,
                                note=f"knapsack, no candidate below {floor} bits"))
        except SizewiseError:       # nothing that coarse-free fits this budget
            break
    out += uniform_allocations(profile, sizes, budget)[:1]
    seen, unique = set(), []
    for a in out:
        key = tuple((c.method, c.format) for c in a.plan.choices)
        if key not in seen:
            seen.add(key)
            unique.append(a)
    return unique


# method options a budget measures both ways where its plan's methods take them and the user left them
# unset. GPTQ's clip search lowers each layer's own output error at int3 (by ~10% on the first layers
# of SmolLM2 and Qwen2.5-Coder-0.5B) but not always the model's: at int3 g64 the KL on WikiText-2 falls
# 0.737 -> 0.511 on SmolLM2 and rises 0.190 -> 0.224 on Qwen2.5-Coder (bench/clip_effect.py).
MEASURED_OPTIONS = ("clip_search",)


def option_variants(plan: Plan, options: dict | None) -> list[dict]:
    """The options worth measuring `plan` with besides the defaults: each boolean of `MEASURED_OPTIONS`
    that one of its methods takes and `options` leaves unset, flipped from the method's default."""
    out = []
    for key in MEASURED_OPTIONS:
        defaults = [methods.get(m).options[key] for m in sorted(plan.methods()) if key in methods.get(m).options]
        if defaults and key not in (options or {}):
            out.append({key: not defaults[0]})
    return out


def measure_plans(model, arch: Architecture, allocs: list[Allocation], samples: torch.Tensor, *,
                  stats: dict | None = None, options: dict | None = None, batch: int = 8,
                  progress: bool = True, cache: SolvedCache | None = None, text_given: bool = True) -> list[float]:
    """Measured KL(float ‖ plan) in nats/token on `samples`, per plan; the model is restored.

    Each plan's weights are solved from `stats` (the float model's input statistics, needed by
    calibrated quantizers) all at once, as the profile predicted them. `cache` (a `SolvedCache`
    kept by the caller, e.g. across the budgets of a sweep) holds solved weights and the float
    model's log-probabilities, which plans and budgets share. A plan sized for a GGUF is measured
    with llama.cpp's input rounding (`runtime.llamacpp`); the reference is the float model as it is.
    """
    from ..runtime.llamacpp import rounded_inputs

    cache = SolvedCache() if cache is None else cache
    refs = {r.weight_name: r for r in arch.all_linears()}
    layer_of = {r.weight_name: layer for layer, lrefs in zip(arch.layers, arch.linears) for r in lrefs}
    params = dict(model.named_parameters())

    def stats_of(name: str, cand: Candidate):
        # linears' statistics are keyed by module name, the head table's by its weight name
        st = stats.get(refs[name].name if name in refs else name) if stats is not None else None
        if st is None and cand.method != "float" and methods.get(cand.method).needs_calibration:
            raise SizewiseError(f"measuring a {cand.method} plan needs the calibration statistics")
        return st

    def original(name: str) -> torch.Tensor:
        return refs[name].weight() if name in refs else params[name].detach().float()

    # every plan's weights solved up front, each weight's candidates together (GPTQ's in one column
    # loop); a decoder layer on disk (`lazy`) is read once, for all of its weights
    todo: dict[str, list[Candidate]] = {}
    for alloc in allocs:
        for c in alloc.plan.choices:
            cand = Candidate(c.method, c.format)
            if (c.name, cand) not in cache.weights and cand not in todo.setdefault(c.name, []):
                todo[c.name].append(cand)
    by_layer: dict[int, list[str]] = {}
    for name in todo:
        by_layer.setdefault(id(layer_of.get(name)), []).append(name)
    for names in by_layer.values():
        with held(layer_of[names[0]]) if names[0] in layer_of else nullcontext():
            originals = {n: original(n) for n in names}
        for name in names:
            st = [stats_of(name, c) for c in todo[name]][0]         # (each candidate's need checked)
            for cand, solved in zip(todo[name], _solved_all(todo[name], originals.pop(name), st, options,
                                                            text_given)):
                cache.weight(name, cand, lambda: solved)

    key = cache.samples_key(samples)
    # whole plans: KL ≫ float32 rounding; a large reference in float16
    store = reference_dtype(samples.numel() * model.get_output_embeddings().weight.shape[0])
    reference = cache.reference(key, lambda: _log_probs(model, samples, batch, torch.float32, store=store))
    kls = []
    bar = tqdm(allocs, desc="measuring plans", unit="plan", disable=not progress, file=sys.stderr)
    for alloc in bar:
        pkey = (key, alloc.plan_float_dtype, _arithmetic(alloc),
                tuple((c.name, c.method, c.format) for c in alloc.plan.choices))
        known = cache.measured_kl(pkey)
        if known is not None:               # the same plan, measured for another budget
            kls.append(known)
            continue
        chosen = {c.name: Candidate(c.method, c.format) for c in alloc.plan.choices}

        def dense(name: str) -> torch.Tensor | None:
            # solved above and kept solved (uint8 codes), not dense: 4x less memory
            return _dense(cache.weights[(name, chosen[name])]) if name in chosen else None

        # tables the plan does not name stay float, in the plan's float dtype
        tables = {n: dense(n) if n in chosen else params[n].detach().to(TORCH_DTYPES[alloc.plan_float_dtype]).float()
                  for n in arch.tables}
        rounding = _plan_roundings(model, arch, alloc)
        with _tables_in(params, tables), _linears_in(arch, dense), rounded_inputs(rounding):
            kls.append(_kl_to(model, reference, samples, batch, torch.float32))
        del tables
        cache.put_kl(pkey, kls[-1])
    return kls


@contextmanager
def _tables_in(params: dict, tables: dict[str, torch.Tensor]):
    """Inside the block the token tables hold `tables` (a tied table is one parameter: both of its
    uses see the change); their own tensors come back after, never copied."""
    saved = []
    try:
        for name, w in tables.items():
            p = params[name]
            saved.append((p, p.data))
            p.data = w.to(p.device, p.dtype)
        yield
    finally:
        for p, data in reversed(saved):
            p.data = data


@contextmanager
def _linears_in(arch: Architecture, dense):
    """Inside the block each decoder layer holds the plan's weights (`dense(weight name)`, [out, in]
    float32, or None to keep the float weight) only while it runs: one layer's dense weights at a
    time, the float weights never copied, and a layer on disk (`lazy`) goes back there unchanged.

    The layer must run once per forward pass, as `_kl_to` runs it (`profile._log_prob_chunks`)."""
    by_layer = {id(layer): lrefs for layer, lrefs in zip(arch.layers, arch.linears)}
    swapped: dict[int, list] = {}

    def enter(layer, args, kwargs):
        for r in by_layer[id(layer)]:
            w = dense(r.weight_name)
            if w is not None:
                p = r.module.weight
                swapped.setdefault(id(layer), []).append((p, p.data))
                p.data = (w.t() if r.transposed else w).to(p.device, p.dtype).contiguous()

    def leave(layer, args, kwargs, out):
        for p, data in swapped.pop(id(layer), ()):
            p.data = data
        return out

    handles = []
    try:
        for layer in arch.layers:
            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            # prepend: the float weights are back before a lazy layer checks them (`lazy`)
            handles.append(layer.register_forward_hook(leave, with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for saved in swapped.values():          # a forward that failed inside a layer
            for p, data in saved:
                p.data = data


def _arithmetic(alloc: Allocation) -> str | None:
    return getattr(alloc.layout, "arithmetic", None)


def _plan_roundings(model, arch: Architecture, alloc: Allocation) -> dict:
    """Module -> the input rounding the plan's file gets from its runtime (empty for our own artifact)."""
    from ..runtime.llamacpp import input_rounding, module_roundings

    arithmetic = _arithmetic(alloc)
    if arithmetic is None:
        return {}
    _input_roundings([], arithmetic)                 # a known arithmetic
    chosen = {c.name: c.format for c in alloc.plan.choices}
    float_format = FloatFormat(alloc.plan_float_dtype)
    return module_roundings(model, arch, lambda n: input_rounding(chosen.get(n, float_format)))


KIND_ORDER = ("quant", "sparse", "low-rank", "sparse+low-rank", "float")


def kinds_line(kinds: list[str]) -> str:
    """'kinds chosen: quant 180, sparse 12, low-rank 18' for the layers' `Format.compression`s."""
    counts = {k: kinds.count(k) for k in dict.fromkeys(sorted(kinds, key=lambda k: (
        KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k)))}
    return "kinds chosen: " + ", ".join(f"{k} {n}" for k, n in counts.items())


def render(alloc: Allocation) -> str:
    """The plan as a table: layer, method, bits, group, bits/weight, predicted KL; then the totals."""
    rows = [f"{'layer':52} {'method':7} {'bits':>4} {'group':>7} {'bits/w':>7} {'pred. KL':>10}"]
    mix: dict[str, int] = {}
    for c in alloc.plan.choices:
        fmt, (out, inp) = c.format, alloc.shapes[c.name]
        name = c.name.removesuffix(".weight")
        bits, group = fmt.bits, fmt.group_label
        kind = f"{c.method} {fmt.label}" if fmt.quantized else fmt.label
        mix[kind] = mix.get(kind, 0) + 1
        rows.append(f"{name[-52:]:52} {c.method:7} {bits:>4} {group:>7} {fmt.stored_bits(out, inp) / (out * inp):7.3f} "
                    f"{alloc.predicted[c.name]:10.3e}")
    for name in alloc.shapes:           # every linear is in the plan: the rest are token tables left in float
        if name not in alloc.plan.by_name:
            note = "(outside bits/weight)" if alloc.budget.kind == "bpw" else ""
            rows.append(f"{name.removesuffix('.weight')[-52:]:52} {'float':7} {DTYPE_BITS[alloc.plan_float_dtype]:>4} "
                        f"{'-':>7} {DTYPE_BITS[alloc.plan_float_dtype]:7.3f} {alloc.predicted.get(name, 0.0):10.3e} {note}")
    rows.append("mix: " + ", ".join(f"{v} x {k}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])))
    rows.append(kinds_line([c.format.compression for c in alloc.plan.choices if c.name in alloc.shapes]))
    rows.append(f"total: {alloc.bits_per_weight:.4f} bits/weight over {alloc.linear_params / 1e6:.2f}M linear weights; "
                f"{alloc.layout.noun} at most {alloc.file_bytes / 1e6:.2f} MB; budget {alloc.budget.describe()}; "
                f"predicted KL {alloc.predicted_total:.4g} nats/token")
    if alloc.plan.options:
        rows.append(options_line(alloc.plan))
    return "\n".join(rows)


def options_line(plan: Plan) -> str:
    """'method options chosen by measurement: clip_search=False' for a plan's own options."""
    return "method options chosen by measurement: " + ", ".join(f"{k}={v}" for k, v in sorted(plan.options.items()))
