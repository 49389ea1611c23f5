"""`sizewise pack` and `sizewise unpack`: lossless packing of whole models and artifacts.

These are plain click commands; the main CLI loads them when named and prints any
SizewiseError on one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from sizewise.atomic import claim
from sizewise.errors import SizewiseError


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command()
@click.argument("model")
@click.option("--lossless", is_flag=True,
              help="Required: entropy-code the weights bit-exactly (the only packing this command does; "
                   "`sizewise compress` quantizes).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Directory to write (must not exist or be empty).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default=None,
              help="Store float weights in this dtype. Converting from another dtype (float32 -> bfloat16) "
                   "rounds them: LOSSY, needs --allow-lossy. Default: each tensor as stored.")
@click.option("--allow-lossy", is_flag=True,
              help="Accept the rounding that --dtype implies (recorded in the manifest with its max error).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--threads", type=int, default=None, help="Encoding threads (default: all cores).")
def pack(model, lossless, output, dtype, allow_lossy, force, threads):
    """Entropy-code MODEL (bf16/fp16 weights, or a sizewise artifact's codes) into -o DIR, bit-exact.

    DIR loads wherever a MODEL is taken (sizewise eval DIR ...); `sizewise unpack` restores a plain
    Hugging Face directory.
    """
    from sizewise import artifact
    from sizewise.lossless.artifacts import pack_artifact
    from sizewise.lossless.float_model import pack_model
    from sizewise.lossless.store import is_packed_model

    if not lossless:
        raise SizewiseError("pack needs --lossless: bit-exact entropy coding is the only packing it does "
                            "(use `sizewise compress` to quantize)")
    if allow_lossy and dtype is None:
        raise SizewiseError("--allow-lossy only applies with --dtype (the rounding it allows)")
    path = Path(model)
    with claim(output, overwrite=force, inputs=[model]):
        if path.is_dir() and artifact.is_artifact(path) and not is_packed_model(path):
            if dtype is not None:
                raise SizewiseError("--dtype does not apply to a sizewise artifact (its stored tensors are packed as they are)")
            res = pack_artifact(path, output, overwrite=force, threads=threads)
        else:
            res = pack_model(model, output, dtype=dtype, allow_lossy=allow_lossy, overwrite=force, threads=threads)
    t = res["totals"]
    line = (f"wrote {output}: {_mb(t['file_bytes'])} from {_mb(t['raw_bytes'])} stored "
            f"({100 * t['ratio']:.1f}%, entropy bound {100 * t['bound_ratio']:.1f}%), {t['tensors']} tensors")
    if "float" in t:
        f = t["float"]
        line += f"; bf16/fp16 tensors {100 * f['ratio']:.1f}% (bound {100 * f['bound_ratio']:.1f}%)"
    if "codes" in t:
        c = t["codes"]
        line += f"; integer codes {8 * c['coded_bytes'] / c['params']:.3f} bits each"
    click.echo(line)
    if res.get("lossy"):
        lossy = res["lossy"]
        click.echo(f"LOSSY: {lossy['what']} on {lossy['tensors']} tensors, max abs error {lossy['max_abs_error']:.3g}; "
                   "the packed weights round-trip bit-exactly from here on")


@click.command()
@click.argument("packed", metavar="PACKED_DIR")
@click.option("-o", "--output", required=True, type=click.Path(), help="Hugging Face directory to write.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--threads", type=int, default=None, help="Decoding threads (default: all cores).")
def unpack(packed, output, force, threads):
    """Decode a packed directory back to a plain Hugging Face safetensors directory (-o DIR), bit-exact."""
    from sizewise.lossless.float_model import unpack_model
    from sizewise.lossless.store import KIND_ARTIFACT, is_packed_model

    if not is_packed_model(packed):
        raise SizewiseError(f"{packed} is not a lossless-packed directory (written by `sizewise pack --lossless`)")
    with claim(output, overwrite=force, inputs=[packed]):
        res = unpack_model(packed, output, overwrite=force, threads=threads)
    if res["kind"] == KIND_ARTIFACT:
        click.echo(f"wrote {output}: the artifact's dense float32 model ({res['tensors']} stored tensors decoded)")
    else:
        click.echo(f"wrote {output}: {res['tensors']} tensors, {_mb(res['bytes'])} in {', '.join(res['files'])}, "
                   "every tensor verified against its sha256")
