"""Model directories are data from a stranger: no code in them runs, whatever their config asks."""

from __future__ import annotations

import json
import shutil

import pytest

from sizewise import sources
from sizewise.errors import SizewiseError

EVIL = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("remote code ran")
from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel
"""


@pytest.mark.parametrize("model_type", ["llama", "evil-arch"])
def test_remote_code_in_a_config_never_runs(tiny_dirs, tmp_path, model_type):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(EVIL)
    if model_type == "llama":          # a known architecture loads as itself; auto_map is ignored
        src = sources.load(str(d))
        assert type(src.model).__name__ == "LlamaForCausalLM"
    else:                              # only remote code could build it: one line, nothing run
        with pytest.raises(SizewiseError) as e:
            sources.load(str(d))
        assert "\n" not in str(e.value)
    assert not (d / "RAN").exists()


@pytest.mark.parametrize("model_type", ["llama", "evil-arch"])
def test_remote_code_in_an_artifact_never_runs(tiny_dirs, tmp_path, model_type):
    import sizewise
    from sizewise.api import CompressConfig

    art = tmp_path / "a"
    sizewise.compress(str(tiny_dirs["llama"]), CompressConfig(), art, progress=False)
    cfg = json.loads((art / "hf" / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"})
    (art / "hf" / "config.json").write_text(json.dumps(cfg))
    (art / "hf" / "evil.py").write_text(EVIL)
    try:
        sources.load(str(art))
    except SizewiseError as e:
        assert "\n" not in str(e)
    assert not (art / "hf" / "RAN").exists()
