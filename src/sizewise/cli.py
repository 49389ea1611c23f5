"""Command line: a thin layer over `sizewise.api`. Errors print one line and exit non-zero."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from .defaults import MEASURE_SAMPLES
from .errors import Interrupted, SizewiseError

EXIT_ERROR = 2
# counts and sizes: click refuses what is out of range with one line, before any work
POSITIVE, COUNT = click.IntRange(min=1), click.IntRange(min=0)
CTX = click.IntRange(min=2)


def _group_size(value: str) -> int | None:
    if value in ("channel", "per-channel"):
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise click.BadParameter(f"expected a positive integer or 'channel', got {value!r}")
    return size


def _claimed(output, force: bool, kind: str, *inputs):
    """Hold `output` (checked, locked) for the whole command; see `atomic.claim`."""
    if output is None:
        return nullcontext()
    from .atomic import claim

    return claim(output, overwrite=force, kind=kind, inputs=[i for i in inputs if i])


# Calibration and allocator options shared by `plan` and `sweep` (same names, defaults and help).
_NO_CLIP_HELP = ("GPTQ: fit each group's grid to its min/max instead of searching the clipping range "
                 "that minimizes the Hessian-weighted error (the default; a few percent slower).")


def _gptq_options(no_act_order: bool, no_clip_search: bool, damp: float) -> dict:
    """Method options from the GPTQ flags; only what differs from the defaults, as the manifest records it."""
    options = {"act_order": False} if no_act_order else {}
    if no_clip_search:
        options["clip_search"] = False
    if damp != 0.01:
        options["damp"] = damp
    return options


_CALIB_OPTIONS = (
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
    click.option("--no-clip-search", is_flag=True, help=_NO_CLIP_HELP),
    click.option("--damp", default=0.01, show_default=True, type=click.FloatRange(min=0), help="GPTQ: Hessian damping, a fraction of its mean diagonal."),
)


def _calib_options(f):
    for opt in reversed(_CALIB_OPTIONS):
        f = opt(f)
    return f


def _calib_config(float_dtype, calib, calib_samples, calib_len, calib_dtype, batch, seed, offload, no_act_order,
                  no_clip_search, damp):
    """The CompressConfig that `_calib_options` describe."""
    from . import api

    return api.CompressConfig(options=_gptq_options(no_act_order, no_clip_search, damp), float_dtype=float_dtype, calib=api.CalibConfig(
        text=calib, samples=calib_samples, length=calib_len, seed=seed, batch=batch, offload=offload, dtype=calib_dtype))


def _emit(obj: dict, as_json: bool, output: str | None, human, force: bool = False) -> None:
    if output:
        from .atomic import write_text

        write_text(output, json.dumps(obj, indent=1), overwrite=force)
    if as_json:
        click.echo(json.dumps({k: v for k, v in obj.items() if k != "per_window"}, indent=1))
    else:
        human(obj)


class _Commands(click.Group):
    """`pack` and `unpack` (sizewise.lossless.cli) load when named: importing the lossless package
    loads torch, and `import sizewise.cli` stays light so that `main` handles signals first."""

    LAZY = ("pack", "unpack")

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name):
        if name in self.LAZY:
            from .lossless import cli as lossless_cli

            return getattr(lossless_cli, name)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sizewise")
def cli():
    """Compress a causal language model to the size you choose, and measure what it cost.

    MODEL is a Hugging Face directory (safetensors), a .gguf file, a sizewise artifact
    directory, or a built-in name (smollm2-135m, qwen2.5-coder-0.5b). Typical use:

    \b
      sizewise compress smollm2-135m --method gptq --bits 4 --group-size 64 \\
          --calib enwiki-sample -o out/w4g64
      sizewise eval out/w4g64 --text wikitext2-test --windows 64 --against smollm2-135m
      sizewise info out/w4g64
    """


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Artifact directory to write (must not exist or be empty).")
@click.option("--method", default="rtn", show_default=True, help="rtn, rtn-mse, gptq; pruning: sparsegpt, sparsegpt+gptq, "
              "wanda, magnitude; svd (see `sizewise methods`).")
@click.option("--bits", default=4, show_default=True, type=int, help="Bits per weight code, 2 to 8.")
@click.option("--sparsity", default=None, help="With a pruning method: 50% (of each row, bitmap mask), 2:4 or 4:8 (N kept of "
              "every M, stored as indices).")
@click.option("--lowrank", default=None, type=int, help="Add rank-R float16 factors: with rtn/gptq they correct the "
              "quantization error (activation-whitened SVD; GGUF: a LoRA adapter OUT.lora.gguf); with svd they are the weight.")
@click.option("--group-size", default="64", show_default=True, help="Weights sharing one scale, dividing each layer's input size; 'channel' for one per row.")
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric grid (no zero stored) or asymmetric.")
@click.option("--zero", type=click.Choice(["int", "float16"]), default="int", show_default=True, help="Asymmetric zero point: a b-bit integer, or a float16 minimum (ggml Q4_1 style).")
@click.option("--scale-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option("--float-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True, help="Storage of weights left unquantized (embeddings, norms, skipped layers).")
@click.option("--skip", multiple=True, help="Glob of linear layer names to keep in float (repeatable), e.g. '*.down_proj'.")
@click.option("--plan", "plan_path", type=click.Path(), help="Apply a plan JSON (per-layer method and format) instead of one uniform setting.")
@click.option("--calib", default=None, help="Calibration text: a file or built-in name (enwiki-sample). Default: samples the model writes itself.")
@click.option("--calib-samples", default=128, show_default=True, type=POSITIVE)
@click.option("--calib-len", default=512, show_default=True, type=CTX, help="Tokens per calibration sample.")
@click.option("--calib-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True, help="Dtype of calibration forward passes (bfloat16: several times faster on CPUs with bf16 units); auto: bfloat16 where the hardware computes it natively.")
@click.option("--batch", default=8, show_default=True, type=POSITIVE, help="Calibration samples per forward pass.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--offload", type=click.Path(), help="Keep calibration activations memory-mapped in this directory instead of RAM.")
@click.option("--no-act-order", is_flag=True, help="GPTQ: process columns in their natural order.")
@click.option("--no-clip-search", is_flag=True, help=_NO_CLIP_HELP)
@click.option("--damp", default=0.01, show_default=True, type=click.FloatRange(min=0), help="GPTQ: Hessian damping, a fraction of its mean diagonal.")
@click.option("--budget", default=None, help="Instead of one format: mix per-layer choices to fit bits per weight "
              "over the linear layers (3.5bpw) or a file size (70MB = 70e6 bytes; MiB, GB, GiB): the packed "
              "artifact's, or with --format gguf the .gguf file's. --method may then list several quantizers (rtn,gptq).")
@click.option("--fisher-samples", default=8, show_default=True, type=POSITIVE, help="With --budget: calibration samples for the layer-importance (Fisher) pass.")
@click.option("--measure-samples", default=MEASURE_SAMPLES, show_default=True, type=COUNT, help="With --budget: held-out calibration samples on which the chosen plan is measured against alternatives; 0 skips.")
@click.option("--format", "out_format", type=click.Choice(["artifact", "gguf"]), default="artifact", show_default=True,
              help="gguf: write -o FILE.gguf for llama.cpp instead of an artifact directory; the formats must be "
              "ggml block types (group size 32, float16 scales, --sym or --zero float16; or k-quants in a --plan); "
              "with --budget the allocator then chooses among Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, F16 and, on layers "
              "whose input size is a multiple of 256, Q2_K..Q6_K, and a file-size budget bounds the .gguf file.")
@click.option("--drop-layers", default=0, show_default=True, type=int, help="Structured pruning: remove this many whole "
              "decoder layers (the block whose input and output differ least on the calibration text).")
@click.option("--prune-mlp", default=None, help="Structured pruning: remove this fraction of every layer's MLP channels "
              "(10% or 0.1; the kept intermediate size a multiple of 64), the down projection refitted by least squares.")
@click.option("--prune-heads", default=0, show_default=True, type=int, help="Structured pruning: remove this many query "
              "heads per layer, the same number from each key/value group, the output projection refitted.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled (.bin) weights. Only for files you trust.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--recipe", "recipe_path", type=click.Path(), help="Run a recipe JSON (method, options, format/plan/budget, "
              "calibration, output: every run records its own in its manifest) instead of the flags that describe one.")
@click.pass_context
def compress(ctx, model, output, method, bits, sparsity, lowrank, group_size, sym, zero, scale_dtype, float_dtype, skip, plan_path, calib,
             calib_samples, calib_len, calib_dtype, batch, seed, offload, no_act_order, no_clip_search, damp, budget,
             fisher_samples, measure_samples, out_format, drop_layers, prune_mlp, prune_heads, force, allow_pickle, quiet,
             recipe_path):
    """Compress MODEL and write an artifact (manifest, packed tensors, config and tokenizer) to -o DIR,
    or with --format gguf a GGUF file for llama.cpp.

    With --drop-layers/--prune-mlp/--prune-heads the model first becomes a smaller dense one; it is
    quantized only if --method or --bits is given, else kept in --float-dtype."""
    from . import api
    from .plan import Plan
    from .prune import StructuredConfig, parse_fraction
    from .quant.formats import FloatFormat
    from .quant.methods import format_for
    from .quant.uniform import QuantFormat
    from .recipe import Recipe

    if recipe_path:
        given = [p.opts[0] for p in ctx.command.params if p.name in _RECIPE_FLAGS
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise SizewiseError(f"--recipe holds the whole recipe; drop {', '.join(given)}")
        recipe = Recipe.load(recipe_path)
    else:
        grid = QuantFormat(bits, _group_size(group_size), symmetric=sym, scale_dtype=scale_dtype, zero=zero)
        if budget is not None and (sparsity or lowrank):
            raise SizewiseError("--budget chooses among quantizers only; --sparsity and --lowrank set one format")
        recipe = Recipe(
            method=method,
            format=grid if budget is not None else format_for(method, grid, sparsity=sparsity, rank=lowrank,
                                                              float_dtype=float_dtype),
            options=_gptq_options(no_act_order, no_clip_search, damp), skip=tuple(skip), float_dtype=float_dtype,
            plan=Plan([]) if plan_path else None,     # checked with the recipe before the file is read
            calib=api.CalibConfig(text=calib, samples=calib_samples, length=calib_len, seed=seed, batch=batch,
                                  offload=offload, dtype=calib_dtype),
            budget=budget, fisher_samples=fisher_samples, measure_samples=measure_samples, output=out_format).check()
        structured = StructuredConfig(drop_layers, parse_fraction(prune_mlp) if prune_mlp else 0.0, prune_heads)
        if structured.active:
            recipe.structured = structured.check()
            explicit = {p for p in ("method", "bits") if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE}
            if not explicit and not plan_path and budget is None:    # a smaller float model
                recipe.format, recipe.skip = FloatFormat(float_dtype), ("*",)
            recipe.check()
        if plan_path:
            recipe.plan = Plan.load(plan_path)
    with _claimed(output, force, "file" if recipe.output == "gguf" else "dir", model, recipe.calib.text, plan_path,
                  recipe_path, recipe.calib.offload):
        res, alloc = api.run(model, recipe, output, overwrite=force, progress=not quiet, allow_pickle=allow_pickle)
    pruned = res.manifest["transforms"].get("structured")
    if pruned:
        b, a = pruned["before"], pruned["after"]
        click.echo(f"pruned: layers {b['layers']} -> {a['layers']}, MLP channels {b['intermediate']} -> "
                   f"{a['intermediate']}, query heads {b['heads']} -> {a['heads']}; parameters "
                   f"{pruned['params_before'] / 1e6:.2f}M -> {pruned['params_after'] / 1e6:.2f}M "
                   f"(-{1 - pruned['params_after'] / pruned['params_before']:.1%})")
    if alloc is not None and recipe.output != "gguf":
        click.echo(f"allocated for {recipe.budget}: predicted KL {alloc.predicted_total:.4g} nats/token "
                   f"(`sizewise info {output}` lists every layer)")
    if recipe.output == "gguf":
        e = res.exported
        types = ", ".join(f"{n} x {t}" for t, n in sorted(e["tensor_types"].items(), key=lambda kv: -kv[1]))
        click.echo(f"wrote {output}: {e['bytes'] / 1e6:.1f} MB ({types})")
        if "lora" in e:
            click.echo(f"wrote {e['lora']['path']}: low-rank corrections of {e['lora']['tensors']} weights "
                       f"(llama.cpp: --lora {e['lora']['path']})")
        return
    t = res.manifest["totals"]
    click.echo(f"wrote {output}: {t['bits_per_weight']:.3f} bits/weight over linear layers, "
               f"{t['file_bytes'] / 1e6:.1f} MB packed ({t['bits_per_weight_file']:.2f} bits/param over the whole model), "
               f"{res.manifest['timing']['wall_s']:.0f} s")


# compress's flags that a --recipe file replaces
_RECIPE_FLAGS = ("method", "bits", "sparsity", "lowrank", "group_size", "sym", "zero", "scale_dtype", "float_dtype", "skip", "plan_path", "calib",
                 "calib_samples", "calib_len", "calib_dtype", "batch", "seed", "offload", "no_act_order",
                 "no_clip_search", "damp", "budget", "fisher_samples", "measure_samples", "out_format", "drop_layers",
                 "prune_mlp", "prune_heads")


@cli.command(name="plan")
@click.argument("model")
@click.option("--budget", required=True, help="Bits per weight over the linear layers (3.25bpw) or packed file size (70MB = 70e6 bytes; MiB, GB, GiB).")
@click.option("-o", "--output", type=click.Path(), help="Write the plan as JSON (apply it with `sizewise compress MODEL --plan FILE`).")
@click.option("--method", default="rtn", show_default=True, help="Quantizers to choose among, comma-separated: rtn, rtn-mse, gptq.")
@_calib_options
@click.option("--format", "out_format", type=click.Choice(["artifact", "gguf"]), default="artifact", show_default=True,
              help="gguf: choose among llama.cpp's types only, and a byte budget bounds the .gguf file (apply with "
              "`compress --plan FILE --format gguf`).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@click.option("--allow-pickle", is_flag=True)
@click.option("--quiet", is_flag=True)
def plan_cmd(model, budget, output, method, fisher_samples, measure_samples, out_format, force, allow_pickle, quiet,
             **calib):
    """Choose each linear layer's format to fit a budget at least predicted loss, and print the plan."""
    from . import api
    from .allocate import render

    with _claimed(output, force, "file", model, calib["calib"], calib["offload"]):
        alloc = api.plan_for_budget(model, budget, _calib_config(**calib), quantizers=tuple(method.split(",")),
                                    fisher_samples=fisher_samples, measure_samples=measure_samples,
                                    progress=not quiet, allow_pickle=allow_pickle, layout=out_format)
        click.echo(render(alloc))
        if output:
            from .atomic import write_text

            write_text(output, alloc.plan.to_json(), overwrite=force)
            click.echo(f"wrote {output}")


