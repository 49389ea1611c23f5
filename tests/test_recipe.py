"""Recipes: everything a run does, as JSON that round-trips and is checked before any work."""

from __future__ import annotations

import json

import pytest

from sizewise.errors import SizewiseError
from sizewise.plan import Choice, Plan
from sizewise.quant.formats import FloatFormat
from sizewise.quant.kquant import KQuantFormat
from sizewise.quant.uniform import QuantFormat
from sizewise.recipe import CalibConfig, Recipe

RECIPES = [
    Recipe(),
    Recipe(method="awq+gptq", format=QuantFormat(3, 32, symmetric=True, scale_dtype="bfloat16"),
           options={"act_order": False, "damp": 0.05}, skip=("*.down_proj",), float_dtype="bfloat16",
           calib=CalibConfig(text="enwiki-sample", samples=16, length=128, seed=3, dtype="float32")),
    Recipe(method="rotate+gptq", plan=Plan([Choice("a.weight", "gptq", KQuantFormat("Q4_K")),
                                            Choice("b.weight", "float", FloatFormat("float32"))])),
    Recipe(method="rtn,gptq", budget="3.5bpw", fisher_samples=4, measure_samples=0, output="gguf"),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.method)
def test_json_round_trip(recipe):
    back = Recipe.from_dict(json.loads(recipe.to_json()))
    assert back == recipe
    assert back.to_json() == recipe.to_json()


def test_load_from_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(RECIPES[1].to_json())
    assert Recipe.load(p) == RECIPES[1]
    with pytest.raises(SizewiseError):
        Recipe.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SizewiseError):
        Recipe.load(tmp_path / "bad.json")


@pytest.mark.parametrize("bad", [
    {"method": "nope"},
    {"method": "gptq", "options": {"act_ordr": False}},        # a typo is not silently ignored
    {"method": "gptq", "options": {"act_order": "no"}},        # options are typed
    {"method": "gptq", "options": {"block_size": 1.5}},
    {"method": "gptq", "options": {"damp": -1.0}},
    {"float_dtype": "float8"},
    {"output": "onnx"},
    {"budget": "3bpw", "skip": ["*.q_proj"]},
    {"budget": "3bpw", "method": "awq+gptq,rtn"},
    {"method": "awq+gptq", "sequential": False},             # AWQ changes the model: no float statistics
    {"sequential": "yes"},
    {"colour": "blue"},
    {"format": {"kind": "quant", "bits": 9}},
    {"recipe_version": 99},
])
def test_bad_recipes_are_one_line_errors(bad):
    with pytest.raises(SizewiseError) as e:
        Recipe.from_dict({**Recipe().to_dict(), **bad})
    assert "\n" not in str(e.value)


def test_budget_methods_split_transforms_from_quantizers():
    r = Recipe(method="awq+gptq,awq+rtn", budget="3bpw")
    pipeline, quantizers = r.budget_methods()
    assert pipeline == "awq+rtn"
    assert (r.pipeline.awq, r.pipeline.rotate, r.pipeline.quantizer) == (True, False, "rtn")
    assert quantizers == ("gptq", "rtn")


