"""Outputs appear whole or not at all: each is built beside its destination, then renamed into place.

The one place sizewise writes anything a user or a later run reads (artifacts, reports, GGUF files,
JSON results, cache entries): a reader never sees a half-written output, because a rename within one
directory is atomic, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(out: str | Path, *, replace: bool = True):
    """Yield an empty temporary directory beside `out`; when the block completes it becomes `out`;
    if the block raises, it is removed.

    replace=True: an existing `out` is moved aside first, then deleted. replace=False (cache
    entries): an existing non-empty `out` is kept, e.g. another process finished the same entry first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 is for scratch space; an output is ordinary data
    try:
        yield tmp
        if replace and out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            out.rename(trash)
            shutil.rmtree(trash)
        try:
            os.replace(tmp, out)  # also fills an empty `out`
        except OSError:
            if replace or not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(path: str | Path):
    """Yield a temporary path beside `path` to write; when the block completes it replaces `path`,
    if the block raises, it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for scratch space
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())
