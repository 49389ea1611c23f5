"""`sizewise sweep` on a tiny model: one profile for many budgets, every point within its budget,
one evaluation, an atomic output directory, and one-line errors before any work."""

import json

import pytest

from sizewise import allocate
from sizewise.api import budget as api_budget
from sizewise.cli import main
from sizewise.sweep import parse_budgets, parse_uniform, read_peers


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def calls(monkeypatch, module, name):
    """Count calls of module.name, still calling it."""
    seen = []
    real = getattr(module, name)

    def counted(*a, **k):
        seen.append(1)
        return real(*a, **k)
    monkeypatch.setattr(module, name, counted)
    return seen


@pytest.fixture
def args(tiny_dirs):
    text = tiny_dirs["text"]
    return ["--calib", text, "--calib-samples", 8, "--calib-len", 32, "--text", text, "--ctx", 32, "--windows", 3,
            "--quiet"]


def test_sweep_end_to_end(tiny_dirs, tmp_path, capsys, monkeypatch, args):
    monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / "cache"))      # a cold cache: the profile must be computed
    profiles = calls(monkeypatch, api_budget, "profile_model")
    cached = calls(monkeypatch, api_budget, "cached_profile")
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps([{"label": "other Q4", "bits_per_weight": 4.5, "perplexity": 400.0}]))
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "2.75,3.5bpw,5", "-o", out,
                            "--method", "rtn,gptq", "--uniform", "rtn:4:32", "--uniform", "gptq:3:channel",
                            "--peer", peers, *args)
    assert code == 0, err
    assert len(profiles) == 1 and len(cached) == 1
    for name in ("report.md", "sweep.json", "ppl_vs_bits.png", "bits_per_layer.png"):
        assert (out / name).stat().st_size > 0, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []      # nothing staged is left
    res = json.loads((out / "sweep.json").read_text())
    alloc = [p for p in res["points"] if p["kind"] == "allocated"]
    uniform = {p["label"]: p for p in res["points"] if p["kind"] == "uniform"}
    assert [p["budget"] for p in alloc] == ["2.75bpw", "3.5bpw", "5bpw"]
    assert set(uniform) == {"uniform-rtn-w4g32", "uniform-gptq-w3ch"}
    for p in alloc:
        assert p["bits_per_weight"] <= p["budget_value"]
        assert p["linear_stored_bits"] <= p["budget_value"] * res["linear_params"]
        manifest = json.loads((out / p["dir"] / "manifest.json").read_text())
        assert manifest["totals"]["linear_stored_bits"] == p["linear_stored_bits"]
        assert manifest["allocation"]["budget"] == p["budget"]
        assert len(p["bits"]) == len(res["linears"]) == 14 and set(p["bits"]) <= {2, 3, 4, 5, 6, 8, 16}
    assert alloc[0]["bits_per_weight"] < alloc[1]["bits_per_weight"] < alloc[2]["bits_per_weight"]
    for p in alloc:      # each plan chosen as `compress --budget` chooses it: least measured KL among variants
        rows = p["measured_plans"]
        assert rows and sum(r["chosen"] for r in rows) == 1
        assert next(r for r in rows if r["chosen"])["measured_kl"] == min(r["measured_kl"] for r in rows)
        manifest = json.loads((out / p["dir"] / "manifest.json").read_text())
        assert "saved from one float-model pass" in manifest["calibration"]["statistics"]    # no passes per budget
    assert uniform["uniform-rtn-w4g32"]["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    # GPTQ is not solved in groups of 32 beside RTN, so RTN's own grid is profiled there and predicted
    assert uniform["uniform-rtn-w4g32"]["predicted_kl"] > 0
    assert uniform["uniform-gptq-w3ch"]["predicted_kl"] > 0          # a profiled candidate: predicted too
    for p in res["points"]:
        assert p["perplexity"] > 1 and p["kl"] >= 0 and 0 <= p["top1_agreement"] <= 1
        assert p["file_bytes"] == (out / p["dir"] / "packed.safetensors").stat().st_size
        assert p["compress_s"] == res["timing"]["compress_s"][p["dir"]] > 0
    assert res["timing"]["profile_s"] > 0 and res["timing"]["eval_s"] > 0
    assert res["profile"]["calibration"]["samples"] == 8 and res["evaluation"]["windows"] == 3
    assert res["peers"][0]["label"] == "other Q4"
    report = (out / "report.md").read_text()
    assert "| b3.5bpw | 3.5bpw |" in report and "other Q4 (peer)" in report and "bits_per_layer.png" in report
    assert "| b2.75bpw | 2.75bpw |" in stdout and "report:" in stdout

    # the output exists now: refused without --force, replaced with it (the profile then comes from the cache)
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "3", "-o", out, *args)
    assert code == 2 and err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert (out / "b5bpw").is_dir()
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "3", "-o", out, "--force",
                       "--method", "rtn,gptq", *args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["b3bpw"]
    assert len(profiles) == 1


