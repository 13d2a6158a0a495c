#!/usr/bin/env python3
"""Generate the NF4 reference fixtures in tests/fixtures/nf4/ from bitsandbytes.

The bytes come from bitsandbytes' reference (PyTorch) backend, the kernels it
registers as "default" in bitsandbytes/backends/default/ops.py
(quantize_4bit, dequantize_4bit, quantize_blockwise, dequantize_blockwise),
called on CPU tensors. Double quantisation follows
bitsandbytes.functional.quantize_4bit(compress_statistics=True):
offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256) with
the signed dynamic map; dequantisation follows functional.dequantize_4bit:
dequantize_blockwise(q8, absmax2) + offset, then dequantize_4bit.
Generated with bitsandbytes 0.50.2 and torch 2.15.0 (CPU). For each case the
public API (functional.quantize_4bit / dequantize_4bit, which on CPU routes the
8-bit step and the dequantisation through the native CPU library) is run too,
and its agreement is written to the manifest. Where the two disagree on the
stored bytes (a double-quantised group whose scales are all equal: the
reference stores the map's 0, code 127, the native CPU library code 0 with
absmax2 0), a case can take its bytes from the public API instead (source
"api" in the manifest); a checkpoint saved by bitsandbytes holds those.

Usage (in a throwaway virtualenv, not in the repository):
    python -m venv /tmp/bnbenv && /tmp/bnbenv/bin/pip install bitsandbytes torch
    TORCHDYNAMO_DISABLE=1 /tmp/bnbenv/bin/python scripts/gen_nf4_fixtures.py [outdir]

Format (all little-endian, raw, no header), per case NAME:
    NAME.in.f32       rows*cols float32 input, row-major
    NAME.packed.u8    ceil(rows*cols/2) bytes, even element in the high nibble
    NAME.absmax.f32   per-block float32 absmax            (plain cases)
    NAME.q8.u8        per-block 8-bit scale codes          (double-quant cases)
    NAME.absmax2.f32  per-256-block float32 absmax2        (double-quant cases)
    NAME.offset.f32   one float32, mean of the block absmax (double-quant cases)
    NAME.map8.f32     the 256-entry map used               (double-quant cases)
    NAME.out.f32      rows*cols float32 dequantised by the reference backend
manifest.txt: one line per case: NAME ROWS COLS BLOCK_SIZE DQ(0/1) MAP AGREES
SOURCE, where MAP is "bnb" (bitsandbytes' create_dynamic_map on this torch),
"tsv" (data/bnb_dynamic_map_signed.tsv) or "-"; AGREES says whether the public
API and the reference backend give the same bytes; SOURCE is "ref" (the bytes
come from the reference backend) or "api" (from the public API); '#' lines are
comments.
"""
import importlib.util
import os
import struct
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # keep the reference kernels uncompiled

import numpy as np
import torch
import bitsandbytes
import bitsandbytes._ops as bnb_ops
import bitsandbytes.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "nf4")


