"""A GGUF model → a float32 safetensors Hugging Face directory, one tensor at a time.

transformers' own GGUF loading dequantizes every tensor into one float32 state dict (an 8B model:
32 GB). This writes the same tensors with transformers' own pieces (its config and tokenizer
readers, its tensor-name map and per-architecture tensor processors, gguf's dequantizer), but holds
one dequantized tensor and one output shard at a time; the GGUF itself is memory-mapped.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import families

# Output shards: each is built in memory alone (plus its serialized bytes) before it is written.
SHARD_BYTES = 1 << 30


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write `gguf_path` as config, generation config, tokenizer and float32 shards into `out_dir`
    (an existing empty directory). Raises OSError/ValueError where transformers cannot read it."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    where, name = gguf_path.parent, gguf_path.name
    config = AutoConfig.from_pretrained(where, gguf_file=name, trust_remote_code=False)
    # what transformers' GGUF loader leaves at its defaults (Qwen3's head_dim, Gemma's soft-caps, rope scaling)
    for key, value in families.config_from_gguf(gguf_path).items():
        setattr(config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config               # the output is plain float weights
    with torch.device("meta"):                        # the names and shapes transformers expects
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    parsed = load_gguf_checkpoint(gguf_path, return_tensors=False)
    field = GGUFReader(gguf_path).get_field("general.architecture")
    if field is None:
        raise ValueError("the file names no general.architecture")
    architecture = field.contents()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(meta, processor)
    expected = set(meta.state_dict())

    shards: list[list[str]] = [[]]
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            save_file(shard, str(out_dir / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append([])
        shard, shard_bytes = {}, 0

    def add(hf_name: str, t: torch.Tensor):
        nonlocal shard_bytes, total
        t = t.to(torch.float32).contiguous()
        if shard_bytes and shard_bytes + t.numel() * 4 > SHARD_BYTES:
            flush()
        shard[hf_name] = t
        shards[-1].append(hf_name)
        shard_bytes += t.numel() * 4
        total += t.numel() * 4

    # some processors gather into parsed["tensors"] (experts stacked over several GGUF tensors)
    state = {"config": parsed["config"], "tensors": {}}
    for tensor in GGUFReader(gguf_path).tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=state)
        if result.name in names and names[result.name] in expected:
            add(names[result.name], torch.from_numpy(np.copy(result.weights)))
    for hf_name, t in state["tensors"].items():
        if hf_name in expected:
            add(hf_name, t)
    flush()
    shards = [s for s in shards if s]
    _name_shards(out_dir, shards, total)
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _name_shards(out_dir: Path, shards: list[list[str]], total: int) -> None:
    """Hugging Face's file names (model.safetensors, or model-0000k-of-0000n + index)."""
    if len(shards) == 1:
        (out_dir / "part-00001.safetensors").rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for k, names in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        path = out_dir / f"part-{k:05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