@pytest.mark.parametrize("budgets, message", [
    ("3,1.5,4", "budget 1.5bpw is below the smallest reachable bits per weight"),
    ("3,20bpw", "budget 20bpw is above the largest reachable"),
    ("3,3bpw", "budget 3bpw is listed twice"),
    ("3,x", "budget 'x' is not understood"),
])
def test_bad_budget_fails_before_profiling(tiny_dirs, tmp_path, capsys, monkeypatch, args, budgets, message):
    profiles = calls(monkeypatch, api_budget, "cached_profile")      # a cache hit is profiling too late as well
    out = tmp_path / "sweep"
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", budgets, "-o", out, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "1.5" not in budgets or "reachable: 2.25 to 16.00 bits/weight" in err
    assert not profiles
    assert list(tmp_path.iterdir()) == []                  # no output directory, no temporary one


def test_bad_uniform_and_peer_fail_early(tiny_dirs, tmp_path, capsys, monkeypatch, args):
    profiles = calls(monkeypatch, api_budget, "cached_profile")
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "3", "-o", tmp_path / "a",
                       "--uniform", "rtn:4:48", *args)            # 48 does not divide the 64-wide inputs
    assert code == 2 and err.count("\n") == 1
    bad = tmp_path / "peers.json"
    bad.write_text(json.dumps([{"label": "x", "bits_per_weight": 4}]))
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "3", "-o", tmp_path / "b", "--peer", bad, *args)
    assert code == 2 and err.count("\n") == 1 and "perplexity" in err
    assert not profiles and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_parsers():
    assert [b.text for b in parse_budgets("2.5, 3,3.5bpw,70MB")] == ["2.5bpw", "3bpw", "3.5bpw", "70MB"]
    method, fmt = parse_uniform("gptq:3:channel")
    assert method == "gptq" and fmt.bits == 3 and fmt.group_size is None and not fmt.symmetric
    for bad in ("rtn:4", "nope:4:64", "rtn:four:64"):
        with pytest.raises(Exception, match="uniform point|unknown method"):
            parse_uniform(bad)
    assert read_peers([{"label": "a", "bits_per_weight": 3, "perplexity": 30}])[0]["source"] == "a peer point"


def test_failure_leaves_no_output(tiny_dirs, tmp_path, capsys, monkeypatch, args):
    """A sweep that fails late (here: in evaluation) leaves neither OUT nor its temporary directory."""
    from sizewise.api import evaluation
    from sizewise.errors import SizewiseError

    def broken(*a, **k):
        raise SizewiseError("evaluation failed")
    monkeypatch.setattr(evaluation, "compare", broken)
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "3", "-o", tmp_path / "sweep", *args)
    assert code == 2 and "evaluation failed" in err
    assert list(tmp_path.iterdir()) == []