def load_default_kernels():
    """Re-executes backends/default/ops.py with a register_kernel that records the
    functions, so the reference kernels can be called even where a CPU-native
    kernel is registered for the same op."""
    captured = {}

    def recorder(name, device):
        def deco(fn):
            captured[(name, device)] = fn
            return fn

        return deco

    path = os.path.join(os.path.dirname(bitsandbytes.__file__), "backends", "default", "ops.py")
    original = bnb_ops.register_kernel
    bnb_ops.register_kernel = recorder
    try:
        spec = importlib.util.spec_from_file_location("bitsandbytes.backends.default._lora_ref", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        bnb_ops.register_kernel = original
    return {name.split("::")[1]: fn for (name, dev), fn in captured.items() if dev == "default"}


REF = load_default_kernels()


def tsv_map():
    bits = []
    with open(os.path.join(ROOT, "data", "bnb_dynamic_map_signed.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            bits.append(int(line.split("\t")[2], 16))
    return torch.tensor(np.array(bits, dtype=np.uint32).view(np.float32))


def reference(A, blocksize, dq, code8):
    """Quantise and dequantise A (float32, 2-D) with the reference kernels."""
    packed, absmax = REF["quantize_4bit"](A, blocksize, "nf4", torch.uint8)
    res = {"packed": packed.reshape(-1)}
    scales = absmax
    if dq:
        offset = absmax.mean()
        q8, absmax2 = REF["quantize_blockwise"](absmax - offset, code8, 256)
        scales = REF["dequantize_blockwise"](q8, absmax2, code8, 256, torch.float32) + offset
        res.update(q8=q8, absmax2=absmax2, offset=offset.reshape(1), map8=code8)
    else:
        res["absmax"] = absmax
    res["out"] = REF["dequantize_4bit"](packed, scales, blocksize, "nf4", A.shape, torch.float32)
    return res


def public_api(A, blocksize, dq):
    """Quantise and dequantise A with functional.quantize_4bit / dequantize_4bit."""
    q, st = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    res = {"packed": q.reshape(-1)}
    if dq:
        res.update(q8=st.absmax, absmax2=st.state2.absmax, offset=st.offset.reshape(1), map8=st.state2.code)
    else:
        res["absmax"] = st.absmax
    res["out"] = F.dequantize_4bit(q, st)
    return res


def public_api_agrees(A, blocksize, dq, res):
    """Does functional.quantize_4bit / dequantize_4bit give the same bytes?"""
    q, st = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    same = torch.equal(q.reshape(-1), res["packed"])
    if dq:
        same = same and torch.equal(st.absmax, res["q8"]) and torch.equal(st.state2.absmax, res["absmax2"])
    else:
        same = same and torch.equal(st.absmax, res["absmax"])
    out = F.dequantize_4bit(q, st)
    return same and torch.equal(out.reshape(-1), res["out"].reshape(-1))


def write(name, key, t, dtype):
    arr = t.detach().cpu().numpy().astype(dtype, copy=False).reshape(-1)
    arr.astype(np.dtype(dtype).newbyteorder("<")).tofile(os.path.join(OUT, f"{name}.{key}"))


def nf4_code():
    return torch.tensor(
        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
         0.7229568362236023, 1.0], dtype=torch.float32)


def threshold_probes():
    """1.0 (so absmax = 1 and v = x exactly), the 15 midpoints, and the float32
    neighbours just above and below each: 46 values."""
    c = nf4_code()
    t = (c[:-1] + c[1:]) / 2
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    down = torch.nextafter(t, torch.full_like(t, -2.0))
    return torch.cat([torch.tensor([1.0]), t, up, down])


def weights(gen, rows, cols):
    """Weight-like data: normal, with a different scale per row."""
    scale = 0.02 * (1.0 + 4.0 * torch.rand(rows, 1, generator=gen))
    return (torch.randn(rows, cols, generator=gen) * scale).float()


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(20240607)
    bnb_map = F.create_dynamic_map(signed=True).float()
    cases = []  # (name, A, blocksize, dq, map name[, source])

    probes = threshold_probes()
    fill = torch.linspace(-0.9, 0.9, 64 - probes.numel())
    cases.append(("thr_full", torch.cat([probes, fill]).reshape(1, 64), 64, False, "-"))
    head = weights(gen, 1, 64).reshape(-1)
    cases.append(("thr_partial", torch.cat([head, probes]).reshape(2, 55), 64, False, "-"))
    neg = -probes  # ties on the negative side, absmax still 1
    cases.append(("thr_neg", torch.cat([neg, -fill]).reshape(2, 32), 32, False, "-"))

    z = weights(gen, 3, 64)
    z[1].zero_()
    cases.append(("zero_row", z, 64, False, "-"))
    zt = weights(gen, 3, 43)  # 129 elements: blocks 32,32,32,32,1; block 1 zero; odd length
    zt.reshape(-1)[32:64] = 0.0
    cases.append(("zero_odd", zt, 32, False, "-"))
    ztail = weights(gen, 1, 80)  # partial last block (16) all zero: absmax convention differs
    ztail.reshape(-1)[64:] = 0.0
    cases.append(("zero_tail", ztail, 64, False, "-"))

    cases.append(("rand_7x33_b64", weights(gen, 7, 33), 64, False, "-"))
    cases.append(("rand_5x129_b32", weights(gen, 5, 129), 32, False, "-"))
    cases.append(("rand_4x300_b128", weights(gen, 4, 300), 128, False, "-"))
    cases.append(("rand_3x1000_b4096", weights(gen, 3, 1000), 4096, False, "-"))
    cases.append(("rand_9x512_b256", weights(gen, 9, 512), 256, False, "-"))

    cases.append(("dq_7x33_b64", weights(gen, 7, 33), 64, True, "bnb"))
    dz = weights(gen, 16, 64)
    dz[3].zero_()
    cases.append(("dq_zero_16x64_b64", dz, 64, True, "bnb"))
    cases.append(("dq_65x130_b32", weights(gen, 65, 130), 32, True, "bnb"))  # 265 blocks: 2 groups
    cases.append(("dq_9x257_b64_tsv", weights(gen, 9, 257), 64, True, "tsv"))  # 37 blocks, odd length

    # A partial last block whose absmax (2.5e-39) is below 1e-38: bitsandbytes
    # divides by 1e-38 and stores 1e-38 for that block, so code * absmax is the value.
    sub = torch.linspace(-0.5, 0.5, 80)
    sub[64:] = torch.tensor([2.5e-39, -1e-39, 5e-40, 0.0] * 4)
    cases.append(("sub_tail", sub.reshape(1, 80), 64, False, "-"))
    # Every block absmax equal (0.5): one group of spread 0. The reference backend
    # stores code 127 and absmax2 1e-38, the public API (native CPU library) code 0
    # and absmax2 0; the fixture holds the public API's bytes.
    flat = torch.tensor([0.5, -0.25] * 32).repeat(4, 1)
    cases.append(("dq_flat_4x64_b64", flat, 64, True, "bnb", "api"))

    lines = [
        "# NF4 fixtures from bitsandbytes %s (reference backend; public API where source = api), torch %s;"
        " see scripts/gen_nf4_fixtures.py"
        % (bitsandbytes.__version__, torch.__version__.split("+")[0]),
        "# name rows cols block_size double_quant map public_api_agrees source",
    ]
    for name, A, bs, dq, map_name, *rest in cases:
        source = rest[0] if rest else "ref"
        A = A.contiguous().float()
        code8 = {"bnb": bnb_map, "tsv": tsv_map(), "-": None}[map_name]
        res = reference(A, bs, dq, code8)
        agrees = public_api_agrees(A, bs, dq, res) if map_name != "tsv" else "n/a"
        if source == "api":
            res = public_api(A, bs, dq)
        write(name, "in.f32", A, np.float32)
        write(name, "packed.u8", res["packed"], np.uint8)
        write(name, "out.f32", res["out"], np.float32)
        if dq:
            write(name, "q8.u8", res["q8"], np.uint8)
            write(name, "absmax2.f32", res["absmax2"], np.float32)
            write(name, "offset.f32", res["offset"], np.float32)
            write(name, "map8.f32", res["map8"], np.float32)
        else:
            write(name, "absmax.f32", res["absmax"], np.float32)
        lines.append(f"{name} {A.shape[0]} {A.shape[1]} {bs} {int(dq)} {map_name} {agrees} {source}")
    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
