"""Text → tokens: calibration samples and evaluation windows, with the protocol recorded.

Calibration and evaluation both read text as is and tokenize it whole without special tokens,
so the same file always gives the same tokens; only *where* samples are cut differs.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import builtins, families
from .atomic import staged_file
from .errors import SizewiseError


@dataclass(frozen=True)
class Text:
    name: str       # what the user gave (path or built-in name)
    path: Path
    sha256: str
    content: str

    def protocol(self) -> dict:
        return {"text": self.name, "path": str(self.path), "sha256": self.sha256, "chars": len(self.content)}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a flat uint8 array (no copy when it is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the raw tensor bytes (little-endian, row-major): equal hash = bit-exact."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def files_sha256(files) -> str:
    """One digest over several files: name and content hash of each, in name order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def read_text(spec: str | Path) -> Text:
    """A text file path or a built-in text name (see `sizewise.builtins.TEXTS`)."""
    spec = str(spec)
    path = Path(spec)
    if not path.exists() and builtins.is_builtin_text(spec):
        path = builtins.fetch_text(spec)
    if not path.is_file():
        raise SizewiseError(f"no text file at {spec} (built-in texts: {', '.join(builtins.TEXTS)})")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SizewiseError(f"{spec} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return Text(spec, path, sha256_file(path), content)


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, no special tokens added."""
    ids = tokenizer(text.content, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokens: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """`n` samples of `length` tokens cut at seeded random offsets: [n, length]."""
    if n < 1 or length < 1:
        raise SizewiseError(f"calibration needs at least 1 sample of at least 1 token, got {n} x {length}")
    if tokens.numel() < length:
        raise SizewiseError(f"calibration text has {tokens.numel()} tokens, fewer than one sample of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


@dataclass(frozen=True)
class Windows:
    """Evaluation windows over a token stream.

    Window k starts at k*stride and holds `ctx` tokens; every window scores the tokens that the
    previous one did not (all of them for the first), so stride == ctx gives non-overlapping windows.
    With a BOS token, BOS is prepended and the first text token is scored too.
    """

    inputs: list[torch.Tensor]     # each [1, T]
    score_from: list[int]          # index of the first input position whose *prediction* counts
    ctx: int
    stride: int
    bos: int | None

    @property
    def tokens_scored(self) -> int:
        return sum(x.shape[1] - 1 - s for x, s in zip(self.inputs, self.score_from))

    def protocol(self) -> dict:
        return {"ctx": self.ctx, "stride": self.stride, "windows": len(self.inputs),
                "bos": self.bos, "tokens_scored": self.tokens_scored}


def eval_windows(tokens: torch.Tensor, ctx: int, stride: int | None = None, count: int | None = None,
                 bos: int | None = None, max_positions: int | None = None) -> Windows:
    """`count` windows of `ctx` tokens every `stride` (None: ctx); `max_positions`: the model's limit,
    which a window (with its BOS) must not exceed."""
    stride = ctx if stride is None else stride
    if ctx < 2 or not 1 <= stride <= ctx:
        raise SizewiseError(f"need ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx}, stride={stride}")
    if tokens.numel() < ctx:
        raise SizewiseError(f"text has {tokens.numel()} tokens, shorter than one window of {ctx}")
    if max_positions is not None and ctx + (bos is not None) > max_positions:
        raise SizewiseError(f"ctx {ctx}{' plus BOS' if bos is not None else ''} exceeds the model's "
                            f"{max_positions} positions; use --ctx {max_positions - (bos is not None)} or less")
    available = (tokens.numel() - ctx) // stride + 1
    count = available if count is None else count
    if count < 1 or count > available:
        raise SizewiseError(f"asked for {count} windows of {ctx} tokens (stride {stride}); the text has {available}")
    inputs, score_from = [], []
    for k in range(count):
        x = tokens[k * stride:k * stride + ctx]
        first = 0 if k == 0 else ctx - stride - 1   # predictions at positions >= first score new tokens
        if bos is not None:
            x = torch.cat([torch.tensor([bos]), x])
            first += 1 if k else 0                  # BOS shifts everything by one; BOS->token 0 scored
        inputs.append(x[None])
        score_from.append(max(first, 0))
    return Windows(inputs, score_from, ctx, stride, bos)


def max_positions(model) -> int | None:
    """The longest sequence the model's config allows (None when it names no limit)."""
    c = model.config
    n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return n if isinstance(n, int) and n > 0 else None


def wants_bos(model, tokenizer) -> int | None:
    """The BOS id if this model expects one at the start of every sequence (its tokenizer adds one, or
    its family says so: `Family.bos`, e.g. Gemma), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    if getattr(tokenizer, "add_bos_token", False) or families.of(model.config).bos:
        return bos
    return None


@torch.no_grad()
def generate_samples(model, tokenizer, n: int, length: int, seed: int, cache_key: str,
                     batch: int = 32, progress: bool = True) -> torch.Tensor:
    """Data-free calibration: `n` sequences of `length` tokens that the model samples itself.

    Sampling starts from BOS (or EOS when there is none) at temperature 1; the result is cached per
    model (by its weights' hash) and settings, so a second compression reuses it.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    cache = builtins.cache_dir() / "selfcalib" / f"{cache_key[:32]}-n{n}-L{length}-s{seed}.safetensors"
    if cache.is_file():
        return load_file(str(cache))["samples"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise SizewiseError("the tokenizer has no BOS or EOS token to start self-generated calibration; pass --calib FILE")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, n, batch), desc="self-generating calibration samples", unit="batch",
                  disable=not progress, file=sys.stderr):
        b = min(batch, n - s)
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=length, min_new_tokens=length, pad_token_id=start)
        out.append(gen[:, 1:length + 1].cpu())
    samples = torch.cat(out)
    with staged_file(cache) as tmp:
        save_file({"samples": samples.contiguous()}, str(tmp))
    return samples
