"""`sizewise plan` and `sizewise compress --budget` on a tiny model; one-line errors for bad budgets."""

import json

from sizewise.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_then_compress_with_the_plan(tiny_dirs, tmp_path, capsys):
    model, plan = tiny_dirs["llama"], tmp_path / "plan.json"
    calib = ["--calib", tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32, "--quiet"]
    code, out, err = run(capsys, "plan", model, "--budget", "3.25bpw", "-o", plan, *calib[:-1])   # not --quiet
    assert code == 0, err
    assert "pred. KL" in out and "q_proj" in out and "budget 3.25 bits/weight" in out
    # no --method, calibration text given: the calibrated quantizer is a candidate, and the output says so
    assert "choosing among rtn, gptq per layer (calibration text given)" in err
    assert {c["method"] for c in json.loads(plan.read_text())["choices"]} <= {"rtn", "gptq", "float"}
    code, out, err = run(capsys, "compress", model, "--plan", plan, "-o", tmp_path / "a", "--quiet")
    assert code == 0, err
    totals = json.loads((tmp_path / "a" / "manifest.json").read_text())["totals"]
    assert totals["linear_stored_bits"] <= 3.25 * totals["linear_params"]


def test_compress_to_a_file_size(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "b"
    code, stdout, err = run(capsys, "compress", tiny_dirs["gpt2"], "--budget", "150kB", "-o", out, "--calib",
                            tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32)
    assert code == 0, err
    assert "allocated for 150kB" in stdout
    assert "choosing among rtn, gptq" in err
    assert (out / "packed.safetensors").stat().st_size <= 150_000


def test_unreachable_budget_is_one_line(tiny_dirs, tmp_path, capsys):
    code, out, err = run(capsys, "plan", tiny_dirs["llama"], "--budget", "1bpw", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "reachable: 2.25 to 16.00 bits/weight" in err
    code, out, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", "3bpw", "--plan", "x.json",
                         "-o", tmp_path / "c")
    assert code == 2 and "drop --plan" in err


def test_budget_with_awq_applies_the_plan_through_awq(tiny_dirs, tmp_path, capsys):
    """The allocator chooses among the quantizers; AWQ then searches scales for each chosen format."""
    out = tmp_path / "awq"
    calib = ["--calib", tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32, "--quiet"]
    code, stdout, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", "3.5bpw", "--method", "awq+gptq,awq+rtn",
                            "-o", out, *calib)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["transforms"]["awq"], "AWQ scales were not searched"
    assert {c["method"] for c in m["plan"]} <= {"gptq", "rtn", "float"}
    assert m["totals"]["linear_stored_bits"] <= 3.5 * m["totals"]["linear_params"]
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", "3.5bpw", "--method", "awq+gptq,rtn",
                       "-o", tmp_path / "mixed", *calib)
    assert code == 2 and err.count("\n") == 1 and "same transforms" in err


def test_a_rotated_budget_profiles_the_rotated_model_and_its_recipe_rebuilds_it(tiny_dirs, tmp_path, capsys):
    """rotate+ with a budget: the model is rotated once, before profiling; the plan is solved from the rotated
    model's statistics and the recipe (rotate+rtn with that plan, float statistics) rebuilds the same bytes.
    The artifact is the rotated model: it loads and matches the source's logits at a fine grid."""
    import torch
    from safetensors.torch import load_file

    from sizewise.sources import load

    calib = ["--calib", tiny_dirs["text"], "--calib-samples", 8, "--calib-len", 32, "--quiet"]
    out = tmp_path / "rot"
    code, stdout, err = run(capsys, "compress", tiny_dirs["llama"], "--budget", "7.5bpw", "--method",
                            "rotate+gptq,rotate+rtn", "-o", out, *calib)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["transforms"]["rotate"]["rotation"] == "randomized-hadamard"
    assert {c["method"] for c in m["plan"]} <= {"gptq", "rtn", "float"}
    assert m["totals"]["linear_stored_bits"] <= 7.5 * m["totals"]["linear_params"]
    recipe = m["recipe"]
    assert recipe["method"] == "rotate+rtn" and recipe["sequential"] is False
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--recipe", tmp_path / "r.json", "-o", tmp_path / "again",
                       "--quiet")
    assert code == 0, err
    a, b = load_file(str(out / "packed.safetensors")), load_file(str(tmp_path / "again" / "packed.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # the rotated, quantized model computes what the source does (7.5 bits: close, not equal)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    got = load(out).model.float().eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, q = ref(ids).logits.log_softmax(-1), got(ids).logits.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 0.05
    # a plan alone would lose the rotation it was made for: `plan` and `sweep` say so in one line
    code, _, err = run(capsys, "plan", tiny_dirs["llama"], "--budget", "4bpw", "--method", "rotate+gptq",
                       "-o", tmp_path / "p.json", *calib)
    assert code == 2 and err.count("\n") == 1 and "compress --budget" in err
    code, _, err = run(capsys, "sweep", tiny_dirs["llama"], "--budgets", "4", "--method", "rotate+gptq",
                       "-o", tmp_path / "s", *calib)
    assert code == 2 and err.count("\n") == 1 and "compress --budget" in err


def test_budget_without_calibration_text_chooses_data_free_methods(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "plan", tiny_dirs["llama"], "--budget", "4bpw", "-o", tmp_path / "p.json",
                       "--calib-samples", 4, "--calib-len", 16)
    assert code == 0, err
    assert "choosing among rtn per layer (no --calib text: data-free" in err
    assert {c["method"] for c in json.loads((tmp_path / "p.json").read_text())["choices"]} <= {"rtn", "float"}

