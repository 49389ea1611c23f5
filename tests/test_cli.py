"""The command line end to end on tiny models, and one-line errors for bad input."""

import json

import pytest

from sizewise.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_info_eval_end_to_end(tiny_dirs, tmp_path, capsys):
    model, text, out = tiny_dirs["llama"], tiny_dirs["text"], tmp_path / "w4"
    code, stdout, err = run(capsys, "compress", model, "--bits", 4, "--group-size", 32, "-o", out, "--quiet")
    assert code == 0 and "bits/weight" in stdout, err
    code, stdout, _ = run(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    assert info["file_bytes"] == (out / "packed.safetensors").stat().st_size
    assert len([r for r in info["layers"] if r["linear"]]) == 14
    code, stdout, _ = run(capsys, "eval", out, "--text", text, "--ctx", 64, "--windows", 5,
                          "--against", model, "--json", "--quiet")
    res = json.loads(stdout)
    assert code == 0
    assert res["tokens"] == 5 * 63 and res["protocol"]["windows"] == 5
    assert res["kl"] > 0 and 0 < res["top1_agreement"] <= 1
    assert res["protocol"]["sha256"] and res["protocol"]["torch"]
    # The reference evaluated against itself: zero divergence, identical perplexity.
    code, stdout, _ = run(capsys, "eval", model, "--text", text, "--ctx", 64, "--windows", 5,
                          "--against", model, "--json", "--quiet")
    same = json.loads(stdout)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(res["reference_perplexity"])


def test_eval_writes_full_result_with_per_window_values(tiny_dirs, tmp_path, capsys):
    dest = tmp_path / "r" / "eval.json"
    code, stdout, _ = run(capsys, "eval", tiny_dirs["gpt2"], "--text", tiny_dirs["text"], "--ctx", 32,
                          "--windows", 3, "-o", dest, "--quiet")
    assert code == 0 and "perplexity" in stdout
    assert len(json.loads(dest.read_text())["per_window"]) == 3


def test_help_is_available(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "compress" in out and "eval" in out and "info" in out
    code, out, _ = run(capsys, "compress", "--help")
    assert code == 0 and "--calib-samples" in out


@pytest.mark.parametrize("args, message", [
    (["compress", "{missing}", "-o", "{out}"], "no model at"),
    (["compress", "{llama}", "-o", "{out}", "--bits", "9"], "bits must be between 2 and 8"),
    (["compress", "{llama}", "-o", "{out}", "--bits", "1"], "bits must be between 2 and 8"),
    (["compress", "{llama}", "-o", "{out}", "--group-size", "48"], "group size 48 does not divide the input dimension 64"),
    (["compress", "{llama}", "-o", "{out}", "--group-size", "abc"], "expected a positive integer or 'channel'"),
    (["compress", "{llama}", "-o", "{out}", "--method", "magic"], "unknown method 'magic'"),
    (["compress", "{llama}", "-o", "{full}"], "already exists and is not empty"),
    (["compress", "{text}", "-o", "{out}"], "neither a Hugging Face model directory"),
    (["compress", "{corrupt}", "-o", "{out}"], "cannot load a causal LM"),
    (["compress", "{pickled}", "-o", "{out}"], "only pickled PyTorch weights"),
    (["compress", "{llama}", "-o", "{out}", "--plan", "{text}"], "not a sizewise plan"),
    (["eval", "{llama}", "--text", "{short}", "--ctx", "1024"], "shorter than one window of 1024"),
    (["eval", "{llama}", "--text", "{missing}"], "no text file"),
    (["info", "{text}"], "is not a model"),
    (["info", "{missing}"], "no model at"),
    (["info", "{corrupt}"], "not readable JSON"),
    (["compress", "{llama}"], "Missing option '-o'"),
    (["frobnicate"], "No such command"),
])
def test_bad_input_gets_one_line_error_and_nonzero_exit(args, message, tiny_dirs, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"x")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    names = {"missing": tmp_path / "nope", "out": tmp_path / "out", "llama": tiny_dirs["llama"], "text": tiny_dirs["text"],
             "full": full, "short": short, "corrupt": corrupt, "pickled": pickled}
    code, out, err = run(capsys, *[a.format(**names) for a in args])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_gptq_without_calibration_text_uses_cached_self_generated_samples(tiny_dirs, tmp_path, capsys):
    from sizewise import builtins

    args = ["compress", tiny_dirs["llama"], "--method", "gptq", "--bits", 3, "--group-size", 32,
            "--calib-samples", 4, "--calib-len", 16, "--quiet"]
    code, _, err = run(capsys, *args, "-o", tmp_path / "a")
    assert code == 0, err
    cached = list((builtins.cache_dir() / "selfcalib").glob("*-n4-L16-s0.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    code, _, err = run(capsys, *args, "-o", tmp_path / "b")
    assert code == 0 and cached[0].stat().st_mtime_ns == stamp      # reused, not regenerated
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["calibration"]["text"] is None and "self-generated" in m["calibration"]["source"]
    assert all(e["method"] == "gptq" for e in m["tensors"].values() if e["linear"])


def test_gptq_with_calibration_file_records_protocol(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "g"
    code, _, err = run(capsys, "compress", tiny_dirs["opt"], "--method", "gptq", "--bits", 4, "--group-size", "channel",
                       "--calib", tiny_dirs["text"], "--calib-samples", 6, "--calib-len", 32, "--seed", 5,
                       "--offload", tmp_path / "acts", "-o", out, "--quiet")
    assert code == 0, err
    cal = json.loads((out / "manifest.json").read_text())["calibration"]
    assert cal["samples"] == 6 and cal["length"] == 32 and cal["seed"] == 5 and len(cal["sha256"]) == 64


@pytest.mark.parametrize("method", ["awq", "awq+gptq", "rotate+gptq", "rotate+awq+rtn-mse"])
def test_method_pipelines_end_to_end(method, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "p"
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--method", method, "--bits", 4, "--group-size", 32,
                       "--calib", tiny_dirs["text"], "--calib-samples", 4, "--calib-len", 32, "-o", out, "--quiet")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"]["name"] == method
    assert ("rotate" in m["transforms"]) == method.startswith("rotate")
    assert ("awq" in m["transforms"]) == ("awq" in method)
    code, stdout, _ = run(capsys, "eval", out, "--text", tiny_dirs["text"], "--ctx", 64, "--windows", 3,
                          "--against", tiny_dirs["llama"], "--json", "--quiet")
    assert code == 0 and json.loads(stdout)["top1_agreement"] > 0.5


def test_compare_writes_report_with_plot(tiny_dirs, tmp_path, capsys):
    arts = []
    for bits in (4, 2):
        out = tmp_path / f"w{bits}"
        assert run(capsys, "compress", tiny_dirs["llama"], "--bits", bits, "--group-size", 32, "-o", out, "--quiet")[0] == 0
        arts.append(out)
    code, stdout, err = run(capsys, "compare", tiny_dirs["llama"], *arts, "--text", tiny_dirs["text"], "--ctx", 64,
                            "--windows", 4, "-o", tmp_path / "rep", "--quiet")
    assert code == 0, err
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert set(results["candidates"]) == {"w4", "w2"}
    assert results["candidates"]["w2"]["kl"] > results["candidates"]["w4"]["kl"] > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "int4 g32 asym" in md and "ppl_vs_bits.png" in md
    assert (tmp_path / "rep" / "ppl_vs_bits.png").read_bytes()[:4] == b"\x89PNG"


def test_auto_calibration_dtype_is_resolved_and_recorded(tiny_dirs, tmp_path):
    from pathlib import Path

    import sizewise
    from sizewise.api import auto_calib_dtype

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expect = "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"
    assert auto_calib_dtype("cpu") == expect
    calib = sizewise.CalibConfig(text=str(tiny_dirs["text"]), samples=4, length=16, dtype="auto")
    res = sizewise.compress(tiny_dirs["llama"], sizewise.CompressConfig(method="gptq", calib=calib), tmp_path / "a",
                            progress=False)
    assert res.manifest["calibration"]["dtype"] == expect
