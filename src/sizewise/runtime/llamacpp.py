"""How llama.cpp's CPU matrix products round their inputs, so a GGUF can be measured as llama.cpp runs it.

ggml multiplies a weight by activations first converted to the weight type's "vec_dot_type":
8-bit blocks of 32 with a float16 scale (Q8_0; Q8_1 rounds the same values and adds block sums)
for the 32-weight types, 8-bit blocks of 256 with a float32 scale (Q8_K) for the k-quants, the
weight's own dtype for F16 and BF16, nothing for F32. The weights of a sizewise GGUF are exact,
so this rounding is all that separates llama.cpp's logits from sizewise's float evaluation; on
SmolLM2-135M it costs about 0.003 nats per token, as much as a 5-bit weight grid. The allocator
prices it per tensor (`allocate.profile_model(arithmetic="llamacpp")`) and measures plans with it.

Written by hand: the rounding lives inside ggml's C kernels; no library exposes it on tensors.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..quant.formats import Format

# ggml type -> how the CPU backend rounds the activations it multiplies (ggml-cpu's vec_dot_type)
INPUT_ROUNDING: dict[str, str | None] = {
    "F32": None, "F16": "f16", "BF16": "bf16",
    **{t: "q8_0" for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4")},
    **{t: "q8_K" for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")},
}
ROUNDINGS = ("q8_0", "q8_K", "f16", "bf16")
_BLOCK = {"q8_0": 32, "q8_K": 256}


def input_rounding(fmt: Format) -> str | None:
    """The rounding llama.cpp applies to the inputs of a weight stored in `fmt` (None: none)."""
    if fmt.ggml_type is None:
        raise ValueError(f"{fmt} is not a ggml type")
    return INPUT_ROUNDING[fmt.ggml_type]


def round_input(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """`x` (float, last dimension = the matmul's inner one) as ggml hands it to the dot product."""
    if kind is None:
        return x
    if kind == "f16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    block = _BLOCK[kind]
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    if kind == "q8_0":
        # quantize_row_q8_0: d = amax/127, q = round(x/d) half away from zero, d stored as float16
        d = xb.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        t = xb * inv
        q = torch.sign(t) * torch.floor(t.abs() + 0.5)
        out = q * d.to(torch.float16).float()
    else:
        # quantize_row_q8_K: the signed value of largest magnitude maps to -127, q = nearest (ties
        # to even) clipped at 127, d = 1/iscale kept in float32
        m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        iscale = torch.where(m != 0, -127 / m, torch.zeros_like(m))
        q = torch.round(xb * iscale).clamp_max(127)
        out = q * torch.where(iscale != 0, 1 / iscale, torch.zeros_like(iscale))
    return out.reshape(shape).to(x.dtype)


def module_roundings(model, arch, kind_of) -> dict:
    """Module -> its input rounding in llama.cpp, for every decoder linear and the output head;
    `kind_of(weight name)` gives a weight's rounding (the head's is asked for by `arch.head_table`)."""
    modules = {r.module: r.weight_name for r in arch.all_linears()}
    if arch.head_table is not None:
        modules[model.get_output_embeddings()] = arch.head_table
    return {m: kind_of(n) for m, n in modules.items()}


def fits(kind: str | None, in_features: int) -> bool:
    return in_features % _BLOCK.get(kind, 1) == 0


@contextmanager
def rounded_inputs(modules: dict[torch.nn.Module, str | None]):
    """Within the block, each module's input is rounded as llama.cpp rounds it for that module's type."""
    handles = [m.register_forward_pre_hook(lambda mod, args, k=kind: (round_input(args[0], k), *args[1:]))
               for m, kind in modules.items() if kind is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
