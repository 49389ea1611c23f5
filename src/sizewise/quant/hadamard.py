"""Hadamard matrices of many orders, as pure functions: H with entries ±1 and H·Hᵀ = n·I.

Built as Kronecker products of blocks, since the product of Hadamard matrices is Hadamard:
- powers of two (Sylvester's doubling),
- Paley I: order q + 1 for a prime q ≡ 3 (mod 4), e.g. 4, 8, 12, 20, 24, 32, 44, 48, 60, 72, ...
- Paley II: order 2(q + 1) for a prime q ≡ 1 (mod 4), e.g. 12, 28, 36, 60, 76, ...
That covers the hidden sizes of common models: 576 = 36·16, 896 = 28·32, 960 = 60·16, 2304 = 36·64.
Orders that need other constructions (e.g. 188) raise a one-line error.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import SizewiseError


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    d = 2
    while d * d <= q:
        if q % d == 0:
            return False
        d += 1
    return True


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _block_kind(n: int) -> str | None:
    """Which direct construction builds order n, if any (Sylvester for powers of two)."""
    if _pow2(n):
        return "sylvester"
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "paley1"
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@lru_cache(maxsize=None)
def factors(n: int) -> tuple[int, ...] | None:
    """Block orders whose Kronecker product has order n, or None if no construction here reaches n.

    Preferred shape: one small Paley block times a power of two (K ⊗ H_2^k, as QuaRot uses, which also
    allows a fast transform later); otherwise any product of blocks.
    """
    if n < 1 or (n > 2 and n % 4):
        return None  # a Hadamard matrix of order > 2 needs 4 | n
    if _pow2(n):
        return (n,)
    odd = n
    while odd % 2 == 0:
        odd //= 2
    d = odd
    while d <= n:
        if _block_kind(d) is not None:
            return (d, n // d) if d < n else (d,)
        d *= 2
    for d in range(n // 2, 2, -1):
        if n % d == 0 and not _pow2(d) and _block_kind(d) is not None:
            rest = factors(n // d)
            if rest is not None:
                return (d,) + rest
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod q (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _block(n: int) -> torch.Tensor:
    kind = _block_kind(n)
    f64 = torch.float64
    if kind == "sylvester":
        h = torch.ones(1, 1, dtype=f64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    if kind == "paley1":
        q = n - 1
        s = torch.zeros(n, n, dtype=f64)  # skew conference matrix [[0, 1ᵀ], [−1, Q]]
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(n, dtype=f64) + s
    if kind == "paley2":
        q = n // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=f64)  # symmetric conference matrix [[0, 1ᵀ], [1, Q]]
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=f64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=f64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=f64), b)
    raise AssertionError(n)


def has_hadamard(n: int) -> bool:
    return factors(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (float64, entries ±1, H·Hᵀ = n·I); one-line error if not buildable."""
    fs = factors(n)
    if fs is None:
        raise SizewiseError(
            f"no Hadamard matrix of order {n} can be built here: sizewise builds Kronecker products of "
            "Sylvester (2^k), Paley I (prime q ≡ 3 mod 4: q+1) and Paley II (prime q ≡ 1 mod 4: 2(q+1)) blocks, "
            "and any order above 2 must be a multiple of 4")
    h = torch.ones(1, 1, dtype=torch.float64)
    for d in fs:
        h = torch.kron(h, _block(d))
    return h