@cli.command()
@click.argument("model")
@click.option("--budgets", required=True, help="Comma-separated budgets: bits per weight (2.5,3,3.5bpw; a bare number is bpw) "
              "or file sizes (60MB,70MB: the packed artifact, or with --format gguf the .gguf file). "
              "All are checked before any work.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Sweep directory to write (must not exist or be empty).")
@click.option("--method", default="rtn", show_default=True, help="Quantizers the allocator chooses among, comma-separated: rtn, rtn-mse, gptq.")
@_calib_options
@click.option("--uniform", multiple=True, help="Uniform baselines, METHOD:BITS:GROUP, comma-separated or repeated "
              "(rtn:4:64,gptq:3:channel); same format family as the allocator's (asymmetric, float16 scales). "
              "Or METHOD:GGML_TYPE (rtn:Q4_0, gptq:Q4_K), as --format gguf requires.")
@click.option("--peer", "peers", multiple=True, type=click.Path(), help="JSON file of other tools' points "
              '([{"label", "bits_per_weight", "perplexity"}, ...]) drawn on the plot as given (repeatable).')
@click.option("--text", default="wikitext2-test", show_default=True, help="Evaluation text: a file or built-in name.")
@click.option("--ctx", default=1024, show_default=True, type=CTX, help="Tokens per evaluation window.")
@click.option("--stride", default=None, type=POSITIVE, help="Window step (default: ctx, non-overlapping).")
@click.option("--windows", default=None, type=POSITIVE, help="Use the first N windows (default: all).")
@click.option("--sequential", is_flag=True, help="Run the calibration passes again for every budget (compressed "
              "outputs propagate, as in `compress --budget`); default: solve every plan from the profile's statistics.")
