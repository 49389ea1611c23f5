"""What the commands share: option groups, value parsing, output claims and result printing."""

from __future__ import annotations

import json
from contextlib import nullcontext

import click

from ..defaults import MEASURE_SAMPLES

EXIT_ERROR = 2
# counts and sizes: click refuses what is out of range with one line, before any work
POSITIVE, COUNT = click.IntRange(min=1), click.IntRange(min=0)
CTX = click.IntRange(min=2)


def parse_group_size(value: str) -> int | None:
    if value in ("channel", "per-channel"):
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise click.BadParameter(f"expected a positive integer or 'channel', got {value!r}")
    return size


# a stopped run's checkpoint beside -o (`checkpoint.location`) is resumed unless this discards it
RESTART = click.option("--restart", is_flag=True, help="Discard the checkpoint a stopped run left beside -o "
                       "(.NAME.checkpoint, .NAME.profile.checkpoint) instead of resuming from it.")


def claimed(output, force: bool, kind: str, *inputs):
    """Hold `output` (checked, locked) for the whole command; see `atomic.claim`."""
    if output is None:
        return nullcontext()
    from ..atomic import claim

    return claim(output, overwrite=force, kind=kind, inputs=[i for i in inputs if i])


# --method with a budget: the words that add pruning and low-rank candidates (`allocate.budget_candidates`)
JOINT_HELP = ("Name more kinds to add pruning and low-rank candidates (opt in: each is profiled on every layer): "
              "a pruner (sparsegpt, wanda, magnitude: 2:4 and 50% sparse, kept weights on 3-5 bit g64 grids; "
              "sparsegpt rounds them with GPTQ), lowrank (the quantizers' 2-4 bit g64 grids plus rank 8 or 16 "
              "float16 factors), svd (factors alone, rank 32 or 64); e.g. gptq,sparsegpt,lowrank. The plan then "
              "says which kinds it chose (a sweep also plots them: kinds_per_layer.png).")

# Calibration and allocator options shared by `plan` and `sweep` (same names, defaults and help).
NO_CLIP_HELP = ("GPTQ: fit each group's grid to its min/max instead of searching the clipping range "
                 "that minimizes the Hessian-weighted error (the default; a few percent slower).")


def gptq_options(no_act_order: bool, no_clip_search: bool, damp: float) -> dict:
    """Method options from the GPTQ flags; only what differs from the defaults, as the manifest records it."""
    options = {"act_order": False} if no_act_order else {}
    if no_clip_search:
        options["clip_search"] = False
    if damp != 0.01:
        options["damp"] = damp
    return options


CALIB_OPTIONS = (
    click.option("--float-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True),
    click.option("--calib", default=None, help="Calibration text: a file or built-in name (enwiki-sample). Default: samples the model writes itself."),
    click.option("--calib-samples", default=128, show_default=True, type=POSITIVE),
    click.option("--calib-len", default=512, show_default=True, type=CTX, help="Tokens per calibration sample."),
    click.option("--calib-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
                 help="Dtype of calibration forward passes; auto: bfloat16 where the hardware computes it natively."),
    click.option("--batch", default=8, show_default=True, type=POSITIVE, help="Calibration samples per forward pass."),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--offload", type=click.Path(), help="Keep calibration activations memory-mapped in this directory instead of RAM."),
    click.option("--fisher-samples", default=8, show_default=True, type=POSITIVE, help="Calibration samples for the layer-importance (Fisher) pass."),
    click.option("--measure-samples", default=MEASURE_SAMPLES, show_default=True, type=COUNT, help="Held-out calibration samples on which the knapsack's plan is measured against a few alternatives (plans without the lowest bit widths, the best uniform one); 0 trusts the prediction alone."),
    click.option("--no-act-order", is_flag=True, help="GPTQ: process columns in their natural order."),
    click.option("--no-clip-search", is_flag=True, help=NO_CLIP_HELP),
    click.option("--damp", default=0.01, show_default=True, type=click.FloatRange(min=0), help="GPTQ: Hessian damping, a fraction of its mean diagonal."),
)


def calib_options(f):
    for opt in reversed(CALIB_OPTIONS):
        f = opt(f)
    return f


def calib_config(float_dtype, calib, calib_samples, calib_len, calib_dtype, batch, seed, offload, no_act_order,
                  no_clip_search, damp):
    """The CompressConfig that `calib_options` describe."""
    from .. import api

    return api.CompressConfig(options=gptq_options(no_act_order, no_clip_search, damp), float_dtype=float_dtype, calib=api.CalibConfig(
        text=calib, samples=calib_samples, length=calib_len, seed=seed, batch=batch, offload=offload, dtype=calib_dtype))


def emit(obj: dict, as_json: bool, output: str | None, human, force: bool = False) -> None:
    if output:
        from ..atomic import write_text

        write_text(output, json.dumps(obj, indent=1), overwrite=force)
    if as_json:
        click.echo(json.dumps({k: v for k, v in obj.items() if k != "per_window"}, indent=1))
    else:
        human(obj)


def budget_method(method: str | None, calib_text: str | None, quiet: bool = False) -> str:
    """--method as given, else the recipe's default for a budget, said on stderr unless quiet (which
    methods, and why)."""
    if method:
        return method
    from ..recipe import Recipe

    chosen = Recipe.default_budget_method(calib_text)
    why = "calibration text given" if calib_text else "no --calib text: data-free; give one to also choose GPTQ"
    if not quiet:
        click.echo(f"choosing among {chosen.replace(',', ', ')} per layer ({why}); --method sets the list", err=True)
    return chosen
