"""Low-rank corrections in llama.cpp: a GGUF plus its LoRA adapter against sizewise's own evaluation of
the artifact it came from (issue 16: "llama.cpp with the LoRA GGUF agrees with sizewise's perplexity
within 1%"), on the first N windows of WikiText-2 test.

    .venv/bin/python bench/lora_llamacpp.py [--windows 2]

Needs the GGUFs bench/llamacpp.py exported into out/bench/llamacpp-lora/gguf from the artifacts
out/bench/lora/rtn-q4_0-r16 (`compress smollm2-135m --method rtn --bits 4 --group-size 32 --sym
--lowrank 16 --calib enwiki-sample`) and out/bench/lora/rtn-q4_0 (the same without factors), and
llama.cpp's venv (out/llama-venv, bench/llamacpp.py builds it).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, save

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--windows", type=int, default=2)
args = ap.parse_args()
from sizewise import data, sources
from sizewise.evaluate import evaluate

work = Path("out/bench/llamacpp-lora/gguf")
src = sources.load("smollm2-135m")
text = data.read_text("wikitext2-test")
wins = data.eval_windows(data.tokenize(src.tokenizer, text), 1024, None, args.windows, data.wants_bos(src.model, src.tokenizer))
np.save(work / "w2.npy", np.stack([x[0].numpy() for x in wins.inputs]).astype(np.int32))
out = {}
for label, lora in [("rtn-q4_0-r16", True), ("rtn-q4_0-r16", False), ("rtn-q4_0", False)]:
    job = {"evaluate": {"model": str(work / f"sizewise-{label}.gguf"), "windows": str(work / "w2.npy"),
                        "score_from": wins.score_from, "threads": 2, "kv_type": "f32", "extra_bufts": False,
                        "check": {}, "check_rounded": {}, "speed": None,
                        "lora": str(work / f"sizewise-{label}.lora.gguf") if lora else None},
           "out": str(work / "r.json")}
    (work / "j.json").write_text(json.dumps(job))
    subprocess.run(["out/llama-venv/bin/python", "bench/llamacpp_worker.py", str(work / "j.json")], check=True)
    out[f"llama.cpp {label}{' +lora' if lora else ''}"] = json.loads((work / "r.json").read_text())["perplexity"]
for label in ("rtn-q4_0-r16", "rtn-q4_0"):
    m = sources.load(f"out/bench/lora/{label}").model
    out[f"sizewise {label}"] = evaluate(m, wins, text, progress=False)["perplexity"]
print(json.dumps(out, indent=1))
save("lora_llamacpp", {"benchmark": "lora_llamacpp", "model": "smollm2-135m", "cpu": cpu_model(),
                       "protocol": wins.protocol(), "perplexity": out,
                       "llamacpp_over_sizewise_with_lora": out["llama.cpp rtn-q4_0-r16 +lora"] / out["sizewise rtn-q4_0-r16"],
                       "llamacpp_over_sizewise_without": out["llama.cpp rtn-q4_0"] / out["sizewise rtn-q4_0"]})
