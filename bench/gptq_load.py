"""Load a GPTQ checkpoint directory with transformers (optimum + gptqmodel's pure-torch layer)
and write its logits for given token windows: run by bench/deploy.py in the venv `make
gptq-runtime` builds (gptqmodel would move torch in the main one).

    .venv-gptq/bin/python bench/gptq_load.py DIR IDS.safetensors OUT.safetensors
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # no compile step: the same arithmetic, sooner

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTQConfig


def main(path: str, ids_path: str, out_path: str) -> int:
    torch.set_num_threads(2)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)["quantization_config"]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", quantization_config=GPTQConfig(bits=config["bits"], backend="torch")).eval()
    load_s = time.perf_counter() - start
    ids = load_file(ids_path)["ids"]
    with torch.no_grad():
        logits = torch.cat([model(ids[i: i + 1]).logits.float() for i in range(len(ids))])
    save_file({"logits": logits.contiguous(), "load_s": torch.tensor([load_s])}, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
