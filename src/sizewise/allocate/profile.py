"""Sensitivity profiling: the predicted cost of every candidate on every layer.

Sensitivity proxy (predicted KL divergence from the float model, nats per token). For a linear
layer with calibration inputs X (H = XᵀX over N tokens) and a candidate's weight error ΔW, the
layer-output error of output channel j is e_j = (ΔW H ΔWᵀ)_jj / N, exactly the mean over tokens
of (Δy_j)². A second-order expansion of the KL around the float model turns output errors into
model loss: KL ≈ ½ Σ_j f_j e_j, where f_j is the diagonal Fisher of the layer's output (mean over
tokens of (∂ℓ/∂y_j)², labels sampled from the model itself, so that E[ggᵀ] is the Fisher of the
model's own distribution and ½ δᵀFδ is its KL). Costs add over layers (cross-terms ignored).

A GGUF runs in llama.cpp, which also rounds each matmul's input to the weight type's dot-product
format (`runtime.llamacpp`: 8-bit blocks of 32 for Q4_0..Q8_0 and IQ4_NL, of 256 for the
k-quants, float16 for F16). With `arithmetic="llamacpp"` a candidate's cost adds that rounding's
½ Σ_j f_j (W E Wᵀ)_jj / N (E = Σ e eᵀ of the input's rounding error e, on the float weight W; the
cross term with the weight error is ignored), scaled per linear role to the KL measured with all
of that role's inputs rounded (`_calibrate_rounding`); the head table's is measured with its input
rounded, and plans are measured with every input rounded as llama.cpp would.

Profiling runs the engine once over the *float* model: each layer's statistics are those of the
inputs the float model gives it. The allocation must be known before any layer is compressed, and
a layer's own error dominates the change its input statistics would see from upstream choices.

Token tables (embedding, untied head) have costs measured directly (`_table_costs`): data-free
candidates, and for the table that computes the logits also calibrated ones, solved from the final
hidden states.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import engine
from ..arch import Architecture, discover
from ..checkpoint import NotesCheckpoint
from ..defaults import HEAD_SAMPLES, LOGIT_BYTES, ROUNDING_TOKENS
from ..errors import SizewiseError
from ..evaluate import decoder_output
from ..observers import DEFAULT_OBSERVERS, RoundingGram
from ..precision import float32_execution
from ..quant.formats import TORCH_DTYPES
from .candidates import Candidate, _data_free, _dense, _dequantized, _solved_all, _table_takes, profiled

PROFILE_VERSION = 6          # bump when the proxy's definition changes: cached profiles are then ignored (5: llama.cpp's input rounding; 6: data-free factors without text)


@dataclass
class LayerProfile:
    name: str                        # weight name
    shape: tuple[int, int]
    importance: float                # mean over output channels of the diagonal Fisher f_j
    costs: list[float | None]        # predicted KL (nats/token) per candidate; None where it does not fit
    errors: list[float | None]       # Σ_j e_j: mean squared layer-output error per token, per candidate
    kind: str = "linear"             # or "table": costs then measured directly (KL with only this table changed)
    rounding: dict = field(default_factory=dict)   # llama.cpp input rounding kind -> its cost, included in costs

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "importance": self.importance, "costs": self.costs,
                "errors": self.errors, "kind": self.kind, "rounding": self.rounding}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerProfile":
        return cls(d["name"], tuple(d["shape"]), d["importance"], d["costs"], d["errors"], d["kind"], d["rounding"])


@dataclass
class Profile:
    candidates: tuple[Candidate, ...]
    layers: list[LayerProfile]
    protocol: dict = field(default_factory=dict)

    def __post_init__(self):
        self.by_name = {l.name: l for l in self.layers}
        self.stats = None          # linear name -> engine.LinearStats when profiled with keep_stats; not saved

    def to_json(self) -> str:
        return json.dumps({"profile_version": PROFILE_VERSION, "protocol": self.protocol,
                           "candidates": [c.to_dict() for c in self.candidates],
                           "layers": [l.to_dict() for l in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        if d.get("profile_version") != PROFILE_VERSION:
            raise SizewiseError("the sensitivity profile was made by another sizewise version; profile again")
        return cls(tuple(Candidate.from_dict(c) for c in d["candidates"]),
                   [LayerProfile.from_dict(l) for l in d["layers"]], d["protocol"])


def fisher_diagonal(model, arch: Architecture, samples: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per decoder linear, f_j = mean over tokens of (∂ℓ/∂y_j)², labels drawn from the model's own predictions.

    One forward and one backward pass per sample; no parameter gradients are computed.
    """
    refs = arch.all_linears()
    acc = {r.name: torch.zeros(r.shape[0], dtype=torch.float64) for r in refs}
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}

    def watch(name):
        def accumulate(g):      # returns None: the gradient itself is left alone
            acc[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu())

        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(accumulate)
        return hook

    # gradients flow from the embedding output: parameters stay frozen
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
    handles += [r.module.register_forward_hook(watch(r.name)) for r in refs]
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in samples:
                logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0].float()
                probs = logits.detach().softmax(-1).cpu()
                labels = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
                F.cross_entropy(logits, labels, reduction="sum").backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return {name: (a / max(tokens, 1)).float() for name, a in acc.items()}


