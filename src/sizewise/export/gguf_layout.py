"""The GGUF file as the allocator sizes it: `GGUFLayout`, a file layout (see `allocate.sizes`).

It sits with the GGUF writer whose header it sizes. It takes the allocator's candidates as they
come (anything with `.format` and `.label`) and never imports the allocator.
"""

from __future__ import annotations

import torch

from ..errors import SizewiseError
from ..quant.formats import TORCH_DTYPES
from .gguf import GGML, data_bytes, extra_tensor_shapes, file_names, float_type, gguf_export_args, header_bytes

# A row is one tensor as a file holds it: (name, dtype or ggml type, shape, data bytes); `allocate.sizes.Row`.
Row = tuple[str, str, tuple[int, ...], int]


class GGUFLayout:
    """The GGUF file that `export` writes from the artifact (`export/gguf.py`): a header (metadata,
    the whole tokenizer, one info per tensor) padded to 32 bytes, then every tensor's ggml blocks
    padded to 32 bytes; norms F32, other float tensors in the float dtype, a tied head left out.

    Exact, to the byte: the header is sized by gguf's own writer with the metadata the export writes
    (`export_args`; nothing in it depends on the plan), data by ggml's block sizes. Candidates must
    be ggml types (`allocate.gguf_candidate_set`). The file itself is written by `api.export` with
    `**layout.export_args` (`api.budget.write_gguf`).
    """

    kind = "gguf"
    arithmetic = "llamacpp"     # what runs it rounds each matmul's input (`runtime.llamacpp`)
    noun = "GGUF file"

    def __init__(self, config, tokenizer, *, name: str | None = None, tokenizer_pre: str | None = None,
                 metadata: dict | None = None):
        self.config, self.tokenizer = config, tokenizer
        self.export_args = {"name": name, "tokenizer_pre": tokenizer_pre, "metadata": dict(metadata or {})}

    @classmethod
    def for_source(cls, src) -> "GGUFLayout":
        """The GGUF a compression of `src` is exported as (`export.gguf.gguf_export_args`)."""
        return cls(src.model.config, src.tokenizer, **gguf_export_args(src.info))

    def check(self, candidates) -> None:
        bad = [c for c in candidates if c.format.ggml_type is None]
        if bad:
            raise SizewiseError(f"GGUF cannot hold {bad[0].label} exactly; a GGUF's candidates must be ggml types "
                                "(allocate.gguf_candidate_set: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4, Q2_K..Q6_K, float)")

    def rows(self, name: str, cand, shape: tuple[int, int], state_shape: tuple[int, ...]) -> list[Row]:
        t = GGML[cand.format.ggml_type]
        return [(name, t.name, tuple(state_shape), data_bytes(t, state_shape))]

    def other_rows(self, name: str, t: torch.Tensor, float_dtype: str) -> list[Row]:
        if not t.is_floating_point():
            raise SizewiseError(f"GGUF holds float tensors only; {name} is {t.dtype}")
        g = float_type(t.dim(), TORCH_DTYPES[float_dtype])
        return [(name, g.name, tuple(t.shape), data_bytes(g, tuple(t.shape)))]

    def measure(self, others: list[Row], groups: list[list[list[Row]]]) -> tuple[int, list[list[int]]]:
        """(bytes of everything but the choices, bytes of each option of each group of choices)."""
        firsts = [g[0][0] for g in groups]            # one row per choosable tensor, whatever its type
        names = file_names(self.config, [r[0] for r in others + firsts])
        extras = extra_tensor_shapes(self.config)   # written after the weights, as `gguf_tensors` does
        head = header_bytes(self.config, [(names[n], shape) for n, _, shape, _ in others + firsts if n in names]
                            + [(n, shape) for n, shape, _ in extras], self.tokenizer, **self.export_args)
        kept = lambda rows: sum(b for n, _, _, b in rows if n in names)     # noqa: E731
        return head + kept(others) + sum(b for _, _, b in extras), [[kept(opt) for opt in g] for g in groups]

    def describe(self) -> dict:
        return {"kind": self.kind, **self.export_args}
