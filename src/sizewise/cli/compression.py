"""Commands that compress: compress, plan, sweep."""

from __future__ import annotations

import click

from ..defaults import MEASURE_SAMPLES
from ..errors import SizewiseError
from .group import cli
from .options import (
    COUNT,
    CTX,
    NO_CLIP_HELP,
    POSITIVE,
    RESTART,
    JOINT_HELP,
    budget_method,
    calib_config,
    calib_options,
    claimed,
    gptq_options,
    parse_group_size,
)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Artifact directory to write (must not exist or be empty).")
@click.option("--method", default=None, help="rtn (the default), rtn-mse, gptq; pruning: sparsegpt, sparsegpt+gptq, "
              "wanda, magnitude; svd (see `sizewise methods`). With --budget: the quantizers to choose among "
              "(default: rtn,gptq with --calib, rtn without). " + JOINT_HELP)
@click.option("--bits", default=4, show_default=True, type=int, help="Bits per weight code, 2 to 8.")
@click.option("--sparsity", default=None, help="With a pruning method: 50% (of each row, bitmap mask), 2:4 or 4:8 (N kept of "
              "every M, stored as indices).")
@click.option("--lowrank", default=None, type=int, help="Add rank-R float16 factors: with rtn/gptq they correct the "
              "quantization error (SVD whitened by the inputs when the run calibrates, i.e. gptq or --calib given; rtn without "
              "--calib: plain SVD, no data; GGUF: a LoRA adapter OUT.lora.gguf); with svd they are the weight.")
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
@click.option("--no-clip-search", is_flag=True, help=NO_CLIP_HELP)
@click.option("--damp", default=0.01, show_default=True, type=click.FloatRange(min=0), help="GPTQ: Hessian damping, a fraction of its mean diagonal.")
@click.option("--budget", default=None, help="Instead of one format: mix per-layer choices to fit bits per weight "
              "over the linear layers (3.5bpw) or a file size (70MB = 70e6 bytes; MiB, GB, GiB): the packed "
              "artifact's, or with --format gguf the .gguf file's. --method may then list several quantizers (rtn,gptq).")
@click.option("--fisher-samples", default=8, show_default=True, type=POSITIVE, help="With --budget: calibration samples for the layer-importance (Fisher) pass.")
@click.option("--measure-samples", default=MEASURE_SAMPLES, show_default=True, type=COUNT, help="With --budget: held-out calibration samples on which the chosen plan is measured against alternatives; 0 skips.")
@click.option("--sequential/--float-stats", default=None, help="How calibrated layers are solved: --sequential, each from "
              "its inputs with the layers before it already compressed (the default without --budget); --float-stats, "
              "every layer from one pass over the float model (the default with --budget: its profile has made that "
              "pass, so no further one is run). AWQ and structured pruning are always sequential (a budget rotates the model before profiling it).")
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
@RESTART
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled (.bin) weights. Only for files you trust.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--recipe", "recipe_path", type=click.Path(), help="Run a recipe JSON (method, options, format/plan/budget, "
              "calibration, output: every run records its own in its manifest) instead of the flags that describe one.")
