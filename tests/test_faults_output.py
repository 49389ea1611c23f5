"""Fault injection, outputs: nothing replaced without --force, no output equal to or inside an input,
a second writer refused, stale staging of dead processes removed, signals during the work and
during the final rename clean up and exit 130/143 with one line. Every pre-existing file under the
paths given is byte-identical afterwards unless --force named it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sizewise import atomic
from sizewise.cli import main
from sizewise.errors import Interrupted, SizewiseError
from test_faults import SRC, one_error, snapshot


def _partials(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def room(tiny_dirs, tmp_path):
    """A directory holding a model copy, a text, an existing artifact-like dir and a file."""
    import shutil

    shutil.copytree(tiny_dirs["llama"], tmp_path / "model")
    (tmp_path / "text.txt").write_text(Path(tiny_dirs["text"]).read_text())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "file.json").write_text('{"precious": true}')
    return tmp_path


EVAL = ["--text", "{room}/text.txt", "--ctx", "32", "--windows", "1", "--quiet"]


@pytest.mark.parametrize("args, message", [
    (["compress", "{room}/model", "-o", "{room}/full", "--quiet"], "already exists"),
    (["compress", "{room}/model", "-o", "{room}/file.json", "--quiet"], "already exists"),
    (["compress", "{room}/model", "-o", "{room}/model", "--force", "--quiet"], "is the input"),
    (["compress", "{room}/model", "-o", "{room}/model/sub", "--quiet"], "is the input"),
    (["compress", "{room}/model", "-o", "{room}", "--force", "--quiet"], "inside the output"),
    (["compress", "{room}/model", "-o", "{room}/text.txt/x", "--quiet"], "not a directory"),
    (["compress", "{room}/model", "-o", "{room}/new/deeper/a", "--bits", "1", "--quiet"], "bits must be"),
    (["compress", "{room}/nothing", "-o", "{room}/new/deeper/a", "--quiet"], "no model at"),
    (["eval", "{room}/model", *EVAL, "--against", "{room}/full", "-o", "{room}/full/x.json"], "is the input"),
    (["eval", "{room}/model", *EVAL, "-o", "{room}/file.json"], "already exists"),
    (["eval", "{room}/model", *EVAL, "-o", "{room}/full"], "is a directory"),
    (["eval", "{room}/model", *EVAL, "-o", "{room}/full", "--force"], "is a directory"),
    (["eval", "{room}/model", *EVAL, "-o", "{room}/text.txt", "--force"], "is the input"),
    (["plan", "{room}/model", "--budget", "4.5bpw", "-o", "{room}/full", "--quiet"], "is a directory"),
    (["plan", "{room}/model", "--budget", "4.5bpw", "-o", "{room}/file.json", "--quiet"], "already exists"),
    (["compare", "{room}/model", "{room}/model", *EVAL, "-o", "{room}/full"], "already exists"),
    (["compare", "{room}/model", "{room}/model", *EVAL, "-o", "{room}/model", "--force"], "is the input"),
    (["export", "{room}/model", "-o", "{room}/file.json"], "already exists"),
    (["compress", "{room}/model", "-o", "", "--quiet"], "output path is empty"),
    (["compress", "{room}/model", "-o", "/proc/sizewise-fault-test", "--quiet"], "cannot write"),   # unwritable, even as root
    (["compress", "{room}/model", "-o", "{room}/a", "--offload", "{room}/file.json", "--quiet"], "not a directory"),
    (["pack", "{room}/model", "--lossless", "-o", "{room}/full"], "already exists"),
    (["unpack", "{room}/model", "-o", "{room}/full"], "lossless-packed"),
])
def test_outputs_are_never_replaced_without_force_nor_inputs(args, message, room, capsys):
    before = snapshot(room)
    one_error(capsys, *[a.format(room=room) for a in args], contains=message)
    assert snapshot(room) == before and not _partials(room)


def test_force_replaces_a_file_or_a_directory_cleanly(room, capsys):
    assert main(["compress", str(room / "model"), "-o", str(room / "file.json"), "--force", "--quiet"]) == 0
    assert (room / "file.json" / "manifest.json").is_file()
    assert main(["compare", str(room / "model"), str(room / "file.json"), *[a.format(room=room) for a in EVAL],
                 "-o", str(room / "full"), "--force"]) == 0
    assert (room / "full" / "report.md").is_file() and not (room / "full" / "keep.txt").exists()
    (room / "e.json").write_text("old")
    assert main(["eval", str(room / "model"), *[a.format(room=room) for a in EVAL], "-o", str(room / "e.json"),
                 "--force"]) == 0
    assert '"perplexity"' in (room / "e.json").read_text()
    capsys.readouterr()
    assert not _partials(room)


def test_output_that_appears_during_the_work_is_kept(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(SizewiseError, match="appeared while this run worked"):
        with atomic.staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and not _partials(tmp_path)
    with pytest.raises(SizewiseError, match="appeared"):
        with atomic.staged_file(tmp_path / "f.json", overwrite=False) as tmp:
            tmp.write_text("new")
            (tmp_path / "f.json").write_text("theirs")
    assert (tmp_path / "f.json").read_text() == "theirs" and not _partials(tmp_path)


def _hold(out: Path):
    """Another process holding the claim on `out` (as a running sizewise would)."""
    code = ("import sys, time; from sizewise.atomic import claim\n"
            f"with claim({str(out)!r}):\n    print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_of_the_same_output_is_refused(room, capsys):
    out = room / "a"
    holder = _hold(out)
    try:
        one_error(capsys, "compress", room / "model", "-o", out, "--quiet", contains="another sizewise run")
        with pytest.raises(SizewiseError, match="another sizewise run"):
            with atomic.staged_dir(out):
                pass
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its staging area is stale, and the next run removes it
    assert len(_partials(room)) == 1
    assert main(["compress", str(room / "model"), "-o", str(out), "--quiet"]) == 0
    assert not _partials(room) and (out / "manifest.json").is_file()


def test_stale_staging_of_dead_processes_is_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".o.partial-{pid}-abc").mkdir()                   # no lock, dead pid
    (tmp_path / f".o.partial-{pid}-abc" / "packed.safetensors").write_bytes(b"half")
    (tmp_path / f".o.partial-{os.getpid()}-def").mkdir()           # no lock yet, live pid: left alone
    (tmp_path / ".other.partial-1-x").mkdir()                       # another output's: not ours to judge
    with atomic.staged_dir(tmp_path / "o") as tmp:
        (tmp / "x").write_text("x")
    assert _partials(tmp_path) == [f".o.partial-{os.getpid()}-def", ".other.partial-1-x"]


def test_signal_during_the_final_rename_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM arriving inside the rename into place: the output is whole, then the run stops."""
    previous = atomic.handle_signals()
    real = os.replace

    def replace_then_signal(a, b):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)               # the handler runs here, inside the critical section: deferred
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    try:
        with pytest.raises(Interrupted):
            with atomic.staged_dir(tmp_path / "o") as tmp:
                (tmp / "x").write_text("whole")
        assert (tmp_path / "o" / "x").read_text() == "whole" and not _partials(tmp_path)
        with pytest.raises(Interrupted):       # during the work: staging removed, nothing placed
            with atomic.staged_dir(tmp_path / "p") as tmp:
                (tmp / "x").write_text("half")
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert not (tmp_path / "p").exists() and not _partials(tmp_path)
    finally:
        atomic.restore_signals(previous)


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "error: terminated"),
                                             (signal.SIGINT, 130, "error: interrupted")])
def test_signal_during_compress_cleans_up_with_one_line(sig, code, line, room):
    """A real `sizewise compress` in a subprocess, signalled once its staging area exists."""
    out = room / "a"
    args = ["compress", str(room / "model"), "-o", str(out), "--method", "gptq", "--calib", str(room / "text.txt"),
            "--calib-samples", "256", "--calib-len", "128", "--quiet"]
    p = subprocess.Popen([sys.executable, "-c", "import sys; from sizewise.cli import main; sys.exit(main())", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    first = p.stderr.readline()        # "calibration activations: ...": loaded, the passes begin
    while first.startswith("peak memory"):      # the estimate printed before any work
        first = p.stderr.readline()
    assert first.startswith("calibration activations") and _partials(room), first
    time.sleep(0.3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert not out.exists() and not _partials(room)