def profile_model(model, arch: Architecture, samples: torch.Tensor, candidates: tuple[Candidate, ...], *,
                  options: dict | None = None, fisher_samples: int = 8, seed: int = 0, batch: int = 8,
                  compute_dtype: torch.dtype = torch.float32, offload: Path | None = None,
                  progress: bool = True, keep_stats: bool = False, table_samples: int = 4,
                  tables: bool = True, arithmetic: str | None = None,
                  checkpoint: NotesCheckpoint | None = None, text_given: bool = True) -> Profile:
    """Predicted KL of every candidate on every decoder linear: one Fisher pass, one engine pass;
    with `tables`, for the token tables (embedding, untied head), the KL measured on
    `table_samples` samples (only byte budgets choose for tables; `add_table_costs` adds them later).
    `arithmetic="llamacpp"`: costs include llama.cpp's rounding of each candidate's inputs (GGUF
    candidates only; see the module docstring).

    The model is left exactly as it was. With `keep_stats` the profile also holds each linear's
    input statistics (`profile.stats`, in memory only), so plans can be solved without another pass.
    `checkpoint` (its `notes` this function's): each layer's measurements are kept there as the pass
    goes, and a stopped pass resumes at its first unfinished layer (the statistics are then not kept:
    the layers before it were measured by the earlier run). `text_given`: whether `samples` come from
    calibration text (else the model wrote them): candidates are solved as `compress` would solve them
    with that calibration (`methods.calibrates`), only their costs read these samples either way.
    """
    if fisher_samples < 1:
        raise SizewiseError(f"the Fisher estimate needs at least 1 sample, got {fisher_samples}")
    t0 = time.perf_counter()
    rounds = _input_roundings(candidates, arithmetic)
    fisher = fisher_diagonal(model, arch, samples[:fisher_samples], seed=seed)
    t_fisher = time.perf_counter() - t0
    layer_of = {ref.weight_name: i for i, refs in enumerate(arch.linears) for ref in refs}
    notes = {} if checkpoint is None else checkpoint.notes       # decoder layer -> its linears' profiles
    resumed = checkpoint is not None and checkpoint.done > 0
    profiled_here = profiled(candidates)          # dominated candidates get no cost on linears

    def measure(ref, w, stats):
        f = fisher[ref.name].to(w.device)
        h = stats.xtx
        rounding = {k: 0.5 * float((f * ((w @ e) * w).sum(1).clamp_min(0)).sum()) / stats.rounding_count
                    for k, e in stats.rounding.items()}
        costs, errors = [], []
        todo = [c.fits(ref.shape[1]) and p for c, p in zip(candidates, profiled_here)]
        # all at once (GPTQ's formats in one column loop), each dropped once measured
        solved = _solved_all([c for c, t in zip(candidates, todo) if t], w, stats, options, text_given)[::-1]
        for cand, kind, t in zip(candidates, rounds, todo):
            if not t:
                costs.append(None)
                errors.append(None)
                continue
            dw = _dense(solved.pop()) - w
            row = ((dw @ h) * dw).sum(1).clamp_min(0) / stats.count     # e_j, mean (Δy_j)² per token
            errors.append(float(row.sum()))
            costs.append(0.5 * float((f * row).sum()))
        lp = LayerProfile(ref.weight_name, ref.shape, float(f.mean()), costs, errors, rounding=rounding)
        notes.setdefault(layer_of[ref.weight_name], {"linears": []})["linears"].append(lp.to_dict())

    stats, facts = engine.statistics(model, arch, samples, batch=batch, offload=offload, progress=progress,
                                     compute_dtype=compute_dtype, measure=measure,
                                     head=tables and needs_head_stats(arch, candidates),
                                     observers=(*DEFAULT_OBSERVERS, RoundingGram(
                                         tuple(sorted({k for k in rounds if k is not None})), ROUNDING_TOKENS)),
                                     checkpoint=checkpoint)
    if resumed:
        stats = {k: v for k, v in stats.items() if k not in layer_of}    # only the head's, if measured
        keep_stats = False
    layers = [LayerProfile.from_dict(d) for i in sorted(notes) for d in notes[i]["linears"]]
    t1 = time.perf_counter()
    calibration = _calibrate_rounding(model, arch, layers, samples[:table_samples], batch, progress) if arithmetic else {}
    for lp in layers:                       # each candidate pays its own input rounding on top of its weight error
        lp.costs = [None if c is None else c + lp.rounding.get(k, 0.0) for c, k in zip(lp.costs, rounds)]
    protocol = {"proxy": "0.5 * sum_j fisher_j * mean_tokens (dW X^T)_j^2, float-model inputs; token tables: "
                         "measured KL with only that table changed (calibrated ones solved from the head's "
                         f"input on the last {HEAD_SAMPLES} samples)",
                "fisher_samples": min(fisher_samples, len(samples)), "fisher_labels": "sampled from the model",
                "seed": seed, "calibration_tokens": int(samples.numel()), "options": options or {},
                "arithmetic": arithmetic, **({"rounding_tokens": ROUNDING_TOKENS, "rounding_calibration": calibration,
                                              "rounding_calibration_s": time.perf_counter() - t1} if arithmetic else {}),
                "fisher_s": t_fisher, "engine_s": facts["engine_s"], "profile_s": time.perf_counter() - t0}
    prof = Profile(tuple(candidates), layers, protocol)
    if tables:
        add_table_costs(prof, model, arch, samples, batch=batch, table_samples=table_samples, options=options,
                        progress=progress, stats=stats, compute_dtype=compute_dtype, text_given=text_given)
    prof.protocol["profile_s"] = time.perf_counter() - t0
    if keep_stats:
        prof.stats = stats
    return prof


