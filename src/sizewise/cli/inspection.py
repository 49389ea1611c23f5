"""Commands that read, measure and convert: eval, info, compare, export, methods, fetch."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import SizewiseError
from .group import cli
from .options import CTX, POSITIVE, claimed, emit


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
    from .. import api

    with claimed(output, force, "file", model, against, text):
        res = api.evaluate(model, text, ctx=ctx, stride=stride, windows=windows, against=against,
                           progress=not quiet, allow_pickle=allow_pickle)
        emit(res, as_json, output, _eval_human, force)


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
    from .. import api

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
    emit(res, as_json, None, human)


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
    from .. import api

    with claimed(output, force, "dir", reference, text, *candidates):
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
    from .. import api

    if tokenizer_pre is not None and fmt != "gguf":
        raise SizewiseError("--tokenizer-pre applies to --format gguf only")
    with claimed(output, force, "file" if fmt == "gguf" else "dir", artifact_dir):
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
    from ..quant.methods import METHODS

    for m in METHODS.values():
        click.echo(f"{m.name:14} {'needs calibration' if m.needs_calibration else 'data-free':18} {m.summary}")


@cli.command()
@click.argument("name")
def fetch(name):
    """Download and convert a built-in model or text into the cache, and print its path."""
    from .. import builtins

    if builtins.is_builtin_model(name):
        click.echo(builtins.fetch_model(name))
    elif builtins.is_builtin_text(name):
        click.echo(builtins.fetch_text(name))
    else:
        raise SizewiseError(f"unknown built-in {name!r}; models: {', '.join(builtins.MODELS)}; texts: {', '.join(builtins.TEXTS)}")
