"""Structured pruning: a smaller *dense* model that every runtime runs faster, not a masked one.

    report = prune(model, samples, StructuredConfig(drop_layers=2, prune_mlp=0.1, prune_heads=3))

1. Whole decoder layers: the block whose removal changes the residual stream least (angular
   distance, `layers.py`), from one forward pass over the calibration samples.
2. Then one walk of the sequential engine over the remaining layers. For each layer its inputs are
   observed (the engine's Gram XᵀX of every linear's input), and before it propagates a transform
   removes, uniformly in every layer:
   - MLP channels: columns of down_proj and rows of gate/up, chosen by their least-squares output
     error (`removal.select` on down_proj's input Gram), down_proj refitted on the kept channels;
   - query heads: the same number from every key/value group, rows of q_proj and columns of
     o_proj, chosen and refitted the same way on o_proj's input Gram (key/value heads are kept).
   The next layer thus sees the pruned layer's outputs, and its own choices and refits account
   for them.
3. The config gets the new sizes (num_hidden_layers, intermediate_size, num_attention_heads and an
   explicit head_dim), so transformers reloads the model and GGUF export writes a smaller one.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import engine, families
from ..arch import discover
from ..errors import SizewiseError
from .config import Sizes, StructuredConfig, text_config
from .layers import angular_distances, drop_layers
from .removal import output_error, refit, select


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[rows].clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[rows].clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(rows)


def _set_inputs(lin: nn.Linear, w: torch.Tensor) -> None:
    """A new [out, kept in] weight (the bias, on the output side, is unchanged)."""
    lin.weight = nn.Parameter(w.to(lin.weight.dtype).contiguous(), requires_grad=lin.weight.requires_grad)
    lin.in_features = w.shape[1]


def _restrict(stats, keep: torch.Tensor) -> None:
    """The linear's input statistics after its inputs `keep` are all that is left."""
    if stats.xtx is not None:
        stats.xtx = stats.xtx[keep][:, keep].contiguous()
    if stats.abs_sum is not None:
        stats.abs_sum = stats.abs_sum[keep].contiguous()
    stats.rounding = {k: v[keep][:, keep].contiguous() for k, v in stats.rounding.items()}
    stats.cache.clear()


def _remove_inputs(consumer: nn.Linear, stats, units: torch.Tensor, remove: int, damp: float,
                   groups: torch.Tensor | None = None, per_group: int = 0) -> tuple[torch.Tensor, dict]:
    """Remove `remove` input units of `consumer`, refitting it on the rest; returns (kept input
    columns, what was removed and the output error before and after the refit)."""
    w = consumer.weight.detach().float()
    removed = select(w, stats.xtx, units, remove, damp=damp, groups=groups, per_group=per_group)
    mask = torch.ones(units.shape[0], dtype=torch.bool)
    mask[removed] = False
    keep = units[mask].reshape(-1)
    new = refit(w, stats.xtx, keep, damp)
    record = {"removed": removed,
              "error_removed": output_error(w, stats.xtx, w[:, keep], keep),
              "error_refit": output_error(w, stats.xtx, new, keep)}
    _set_inputs(consumer, new)
    _restrict(stats, keep)
    return keep, record


def _unit_pruner(prefix: str, spec: families.Prunable, before: Sizes, after: Sizes, damp: float, log: list):
    """The engine transform that removes MLP channels and query heads from each layer."""

    def transform(i, layer, refs, stats):
        name = f"{prefix}.{i}."
        record = {"layer": i}
        if after.intermediate < before.intermediate:
            down = layer.get_submodule(spec.mlp_out)
            keep, record["mlp"] = _remove_inputs(down, stats[name + spec.mlp_out],
                                                 torch.arange(before.intermediate)[:, None],
                                                 before.intermediate - after.intermediate, damp)
            for sub in spec.mlp_in:
                _keep_rows(layer.get_submodule(sub), keep)
        if after.heads < before.heads:
            d, group = before.head_dim, before.heads // before.kv_heads
            keep, record["heads"] = _remove_inputs(
                layer.get_submodule(spec.o), stats[name + spec.o],
                torch.arange(before.heads * d).reshape(before.heads, d), before.heads - after.heads, damp,
                groups=torch.arange(before.heads) // group, per_group=(before.heads - after.heads) // before.kv_heads)
            _keep_rows(layer.get_submodule(spec.q), keep)
            # transformers repeats each key/value head for this many query heads
            layer.get_submodule(spec.attention).num_key_value_groups = after.heads // after.kv_heads
        log.append(record)

    return transform


def _unchanged(ref, w, stats):
    return w


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check(model, cfg: StructuredConfig) -> tuple[families.Prunable, tuple[Sizes, Sizes]]:
    """The family's prunable modules and (sizes now, after); a one-line error for a model or request
    structured pruning cannot serve."""
    spec = families.of(model.config).prunable
    if spec is None:
        raise SizewiseError(f"structured pruning supports model types {', '.join(families.prunable_model_types())}; "
                            f"got {getattr(model.config, 'model_type', None)!r}")
    return spec, cfg.target(model.config)


def prune(model, samples: torch.Tensor, cfg: StructuredConfig, *, batch: int = 8,
          compute_dtype: torch.dtype = torch.float32, progress: bool = True, offload: Path | None = None) -> dict:
    """Remove layers, MLP channels and heads from `model` in place, as `cfg` says, measuring on the
    calibration `samples` [n, length]; returns what was done (for the manifest's transforms)."""
    spec, (before, after) = check(model, cfg)
    arch = discover(model)
    report = {"config": cfg.to_dict(), "before": asdict(before), "after": asdict(after),
              "params_before": _params(model)}
    if cfg.drop_layers:
        dist = angular_distances(model, arch, samples, cfg.drop_layers, batch=batch, compute_dtype=compute_dtype)
        start = min(range(len(dist)), key=dist.__getitem__)
        dropped = list(range(start, start + cfg.drop_layers))
        drop_layers(model, arch, dropped)
        arch = discover(model)
        report["layers"] = {"dropped": dropped, "angular_distance": dist,
                            "rule": f"the block of {cfg.drop_layers} with the least angular distance between its "
                                    "input and output (Gromov et al. 2024)"}
    if after.intermediate < before.intermediate or after.heads < before.heads:
        log: list = []
        transform = _unit_pruner(arch.layers_path, spec, before, after, cfg.damp, log)
        facts = engine.run(model, arch, _unchanged, samples, batch=batch, offload=offload, progress=progress,
                           compute_dtype=compute_dtype, transform=transform)
        cfg_text = text_config(model.config)
        cfg_text.intermediate_size = after.intermediate
        cfg_text.num_attention_heads = after.heads
        cfg_text.head_dim = after.head_dim              # no longer hidden_size / heads
        report["per_layer"] = log
        report["engine_s"] = facts["engine_s"]
        for kind in ("mlp", "heads"):
            rows = [r[kind] for r in log if kind in r]
            if rows:
                report[f"{kind}_error"] = {k: sum(r[k] for r in rows) / len(rows)
                                           for k in ("error_removed", "error_refit")}
    report["params_after"] = _params(model)
    return report