@click.pass_context
def compress(ctx, model, output, method, bits, sparsity, lowrank, group_size, sym, zero, scale_dtype, float_dtype, skip, plan_path, calib,
             calib_samples, calib_len, calib_dtype, batch, seed, offload, no_act_order, no_clip_search, damp, budget,
             fisher_samples, measure_samples, sequential, out_format, drop_layers, prune_mlp, prune_heads, force, restart,
             allow_pickle, quiet, recipe_path):
    """Compress MODEL and write an artifact (manifest, packed tensors, config and tokenizer) to -o DIR,
    or with --format gguf a GGUF file for llama.cpp.

    With --drop-layers/--prune-mlp/--prune-heads the model first becomes a smaller dense one; it is
    quantized only if --method or --bits is given, else kept in --float-dtype.

    Each finished decoder layer is kept beside -o (.NAME.checkpoint/, removed on success): the same
    command run again after a failure or interrupt resumes there, with the same result (with --budget,
    the profiling pass too)."""
    from .. import api
    from ..plan import Plan
    from ..prune import StructuredConfig, parse_fraction
    from ..quant.formats import FloatFormat
    from ..quant.methods import format_for
    from ..quant.uniform import QuantFormat
    from ..recipe import Recipe

    if recipe_path:
        given = [p.opts[0] for p in ctx.command.params if p.name in _RECIPE_FLAGS
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise SizewiseError(f"--recipe holds the whole recipe; drop {', '.join(given)}")
        recipe = Recipe.load(recipe_path)
    else:
        method = budget_method(method, calib, quiet) if budget is not None else (method or "rtn")
        grid = QuantFormat(bits, parse_group_size(group_size), symmetric=sym, scale_dtype=scale_dtype, zero=zero)
        if budget is not None and (sparsity or lowrank):
            raise SizewiseError("--sparsity and --lowrank set one format; --budget chooses sparsity and ranks per "
                                "layer when --method names them (e.g. gptq,sparsegpt,lowrank)")
        recipe = Recipe(
            method=method,
            format=grid if budget is not None else format_for(method, grid, sparsity=sparsity, rank=lowrank,
                                                              float_dtype=float_dtype),
            options=gptq_options(no_act_order, no_clip_search, damp), skip=tuple(skip), float_dtype=float_dtype,
            plan=Plan([]) if plan_path else None,     # checked with the recipe before the file is read
            calib=api.CalibConfig(text=calib, samples=calib_samples, length=calib_len, seed=seed, batch=batch,
                                  offload=offload, dtype=calib_dtype),
            budget=budget, fisher_samples=fisher_samples, measure_samples=measure_samples, output=out_format,
            sequential=sequential).check()
        structured = StructuredConfig(drop_layers, parse_fraction(prune_mlp) if prune_mlp else 0.0, prune_heads)
        if structured.active:
            recipe.structured = structured.check()
            explicit = {p for p in ("method", "bits") if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE}
            if not explicit and not plan_path and budget is None:    # a smaller float model
                recipe.format, recipe.skip = FloatFormat(float_dtype), ("*",)
            recipe.check()
        if plan_path:
            recipe.plan = Plan.load(plan_path)
    with claimed(output, force, "file" if recipe.output == "gguf" else "dir", model, recipe.calib.text, plan_path,
                  recipe_path, recipe.calib.offload):
        # the command uses only what was written: written layers need not stay in memory
        res, alloc = api.run(model, recipe, output, overwrite=force, progress=not quiet, allow_pickle=allow_pickle,
                             restart=restart, keep_model=False)
    pruned = res.manifest["transforms"].get("structured")
    if pruned:
        b, a = pruned["before"], pruned["after"]
        click.echo(f"pruned: layers {b['layers']} -> {a['layers']}, MLP channels {b['intermediate']} -> "
                   f"{a['intermediate']}, query heads {b['heads']} -> {a['heads']}; parameters "
                   f"{pruned['params_before'] / 1e6:.2f}M -> {pruned['params_after'] / 1e6:.2f}M "
                   f"(-{1 - pruned['params_after'] / pruned['params_before']:.1%})")
    if alloc is not None and recipe.output != "gguf":
        from ..allocate.choice import kinds_line, options_line

        click.echo(f"allocated for {recipe.budget}: predicted KL {alloc.predicted_total:.4g} nats/token "
                   f"(`sizewise info {output}` lists every layer); "
                   + kinds_line([c.format.compression for c in alloc.plan.choices])
                   + (f"; {options_line(alloc.plan)}" if alloc.plan.options else ""))
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
                 "no_clip_search", "damp", "budget", "fisher_samples", "measure_samples", "sequential", "out_format", "drop_layers",
                 "prune_mlp", "prune_heads")


@cli.command(name="plan")
@click.argument("model")
@click.option("--budget", required=True, help="Bits per weight over the linear layers (3.25bpw) or packed file size (70MB = 70e6 bytes; MiB, GB, GiB).")
@click.option("-o", "--output", type=click.Path(), help="Write the plan as JSON (apply it with `sizewise compress MODEL --plan FILE`).")
@click.option("--method", default=None, help="Quantizers to choose among, comma-separated: rtn, rtn-mse, gptq "
              "(default: rtn,gptq with --calib, rtn without). " + JOINT_HELP)