@click.option("--format", "out_format", type=click.Choice(["artifact", "gguf"]), default="artifact", show_default=True,
              help="gguf: also write every point as POINT.gguf (llama.cpp) beside its artifact; the allocator then "
              "chooses among llama.cpp's types (as `compress --format gguf --budget`), byte budgets bound the .gguf "
              "file, and --uniform points must be ggml types.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled (.bin) weights. Only for files you trust.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def sweep(model, budgets, output, method, fisher_samples, measure_samples, uniform, peers, text, ctx, stride, windows,
          sequential, out_format, force, allow_pickle, quiet, **calib):
    """Compress MODEL to every budget (one profile), plus uniform baselines; evaluate all; write a report.

    \b
      sizewise sweep smollm2-135m --budgets 2.5,3,3.5,4,5 --method rtn,gptq \\
          --calib enwiki-sample --uniform rtn:4:64,gptq:3:64 --windows 16 -o out/sweep
      sizewise sweep smollm2-135m --format gguf --budgets 70MB,78MB,90MB --method rtn,gptq \\
          --calib enwiki-sample --uniform gptq:Q4_K --windows 16 -o out/gguf-sweep
    """
    from . import api

    with _claimed(output, force, "dir", model, text, calib["calib"], calib["offload"], *peers):
        res = api.sweep(model, budgets, output, _calib_config(**calib), quantizers=tuple(method.split(",")),
                        uniform=[u for item in uniform for u in item.split(",") if u.strip()], peers=list(peers),
                        text=text, ctx=ctx, stride=stride, windows=windows, fisher_samples=fisher_samples,
                        measure_samples=measure_samples, sequential=sequential, overwrite=force,
                        progress=not quiet, allow_pickle=allow_pickle, format=out_format)
    click.echo(res["table"])
    t = res["timing"]
    click.echo(f"report: {res['report']} (profile {t['profile_s']:.1f} s, compress {sum(t['compress_s'].values()):.1f} s, "
               f"evaluation {t['eval_s']:.1f} s)")


