"""Decoder layers kept on disk (`sizewise.lazy`): at most one is read at a time, and every result is
the eagerly loaded model's, bit for bit."""

import json

import pytest
import torch

import sizewise.allocate as A
from safetensors.torch import load_file, save_file

import sizewise
from sizewise import artifact, engine, lazy, sources
from sizewise.api import CompressConfig
from sizewise.arch import discover
from sizewise.cli import main
from sizewise.errors import SizewiseError
from sizewise.quant.uniform import QuantFormat
from sizewise.recipe import CalibConfig
from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen2"])      # tied head; untied head and biases
def sharded(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("lazy") / request.param
    tiny_model(request.param, 3).to(torch.bfloat16).save_pretrained(d, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > 3
    return d


def _load(d, monkeypatch, on_disk: bool):
    monkeypatch.setenv(lazy.ENV, "1" if on_disk else "0")
    return sources.load(d)


def _resident_layers(layers) -> list[int]:
    return [i for i, layer in enumerate(layers) if not any(p.is_meta for p in layer.parameters())]


def _watch(layers):
    """Per linear forward: (layer running, layers whose weights are in memory then)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *a, i=i: seen.append((i, _resident_layers(layers))))
             for i, layer in enumerate(layers) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


def test_forward_and_eval_read_one_layer_at_a_time_and_equal_the_eager_model(sharded, monkeypatch, tmp_path):
    src, eager = _load(sharded, monkeypatch, True), _load(sharded, monkeypatch, False)
    layers = discover(src.model).layers
    assert lazy.is_lazy(src.model) and not lazy.is_lazy(eager.model)
    assert _resident_layers(layers) == [] and src.info["parameters"] == eager.info["parameters"]
    seen, hooks = _watch(layers)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(src.model(x).logits, eager.model(x).logits)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 4)
    got = sizewise.evaluate(src, text, ctx=32, windows=3, progress=False)
    want = sizewise.evaluate(eager, text, ctx=32, windows=3, progress=False)
    for h in hooks:
        h.remove()
    assert got["perplexity"] == want["perplexity"] and got["per_window"] == want["per_window"]
    assert seen and {i for i, _ in seen} == set(range(len(layers)))
    assert all(resident == [i] for i, resident in seen)             # only the running layer
    assert _resident_layers(layers) == [] and lazy.is_lazy(src.model)


def test_statistics_leave_every_layer_on_disk(sharded, monkeypatch):
    src = _load(sharded, monkeypatch, True)
    arch = discover(src.model)
    samples = torch.randint(0, 300, (4, 16))
    stats, _ = engine.statistics(src.model, arch, samples, batch=2, progress=False)
    eager = _load(sharded, monkeypatch, False)
    want, _ = engine.statistics(eager.model, discover(eager.model), samples, batch=2, progress=False)
    assert stats.keys() == want.keys() and all(torch.equal(stats[k].xtx, want[k].xtx) for k in want)
    assert _resident_layers(arch.layers) == []     # unchanged weights go back to disk


def _config(tmp_path, method: str) -> CompressConfig:
    """4-bit g32 with `method`, calibrated on a few short samples of the tiny text."""
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    return CompressConfig(method, QuantFormat(4, 32), calib=CalibConfig(str(text), samples=4, length=32, dtype="float32"))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
def test_compress_is_bit_identical_and_solved_layers_stay(sharded, monkeypatch, tmp_path, method):
    cfg = _config(tmp_path, method)
    src = _load(sharded, monkeypatch, True)
    layers = discover(src.model).layers
    seen, hooks = _watch(layers)
    res = sizewise.compress(src, cfg, tmp_path / "lazy", progress=False)
    for h in hooks:
        h.remove()
    sizewise.compress(_load(sharded, monkeypatch, False), cfg, tmp_path / "eager", progress=False)
    a, b = (load_file(str(tmp_path / d / artifact.PACKED)) for d in ("lazy", "eager"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method != "rtn":                     # calibration passes: no layer ahead of the running one is read
        assert seen and all(max(resident, default=-1) <= i for i, resident in seen)
    assert _resident_layers(layers) == list(range(len(layers)))      # solved weights kept, not re-read
    assert not lazy.is_lazy(res.model)


def _rewrite_shard(d, key, change):
    """Apply `change(tensors)` to the shard holding `key`, and its index entry."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][key]
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("fault", ["missing", "shape", "dtype"])
def test_a_checkpoint_that_does_not_match_its_config_is_one_error_line(sharded, tmp_path, monkeypatch, capsys, fault):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    key = "model.layers.1.mlp.up_proj.weight"
    changes = {"missing": lambda t: t.pop(key),
               "shape": lambda t: t.__setitem__(key, t[key][:-1].clone()),
               "dtype": lambda t: t.__setitem__(key, t[key].to(torch.int8))}
    _rewrite_shard(d, key, changes[fault])
    monkeypatch.setenv(lazy.ENV, "1")
    with pytest.raises(SizewiseError) as e:
        sources.load(d)
    assert "\n" not in str(e.value) and key in str(e.value)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    assert main(["eval", str(d), "--text", str(text), "--ctx", "16", "--windows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and key in err[-1] and not any("Traceback" in line for line in err)


def test_peak_estimate_counts_one_layer_from_disk_for_eval(sharded, monkeypatch):
    from sizewise.memory import peak_memory

    src, eager = _load(sharded, monkeypatch, True), _load(sharded, monkeypatch, False)
    layers = discover(eager.model).layers
    layer_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    got, want = peak_memory(src.model, task="eval", ctx=64), peak_memory(eager.model, task="eval", ctx=64)
    assert want.total - got.total == (len(layers) - 1) * layer_bytes
    assert got.parts["layer read from disk"] == layer_bytes
    # compressing keeps the solved layers: the same peak as the eager model's, plus one layer read
    got, want = peak_memory(src.model, task="compress"), peak_memory(eager.model, task="compress")
    assert got.total - want.total == layer_bytes


@pytest.mark.parametrize("family", list(__import__("tiny").CONFIGS))
def test_every_family_loads_lazily_with_the_eager_logits(tiny_dirs, monkeypatch, family):
    src, eager = _load(tiny_dirs[family], monkeypatch, True), _load(tiny_dirs[family], monkeypatch, False)
    layers = discover(src.model).layers
    assert lazy.is_lazy(src.model) and _resident_layers(layers) == []
    x = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(src.model(x, use_cache=False).logits, eager.model(x, use_cache=False).logits)
    assert _resident_layers(layers) == []


def test_a_layer_the_plan_leaves_float_is_read_again_for_the_artifact(sharded, monkeypatch, tmp_path):
    cfg = CompressConfig("rtn", QuantFormat(4, 32), skip=("*.layers.1.*",), float_dtype="bfloat16")
    src = _load(sharded, monkeypatch, True)
    sizewise.compress(src, cfg, tmp_path / "lazy", progress=False)
    sizewise.compress(_load(sharded, monkeypatch, False), cfg, tmp_path / "eager", progress=False)
    a, b = (artifact.load_weights(tmp_path / d) for d in ("lazy", "eager"))
    assert a.keys() == b.keys() and any(".layers.1." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _linears_in_memory(layers) -> list[int]:
    """Per layer, how many of its linear weights are real tensors (not meta)."""
    return [sum(not m.weight.is_meta for m in layer.modules() if isinstance(m, torch.nn.Linear)) for layer in layers]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_written_layers_leave_the_model_when_it_is_not_kept(sharded, monkeypatch, tmp_path, method):
    """keep_model=False (what the CLI asks): a layer's linears leave memory once written, so a model read
    from disk layer by layer never accumulates; the artifact is the same bytes, Result.model is None."""
    cfg = _config(tmp_path, method)
    src = _load(sharded, monkeypatch, True)
    layers = discover(src.model).layers
    counts = []
    put = artifact.ArtifactWriter.put
    monkeypatch.setattr(artifact.ArtifactWriter, "put",
                        lambda self, name, qt: (counts.append(_linears_in_memory(layers)), put(self, name, qt))[1])
    res = sizewise.compress(src, cfg, tmp_path / "dropped", progress=False, keep_model=False)
    monkeypatch.undo()
    assert res.model is None
    # a tiny decoder layer has 7 linears: never more than one layer's in memory (the one being written)
    assert counts and max(sum(c) for c in counts) <= 7
    assert _linears_in_memory(layers) == [0] * len(layers)
    sizewise.compress(_load(sharded, monkeypatch, False), cfg, tmp_path / "kept", progress=False)
    a, b = (load_file(str(tmp_path / d / artifact.PACKED)) for d in ("dropped", "kept"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "dropped" / artifact.MANIFEST).read_text())["totals"] == \
        json.loads((tmp_path / "kept" / artifact.MANIFEST).read_text())["totals"]


def test_each_parameter_reads_every_layer_once_and_holds_none_after(sharded, monkeypatch):
    """`named_parameters()`'s memo would keep every layer read (an 8B model whole); its lazy walk would
    read a layer once per module. `each_parameter` gives the same names, reading each layer once."""
    src = _load(sharded, monkeypatch, True)
    layers = discover(src.model).layers
    reads, held_then, read = [], [], lazy._materialize
    monkeypatch.setattr(lazy, "_materialize", lambda rec: (reads.append(rec.module), read(rec)))
    names = []
    for name, p in lazy.each_parameter(src.model):
        assert not p.is_meta
        names.append(name)
        held_then.append(len(_resident_layers(layers)))
    assert names == [n for n, _ in src.model.named_parameters()]       # (ties once, as there)
    assert [list(layers).index(m) for m in reads] == list(range(len(layers)))
    assert max(held_then) == 1 and _resident_layers(layers) == []


def _mapped_anonymous_kb(directory) -> int:
    """Written (copy-on-write) pages this process still maps from `directory`'s files (Linux)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:   # a mapping's first line
                inside = len(head) > 5 and head[5].startswith(str(directory))
            elif inside and head[0] == "Anonymous:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps")
def test_a_kept_norm_does_not_pin_its_layers_written_weights(tmp_path, monkeypatch):
    """A tensor read with `safe_open` holds its file's whole mapping, written pages included: the
    norms a solved layer keeps must not keep its dropped weights' memory mapped."""
    d = tmp_path / "m"
    import transformers as tf
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=320, max_position_embeddings=64)
    tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    src = _load(d, monkeypatch, True)
    arch = discover(src.model)
    for i, layer in enumerate(arch.layers):
        with lazy.held(layer):
            for ref in arch.linears[i]:
                ref.set_weight(ref.weight() * 0.5)       # in place: copy-on-write pages of the mapping
            assert _mapped_anonymous_kb(d) > 0           # (the measure sees them)
            for ref in arch.linears[i]:
                lazy.drop_weight(ref.module)
        assert not any(p.is_meta for n, p in layer.named_parameters() if "norm" in n)
    assert _mapped_anonymous_kb(d) == 0


def _packed(d):
    return load_file(str(d / artifact.PACKED))


def test_budgets_plans_and_sweeps_on_a_lazy_model_are_the_eager_ones(sharded, monkeypatch, tmp_path, capsys):
    """The allocator's passes (Fisher, profile, measured plans, the plan solved from the profile's
    statistics) run on layers read from disk as on the loaded model: same plan, same bytes."""
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 4)
    common = ["--calib", str(text), "--calib-samples", "8", "--calib-len", "32", "--calib-dtype", "float32", "--quiet"]
    for on_disk in (True, False):
        monkeypatch.setenv(lazy.ENV, "1" if on_disk else "0")
        monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path / f"cache{on_disk}"))     # each profiles its own model
        d = tmp_path / f"budget{on_disk}"
        assert main(["compress", str(sharded), "--budget", "3.5bpw", "-o", str(d), *common]) == 0
        assert main(["plan", str(sharded), "--budget", "3bpw", "-o", str(tmp_path / f"plan{on_disk}.json"),
                     *common]) == 0
        assert main(["sweep", str(sharded), "--budgets", "3,4", "--method", "rtn,gptq", "--text", str(text),
                     "--ctx", "32", "--windows", "2", "-o", str(tmp_path / f"sweep{on_disk}"), *common]) == 0
    capsys.readouterr()
    manifests = [json.loads((tmp_path / f"budget{x}" / "manifest.json").read_text()) for x in (True, False)]
    assert manifests[0]["plan"] == manifests[1]["plan"]
    a, b = _packed(tmp_path / "budgetTrue"), _packed(tmp_path / "budgetFalse")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "planTrue.json").read_text() == (tmp_path / "planFalse.json").read_text()
    for point in ("b3bpw", "b4bpw"):
        a, b = _packed(tmp_path / "sweepTrue" / point), _packed(tmp_path / "sweepFalse" / point)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sweeps = [json.loads((tmp_path / f"sweep{x}" / "sweep.json").read_text()) for x in (True, False)]
    assert [p["perplexity"] for p in sweeps[0]["points"]] == [p["perplexity"] for p in sweeps[1]["points"]]