def _calibrate_rounding(model, arch: Architecture, layers: list, samples: torch.Tensor, batch: int,
                        progress: bool) -> dict:
    """Scale the layers' input-rounding proxies to measurement, per linear role and 8-bit kind.

    The Fisher proxy misjudges rounding noise by role: it overstates v_proj's about 2.5x on SmolLM2
    (attention averages the independent noise of many tokens), and states down_proj's about right.
    So for each role (q_proj, ..., down_proj) and kind, the KL with every such input rounded is
    measured on `samples`, and each layer's proxy is scaled so that the role's sum matches; the
    proxy still says how the role's cost splits over layers. Float16 rounding (~1e-17) is left as is.
    Returns {"ROLE KIND": {"proxy", "measured"}}.
    """
    from ..runtime.llamacpp import rounded_inputs

    modules = {r.weight_name: r.module for r in arch.all_linears()}
    groups: dict[tuple[str, str], list] = {}
    for lp in layers:
        for kind in lp.rounding:
            if kind.startswith("q8"):
                groups.setdefault((re.sub(r"\.\d+\.", ".", lp.name), kind), []).append(lp)
    if not groups or not len(samples):
        return {}
    reference = _log_probs(model, samples, batch)
    out = {}
    for (role, kind), lps in tqdm(groups.items(), desc="rounding costs", unit="role", disable=not progress,
                                  file=sys.stderr):
        with rounded_inputs({modules[lp.name]: kind for lp in lps}):
            kl = _kl_to(model, reference, samples, batch)
        proxy = sum(lp.rounding[kind] for lp in lps)
        for lp in lps:
            lp.rounding[kind] *= kl / proxy if proxy > 0 else 1.0
        out[f"{role} {kind}"] = {"proxy": proxy, "measured": kl}
    return out