@cli.command(name="eval")
@click.argument("model")
@click.option("--text", default="wikitext2-test", show_default=True, help="Evaluation text: a file or built-in name.")
@click.option("--ctx", default=1024, show_default=True, type=CTX, help="Tokens per window.")
@click.option("--stride", default=None, type=POSITIVE, help="Window step (default: ctx, non-overlapping).")
@click.option("--windows", default=None, type=POSITIVE, help="Use the first N windows (default: all).")
@click.option("--against", default=None, help="Reference MODEL: adds KL(reference || MODEL) and top-1 agreement.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-o", "--output", type=click.Path(), help="Also write the full result (with per-window values) as JSON.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@click.option("--allow-pickle", is_flag=True)
@click.option("--quiet", is_flag=True)
def eval_cmd(model, text, ctx, stride, windows, against, as_json, output, force, allow_pickle, quiet):
    """Perplexity of MODEL on a text, and optionally its divergence from a reference model."""
    from . import api

    with _claimed(output, force, "file", model, against, text):
        res = api.evaluate(model, text, ctx=ctx, stride=stride, windows=windows, against=against,
                           progress=not quiet, allow_pickle=allow_pickle)
        _emit(res, as_json, output, _eval_human, force)


def _eval_human(r: dict) -> None:
    p = r["protocol"]
    click.echo(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
               f"({p['windows']} windows of {p['ctx']}, stride {p['stride']}, {Path(p['path']).name} sha256 {p['sha256'][:12]})")
    if "kl" in r:
        click.echo(f"reference perplexity {r['reference_perplexity']:.4f}; KL(reference || model) {r['kl']:.5f} nats/token; "
                   f"top-1 agreement {100 * r['top1_agreement']:.2f}%")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model, as_json):
    """Per-tensor formats, bits per weight and sizes of MODEL: an artifact, a lossless-packed directory,
    a .gguf file, a Hugging Face directory or a built-in name (headers only: no weights are loaded)."""
    from . import api

    res = api.info(model)

    def human(r):
        src = r["source"]
        if r["kind"] in ("artifact", "packed"):
            click.echo(f"{r['path']}: {r['kind']}, from {src.get('spec')} ({src.get('model_type')}, "
                       f"{src.get('parameters', 0) / 1e6:.1f}M params), method {r['method']['name']}")
        else:
            quant = f", quantized ({r['quantization']})" if r.get("quantization") else ""
            click.echo(f"{r['path']}: {r['kind']} model, architecture {r['architecture']}, "
                       f"{r['model_params'] / 1e6:.1f}M params{quant}")
        click.echo(f"{'tensor':58} {'method':8} {'format':22} {'bits/w':>7} {'KB':>9}")
        for row in r["layers"]:
            click.echo(f"{row['name'][:58]:58} {row['method']:9} {row['format']:30} {row['bits_per_weight']:7.3f} "
                       f"{row['bytes'] / 1024:9.1f}")
        if r["bits_per_weight"] is not None:
            click.echo(f"linear layers: {r['bits_per_weight']:.4f} bits/weight over {r['linear_params'] / 1e6:.2f}M weights")
        bpp = "" if r["bits_per_weight_model"] is None else f"{r['bits_per_weight_model']:.3f} bits/param stored, "
        click.echo(f"whole model: {bpp}weights {r['file_bytes'] / 1e6:.2f} MB"
                   + (f" (lossless-packed: {100 * r['lossless']['ratio']:.1f}% of the coded tensors' raw bytes)"
                      if "lossless" in r else "")
                   + f"; on disk {r['disk_bytes'] / 1e6:.2f} MB")
    _emit(res, as_json, None, human)


