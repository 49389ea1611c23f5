"""The family registry: every family is registered, reachable from a tiny config, and unambiguous;
a model type no family covers gets the generic family, which AWQ, rotation and GGUF refuse."""

import importlib
import pkgutil
from types import SimpleNamespace

import pytest

from sizewise import families
from sizewise.arch import discover
from sizewise.errors import SizewiseError
from sizewise.export.gguf import file_names
from sizewise.families import FAMILIES, GENERIC, Family
from sizewise.quant.awq import awq_transform
from sizewise.quant.rotate import rotate_model
from tiny import CONFIGS, tiny_model


@pytest.mark.parametrize("key", list(CONFIGS))
def test_every_tiny_config_resolves_to_its_family(key):
    cfg = CONFIGS[key]()
    fam = families.of(cfg)
    assert fam in FAMILIES and fam.known
    assert key == fam.name or key in fam.model_types       # tiny.py names each config by family or model type
    assert families.for_model_type(cfg.model_type) is fam


def test_every_family_has_a_tiny_config():
    covered = {families.of(make()).name for make in CONFIGS.values()}
    assert covered == {f.name for f in FAMILIES}


def test_every_family_module_is_registered():
    found = []
    for info in pkgutil.iter_modules(families.__path__):
        if info.name in ("base", "gguf_keys"):      # what a family is; GGUF keys the families share
            continue
        mod = importlib.import_module(f"sizewise.families.{info.name}")
        defined = [v for v in vars(mod).values() if isinstance(v, Family)]
        assert defined, f"families/{info.name}.py defines no Family"
        for fam in defined:
            assert fam in FAMILIES, f"{fam.name} (families/{info.name}.py) is not in the registry"
        found += defined
    assert set(FAMILIES) <= set(found)                     # and the registry holds nothing from elsewhere


def test_registry_model_types_are_unambiguous():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    prefixes = [(p, f) for f in FAMILIES for p in f.model_type_prefixes]
    assert len(prefixes) == len({p for p, _ in prefixes})
    for f in FAMILIES:                                     # exact names win over another family's prefix
        for t in f.model_types:
            assert families.for_model_type(t) is f, t


def test_family_knowledge_is_consistent():
    for f in FAMILIES:
        assert f.folds, f"{f.name}: AWQ has no fold rules"
        assert f.rotates or f.no_rotation, f"{f.name}: rotation refused without a reason"
        if f.gguf is not None:
            assert f.gguf.arch and f.gguf.layer_tensors
    assert families.rotation_model_types()[:3] == ("llama", "qwen2", "mistral")
    assert families.gguf_support() == ("llama (model_type llama, mistral); qwen2 (model_type qwen2); "
                                       "qwen3 (model_type qwen3); gemma2 (model_type gemma2); "
                                       "gemma3 (model_type gemma3_text); phi3 (model_type phi3)")
    assert all(families.of(CONFIGS[k]()).bos for k in ("gemma", "gemma2", "gemma3"))
    assert not families.of(CONFIGS["llama"]()).bos
    assert families.for_model_type("gemma4_text").name == "gemma"   # every other "gemma*" model type, as before
    assert families.for_model_type("gemma3").name == "gemma"        # the multimodal config: no GGUF text layout


@pytest.mark.parametrize("key", [k for k in CONFIGS if families.of(CONFIGS[k]()).gguf is None])
def test_families_without_gguf_are_refused_as_before(key):
    with pytest.raises(SizewiseError, match="GGUF export supports: llama") as e:
        file_names(CONFIGS[key](), [])
    assert "\n" not in str(e.value)


def test_unknown_model_type_gets_the_generic_family_and_one_line_refusals():
    for t in ("weird", "mamba", None):
        assert families.for_model_type(t) is GENERIC
    assert families.of(SimpleNamespace()) is GENERIC and not GENERIC.known and not GENERIC.bos

    m = tiny_model("llama")
    arch = discover(m)                                     # discovery does not need a family
    arch.model_type = "weird"
    assert arch.all_linears()

    with pytest.raises(SizewiseError, match="AWQ knows the fold rules of: llama.*not weird") as e:
        awq_transform(0, arch.layers[0], arch.linears[0], {}, lambda ref: None, "weird")
    assert "\n" not in str(e.value) and "no sizewise family" in str(e.value)

    with pytest.raises(SizewiseError, match="rotation supports: llama, qwen2, mistral.*not weird") as e:
        rotate_model(m, arch)
    assert "\n" not in str(e.value) and "no sizewise family" in str(e.value)

    cfg = SimpleNamespace(model_type="weird", num_hidden_layers=2)
    with pytest.raises(SizewiseError, match="GGUF export supports: llama .*got 'weird'") as e:
        file_names(cfg, [])
    assert "\n" not in str(e.value)
