"""Outputs appear whole or not at all: each is built beside its destination, then renamed into place.

The one place sizewise writes anything a user or a later run reads (artifacts, reports, GGUF files,
JSON results, cache entries): a reader never sees a half-written output, because a rename within one
directory is atomic, and a failed or interrupted write leaves nothing behind.

A user's output is *claimed* before any work (`claim`): its path is checked (nothing replaced without
overwrite, not the input itself, a writable parent), and a staging area `.NAME.partial-PID-*` is made
beside it holding a locked file. The lock refuses a second writer of the same output; a staging area
whose lock nobody holds belongs to a dead process and is removed. The output is checked again at
the final rename, which runs with SIGINT/SIGTERM deferred (`handle_signals`), as does the cleanup.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import Interrupted, SizewiseError

LOCK = "lock"
_claims: dict[str, dict] = {}       # output path -> this process's claim on it: area, overwrite, depth
_critical = {"depth": 0, "pending": None}


# --- signals ------------------------------------------------------------------------------------


def handle_signals() -> dict:
    """SIGINT and SIGTERM raise `Interrupted`, so that every staging area is cleaned up on the way
    out; inside a critical section (a rename into place, a cleanup) they wait for its end.
    Returns the handlers replaced (signal -> handler), for `restore_signals`."""
    def on_signal(signum, frame):
        if _critical["depth"]:
            _critical["pending"] = signum
        else:
            raise Interrupted(signum)

    try:
        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:      # not the main thread (main() called from a worker): signals stay as they are
        return {}


def restore_signals(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


@contextmanager
def _uninterrupted():
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
        pending = _critical["pending"]
        if not _critical["depth"] and pending is not None:
            _critical["pending"] = None
            raise Interrupted(pending)


# --- checks before any work -----------------------------------------------------------------------


def _key(path: str | Path) -> Path:
    """The absolute path with its parent resolved (a link at the output itself is not followed)."""
    p = Path(os.path.abspath(path))
    return p.parent.resolve() / p.name


def _occupied(p: Path) -> bool:
    """Something is at `p` that replacing would lose (an empty directory is not)."""
    if not os.path.lexists(p):
        return False
    return p.is_symlink() or not p.is_dir() or any(p.iterdir())


def _output_path(out: str | Path) -> Path:
    if not os.fspath(out):      # Path("") would be the current directory
        raise SizewiseError("the output path is empty")
    return Path(out)


def check_target(out: str | Path, *, overwrite: bool, kind: str = "dir", inputs=()) -> None:
    """One line, before any work, unless `out` may be written: nothing there (or an empty directory,
    or `overwrite`), a directory where a file is wanted never replaced, not one of `inputs` nor
    inside one, no input inside it, and its nearest existing ancestor a writable directory."""
    out = _output_path(out)
    key = _key(out)
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue          # built-in names and the like
        src = Path(given).resolve()
        if key == src or key.is_relative_to(src):
            raise SizewiseError(f"output {out} is the input {given} or inside it; choose another output path")
        if src.is_relative_to(key) and os.path.lexists(out):
            raise SizewiseError(f"input {given} is inside the output {out}, which writing would replace; "
                                "choose another output path")
    if kind == "file" and out.is_dir() and not out.is_symlink():
        raise SizewiseError(f"output {out} is a directory; give a file path")
    if _occupied(out) and not overwrite:
        what = "directory" if out.is_dir() else "file"
        raise SizewiseError(f"output {what} {out} already exists{' and is not empty' if what == 'directory' else ''} "
                            "(use --force to replace it)")
    parent = key.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SizewiseError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SizewiseError(f"cannot write {out}: {parent} is not writable")


# --- claims: the staging area and its lock --------------------------------------------------------


_AREA = re.compile(r"\.partial-(\d+)-")


def _held(lock: Path) -> bool | None:
    """Whether a live process holds `lock` (None: there is no lock file to ask)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _other_writers(out: Path, own: Path | None = None) -> list[Path]:
    """Staging areas beside `out` of live processes; those of dead ones are removed on the way."""
    live = []
    for p in out.parent.glob(f".{_glob_escape(out.name)}.partial-*"):
        if p == own:
            continue
        held = _held(p / LOCK) if p.is_dir() else None
        m = _AREA.search(p.name[len(out.name) + 1:])
        if held is None:   # no lock (yet): judged by the pid in its name, when it has one
            held = m is None or _pid_alive(int(m.group(1)))
            if held:
                continue   # a writer that is just starting, or not ours to judge: left alone
        if held:
            live.append(p)
        else:
            with _uninterrupted():
                _remove(p)
    return live


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def claim(out: str | Path, *, overwrite: bool = False, kind: str = "dir", inputs=()):
    """Check `out` (`check_target`) and hold a locked staging area beside it until the block ends;
    yields the area, scratch space on the output's filesystem. Reentrant: a claim this process
    already holds is reused, with its `overwrite`."""
    out = _output_path(out)
    key = str(_key(out))
    if key in _claims:
        c = _claims[key]
        c["depth"] += 1
        try:
            yield c["area"]
        finally:
            c["depth"] -= 1
        return
    check_target(out, overwrite=overwrite, kind=kind, inputs=inputs)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]   # removed again if nothing is written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        area = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    except OSError as e:
        raise SizewiseError(f"cannot write beside {out}: {e.strerror or e}") from None
    fd = None
    try:
        area.chmod(0o755)   # mkdtemp's 0700 is for scratch space; an output is ordinary data
        fd = os.open(area / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        others = _other_writers(out, own=area)
        if others:
            raise SizewiseError(f"another sizewise run is writing {out} (its staging directory {others[0].name} "
                                "is locked); wait for it or choose another output path")
        _claims[key] = {"area": area, "overwrite": overwrite, "depth": 1}
        yield area
    finally:
        with _uninterrupted():
            _claims.pop(key, None)
            shutil.rmtree(area, ignore_errors=True)
            if fd is not None:
                os.close(fd)
            for d in made if not os.path.lexists(out) else ():
                try:
                    d.rmdir()
                except OSError:
                    break


def _place(tmp: Path, out: Path, area: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`, checking `out` again: what appeared there while this run worked is
    replaced only with `overwrite` (moved into the staging area first, deleted with it)."""
    with _uninterrupted():
        if _occupied(out) or (os.path.lexists(out) and tmp.is_file()):
            if tmp.is_file() and out.is_dir() and not out.is_symlink():
                raise SizewiseError(f"output {out} is a directory; give a file path")
            if not overwrite and _occupied(out):
                raise SizewiseError(f"{out} appeared while this run worked; it is left as it was "
                                    "(use --force to replace it)")
            if tmp.is_dir() or (out.is_dir() and not out.is_symlink()):
                trash = area / "replaced"      # a directory cannot replace a file, nor one a directory
                os.rename(out, trash)
                try:
                    os.replace(tmp, out)
                except OSError:
                    os.rename(trash, out)
                    raise
                _remove(trash)
                return
        os.replace(tmp, out)   # also fills an empty `out` directory; replaces a file atomically


@contextmanager
def staged_dir(out: str | Path, *, overwrite: bool = False, cache: bool = False):
    """Yield an empty directory in the staging area beside `out`; when the block completes it becomes
    `out`; if the block raises, it is removed.

    overwrite: an existing non-empty `out` (there at the start or appeared since) is replaced; else it
    is an error, at the start and at the rename (a claim this process holds on `out` decides instead).
    cache=True (cache entries): no claim; an existing non-empty `out` is kept as it is, e.g. another
    process finished the same entry first.
    """
    out = Path(out)
    if cache:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
        try:
            tmp.chmod(0o755)
            yield tmp
            with _uninterrupted():
                try:
                    os.replace(tmp, out)
                except OSError:
                    if not out.is_dir():
                        raise
        finally:
            with _uninterrupted():
                shutil.rmtree(tmp, ignore_errors=True)
        return
    with claim(out, overwrite=overwrite) as area:
        tmp = area / "data"
        tmp.mkdir(mode=0o755)
        try:
            yield tmp
            _place(tmp, out, area, _claims[str(_key(out))]["overwrite"])
        finally:
            with _uninterrupted():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(path: str | Path, *, overwrite: bool = True):
    """Yield a temporary path beside `path` to write; when the block completes it replaces `path`
    (an existing file only with `overwrite`, or as a claim this process holds on `path` says);
    if the block raises, it is removed. Unclaimed (caches) it takes no lock: two processes
    writing the same cache entry write the same bytes."""
    path = Path(path)
    claimed = _claims.get(str(_key(path)))
    if claimed is not None:
        with claim(path) as area:
            tmp = area / "file"
            try:
                yield tmp
                tmp.chmod(0o644)
                _place(tmp, path, area, claimed["overwrite"])
            finally:
                tmp.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)   # mkstemp's 0600 is for scratch space
        _place(Path(tmp), path, path.parent, overwrite)
    finally:
        with _uninterrupted():
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    with staged_file(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, *, overwrite: bool = True) -> None:
    write_bytes(path, text.encode(), overwrite=overwrite)