@cli.command()
@click.argument("reference")
@click.argument("candidates", nargs=-1, required=True)
@click.option("--text", default="wikitext2-test", show_default=True)
@click.option("--ctx", default=1024, show_default=True, type=CTX)
@click.option("--stride", default=None, type=POSITIVE)
@click.option("--windows", default=None, type=POSITIVE, help="Use the first N windows (default: all).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Report directory (report.md, results.json, plot; must not exist or be empty).")
@click.option("--arithmetic", type=click.Choice(["float", "llamacpp"]), default="float", show_default=True,
              help="llamacpp: round each matmul's input as llama.cpp does for the artifact's ggml types "
                   "(predicts the perplexity of its GGUF in llama.cpp).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", is_flag=True)
def compare(reference, candidates, text, ctx, stride, windows, output, arithmetic, force, quiet):
    """Evaluate CANDIDATES side by side against REFERENCE on the same windows and write a report."""
    from . import api

    with _claimed(output, force, "dir", reference, text, *candidates):
        res = api.compare(reference, list(candidates), text, ctx=ctx, stride=stride, windows=windows, out=output,
                          progress=not quiet, arithmetic=arithmetic, overwrite=force)
    ref = res["reference"]["perplexity"]
    click.echo(f"reference perplexity {ref:.4f}")
    for label, r in res["candidates"].items():
        bpw = f"{r['bits_per_weight']:.3f} bits/w" if r.get("bits_per_weight") else ""
        click.echo(f"{label}: perplexity {r['perplexity']:.4f} ({100 * (r['perplexity'] / ref - 1):+.1f}%), "
                   f"KL {r['kl']:.5f}, top-1 {100 * r['top1_agreement']:.1f}% {bpw}")
    click.echo(f"report: {res['report']}")


