import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's cache."""
    monkeypatch.setenv("SIZEWISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny random models saved as Hugging Face directories, plus a text file."""
    from tiny import CONFIGS, SAMPLE_TEXT, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    dirs = {f: save_tiny(f, root / f) for f in CONFIGS}
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    dirs["text"] = text
    return dirs
