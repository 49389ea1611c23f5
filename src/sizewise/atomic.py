"""Outputs appear whole or not at all: a directory is built beside its destination, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(out: str | Path):
    """Yield an empty temporary directory beside `out`; when the block completes it replaces `out`
    (an existing one is moved aside first, then deleted); if the block raises, it is removed.

    A reader never sees a half-written `out`: rename within one directory is atomic.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            out.rename(trash)
            shutil.rmtree(trash)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
