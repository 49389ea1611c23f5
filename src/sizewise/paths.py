"""Names read from a manifest are data from a stranger: each must stay inside its directory."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .errors import SizewiseError


def inside(directory: str | Path, name: str, what: str = "manifest") -> Path:
    """`directory / name` if `name` is a relative path that stays inside `directory` (no '..', not
    absolute, no backslashes, and no link leading out), else a one-line error naming it."""
    p = PurePosixPath(name) if isinstance(name, str) else None
    if (p is None or not name or p.is_absolute() or "\\" in name or any(part in ("..", "") for part in p.parts)
            or name != p.as_posix()):
        raise SizewiseError(f"{what} names {name!r}, which is not a plain relative path inside {directory}")
    base = Path(directory).resolve()
    target = (base / p).resolve()
    if not target.is_relative_to(base):
        raise SizewiseError(f"{what} names {name!r}, which leads outside {directory}")
    return Path(directory) / p