def _input_roundings(candidates, arithmetic: str | None) -> list[str | None]:
    """Per candidate, the input rounding `arithmetic` applies to its matmuls (None: none)."""
    if arithmetic is None:
        return [None] * len(candidates)
    if arithmetic != "llamacpp":
        raise SizewiseError(f"unknown arithmetic {arithmetic!r}; available: llamacpp")
    from ..runtime.llamacpp import input_rounding

    try:
        return [input_rounding(c.format) for c in candidates]
    except ValueError as e:
        raise SizewiseError(f"llama.cpp's arithmetic applies to ggml types only: {e}") from None


def has_table_costs(profile: Profile, arch: Architecture) -> bool:
    return all(profile.by_name.get(n) is not None for n in arch.tables)


def needs_head_stats(arch: Architecture, candidates) -> bool:
    return arch.head_table is not None and any(_table_takes(arch, arch.head_table, c) and not _data_free(c)
                                               for c in candidates)


def add_table_costs(profile: Profile, model, arch: Architecture, samples: torch.Tensor, *, batch: int = 8,
                    table_samples: int = 4, options: dict | None = None, progress: bool = True,
                    stats: dict | None = None, compute_dtype: torch.dtype = torch.float32,
                    text_given: bool = True) -> None:
    """Measure the token tables' candidates (`_table_costs`) into `profile`, if not there yet, on
    the first `table_samples` calibration samples. The head's statistics come from `stats` or, if
    calibrated candidates need them, a pass over the last ones (`engine.head_statistics`)."""
    if has_table_costs(profile, arch):
        return
    t0 = time.perf_counter()
    if needs_head_stats(arch, profile.candidates) and arch.head_table not in (stats or {}):
        stats = engine.head_statistics(model, arch, samples, batch=batch, compute_dtype=compute_dtype)
        if profile.stats is not None:         # kept for solving plans: they may now quantize the head
            profile.stats.update(stats)
    profile.layers += _table_costs(model, arch, profile.candidates, samples[:table_samples], batch, options, progress,
                                   stats, profile.protocol.get("arithmetic"), text_given)
    profile.by_name = {l.name: l for l in profile.layers}
    profile.protocol.update(table_samples=min(table_samples, len(samples)), tables_s=time.perf_counter() - t0)


