#!/usr/bin/env python3
"""Load time, side by side with Python: a 4096^2 fp16 base weight in safetensors
plus 32 PEFT adapters (r = 16, fp32) on that module.

  compare_io.py --make DIR      writes DIR/base.safetensors and DIR/adapter_00..31/
  compare_io.py --time DIR      times the Python load (safetensors + peft), prints JSON

The Python side is what a PEFT user runs: safetensors.torch.load_file for the base,
the module built on the meta device and assigned (no init cost), then
PeftModel.from_pretrained for the first adapter and load_adapter for the rest.
bench/bench_io.cpp is the C++ side over the same files (LORA_BENCH_IO_DIR=DIR).
Needs torch, peft, safetensors (bench/setup-torch.sh, then pip install peft safetensors).
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

DIM, RANK, ADAPTERS = 4096, 16, 32


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(DIM, DIM, bias=False, dtype=torch.float16)


def make(d):
    from peft import LoraConfig, get_peft_model
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"layer.weight": (torch.randn(DIM, DIM, generator=g) * 0.02).half()},
              os.path.join(d, "base.safetensors"), metadata={"format": "pt"})
    for k in range(ADAPTERS):
        m = get_peft_model(Model(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["layer"],
                                                 init_lora_weights=False))
        m.save_pretrained(os.path.join(d, f"adapter_{k:02d}"))


def time_load(d, reps):
    from peft import PeftModel
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        state = load_file(os.path.join(d, "base.safetensors"))
        with torch.device("meta"):
            model = Model()
        model.load_state_dict(state, assign=True)
        pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter_00"), adapter_name="a00")
        for k in range(1, ADAPTERS):
            pm.load_adapter(os.path.join(d, f"adapter_{k:02d}"), adapter_name=f"a{k:02d}")
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make")
    ap.add_argument("--time")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.make:
        make(a.make)
    if a.time:
        print(json.dumps({"python_load_ms": time_load(a.time, a.reps), "adapters": ADAPTERS, "rank": RANK,
                          "torch": torch.__version__}))


if __name__ == "__main__":
    main()