@cli.command(name="export")
@click.argument("artifact_dir", metavar="ARTIFACT")
@click.option("--format", "fmt", type=click.Choice(["gguf", "compressed-tensors", "hf"]), default="gguf", show_default=True,
              help="gguf: a file for llama.cpp; compressed-tensors: a quantized checkpoint directory that transformers "
              "and vLLM load; hf: a dense Hugging Face directory.")
@click.option("-o", "--output", required=True, type=click.Path(), help="File (gguf) or directory to write.")
@click.option("--tokenizer-pre", default=None, help="gguf: llama.cpp pre-tokenizer name (default: the source GGUF's).")
@click.option("--dtype", "--float-dtype", "float_dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Dtype of dense tensors: hf (default bfloat16), compressed-tensors (default float16: also its "
              "scales' dtype), gguf for a model that is not an artifact (default float32).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
def export_cmd(artifact_dir, fmt, output, tokenizer_pre, float_dtype, force):
    """Write an artifact's stored weights as GGUF (llama.cpp) or compressed-tensors, exactly as
    evaluated, or any model as a dense Hugging Face directory.

    ARTIFACT may also be any model (built-in name, HF directory, GGUF) for gguf and hf: written unquantized."""
    from . import api

    if tokenizer_pre is not None and fmt != "gguf":
        raise SizewiseError("--tokenizer-pre applies to --format gguf only")
    with _claimed(output, force, "file" if fmt == "gguf" else "dir", artifact_dir):
        res = api.export(artifact_dir, output, format=fmt, overwrite=force, tokenizer_pre=tokenizer_pre,
                         float_dtype=float_dtype)
    if fmt == "gguf":
        types = ", ".join(f"{k} x{v}" for k, v in sorted(res["tensor_types"].items()))
        click.echo(f"wrote {res['path']}: {res['bytes'] / 1e6:.1f} MB ({types})")
        if "lora" in res:
            click.echo(f"wrote {res['lora']['path']}: its LoRA adapter (llama.cpp: --lora)")
    elif fmt == "hf":
        click.echo(f"wrote {res['path']}: {res['bytes'] / 1e6:.1f} MB dense {res['dtype']}")
    else:
        layers = sum(len(m) for m in res["groups"].values())
        click.echo(f"wrote {res['path']}: {res['bytes'] / 1e6:.1f} MB, {layers} layers quantized in "
                   f"{len(res['groups'])} config groups, {len(res['dense'])} kept dense")
        for layer, why in res["dense"].items():
            click.echo(f"  dense: {layer} ({why})")


@cli.command(name="methods")
def methods_cmd():
    """List the compression methods."""
    from .quant.methods import METHODS

    for m in METHODS.values():
        click.echo(f"{m.name:14} {'needs calibration' if m.needs_calibration else 'data-free':18} {m.summary}")


@cli.command()
@click.argument("name")
def fetch(name):
    """Download and convert a built-in model or text into the cache, and print its path."""
    from . import builtins

    if builtins.is_builtin_model(name):
        click.echo(builtins.fetch_model(name))
    elif builtins.is_builtin_text(name):
        click.echo(builtins.fetch_text(name))
    else:
        raise SizewiseError(f"unknown built-in {name!r}; models: {', '.join(builtins.MODELS)}; texts: {', '.join(builtins.TEXTS)}")




def _quiet_libraries() -> None:
    """transformers' own per-file progress bars and notices drown our per-layer progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv=None) -> int:
    """Run the CLI; every failure ends as one `error:` line and a non-zero exit, never a traceback
    (SIZEWISE_TRACEBACK=1 shows one for an unexpected error): 2 for errors, 130 after Ctrl-C
    (SIGINT), 143 after SIGTERM, both once every staging area is cleaned up."""
    import signal
    import warnings

    from .atomic import handle_signals, restore_signals

    previous = handle_signals()
    # torch's weights-only unpickler warns about pickle protocols before refusing a file: noise here
    warnings.filterwarnings("ignore", module="torch._weights_only_unpickler")
    try:
        try:
            _quiet_libraries()
            rv = cli.main(args=argv, prog_name="sizewise", standalone_mode=False)
            return rv if isinstance(rv, int) else 0
        except SizewiseError as e:
            _say(f"error: {e}")
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.ClickException as e:
            _say(f"error: {e.format_message()}")
        except click.exceptions.Abort:     # click's own prompt, interrupted
            _say("error: interrupted")
            return 128 + signal.SIGINT
        except (KeyboardInterrupt, Interrupted) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            _say("error: interrupted" if signum == signal.SIGINT else "error: terminated")
            return 128 + signum
        except MemoryError:
            _say("error: out of memory")
        except Exception as e:               # a bug or an unforeseen input: still one line
            if os.environ.get("SIZEWISE_TRACEBACK"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _say(f"error: unexpected {type(e).__name__}{': ' + first if first else ''} "
                 "(please report it; SIZEWISE_TRACEBACK=1 shows where)")
    except (KeyboardInterrupt, Interrupted) as e:   # a second signal while reporting the first
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        restore_signals(previous)   # main() called in-process (tests, scripts) leaves no handlers behind
    return EXIT_ERROR


def _say(line: str) -> None:
    try:
        click.echo(line, err=True)
    except OSError:           # stderr closed: the exit code still tells
        pass


if __name__ == "__main__":
    sys.exit(main())