@calib_options
@click.option("--format", "out_format", type=click.Choice(["artifact", "gguf"]), default="artifact", show_default=True,
              help="gguf: choose among llama.cpp's types only, and a byte budget bounds the .gguf file (apply with "
              "`compress --plan FILE --format gguf`).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@RESTART
@click.option("--allow-pickle", is_flag=True)
@click.option("--quiet", is_flag=True)
def plan_cmd(model, budget, output, method, fisher_samples, measure_samples, out_format, force, restart, allow_pickle,
             quiet, **calib):
    """Choose each linear layer's format to fit a budget at least predicted loss, and print the plan.
    With -o, a stopped profiling pass resumes where it stopped when the command is run again."""
    from .. import api
    from ..allocate import render
    from ..checkpoint import location

    quantizers = tuple(budget_method(method, calib["calib"], quiet).split(","))
    with claimed(output, force, "file", model, calib["calib"], calib["offload"]):
        alloc = api.plan_for_budget(model, budget, calib_config(**calib), quantizers=quantizers,
                                    fisher_samples=fisher_samples, measure_samples=measure_samples,
                                    progress=not quiet, allow_pickle=allow_pickle, layout=out_format,
                                    checkpoint=location(output, "profile") if output else None, restart=restart)
        click.echo(render(alloc))
        if output:
            from ..atomic import write_text

            write_text(output, alloc.plan.to_json(), overwrite=force)
            click.echo(f"wrote {output}")


@cli.command()
@click.argument("model")
@click.option("--budgets", required=True, help="Comma-separated budgets: bits per weight (2.5,3,3.5bpw; a bare number is bpw) "
              "or file sizes (60MB,70MB: the packed artifact, or with --format gguf the .gguf file). "
              "All are checked before any work.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Sweep directory to write (must not exist or be empty).")
@click.option("--method", default=None, help="Quantizers the allocator chooses among, comma-separated: rtn, rtn-mse, gptq "
              "(default: rtn,gptq with --calib, rtn without). " + JOINT_HELP)
@calib_options
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
              "outputs propagate, as in `compress --budget --sequential`); default: solve every plan from the profile's statistics, "
              "as `compress --budget` does.")
@click.option("--format", "out_format", type=click.Choice(["artifact", "gguf"]), default="artifact", show_default=True,
              help="gguf: also write every point as POINT.gguf (llama.cpp) beside its artifact; the allocator then "
              "chooses among llama.cpp's types (as `compress --format gguf --budget`), byte budgets bound the .gguf "
              "file, and --uniform points must be ggml types.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@RESTART
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled (.bin) weights. Only for files you trust.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def sweep(model, budgets, output, method, fisher_samples, measure_samples, uniform, peers, text, ctx, stride, windows,
          sequential, out_format, force, restart, allow_pickle, quiet, **calib):
    """Compress MODEL to every budget (one profile), plus uniform baselines; evaluate all; write a report.

    \b
      sizewise sweep smollm2-135m --budgets 2.5,3,3.5,4,5 --method rtn,gptq \\
          --calib enwiki-sample --uniform rtn:4:64,gptq:3:64 --windows 16 -o out/sweep
      sizewise sweep smollm2-135m --format gguf --budgets 70MB,78MB,90MB --method rtn,gptq \\
          --calib enwiki-sample --uniform gptq:Q4_K --windows 16 -o out/gguf-sweep
      sizewise sweep smollm2-135m --budgets 2.5,3,3.5,4 --method gptq,sparsegpt,lowrank \\
          --calib enwiki-sample --windows 16 -o out/joint        # also kinds_per_layer.png
    """
    from .. import api

    quantizers = tuple(budget_method(method, calib["calib"], quiet).split(","))
    with claimed(output, force, "dir", model, text, calib["calib"], calib["offload"], *peers):
        res = api.sweep(model, budgets, output, calib_config(**calib), quantizers=quantizers,
                        uniform=[u for item in uniform for u in item.split(",") if u.strip()], peers=list(peers),
                        text=text, ctx=ctx, stride=stride, windows=windows, fisher_samples=fisher_samples,
                        measure_samples=measure_samples, sequential=sequential, overwrite=force, restart=restart,
                        progress=not quiet, allow_pickle=allow_pickle, format=out_format)
    click.echo(res["table"])
    t = res["timing"]
    click.echo(f"report: {res['report']} (profile {t['profile_s']:.1f} s, compress {sum(t['compress_s'].values()):.1f} s, "
               f"evaluation {t['eval_s']:.1f} s)")
