"""Resumable compress: a run stopped at layer k and run again writes the very bytes of one not stopped."""

import json

import pytest
import torch
import transformers as tf

from sizewise.cli import main
from sizewise.quant import methods
from tiny import CONFIGS, SAMPLE_TEXT, tiny_tokenizer

LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cfg = CONFIGS["llama"]()
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "llama", safe_serialization=True)
    tiny_tokenizer().save_pretrained(root / "llama")
    (root / "text.txt").write_text(SAMPLE_TEXT * 20)
    return root


def _args(model_dir, out, method, *extra, bits=3):
    return ["compress", str(model_dir / "llama"), "-o", str(out), "--method", method, "--bits", str(bits),
            "--group-size", "32", "--calib", str(model_dir / "text.txt"), "--calib-samples", "6",
            "--calib-len", "32", "--batch", "4", "--calib-dtype", "float32", "--quiet", *extra]


class Injected(Exception):
    pass


def _fail_at_layer(monkeypatch, k: int):
    """methods.solve raises on layer k's first linear: layers 0..k-1 are finished, k is not."""
    real = methods.solve

    def solve(name, w, stats, fmt, options=None):
        if solve.calls == k * 7:          # 7 linears per llama layer
            raise Injected(f"injected at layer {k}")
        solve.calls += 1
        return real(name, w, stats, fmt, options)
    solve.calls = 0
    monkeypatch.setattr(methods, "solve", solve)


def _without_timings(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("timing", "created")}


