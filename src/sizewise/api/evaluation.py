"""Measuring models: `evaluate` (perplexity; KL and top-1 agreement against a reference) and
`compare` (artifacts side by side on the same windows, optionally as llama.cpp computes)."""

from __future__ import annotations

from pathlib import Path

from .. import artifact, data, families, memory
from ..atomic import check_target
from ..arch import discover
from ..errors import SizewiseError
from ..evaluate import evaluate as _evaluate
from ..evaluate import evaluate_many
from ..sources import Source
from .compression import _peak_rss_mb, _source
from .inspection import info


def evaluate(model: str | Path | Source, text: str | Path = "wikitext2-test", *, ctx: int = 1024,
             stride: int | None = None, windows: int | None = None, against: str | Path | Source | None = None,
             progress: bool = True, allow_pickle: bool = False) -> dict:
    """Perplexity of `model` on `text`; with `against`, KL divergence and top-1 agreement vs that reference."""
    txt = data.read_text(text)                   # cheap checks before loading models
    src = _source(model, allow_pickle)
    ref = _source(against, allow_pickle) if against is not None else None
    if ref is not None and ref.model.config.vocab_size != src.model.config.vocab_size:
        raise SizewiseError("the two models have different vocabularies; KL divergence needs the same tokenizer")
    tokens = data.tokenize(src.tokenizer, txt)
    wins = data.eval_windows(tokens, ctx, stride, windows, data.wants_bos(src.model, src.tokenizer),
                             data.max_positions(src.model))
    memory.require(memory.peak_memory(src.model, task="eval", ctx=ctx, models=(ref.model,) if ref else ()))
    result = _evaluate(src.model, wins, txt, reference=ref.model if ref else None, progress=progress)
    result["model"] = src.info
    if ref is not None:
        result["reference"] = ref.info
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def compare(reference: str | Path, candidates: list[str | Path], text: str | Path = "wikitext2-test", *,
            ctx: int = 1024, stride: int | None = None, windows: int | None = None,
            out: str | Path | None = None, progress: bool = True, arithmetic: str | None = None,
            overwrite: bool = False) -> dict:
    """Evaluate artifacts side by side against their reference on the same windows; optionally write a report.

    `arithmetic="llamacpp"`: each artifact's matmul inputs are rounded as llama.cpp rounds them for
    its stored types (`runtime.llamacpp`), which predicts what its GGUF measures in llama.cpp.
    """
    from .. import report
    from ..quant.registry import format_from_dict

    if arithmetic not in (None, "float", "llamacpp"):
        raise SizewiseError(f"unknown arithmetic {arithmetic!r}; available: float, llamacpp")
    if out is not None:
        check_target(out, overwrite=overwrite)      # before any work: an existing report is kept
    txt = data.read_text(text)
    ref = _source(reference)
    cands = {}
    for c in candidates:
        src = _source(c)
        label = Path(str(c)).name
        if label in cands:
            raise SizewiseError(f"two candidates are named {label}; give them different directory names")
        cands[label] = src
    tokens = data.tokenize(ref.tokenizer, txt)
    wins = data.eval_windows(tokens, ctx, stride, windows, data.wants_bos(ref.model, ref.tokenizer),
                             min(filter(None, [data.max_positions(m.model) for m in (ref, *cands.values())]), default=None))
    memory.require(memory.peak_memory(ref.model, task="eval", ctx=ctx, models=tuple(v.model for v in cands.values())))
    roundings = {k: _llamacpp_roundings(v) for k, v in cands.items()} if arithmetic == "llamacpp" else None
    res = evaluate_many({k: v.model for k, v in cands.items()}, wins, txt, reference=ref.model, progress=progress,
                        roundings=roundings)
    results = {"reference_spec": str(reference), "protocol": res["reference"]["protocol"],
               "reference": {k: v for k, v in res["reference"].items() if k != "protocol"}, "candidates": {}}
    for label, src in cands.items():
        r = {k: v for k, v in res[label].items() if k != "protocol"}
        if src.info["kind"] == "artifact":
            a = info(src.info["path"])
            method = a["method"]
            fmt = method.get("format")
            r.update(bits_per_weight=a["bits_per_weight"], file_mb=a["file_bytes"] / 1e6, method=method["name"],
                     format=format_from_dict(fmt).label if fmt else "mixed (plan)",
                     compress_s=a["timing"]["wall_s"])
        results["candidates"][label] = r
    if out is not None:
        results["report"] = str(report.write(results, out, overwrite=overwrite))
    return results


def _llamacpp_roundings(src: Source) -> dict:
    """Module -> llama.cpp's input rounding for the types an artifact or a GGUF file stores
    (`runtime.llamacpp`)."""
    from ..export.gguf import gguf_tensor_name
    from ..runtime.llamacpp import INPUT_ROUNDING, input_rounding, module_roundings
    from ..quant.registry import format_from_dict

    kind, spec = src.info["kind"], src.info["spec"]
    if kind == "artifact":
        tensors = artifact.read_manifest(src.info["path"])["tensors"]
        formats = {n: format_from_dict(e["format"]) for n, e in tensors.items() if e["format"]["kind"] != "raw"}
        bad = [f for f in formats.values() if f.ggml_type is None]
        if bad:
            raise SizewiseError(f"llama.cpp's arithmetic applies to ggml types; {spec} stores {bad[0].label}")
        kind_of = lambda name: input_rounding(formats[name])      # noqa: E731
    elif kind == "gguf":
        import gguf

        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(src.info["path"]).tensors}
        layers, layout = src.model.config.num_hidden_layers, families.of(src.model.config).gguf  # the file's arch
        kind_of = lambda name: INPUT_ROUNDING.get(types.get(gguf_tensor_name(name, layers, layout), ""), "?")  # noqa: E731
    else:
        raise SizewiseError(f"llama.cpp's arithmetic needs an artifact or a .gguf, whose tensor types are known; "
                            f"got {spec}")
    out = module_roundings(src.model, discover(src.model), kind_of)
    if "?" in out.values():
        raise SizewiseError(f"{spec}: a weight's ggml type has no known llama.cpp input rounding")
    return out