def _gguf_range(model_dir) -> tuple[int, int]:
    """The tiny model's reachable GGUF file sizes (rtn and gptq over llama.cpp's types)."""
    from sizewise import api
    from sizewise.arch import discover

    src = api._source(model_dir)
    sizes = allocate.size_table(src.model, discover(src.model), allocate.gguf_candidate_set(("rtn", "gptq")),
                                "float16", api_budget.file_layout("gguf", src))
    return sizes.reachable_bytes()


def test_sweep_gguf_writes_one_gguf_per_point_within_budget(tiny_dirs, tmp_path, capsys, monkeypatch, args):
    import gguf

    profiles = calls(monkeypatch, api_budget, "cached_profile")
    lo, hi = _gguf_range(tiny_dirs["llama"])
    small, large = int(lo + 0.4 * (hi - lo)), int(lo + 0.75 * (hi - lo))
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", tiny_dirs["llama"], "--format", "gguf", "--budgets",
                            f"{small}B,{large}B,6bpw", "-o", out, "--method", "rtn,gptq", "--uniform", "rtn:Q8_0", *args)
    assert code == 0, err
    assert len(profiles) == 1
    res = json.loads((out / "sweep.json").read_text())
    assert res["format"] == "gguf"
    report = (out / "report.md").read_text()
    assert "| GGUF file | GGUF bytes |" in report
    for p in res["points"]:
        path = out / p["gguf"]
        assert p["gguf"] == f"{p['dir']}.gguf" and path.stat().st_size == p["gguf_bytes"]
        reader = gguf.GGUFReader(path)
        types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
        assert len(types) == 2 + 9 * 2 and "output.weight" not in types        # tied: no output tensor
        assert f"| {p['gguf']} | {p['gguf_bytes']:,} |" in report
        if p["kind"] == "uniform":
            assert {v for k, v in types.items() if k.startswith("blk.") and "norm" not in k} == {"Q8_0"}
        elif p["budget_kind"] == "bytes":
            assert p["gguf_bytes"] <= p["budget_value"]                   # the .gguf file is within the budget
        else:
            assert p["bits_per_weight"] <= 6
    sized = {p["budget"]: p["gguf_bytes"] for p in res["points"] if p.get("budget_kind") == "bytes"}
    assert sized[f"{small}B"] < sized[f"{large}B"]


def test_sweep_gguf_refuses_what_gguf_cannot_hold_before_work(tiny_dirs, tmp_path, capsys, monkeypatch, args):
    profiles = calls(monkeypatch, api_budget, "cached_profile")
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--format", "gguf", "--budgets", "5", "-o", tmp_path / "a",
                       "--uniform", "rtn:4:32", *args)                # integer zero points: no ggml type
    assert code == 2 and err.count("\n") == 1 and "no exact GGUF type" in err and "rtn:Q4_0" in err, err
    lo, hi = _gguf_range(tiny_dirs["llama"])
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--format", "gguf", "--budgets", f"5,{lo - 1}B",
                       "-o", tmp_path / "b", "--method", "rtn,gptq", *args)
    assert code == 2 and err.count("\n") == 1 and "below the smallest reachable GGUF file size" in err, err
    assert f"({lo:,} to {hi:,} bytes)" in err
    assert not profiles and list(tmp_path.iterdir()) == []


def test_parse_uniform_ggml_types():
    from sizewise.quant.kquant import KQuantFormat
    from sizewise.sweep import uniform_dir

    method, fmt = parse_uniform("gptq:Q4_K")
    assert method == "gptq" and fmt == KQuantFormat("Q4_K") and uniform_dir(method, fmt) == "uniform-gptq-Q4_K"
    method, fmt = parse_uniform("rtn:q4_0")
    assert fmt.symmetric and fmt.group_size == 32 and uniform_dir(method, fmt) == "uniform-rtn-Q4_0"
    assert uniform_dir(*parse_uniform("rtn:4:32")) == "uniform-rtn-w4g32"