def test_a_manifest_recipe_rebuilds_the_same_artifact(tiny_dirs, tmp_path, capsys):
    """Every run records the recipe that rebuilds it; `compress --recipe` of it gives the same bytes."""
    from safetensors.torch import load_file

    from sizewise.cli import main

    first = tmp_path / "a"
    assert main(["compress", str(tiny_dirs["llama"]), "--method", "gptq", "--bits", "3", "--group-size", "32",
                 "--calib", str(tiny_dirs["text"]), "--calib-samples", "8", "--calib-len", "32", "--no-act-order",
                 "-o", str(first), "--quiet"]) == 0
    recipe = json.loads((first / "manifest.json").read_text())["recipe"]
    assert recipe["method"] == "gptq" and recipe["options"] == {"act_order": False}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    again = tmp_path / "b"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(tmp_path / "r.json"), "-o", str(again),
                 "--quiet"]) == 0
    a, b = load_file(str(first / "packed.safetensors")), load_file(str(again / "packed.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    capsys.readouterr()
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(tmp_path / "r.json"), "--bits", "4",
                 "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --bits" in err


def test_a_budget_is_solved_from_its_profiles_statistics_and_its_recipe_rebuilds_it(tiny_dirs, tmp_path, capsys):
    """`compress --budget` solves its plan from the float statistics the profile observed (no further
    pass), records `sequential: false`, and its recipe, a plan solved the same way, gives the same bytes;
    `--sequential` runs the passes, each layer seeing its compressed predecessors, and gives other weights."""
    from safetensors.torch import load_file

    from sizewise.cli import main

    common = ["--calib", str(tiny_dirs["text"]), "--calib-samples", "8", "--calib-len", "32", "--quiet"]
    first = tmp_path / "a"
    assert main(["compress", str(tiny_dirs["llama"]), "--budget", "3.5bpw", "-o", str(first), *common]) == 0
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["recipe"]["sequential"] is False and manifest["recipe"]["budget"] is None
    assert manifest["calibration"]["statistics"].startswith("saved from one float-model pass")
    assert {c["method"] for c in manifest["plan"]} & {"gptq"}      # a calibrated method was chosen somewhere
    (tmp_path / "r.json").write_text(json.dumps(manifest["recipe"]))
    again = tmp_path / "b"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(tmp_path / "r.json"), "-o", str(again),
                 "--quiet"]) == 0
    assert json.loads((again / "manifest.json").read_text())["calibration"]["statistics"].startswith("one float-model pass")
    a, b = load_file(str(first / "packed.safetensors")), load_file(str(again / "packed.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    seq = tmp_path / "s"
    assert main(["compress", str(tiny_dirs["llama"]), "--budget", "3.5bpw", "--sequential", "-o", str(seq), *common]) == 0
    manifest = json.loads((seq / "manifest.json").read_text())
    assert manifest["recipe"]["sequential"] is True and "statistics" not in manifest["calibration"]
    c = load_file(str(seq / "packed.safetensors"))
    assert c.keys() == a.keys() and not all(a[k].equal(c[k]) for k in a)     # the same plan, solved otherwise


@pytest.mark.parametrize("winner", ["search off", "search on"])
def test_a_budget_measures_gptqs_clip_search_both_ways_and_its_recipe_rebuilds_the_winner(
        tiny_dirs, tmp_path, monkeypatch, capsys, winner):
    """The budget's best plan is measured again with GPTQ's clip search off; the plan keeps the options
    of the lower KL (made to win here), the manifest and recipe record them, and the recipe rebuilds
    the same bytes. With --no-clip-search nothing is measured twice."""
    from safetensors.torch import load_file

    import sizewise.api.budget as B
    from sizewise.cli import main

    real = B.measure_plans

    def measure(*args, options=None, **kwargs):        # the real KLs, the losing side's made worse
        kls = real(*args, options=options, **kwargs)
        off = (options or {}).get("clip_search") is False
        return [kl + 1.0 if off == (winner == "search on") else kl for kl in kls]

    monkeypatch.setattr(B, "measure_plans", measure)
    common = ["--calib", str(tiny_dirs["text"]), "--calib-samples", "8", "--calib-len", "32", "--quiet"]
    first = tmp_path / "a"
    assert main(["compress", str(tiny_dirs["llama"]), "--budget", "3.5bpw", "-o", str(first), *common]) == 0
    assert ("method options chosen by measurement: clip_search=False" in capsys.readouterr().out) \
        == (winner == "search off")
    manifest = json.loads((first / "manifest.json").read_text())
    rows = manifest["allocation"]["measured_plans"]
    variant = [r for r in rows if r.get("options")]
    assert len(variant) == 1 and variant[0]["options"] == {"clip_search": False}
    assert sum(r["chosen"] for r in rows) == 1 and variant[0]["chosen"] == (winner == "search off")
    chosen = {"clip_search": False} if winner == "search off" else {}
    assert manifest["allocation"]["options"] == chosen and manifest["recipe"]["options"] == chosen
    assert manifest["method"]["effective_options"]["gptq"]["clip_search"] is (winner == "search on")
    (tmp_path / "r.json").write_text(json.dumps(manifest["recipe"]))
    again = tmp_path / "b"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(tmp_path / "r.json"), "-o", str(again),
                 "--quiet"]) == 0
    a, b = load_file(str(first / "packed.safetensors")), load_file(str(again / "packed.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # solved with the other option: other bytes (the winner's weights were the ones written)
    other = tmp_path / "c"
    flag = ["--no-clip-search"] if winner == "search on" else []
    recipe = {**manifest["recipe"], "options": {"clip_search": False} if flag else {"clip_search": True}}
    (tmp_path / "o.json").write_text(json.dumps(recipe))
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(tmp_path / "o.json"), "-o", str(other),
                 "--quiet"]) == 0
    c = load_file(str(other / "packed.safetensors"))
    assert not all(a[k].equal(c[k]) for k in a)

    # `plan -o` writes the options with the plan, and `compress --plan` applies them
    assert main(["plan", str(tiny_dirs["llama"]), "--budget", "3.5bpw", "-o", str(tmp_path / "p.json"), *common]) == 0
    assert json.loads((tmp_path / "p.json").read_text()).get("options", {}) == chosen
    assert main(["compress", str(tiny_dirs["llama"]), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "e"),
                 *common]) == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["recipe"]["options"] == chosen

    given = tmp_path / "d"
    assert main(["compress", str(tiny_dirs["llama"]), "--budget", "3.5bpw", "--no-clip-search", "-o", str(given),
                 *common]) == 0
    manifest = json.loads((given / "manifest.json").read_text())
    assert not any(r.get("options") for r in manifest["allocation"]["measured_plans"])
    assert manifest["recipe"]["options"] == {"clip_search": False} and manifest["allocation"]["options"] == {}


def test_a_plan_carries_the_options_it_was_measured_with():
    plan = Plan([Choice("a.weight", "gptq", QuantFormat(4, 64))], {"clip_search": False})
    assert Plan.from_json(plan.to_json()) == plan
    assert "options" not in json.loads(Plan(plan.choices).to_json())
    for bad in ({"clip_search": "no"}, {"nonsense": 1}):
        with pytest.raises(SizewiseError, match="option"):
            Plan.from_json(json.dumps({"plan_version": 1, "choices": [], "options": bad}))
