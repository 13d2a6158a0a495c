#!/usr/bin/env python3
"""Generate the DoRA fixtures in tests/fixtures/dora/ from PEFT (use_dora=True).

One small model, nn.Linear(in=16, out=12), wrapped by peft.get_peft_model with
LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0,
init_lora_weights=False) so that B is nonzero from the start and PEFT's
DoraLinearLayer.update_layer initialises the magnitude m to the row norms of
W + s B A (not just ||W||). Three cases:
    bias      nn.Linear with bias, s = alpha / r = 2
    nobias    bias=False, s = 2
    rslora    with bias, use_rslora=True: s = alpha / sqrt(r) = 4

For each case, in float32, with X [5, 16] and a fixed upstream gradient
G [5, 12] (loss = sum(Y * G), so dL/dY = G):
    W, b (bias cases), A, B        the adapter as PEFT initialised it
    m_init                         PEFT's initial lora_magnitude_vector
    m                              m_init * (1 + 0.1 N(0, 1)): the m the rest
                                   uses (so m != n and the row scale matters)
    x, g                           inputs
    y                              model(x), train mode
    dA, dB, dm, dx                 PEFT's gradients (norm detached)
    exact.dA, exact.dB, exact.dm   the same loss differentiated through the
                                   norm: the DoRA formula written out in
                                   float64 autograd without .detach() (not
                                   PEFT's code; PEFT only detaches)
    merged                         base_layer.weight after merge_adapter()
    adamw.step{1,2,3}.{A,B,m}      after each of 3 torch.optim.AdamW steps
                                   (foreach=False; lr, betas, eps,
                                   weight_decay in the metadata) on the same
                                   loss, starting from A, B, m above

Generated with torch 2.15.0 and peft 0.21.2.

Usage (in a throwaway virtualenv, not in the repository):
    /tmp/torchenv/bin/python scripts/gen_dora_fixtures.py [outdir]
"""
import copy
import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "dora")

IN, OUT_F, R, ALPHA, N = 16, 12, 4, 8, 5
ADAMW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


class Model(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT_F, bias=bias)

    def forward(self, x):
        return self.proj(x)


def lora_module(model):
    return model.base_model.model.proj


def exact_gradients(W, b, A, B, m, s, x, g):
    """dL/dA, dL/dB, dL/dm with the norm differentiated (float64 autograd)."""
    W, x, g = W.double(), x.double(), g.double()
    A = A.double().clone().requires_grad_(True)
    B = B.double().clone().requires_grad_(True)
    m = m.double().clone().requires_grad_(True)
    V = W + s * (B @ A)
    n = torch.linalg.norm(V, dim=1)
    y = (x @ V.T) * (m / n)
    if b is not None:
        y = y + b.double()
    (y * g).sum().backward()
    return A.grad.float(), B.grad.float(), m.grad.float()


def make_case(name, bias, rslora):
    torch.manual_seed({"bias": 1, "nobias": 2, "rslora": 3}[name])
    model = Model(bias)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], use_dora=True, lora_dropout=0.0,
                        init_lora_weights=False, use_rslora=rslora)
    model = get_peft_model(model, config)
    model.train()
    mod = lora_module(model)
    s = mod.scaling["default"]
    W = mod.base_layer.weight.detach().clone()
    b = mod.base_layer.bias.detach().clone() if bias else None
    A = mod.lora_A["default"].weight.detach().clone()
    B = mod.lora_B["default"].weight.detach().clone()
    mag = mod.lora_magnitude_vector["default"].weight
    m_init = mag.detach().clone()
    with torch.no_grad():
        mag.mul_(1 + 0.1 * torch.randn(OUT_F))
    m = mag.detach().clone()

    x = torch.randn(N, IN)
    g = torch.randn(N, OUT_F)
    t = {"W": W, "A": A, "B": B, "m_init": m_init, "m": m, "x": x, "g": g}
    if bias:
        t["b"] = b

    xg = x.clone().requires_grad_(True)
    y = model(xg)
    (y * g).sum().backward()
    t["y"] = y.detach().clone()
    t["dA"] = mod.lora_A["default"].weight.grad.clone()
    t["dB"] = mod.lora_B["default"].weight.grad.clone()
    t["dm"] = mag.grad.clone()
    t["dx"] = xg.grad.clone()
    t["exact.dA"], t["exact.dB"], t["exact.dm"] = exact_gradients(W, b, A, B, m, s, x, g)

    merged = copy.deepcopy(model)
    merged.merge_adapter()
    t["merged"] = lora_module(merged).base_layer.weight.detach().clone()

    # 3 AdamW steps on the trainable parameters (A, B, m).
    model.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 3, [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, foreach=False, **ADAMW)
    for step in range(1, 4):
        opt.zero_grad()
        (model(x) * g).sum().backward()
        opt.step()
        t[f"adamw.step{step}.A"] = mod.lora_A["default"].weight.detach().clone()
        t[f"adamw.step{step}.B"] = mod.lora_B["default"].weight.detach().clone()
        t[f"adamw.step{step}.m"] = mag.detach().clone()

    t = {k: v.contiguous().float() for k, v in t.items()}
    meta = {"scaling": json.dumps(s), "rank": str(R), "alpha": str(ALPHA), "use_rslora": json.dumps(rslora),
            "lr": json.dumps(ADAMW["lr"]), "beta1": json.dumps(ADAMW["betas"][0]),
            "beta2": json.dumps(ADAMW["betas"][1]), "eps": json.dumps(ADAMW["eps"]),
            "weight_decay": json.dumps(ADAMW["weight_decay"]), "torch": torch.__version__,
            "peft": peft.__version__}
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file(t, path, metadata=meta)
    print(f"wrote {path}: {len(t)} tensors, scaling {s}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(1)
    make_case("bias", bias=True, rslora=False)
    make_case("nobias", bias=False, rslora=False)
    make_case("rslora", bias=True, rslora=True)


if __name__ == "__main__":
    main()