@pytest.mark.parametrize("method, k", [("rtn", 1), ("gptq", 2), ("rotate+awq+gptq", 2)])
def test_resume_after_failure_at_layer_k_is_bit_identical(method, k, model_dir, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(_args(model_dir, whole, method)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # success leaves no checkpoint

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _fail_at_layer(m, k)
        assert main(_args(model_dir, out, method)) != 0
    ckpt = tmp_path / ".stopped.checkpoint"
    assert not out.exists() and json.loads((ckpt / "state.json").read_text())["done"] == k
    assert not list(tmp_path.glob(".stopped.partial-*"))          # the staging area went, the checkpoint stayed
    assert f"injected at layer {k}" in capsys.readouterr().err

    assert main(_args(model_dir, out, method)) == 0
    assert f"resuming at layer {k + 1}/{LAYERS} from {ckpt}" in capsys.readouterr().err
    assert (out / "packed.safetensors").read_bytes() == (whole / "packed.safetensors").read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (whole, out))
    assert _without_timings(a) == _without_timings(b)
    assert not ckpt.exists()


def test_a_gguf_output_resumes_to_the_same_file(model_dir, tmp_path, monkeypatch, capsys):
    gguf = ["--format", "gguf", "--sym"]
    assert main(_args(model_dir, tmp_path / "whole.gguf", "gptq", *gguf, bits=4)) == 0
    out = tmp_path / "stopped.gguf"
    with monkeypatch.context() as m:
        _fail_at_layer(m, 3)
        assert main(_args(model_dir, out, "gptq", *gguf, bits=4)) != 0
    assert not out.exists() and (tmp_path / ".stopped.gguf.checkpoint").is_dir()
    capsys.readouterr()
    assert main(_args(model_dir, out, "gptq", *gguf, bits=4)) == 0
    assert "resuming at layer 4/4" in capsys.readouterr().err
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_options_refuse_the_checkpoint_in_one_line_and_restart_discards_it(model_dir, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_at_layer(m, 2)
        assert main(_args(model_dir, out, "gptq")) != 0
    capsys.readouterr()
    ckpt = tmp_path / ".out.checkpoint"
    other_bits = _args(model_dir, out, "gptq", bits=4)
    assert main(other_bits) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "recipe (format)" in lines[0] \
        and "--restart" in lines[0], lines
    assert ckpt.is_dir() and not out.exists()                   # refused before anything changed

    assert main(other_bits + ["--restart"]) == 0
    assert "resuming" not in capsys.readouterr().err
    assert not ckpt.exists()
    assert json.loads((out / "manifest.json").read_text())["method"]["format"]["bits"] == 4


def test_a_checkpoint_in_use_is_refused(model_dir, tmp_path, capsys):
    from sizewise.checkpoint import Checkpoint

    held = Checkpoint(tmp_path / ".out.checkpoint", {}, LAYERS)
    try:
        assert main(_args(model_dir, tmp_path / "out", "rtn")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another sizewise run is using the checkpoint" in err[0]
    finally:
        held.close()


def test_a_killed_run_resumes_to_the_same_bytes(model_dir, tmp_path, capsys):
    """SIGKILL (no cleanup runs) while layer 2 is solved; the dead run's staging area is removed by
    the next run, its checkpoint is not."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import sizewise

    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert main(_args(model_dir, whole, "gptq")) == 0
    slow = ("import sys, time\nfrom sizewise.quant import methods\nreal = methods.solve\nn = [0]\n"
            "def solve(*a, **k):\n    n[0] += 1\n    if n[0] > 14: time.sleep(60)\n    return real(*a, **k)\n"
            "methods.solve = solve\nfrom sizewise.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(sizewise.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", slow, *_args(model_dir, out, "gptq")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".killed.checkpoint" / "state.json"
    try:
        deadline = time.time() + 120
        while not (state.is_file() and json.loads(state.read_text())["done"] == 2):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob(".killed.partial-*"))          # a dead run's staging area
    assert main(_args(model_dir, out, "gptq")) == 0
    assert "resuming at layer 3/4" in capsys.readouterr().err
    assert (out / "packed.safetensors").read_bytes() == (whole / "packed.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_plan_resumes_its_profiling_pass_to_the_same_plan(model_dir, tmp_path, monkeypatch, capsys):
    from sizewise.allocate import profile

    def plan(out, cache):
        monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / cache))     # profiled each time, not read from a cache
        return main(["plan", str(model_dir / "llama"), "--budget", "3.5bpw", "--method", "rtn", "-o", str(out),
                     "--calib", str(model_dir / "text.txt"), "--calib-samples", "12", "--calib-len", "32",
                     "--fisher-samples", "2", "--measure-samples", "4", "--calib-dtype", "float32", "--quiet"])

    real, calls = profile._solved_all, [0]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(profile, "_solved_all", counted)
    assert plan(tmp_path / "whole.json", "c1") == 0
    per_layer = calls[0] // LAYERS                  # the profile's candidates on one layer's linears (all alike)

    def failing(*a, **k):
        if calls[0] == 2 * per_layer:
            raise Injected("injected at layer 2")
        calls[0] += 1
        return real(*a, **k)
    calls[0] = 0
    monkeypatch.setattr(profile, "_solved_all", failing)
    out = tmp_path / "stopped.json"
    assert plan(out, "c2") != 0 and not out.exists()
    state = json.loads((tmp_path / ".stopped.json.profile.checkpoint" / "state.json").read_text())
    assert state["done"] == 2 and "injected at layer 2" in capsys.readouterr().err
    monkeypatch.setattr(profile, "_solved_all", real)
    assert plan(out, "c3") == 0
    assert "resuming at layer 3/4" in capsys.readouterr().err
    assert out.read_text() == (tmp_path / "whole.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sweep_resumes_its_profiling_pass_to_the_same_points(model_dir, tmp_path, monkeypatch, capsys):
    from sizewise.allocate import profile

    text = model_dir / "text.txt"

    def sweep(out, cache):
        monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / cache))
        return main(["sweep", str(model_dir / "llama"), "--budgets", "3.5", "-o", str(out), "--calib", str(text),
                     "--calib-samples", "8", "--calib-len", "32", "--fisher-samples", "2", "--measure-samples", "2",
                     "--text", str(text), "--ctx", "32", "--windows", "2", "--calib-dtype", "float32", "--quiet"])

    real = profile._solved_all

    def failing(*a, **k):
        failing.calls += 1
        if failing.calls > failing.limit:
            raise Injected("injected in the profile")
        return real(*a, **k)
    failing.calls, failing.limit = 0, 10**9
    monkeypatch.setattr(profile, "_solved_all", failing)
    assert sweep(tmp_path / "whole", "c1") == 0
    failing.limit = 3 * failing.calls // LAYERS        # stop on layer 3's first linear (all layers alike)
    failing.calls = 0
    assert sweep(tmp_path / "stopped", "c2") != 0
    assert json.loads((tmp_path / ".stopped.profile.checkpoint" / "state.json").read_text())["done"] == 3
    capsys.readouterr()
    failing.limit = 10**9
    assert sweep(tmp_path / "stopped", "c3") == 0
    assert "resuming at layer 4/4" in capsys.readouterr().err
    points = [{k: p[k] for k in ("label", "bits_per_weight", "perplexity")}
              for d in ("whole", "stopped") for p in json.loads((tmp_path / d / "sweep.json").read_text())["points"]]
    assert points[:len(points) // 2] == points[len(points) // 2:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