def _table_costs(model, arch: Architecture, candidates, samples: torch.Tensor, batch: int, options, progress: bool,
                 stats: dict | None = None, arithmetic: str | None = None, text_given: bool = True):
    """KL(float ‖ model with one token table changed) per candidate the table takes, measured directly.

    A table touches every position (and, tied, every output logit): no layer-local proxy applies,
    and there are only one or two of them, so measuring is affordable and exact. `stats` holds the
    head table's input statistics (`engine.head_statistics`), which calibrated candidates need.
    With `arithmetic`, the head's input is rounded as that arithmetic rounds it for the candidate.
    """
    from ..runtime.llamacpp import rounded_inputs

    params = dict(model.named_parameters())
    out = []
    if not arch.tables or not len(samples):
        return out
    stats = stats or {}
    reference = _log_probs(model, samples, batch)

    def takes(name, c):
        return _table_takes(arch, name, c) and (_data_free(c) or name in stats)

    todo = [(n, i) for n in arch.tables for i, c in enumerate(candidates) if takes(n, c)]
    rounds = _input_roundings(candidates, arithmetic)
    head = model.get_output_embeddings()
    bar = tqdm(total=len(todo), desc="token tables", unit="cand", disable=not progress, file=sys.stderr)
    for name, shape in arch.tables.items():
        w = params[name].detach().clone()
        costs: list[float | None] = [None] * len(candidates)
        try:
            for i, cand in enumerate(candidates):
                if cand.method == "float":
                    changed = w.to(TORCH_DTYPES[cand.format.dtype]).float()
                elif takes(name, cand):
                    changed = _dequantized(cand, w, stats.get(name), options, text_given)
                    bar.update()
                else:
                    continue
                with torch.no_grad():
                    params[name].copy_(changed)
                with rounded_inputs({head: rounds[i]} if name == arch.head_table else {}):
                    costs[i] = _kl_to(model, reference, samples, batch)
        finally:
            with torch.no_grad():
                params[name].copy_(w)
        out.append(LayerProfile(name, shape, float("nan"), costs, [None] * len(candidates), "table"))
    bar.close()
    return out


@torch.no_grad()
def _log_prob_chunks(model, samples: torch.Tensor, batch: int, dtype: torch.dtype):
    """The model's log-probabilities on `samples` as [rows, positions, vocab] chunks in `dtype`, in a
    fixed order: the decoder runs once per `batch` samples, and the head a few positions at a time
    (logits of at most `LOGIT_BYTES`), so the vocabulary does not multiply memory and each decoder
    layer runs once per batch (what `choice.measure_plans` swaps a plan's weights in for)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    # a model kept in bf16/fp16 computes as its float32 copy would (`precision`)
    with float32_execution(model, discover(model).layers):
        for s in range(0, len(samples), batch):
            x = samples[s:s + batch].to(device)
            step = max(1, LOGIT_BYTES // (len(x) * vocab * 4))
            with decoder_output(model, x):
                for p in range(0, x.shape[1], step):
                    pos = torch.arange(p, min(p + step, x.shape[1]), device=device)
                    logits = model(input_ids=x, use_cache=False, logits_to_keep=pos).logits
                    yield F.log_softmax(logits.to(dtype), -1).cpu()
                    del logits


def _log_probs(model, samples: torch.Tensor, batch: int, dtype: torch.dtype = torch.float64,
               store: torch.dtype | None = None) -> list[torch.Tensor]:
    """The reference that `_kl_to` compares with: `_log_prob_chunks`, kept in `store` (default `dtype`).

    float64 by default: single-layer changes at 8 bits move the KL by ~1e-8, below float32 rounding.
    Whole plans may keep a float16 copy (`memory.reference_dtype`)."""
    return [c.to(store or dtype) for c in _log_prob_chunks(model, samples, batch, dtype)]


@torch.no_grad()
def _kl_to(model, reference: list[torch.Tensor], samples: torch.Tensor, batch: int,
           dtype: torch.dtype = torch.float64) -> float:
    """KL(reference ‖ model) in nats per token on `samples`, `reference` from `_log_probs(..., batch, dtype)`:
    one chunk of the model's log-probabilities is held beside it at a time."""
    total = 0.0
    for r, lp in zip(reference, _log_prob_chunks(model, samples, batch, dtype), strict=True):
        r = r.to(dtype)
        total += float(torch.sub(r, lp, out=lp).mul_(r.exp()).sum(dtype=torch.float64))
    return max(0.0, total / samples.numel())
