#!/usr/bin/env python3
"""Generate the safetensors fixtures in tests/fixtures/safetensors/.

Every .safetensors file here is written by the real library (safetensors 0.8,
torch 2.15, numpy 2.4), so tests/test_io_safetensors.cpp checks the reader
against Python's bytes and the writer byte-for-byte against Python's output.

  basic.safetensors      safetensors.torch.save_file, metadata {"format": "pt"}:
                         f32 / f16 / bf16 / f64 matrices of odd shapes, a 1-D,
                         a 0-D and an empty [0, 3] tensor, 4-D [4, 3, 1, 1]
                         and 3-D [1, 2, 3] / [2, 2, 2] tensors, integer, bool
                         and fp8 tensors, a name with quote / backslash / tab /
                         non-ASCII characters.
  numpy.safetensors      safetensors.numpy.save_file, no metadata.
  convert.safetensors    torch, metadata {"format": "pt"}: sources of the
                         dtype conversions (ties, subnormals, overflow, the
                         double-rounding traps of f64 -> f32 -> 16 bits).
  sharded/               a 2-shard checkpoint (torch save_file per shard) and
                         its model.safetensors.index.json, as transformers
                         writes it ({"metadata": {"total_size": N},
                         "weight_map": {tensor: shard}}).
  expected.json          per file and tensor: dtype, shape, the exact values
                         (float.hex() strings of the float64 value; integers
                         as integers), and the expected bits of each
                         conversion:
                           f32 -> bf16   torch .to(bfloat16)
                           f32 -> f16    numpy astype(float16)
                           f64 -> f32    numpy astype(float32)
                           f64 -> f16    numpy astype(float16) (one rounding)
                           f64 -> bf16, f16 -> bf16, bf16 -> f16
                                         exact rational rounding (Fraction,
                                         round half to even) below
                         Each peer result is cross-checked against the rational
                         reference here (NaN aside), so a fixture cannot encode
                         a double rounding.

Usage:
    TORCHDYNAMO_DISABLE=1 python scripts/gen_safetensors_fixtures.py [outdir]
"""
import json
import math
import os
import sys
from fractions import Fraction

import numpy as np
import torch
import safetensors
import safetensors.numpy
import safetensors.torch

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "safetensors")

FORMATS = {"bf16": (8, 7), "f16": (5, 10), "f32": (8, 23)}


def round_bits(x, fmt):
    """x (a Python float) rounded once, half to even, to fmt; returns the bits."""
    ebits, mbits = FORMATS[fmt]
    width = 1 + ebits + mbits
    bias = (1 << (ebits - 1)) - 1
    inf = ((1 << ebits) - 1) << mbits
    if math.isnan(x):
        return inf | (1 << (mbits - 1))
    sign = (1 << (width - 1)) if math.copysign(1.0, x) < 0 else 0
    if math.isinf(x):
        return sign | inf
    a = abs(Fraction(x))
    if a == 0:
        return sign
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    e = max(e, 1 - bias)
    n = round(a / Fraction(2) ** (e - mbits))  # Fraction.__round__: half to even
    if n >= 1 << (mbits + 1):
        n >>= 1
        e += 1
    if n < 1 << mbits:  # subnormal (or zero)
        return sign | n
    biased = e + bias
    if biased >= (1 << ebits) - 1:
        return sign | inf
    return sign | (biased << mbits) | (n - (1 << mbits))


def bits16(t):
    return [int(v) for v in t.contiguous().view(torch.int16).numpy().astype(np.uint16)]


def hexes(t):
    return [float(v).hex() for v in t.to(torch.float64).flatten().tolist()]


def describe(tensors):
    out = {}
    for name, t in tensors.items():
        entry = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            entry["values"] = hexes(t)
        elif t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
            entry["values"] = [int(v) for v in t.flatten().tolist()]
        out[name] = entry
    return out


