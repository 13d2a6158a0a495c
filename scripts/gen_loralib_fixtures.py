#!/usr/bin/env python3
"""Generate the loralib fixtures in tests/fixtures/loralib/ with torch + loralib.

loralib (PyPI `loralib` 0.1.2, microsoft/LoRA) is the LoRA paper's reference
code. Two of its layers are checked against the C++ library:

MergedLinear (tests/test_merged_linear.cpp, lora::MergedLinear):
    loralib.MergedLinear(12, 24, r=4, lora_alpha=6, enable_lora=mask,
                         fan_in_fan_out=fifo) -- a fused qkv of 3 slices of 8 --
    for mask in ([True, False, True], [True, True, True]) and fifo in (False, True).
    The layer's weight, bias, lora_A [4 K, 12] and lora_B [8 K, 4] (K = enabled
    slices) are set to seeded random values (loralib starts B at zero; here both
    are nonzero so every term shows). lora_dropout = 0.
    merged_<tft|ttt>[_fifo].safetensors:
        weight [24, 12] ([12, 24] with fan_in_fan_out: loralib's storage), bias [24],
        lora_A, lora_B, x [5, 12], g [5, 24] (the upstream gradient),
        y [5, 24]             forward in train mode (unmerged),
        grad_lora_A, grad_lora_B, grad_x [5, 12], grad_bias [24]
                              gradients of sum(y * g) in train mode,
        merged_weight         weight after model.eval() (merge_weights=True: loralib
                              adds merge_AB() * scaling), in loralib's storage layout,
        y_merged              forward in eval mode (merged).
    __metadata__: enable_lora ("101"), fan_in_fan_out ("0" / "1"), r, lora_alpha.

Embedding (tests/test_embedding.cpp, lora::AdaptedEmbedding):
    loralib.Embedding(11, 6, r=3, lora_alpha=5): lora_A [3, 11], lora_B [6, 3],
    scaling 5 / 3. embedding.safetensors:
        weight [11, 6], lora_A, lora_B, ids [8] (int64: duplicates and the
        boundary ids 0 and 10), g [8, 6], y [8, 6] (train mode),
        grad_lora_A [3, 11], grad_lora_B [6, 3] (of sum(y * g); duplicate ids
        accumulate), merged_weight [11, 6] (after model.eval()), y_merged.

All tensors float32 except ids. Generated with torch 2.15.0, loralib 0.1.2,
safetensors 0.8.0.

Usage:
    /tmp/torchenv/bin/python scripts/gen_loralib_fixtures.py [outdir]
"""
import os
import sys

import loralib
import torch
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "loralib")


def rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float32) * 2 - 1


def save(name, tensors, metadata=None):
    path = os.path.join(OUT, name + ".safetensors")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    print(f"wrote {os.path.relpath(path)} ({os.path.getsize(path)} bytes): "
          + ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()))


def merged_case(name, mask, fifo, seed):
    gen = torch.Generator().manual_seed(seed)
    in_f, out_f, r, alpha, n = 12, 24, 4, 6, 5
    layer = loralib.MergedLinear(in_f, out_f, r=r, lora_alpha=alpha, enable_lora=mask, fan_in_fan_out=fifo,
                                 merge_weights=True)
    with torch.no_grad():
        layer.weight.copy_(rand(gen, *layer.weight.shape))  # [in, out] when fan_in_fan_out
        layer.bias.copy_(rand(gen, out_f))
        layer.lora_A.copy_(rand(gen, *layer.lora_A.shape))
        layer.lora_B.copy_(rand(gen, *layer.lora_B.shape))
    x = rand(gen, n, in_f).requires_grad_(True)
    g = rand(gen, n, out_f)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    lora_a, lora_b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()

    layer.train()
    y = layer(x)
    (y * g).sum().backward()
    layer.eval()  # merges: weight += merge_AB() * scaling
    assert layer.merged
    with torch.no_grad():
        y_merged = layer(x)
    save(name, {
        "weight": weight, "bias": bias, "lora_A": lora_a, "lora_B": lora_b, "x": x, "g": g, "y": y,
        "grad_lora_A": layer.lora_A.grad, "grad_lora_B": layer.lora_B.grad, "grad_x": x.grad,
        "grad_bias": layer.bias.grad, "merged_weight": layer.weight, "y_merged": y_merged,
    }, {"enable_lora": "".join("1" if m else "0" for m in mask), "fan_in_fan_out": "1" if fifo else "0",
        "r": str(r), "lora_alpha": str(alpha)})


def embedding_case(seed):
    gen = torch.Generator().manual_seed(seed)
    layer = loralib.Embedding(11, 6, r=3, lora_alpha=5, merge_weights=True)
    with torch.no_grad():
        layer.weight.copy_(rand(gen, 11, 6))
        layer.lora_A.copy_(rand(gen, 3, 11))
        layer.lora_B.copy_(rand(gen, 6, 3))
    ids = torch.tensor([3, 0, 10, 3, 7, 0, 3, 10], dtype=torch.int64)
    g = rand(gen, 8, 6)
    weight = layer.weight.detach().clone()
    lora_a, lora_b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    layer.train()
    y = layer(ids)
    (y * g).sum().backward()
    layer.eval()
    assert layer.merged
    with torch.no_grad():
        y_merged = layer(ids)
    save("embedding", {
        "weight": weight, "lora_A": lora_a, "lora_B": lora_b, "ids": ids, "g": g, "y": y,
        "grad_lora_A": layer.lora_A.grad, "grad_lora_B": layer.lora_B.grad, "merged_weight": layer.weight,
        "y_merged": y_merged,
    }, {"r": "3", "lora_alpha": "5"})


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, loralib {getattr(loralib, '__version__', '0.1.2')}")
    merged_case("merged_tft", [True, False, True], False, 1)
    merged_case("merged_ttt", [True, True, True], False, 2)
    merged_case("merged_tft_fifo", [True, False, True], True, 3)
    merged_case("merged_ttt_fifo", [True, True, True], True, 4)
    embedding_case(5)


if __name__ == "__main__":
    main()