def test_measured_plans_read_one_layer_at_a_time_and_leave_every_layer_on_disk(sharded, monkeypatch):
    """A plan's weights go into a layer only while it runs: the lazy model's layers go back to disk
    unchanged, and the KLs are the loaded model's."""
    samples = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    kls = []
    for on_disk in (True, False):
        src = _load(sharded, monkeypatch, on_disk)
        arch = discover(src.model)
        stats, _ = engine.statistics(src.model, arch, samples, batch=3, progress=False)
        cands = A.candidate_set(("rtn", "gptq"), bits=(3, 4), group_sizes=(16,))
        prof = A.profile_model(src.model, arch, samples, cands, progress=False, tables=False)
        variants = A.plan_variants(prof, A.size_table(src.model, arch, cands), "5bpw")
        seen, hooks = _watch(arch.layers)
        kls.append(A.measure_plans(src.model, arch, variants, samples[:4], stats=stats, batch=2, progress=False))
        for h in hooks:
            h.remove()
        if on_disk:
            assert seen and all(resident == [i] for i, resident in seen)
            assert _resident_layers(arch.layers) == [] and lazy.is_lazy(src.model)
    assert kls[0] == kls[1] and all(k > 0 for k in kls[0])


def test_a_lazy_float_model_exports_dense_without_reading_a_layer_whole(sharded, monkeypatch, tmp_path):
    """HF and GGUF exports of a model on disk read one tensor at a time (no layer is materialized) and
    write what the loaded model would: the same weights, the same GGUF bytes."""
    monkeypatch.setenv(lazy.ENV, "1")
    read = lazy._materialize
    monkeypatch.setattr(lazy, "_materialize", lambda rec: pytest.fail("a layer was read whole"))
    gguf = sharded.name == "llama"       # (the tiny qwen2's vocabulary is smaller than its tokenizer's)
    assert main(["export", str(sharded), "--format", "hf", "--dtype", "bfloat16", "-o", str(tmp_path / "h")]) == 0
    assert not gguf or main(["export", str(sharded), "--format", "gguf", "--float-dtype", "float16",
                             "-o", str(tmp_path / "lazy.gguf")]) == 0
    monkeypatch.setattr(lazy, "_materialize", read)
    monkeypatch.setenv(lazy.ENV, "0")
    want = dict(sources.load(sharded).model.named_parameters())
    got = dict(sources.load(tmp_path / "h").model.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if gguf:
        assert main(["export", str(sharded), "--format", "gguf", "--float-dtype", "float16",
                     "-o", str(tmp_path / "eager.gguf")]) == 0
        assert (tmp_path / "lazy.gguf").read_bytes() == (tmp_path / "eager.gguf").read_bytes()


def test_a_dense_copy_is_written_in_shards_transformers_loads(tiny_dirs, tmp_path):
    """Shards of at most `shard_bytes` (one tensor may exceed it) and transformers' index; a tied head
    is written once and tied again on loading."""
    import transformers as tf

    from sizewise.export.hf import INDEX, write_dense

    src = sources.load(tiny_dirs["llama"])
    assert src.model.config.tie_word_embeddings
    res = write_dense(src.model, src.tokenizer, tmp_path / "h", dtype="float32", shard_bytes=20_000)
    index = json.loads((tmp_path / "h" / INDEX).read_text())
    assert res["shards"] > 2 and len(set(index["weight_map"].values())) == res["shards"]
    assert "lm_head.weight" not in index["weight_map"]
    for file in set(index["weight_map"].values()):
        tensors = load_file(str(tmp_path / "h" / file))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(x).logits, src.model(x).logits)


def test_models_above_the_size_threshold_stay_on_disk_by_default(monkeypatch, tmp_path):
    from sizewise.defaults import LAZY_ABOVE_BYTES

    monkeypatch.delenv(lazy.ENV, raising=False)
    assert lazy.wanted(tmp_path, LAZY_ABOVE_BYTES + 1) and not lazy.wanted(tmp_path, 1 << 20)