def main():
    np.seterr(over="ignore")  # overflow to inf is one of the cases
    os.makedirs(os.path.join(OUT, "sharded"), exist_ok=True)
    g = torch.Generator().manual_seed(20240607)
    expected = {}

    # ---- basic.safetensors (torch) -------------------------------------------------
    w_f32 = torch.randn(3, 5, generator=g, dtype=torch.float32)
    w_f32[0, 0] = float("inf")
    w_f32[0, 1] = -0.0
    w_f32[1, 2] = 1e-40  # subnormal
    w_f32[2, 4] = -3.4028234663852886e38
    basic = {
        "w_f32": w_f32,
        "w_f16": torch.randn(5, 3, generator=g).to(torch.float16),
        "w_bf16": torch.randn(33, 19, generator=g).to(torch.bfloat16),
        "w_f64": torch.randn(2, 7, generator=g, dtype=torch.float64),
        "b_f32": torch.randn(5, generator=g),
        "b_bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "col_f32": torch.randn(4, 1, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
        "conv": torch.randn(4, 3, 1, 1, generator=g),
        "batched": torch.randn(1, 2, 3, generator=g),
        "cube": torch.randn(2, 2, 2, generator=g),
        "ids": torch.tensor([0, -1, 2**40, -(2**62)], dtype=torch.int64),
        "counts": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
        "shorts": torch.tensor([-32768, 7, 32767], dtype=torch.int16),
        "bytes_i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bytes_u8": torch.tensor([0, 1, 255, 3, 4], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True], dtype=torch.bool),
        "fp8_e4m3": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.tensor([1.0, -4.0], dtype=torch.float32).to(torch.float8_e5m2),
        'blk.0/\u00fcn\u00ef"q\\\t': torch.tensor([1.0, -1.0], dtype=torch.float32),
    }
    path = os.path.join(OUT, "basic.safetensors")
    safetensors.torch.save_file(basic, path, metadata={"format": "pt"})
    expected["basic"] = describe(basic)
    fp8 = {"fp8_e4m3": [0x38, 0xC0, 0x30], "fp8_e5m2": [0x3C, 0xC4]}
    for k, v in fp8.items():  # the fp8 bytes, as OCP's E4M3FN / E5M2 encode them
        got = [int(b) for b in basic[k].view(torch.uint8).tolist()]
        assert got == v, (k, got)
        expected["basic"][k]["bytes"] = v

    # ---- numpy.safetensors (numpy, no metadata) --------------------------------------
    rng = np.random.default_rng(7)
    npt = {
        "a": rng.standard_normal((3, 1)).astype(np.float64),
        "b": rng.standard_normal((1, 4)).astype(np.float32),
        "c": rng.standard_normal((2, 3)).astype(np.float16),
        "d": np.arange(6, dtype=np.int32).reshape(2, 3),
    }
    safetensors.numpy.save_file(npt, os.path.join(OUT, "numpy.safetensors"))
    expected["numpy"] = describe({k: torch.from_numpy(v) for k, v in npt.items()})

    # ---- convert.safetensors -----------------------------------------------------------
    f32_src = [
        0.0, -0.0, 1.0, -1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -(1.0 + 2**-8),
        1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65519.0, 65520.0, 2**-24, 2**-25, 3 * 2**-25, 2**-26,
        1e-40, -1e-40, 2**-126, 3.3961e38, 3.4028234663852886e38, float("inf"), float("-inf"), float("nan"),
        3.14159265, -2.718281828, 1234.5678, 1e-5, -7e-8,
    ]
    f64_src = [
        1.0 + 2**-8 + 2**-30, 1.0 + 2**-11 + 2**-40, -(1.0 + 2**-8 + 2**-30), 1.0 + 2**-24, 1.0 + 2**-24 + 2**-60,
        1.0 + 3 * 2**-24, 1e300, -1e300, 1e-300, -1e-300, 3.5e38, 3.3961e38, 3.3962e38, 65519.99999, 65520.0,
        2**-25 + 2**-60, 2**-25, 2**-149, 2**-150, 2**-150 + 2**-200, 0.1, -0.3, math.pi, math.e, 123456789.123456789,
        float("inf"), float("-inf"), float("nan"), 0.0, -0.0,
    ]
    f16_src = [1.0 + k * 2**-10 for k in range(8)] + [65504.0, -65504.0, 2**-24, 6.1e-5, 0.0, -0.0, float("inf")]
    bf16_src = [1.0 + k * 2**-7 for k in range(4)] + [3e38, -3e38, 1e-30, 2**-14, 2**-24, 2**-25, 3 * 2**-25, 65520.0, 65504.0]
    conv = {
        "src_f32": torch.tensor(f32_src, dtype=torch.float32),
        "src_f64": torch.tensor(f64_src, dtype=torch.float64),
        "src_f16": torch.tensor(f16_src, dtype=torch.float32).to(torch.float16),
        "src_bf16": torch.tensor(bf16_src, dtype=torch.float32).to(torch.bfloat16),
    }
    safetensors.torch.save_file(conv, os.path.join(OUT, "convert.safetensors"), metadata={"format": "pt"})
    expected["convert"] = describe(conv)

    def vals(t):
        return t.to(torch.float64).tolist()

    def cross(peer, name, fmt, what):
        ref = [round_bits(v, fmt) for v in vals(conv[name])]
        for i, (p, r) in enumerate(zip(peer, ref)):
            if math.isnan(vals(conv[name])[i]):
                continue
            if p != r:
                raise SystemExit(f"{what}[{i}] = {vals(conv[name])[i]!r}: peer {p:#x} != rational {r:#x}")
        return peer

    c = expected["convert"]
    c["src_f32"]["to_bf16"] = cross(bits16(conv["src_f32"].to(torch.bfloat16)), "src_f32", "bf16", "f32->bf16")
    c["src_f32"]["to_f16"] = cross(
        [int(b) for b in conv["src_f32"].numpy().astype(np.float16).view(np.uint16)], "src_f32", "f16", "f32->f16")
    c["src_f64"]["to_f32"] = cross(
        [int(b) for b in conv["src_f64"].numpy().astype(np.float32).view(np.uint32)], "src_f64", "f32", "f64->f32")
    c["src_f64"]["to_f16"] = cross(
        [int(b) for b in conv["src_f64"].numpy().astype(np.float16).view(np.uint16)], "src_f64", "f16", "f64->f16")
    c["src_f64"]["to_bf16"] = [round_bits(v, "bf16") if not math.isnan(v) else 0x7FC0 for v in vals(conv["src_f64"])]
    # torch's own f64 -> bf16 rounds twice (through f32): the traps show it, so the
    # fixture takes the rational reference and records torch's answer for the docs.
    c["src_f64"]["torch_to_bf16"] = bits16(conv["src_f64"].to(torch.bfloat16))
    c["src_f16"]["to_bf16"] = [round_bits(v, "bf16") if not math.isnan(v) else 0x7FC0 for v in vals(conv["src_f16"])]
    c["src_bf16"]["to_f16"] = [round_bits(v, "f16") if not math.isnan(v) else 0x7E00 for v in vals(conv["src_bf16"])]
    # f16 -> bf16 and bf16 -> f16 are one rounding through an exact f32, so torch agrees:
    assert bits16(conv["src_f16"].to(torch.bfloat16)) == c["src_f16"]["to_bf16"]
    assert bits16(conv["src_bf16"].to(torch.float16)) == c["src_bf16"]["to_f16"]

    # ---- sharded checkpoint -------------------------------------------------------------
    shard1 = {
        "model.layers.0.q_proj.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.q_proj.bias": torch.randn(6, generator=g),
        "model.embed.weight": torch.randn(5, 4, generator=g),
    }
    shard2 = {
        "model.layers.1.q_proj.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
    }
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total = 0
    weight_map = {}
    for fname, shard in zip(names, (shard1, shard2)):
        safetensors.torch.save_file(shard, os.path.join(OUT, "sharded", fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(OUT, "sharded", "model.safetensors.index.json"), "w") as f:
        # transformers' layout: metadata then the weight map, keys sorted, indent 2.
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2,
                  sort_keys=True)
        f.write("\n")
    expected["sharded"] = describe({**shard1, **shard2})

    expected["versions"] = {"safetensors": safetensors.__version__, "torch": torch.__version__.split("+")[0],
                            "numpy": np.__version__}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
