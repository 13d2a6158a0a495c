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
    TORCHDYNAMO_DISABLE=1 /tmp/bnbenv/bin/python scripts/gen_nf4_fixtures.py --measure
The first writes the cases below into outdir (default tests/fixtures/nf4) and the adversarial
set into outdir/adv (format in adv/manifest.txt; see adversarial()). --measure writes nothing: it
prints, as a markdown table, how often the public API's 8-bit scale codes (bitsandbytes' native
CPU quantiser) differ from lora's nearest ones on weight-like matrices, and asserts on every
scale that the rules transcribed below (native_blockwise, lora_nearest_blockwise) reproduce
bitsandbytes' bytes (docs/nf4.md, "Nearest vs bitsandbytes' native CPU quantiser").

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
OUT = os.path.join(ROOT, "tests", "fixtures", "nf4")  # set by main()


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


def write(name, key, t, dtype, out=None):
    arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    arr = arr.astype(dtype, copy=False).reshape(-1)
    arr.astype(np.dtype(dtype).newbyteorder("<")).tofile(os.path.join(out or OUT, f"{name}.{key}"))


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


def legacy(OUT):
    """The original 17 cases (tests/fixtures/nf4/manifest.txt); unchanged bytes."""
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


# ---------------------------------------------------------------------------
# The 8-bit step, value for value, as plain numpy (the measurement checks both
# against bitsandbytes on every scale it quantises).

F32 = np.float32
NATIVE_BINS = 65536


def native_lut(code):
    """build_quantize_lut() in bitsandbytes' csrc/cpu_ops.cpp (the libbitsandbytes_cpu that
    quantize_blockwise runs on CPU): bin i, centre fl(fl(2i) / 65535) - 1, gets the nearest code
    of its centre, i.e. the number of fp32 midpoints 0.5 * (code[k] + code[k+1]) below it."""
    code = np.asarray(code, F32)
    mid = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    centre = ((F32(2) * np.arange(NATIVE_BINS, dtype=F32)) / F32(NATIVE_BINS - 1)).astype(F32) - F32(1)
    return np.searchsorted(mid, centre, side="left").astype(np.uint8)


def _groups(x, blocksize):
    n = x.size
    nb = -(-n // blocksize)
    pad = np.zeros(nb * blocksize, F32)
    pad[:n] = x
    return pad.reshape(nb, blocksize), n


def native_blockwise(s, code, blocksize=256):
    """quantize_cpu_impl<float> (same file): per block absmax (0: codes 0), inv = 1 / absmax in
    fp32 with no floor (inf below 2^-128), v = clamp(x * inv, -1, 1), bin = (uint16)
    trunc(fma((v + 1) * 0.5, 65535, 0.5)) (NaN from 0 * inf converts to bin 0), code = lut[bin].
    The fma is exact here in float64 then rounded once: (v + 1) * 0.5 is a multiple of 2^-25."""
    x, n = _groups(np.asarray(s, F32).reshape(-1), blocksize)
    amax = np.abs(x).max(axis=1).astype(F32)
    with np.errstate(all="ignore"):
        inv = (F32(1) / amax).astype(F32)
        v = np.clip((x * inv[:, None]).astype(F32), F32(-1), F32(1))
        t = ((v + F32(1)) * F32(0.5)).astype(F32)
        f = (t.astype(np.float64) * (NATIVE_BINS - 1) + 0.5).astype(F32)
        bins = np.where(np.isnan(f), 0, np.trunc(np.nan_to_num(f)).astype(np.int64) & 0xFFFF)
    q = native_lut(code)[bins]
    q[amax == 0] = 0
    return q.reshape(-1)[:n], amax


def lora_nearest_blockwise(s, code, blocksize=256):
    """lora's default 8-bit step (NF4Matrix, ScaleRounding::nearest): a = max(absmax, 1e-38), full
    groups x * (1 / a), the partial last one x / a, clamp, count the fp32 midpoints below; a group of
    spread 0 stores codes 0 and absmax2 0; a partial group stores its divisor a."""
    code = np.asarray(code, F32)
    mid = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    x = np.asarray(s, F32).reshape(-1)
    n = x.size
    q = np.zeros(n, np.uint8)
    stored = []
    for g0 in range(0, n, blocksize):
        xs = x[g0:g0 + blocksize]
        amax = F32(np.abs(xs).max())
        if amax == 0:
            stored.append(F32(0))
            continue
        a = max(amax, F32(1e-38))
        full = xs.size == blocksize
        with np.errstate(all="ignore"):  # the overflow case divides inf by inf
            v = (xs * (F32(1) / a)).astype(F32) if full else (xs / a).astype(F32)
        q[g0:g0 + blocksize] = np.searchsorted(mid, np.clip(v, F32(-1), F32(1)), side="left")
        stored.append(amax if full else a)
    return q, np.array(stored, F32)


def decode_scales(q8, absmax2, offset, code):
    """map8[q] * absmax2 + offset, each rounded to fp32 (bitsandbytes' dequantize_blockwise + offset)."""
    code = np.asarray(code, F32)
    a2 = np.repeat(np.asarray(absmax2, F32), 256)[: q8.size]
    return ((code[q8] * a2).astype(F32) + F32(offset)).astype(F32)


# ---------------------------------------------------------------------------
# --measure: how often bitsandbytes' native CPU scale codes differ from lora's.

def t3(gen, rows, cols, scale):
    """Student t with 3 degrees of freedom (heavy tails), from the generator only."""
    z = torch.randn(rows, cols, generator=gen)
    chi2 = (torch.randn(3, rows, cols, generator=gen) ** 2).sum(0)
    return z / torch.sqrt(chi2 / 3) * scale


def laplace(gen, rows, cols, b):
    u1 = 1.0 - torch.rand(rows, cols, generator=gen)
    u2 = 1.0 - torch.rand(rows, cols, generator=gen)
    return b * (torch.log(u1) - torch.log(u2))


def realistic_mix(gen, rows, cols):
    """Per-row scales spread log-normally around 0.02, and 1% of the columns 10x larger (the
    outlier features of transformer weights)."""
    scale = 0.02 * torch.exp(0.5 * torch.randn(rows, 1, generator=gen))
    W = torch.randn(rows, cols, generator=gen) * scale
    W[:, torch.randperm(cols, generator=gen)[: max(1, cols // 100)]] *= 10
    return W


MEASURE_DISTS = [
    ("gauss 0.002", lambda g, r, c: torch.randn(r, c, generator=g) * 0.002),
    ("gauss 0.02", lambda g, r, c: torch.randn(r, c, generator=g) * 0.02),
    ("gauss 0.2", lambda g, r, c: torch.randn(r, c, generator=g) * 0.2),
    ("student-t3", lambda g, r, c: t3(g, r, c, 0.02)),
    ("laplace", lambda g, r, c: laplace(g, r, c, 0.014)),
    ("mix", realistic_mix),
]
MEASURE_SIZES = [(256, 256, 64), (1024, 1024, 64), (4096, 4096, 64)]
MEASURE_EXTRA = [("mix", 4096, 4096, 32), ("mix", 4096, 4096, 128), ("student-t3", 4096, 4096, 256)]


def measure():
    code = F.create_dynamic_map(signed=True).float()
    nf4 = nf4_code().numpy()
    rows_out = []
    total = {"blocks": 0, "diff": 0}
    dist_hist = {}
    cases = [(d, r, c, bs) for (r, c, bs) in MEASURE_SIZES for d, _ in MEASURE_DISTS] + MEASURE_EXTRA
    makers = dict(MEASURE_DISTS)
    for seed, (dname, rows, cols, bs) in enumerate(cases):
        gen = torch.Generator().manual_seed(1000 + seed)
        W = makers[dname](gen, rows, cols).float().contiguous()
        packed, absmax = REF["quantize_4bit"](W, bs, "nf4", torch.uint8)
        qp, st = F.quantize_4bit(W, blocksize=bs, compress_statistics=True, quant_type="nf4")
        assert torch.equal(qp.reshape(-1), packed.reshape(-1)), "public API 4-bit codes differ"
        offset = st.offset.reshape(1)
        assert torch.equal(offset, absmax.mean().reshape(1))
        s = (absmax - offset).numpy()
        q_nat, a2_nat = st.absmax.numpy(), st.state2.absmax.numpy()
        q_ref, a2_ref = (t.numpy() for t in REF["quantize_blockwise"](absmax - offset, code, 256))
        q_lora, a2_lora = lora_nearest_blockwise(s, code.numpy())
        q_emu, a2_emu = native_blockwise(s, code.numpy())
        assert np.array_equal(q_emu, q_nat) and np.array_equal(a2_emu.view(np.uint32), a2_nat.view(np.uint32)), \
            f"{dname}: the documented native rule does not reproduce bitsandbytes"
        assert np.array_equal(q_lora, q_ref) and np.array_equal(a2_lora, a2_ref), \
            f"{dname}: lora's nearest rule differs from the reference backend"
        d = np.abs(q_lora.astype(int) - q_nat.astype(int))
        ndiff = int((d > 0).sum())
        for k in d[d > 0]:
            dist_hist[int(k)] = dist_hist.get(int(k), 0) + 1
        exact = absmax.numpy().astype(np.float64)
        sc_near = decode_scales(q_lora, a2_lora, offset.item(), code.numpy()).astype(np.float64)
        sc_nat = decode_scales(q_nat, a2_nat, offset.item(), code.numpy()).astype(np.float64)
        ok = exact > 0
        rel_near = np.abs(sc_near - exact)[ok] / exact[ok]
        rel_nat = np.abs(sc_nat - exact)[ok] / exact[ok]
        # Dequantised weights: code value * scale, against the input (relative Frobenius error).
        p = packed.reshape(-1).numpy()
        codes = np.empty(p.size * 2, np.uint8)
        codes[0::2], codes[1::2] = p >> 4, p & 15
        vals = nf4[codes[: W.numel()]].astype(np.float64)
        blk = np.arange(W.numel()) // bs
        w = W.reshape(-1).numpy().astype(np.float64)
        norm = np.linalg.norm(w)
        err = [np.linalg.norm(vals * sc[blk] - w) / norm for sc in (exact, sc_near, sc_nat)]
        # How much farther the native scale is, in units of its group's absmax2 (at most 2 / 65535:
        # the bin centre is within 1 / 65535 of the value, and its code is the nearest to the centre).
        a2_of_block = a2_nat.astype(np.float64)[np.arange(d.size) // 256]
        worse = ((np.abs(sc_nat - exact) - np.abs(sc_near - exact)) / a2_of_block)[d > 0] if ndiff else np.zeros(1)
        total["blocks"] += d.size
        total["diff"] += ndiff
        rows_out.append(
            f"| {dname} | {rows}x{cols} | {bs} | {d.size} | {ndiff} | {100.0 * ndiff / d.size:.3f}% | {int(d.max())} "
            f"| {rel_near.max():.4e} / {rel_near.mean():.4e} | {rel_nat.max():.4e} / {rel_nat.mean():.4e} "
            f"| {worse.max():.1e} | {err[0]:.6f} / {err[1]:.6f} / {err[2]:.6f} |")
        print(rows_out[-1], file=sys.stderr, flush=True)
    print()
    print("| distribution | shape | block | scale codes | differ | share | max code distance "
          "| nearest rel. err. max / mean | native rel. err. max / mean | native extra err. / absmax2 (max) "
          "| weights rel. error: fp32 absmax / nearest / native |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))
    print(f"\ntotal: {total['diff']} of {total['blocks']} scale codes differ "
          f"({100.0 * total['diff'] / total['blocks']:.3f}%); code distance histogram {dict(sorted(dist_hist.items()))}")
    print(f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__.split('+')[0]}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


# ---------------------------------------------------------------------------
# Adversarial fixtures: tests/fixtures/nf4/adv/.

ADV_FORMAT = """\
# Adversarial NF4 fixtures from bitsandbytes %s, torch %s (CPU); see scripts/gen_nf4_fixtures.py.
# Per case NAME, little-endian raw files:
#   NAME.in.f32, NAME.packed.u8 (reference backend = public API; the generator checks they agree)
#   plain:  NAME.absmax.f32, NAME.out.f32                     (reference backend)
#   dq:     NAME.dq.q8.u8, NAME.dq.absmax2.f32, NAME.dq.offset.f32, NAME.dq.out.f32 (reference backend)
#   NAME.api.<same key> where the public API (quantize_4bit / dequantize_4bit) stores other bytes;
#   the dq offset is the same tensor for both. map8.f32: the map of every dq case (this torch's).
# Columns: name rows cols block_size plain dq api_plain api_dq q8_diffs note
#   api_*: "same" or the keys that differ ("-" when the variant is absent);
#   q8_diffs: indices where the reference backend's and the public API's 8-bit codes differ,
#   comma-separated, outside groups of spread 0 (those are listed by note flat_groups=...);
#   note: zero_tail (an all-zero partial last block), sum_overflow (torch's fp32 mean overflows),
#   scale_overflow (a block scale of FLT_MAX that double quantisation cannot decode finitely).
"""


def normalised_probes():
    """The 15 NF4 thresholds and the fp32 neighbour on each side: 45 values in (-1, 1)."""
    c = nf4_code()
    t = (c[:-1] + c[1:]) / 2
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    down = torch.nextafter(t, torch.full_like(t, -2.0))
    return torch.stack([t, up, down], 1).reshape(-1)


def threshold_layout(bs, exps, odd):
    """Full blocks each led by +-2^e (the absmax, a power of two, so x * (1 / 2^e) and x / 2^e are
    exact) then the probes times 2^e, a fill up to the block size, and a partial last block led by
    -2^e with as many probes as fit. odd: an odd element count in 3 rows, else an even count in 2
    rows of even length."""
    p = normalised_probes()
    per = bs - 1
    nfull = -(-p.numel() // per)
    blocks = []
    for b in range(nfull):
        v = torch.linspace(-0.97, 0.97, bs)
        v[0] = 1.0 if b % 2 == 0 else -1.0
        chunk = p[b * per:(b + 1) * per]
        v[1:1 + chunk.numel()] = chunk
        blocks.append(v * 2.0 ** exps[b % len(exps)])
    rows, step = (3, 2) if odd else (2, 1)
    lo = min(bs - 1, p.numel() + 1) if bs > 32 else 9
    lengths = range(bs - 1, lo - 1, -1) if bs == 32 else range(lo, bs)  # as many probes as fit / just enough
    tail = next(L for L in lengths if (L % 2 == 1) == odd and (nfull * bs + L) % (rows * (1 if odd else 2)) == 0)
    v = torch.empty(tail)
    v[0] = -1.0
    v[1:] = p.repeat(bs // p.numel() + 1)[: tail - 1]
    blocks.append(v * 2.0 ** exps[nfull % len(exps)])
    A = torch.cat(blocks)
    return A.reshape(rows, -1)


def block_with_absmax(gen, a, bs):
    """bs values in [-a, a] whose largest magnitude is exactly a (at a random place, random sign)."""
    u = torch.rand(bs, generator=gen) * 1.8 - 0.9
    pos = int(torch.randint(bs, (1,), generator=gen))
    u[pos] = 1.0 if int(torch.randint(2, (1,), generator=gen)) else -1.0
    return (u * a).float()


def crafted_native_scales(gen, code, nb):
    """Block absmax values whose 8-bit code the native CPU quantiser rounds away from the nearest:
    one block at exactly the offset (v = 0), a few with |v| below the 1 / 65535 half-bin, and a dozen
    just across a map midpoint from their bin's centre. The offset (torch's fp32 mean) moves when a
    value is set, so the targets are re-applied until it is stable."""
    code_np = code.numpy()
    mid = ((code_np[:-1] + code_np[1:]) * F32(0.5)).astype(F32)
    a = (0.02 * torch.exp(0.3 * torch.randn(nb, generator=gen))).numpy().astype(F32)
    a[0], a[1] = F32(0.08), F32(0.004)  # the largest (sets absmax2) and the smallest
    vmin = (0.004 - 0.03) / 0.05

    def centre(i):
        return F32(F32(2 * i) / F32(NATIVE_BINS - 1)) - F32(1)

    zones = []
    for k in range(255):
        m = float(mid[k])
        if not (vmin + 0.05 < m < 0.9) or abs(m) < 1e-4:
            continue
        i = int(np.floor((m + 1.0) * 0.5 * (NATIVE_BINS - 1) + 0.5))
        c, half = float(centre(i)), 1.0 / (NATIVE_BINS - 1)
        far = c + half if m > c else c - half  # the bin's edge on the other side of m
        if abs(far - m) > 4e-7:
            zones.append((m + far) / 2)
    pick = torch.randperm(len(zones), generator=gen)[:14].tolist()
    targets = [0.0, 2.0e-6, -3.0e-6, 6.0e-6, -9.0e-6, 1.3e-5] + [zones[i] for i in sorted(pick)]
    slots = list(range(2, 2 + len(targets)))
    for _ in range(20):
        O = torch.from_numpy(a).mean().numpy()
        A2 = F32(a[0] - O)
        before = a.copy()
        for j, v in zip(slots, targets):
            a[j] = F32(O + F32(F32(v) * A2))
        if np.array_equal(before, a):
            break
    s = (a - torch.from_numpy(a).mean().numpy()).astype(F32)
    qn, _ = lora_nearest_blockwise(s, code_np)
    qa, _ = native_blockwise(s, code_np)
    assert int((qn != qa).sum()) >= 12, "crafted scales: too few native/nearest differences"
    return a


def flat_groups(absmax2_lora_rule):
    return [g for g, v in enumerate(absmax2_lora_rule) if v == 0]


def adversarial(out):
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):  # stale files of renamed cases must not linger
        os.remove(os.path.join(out, f))
    gen = torch.Generator().manual_seed(20260611)
    code8 = F.create_dynamic_map(signed=True).float()
    write("map8", "f32", code8, np.float32, out)
    fmax = float(np.finfo(np.float32).max)
    cases = []  # (name, A, block size, variants, note)

    exps = [0, 3, -7, 100, -120, 20, -1, 64]
    for i, bs in enumerate([32, 64, 128, 256, 512, 1024, 2048, 4096]):
        cases.append((f"thr_b{bs}", threshold_layout(bs, exps[i:] + exps[:i], odd=i % 2 == 0), bs, ("plain", "dq"), "-"))

    z = [torch.zeros(32), torch.full((32,), -0.0), torch.tensor([0.0, -0.0] * 16),
         torch.where(torch.arange(32) % 3 == 0, torch.tensor(-0.0), block_with_absmax(gen, 0.05, 32)),
         torch.full((17,), -0.0)]
    cases.append(("zeros_b32", torch.cat(z).reshape(5, 29), 32, ("plain", "dq"), "zero_tail"))
    cases.append(("zeros_all_b32", torch.tensor([0.0, -0.0, -0.0] * 11).reshape(3, 11), 32, ("plain", "dq"), "zero_tail"))

    p = normalised_probes()
    h0 = torch.cat([torch.tensor([fmax, -fmax, float(np.nextafter(F32(fmax), F32(0))), 1e38, -3e38, 1.0, -1e-30]),
                    p[:25] * fmax])
    h1 = torch.cat([torch.tensor([-1e30]), p[:31] * 1e30])
    h2 = torch.cat([torch.tensor([3e38]), p[:29] * 3e38])
    # Double quantisation: torch's fp32 sum of the maxima overflows (bitsandbytes' offset is inf);
    # lora's mean is finite, but block 0's scale (FLT_MAX) would decode past FLT_MAX: a ValueError.
    cases.append(("huge_b32", torch.cat([h0, h1, h2]).reshape(2, 47), 32, ("plain", "dq"), "sum_overflow;scale_overflow"))
    # The same overflow of torch's sum, with scales that lora decodes finitely.
    g3 = [torch.cat([torch.tensor([m]), p[:31] * m]) for m in (3e38, -2e38, 3e38)]
    cases.append(("huge_sum_b32", torch.cat(g3).reshape(3, 32), 32, ("dq",), "sum_overflow"))
    e0 = torch.cat([torch.tensor([1e30]), p * 1e30, torch.linspace(-9e29, 9e29, 18)])
    e1 = torch.cat([torch.tensor([-(2.0 ** 127)]), p * 2.0 ** 127, torch.linspace(-1e38, 1e38, 18)])
    cases.append(("huge_1e30_b64", torch.cat([e0, e1, torch.tensor([-1e38])]).reshape(3, 43), 64, ("plain", "dq"), "-"))

    sub0 = torch.tensor([2.5e-39, -1e-39, 5e-40, 1e-45, -1e-45, 0.0, -0.0, -2.4e-39] * 4)
    sub1 = torch.cat([torch.tensor([1.2e-38]), p[:31] * 1.2e-38])
    sub2 = torch.cat([torch.tensor([-1e-38]), torch.linspace(-9e-39, 9e-39, 31)])
    sub3 = torch.tensor([3e-39, -1e-39, 2e-40, 0.0, -2.9e-39] * 3)
    cases.append(("sub_b32", torch.cat([sub0, sub1, sub2, sub3]).reshape(3, 37), 32, ("plain", "dq"), "-"))
    ulp = 2.0 ** -149  # spread below 2^-128: the native quantiser's 1 / absmax2 is inf
    tiny = [torch.tensor([m * ulp] + [(m // 3) * ulp, -(m // 2) * ulp] * 15 + [0.0]) for m in (1400000, 1400000, 700000, 2100000)]
    cases.append(("sub_tiny_b32", torch.cat(tiny).reshape(4, 32), 32, ("plain", "dq"), "-"))

    eq = [block_with_absmax(gen, 0.25, 32) for _ in range(256)]
    eq += [block_with_absmax(gen, 0.1875, 32), block_with_absmax(gen, 0.3125, 32)]
    cases.append(("dq_equal_b32", torch.cat(eq).reshape(129, 64), 32, ("dq",), "-"))
    fl = torch.cat([block_with_absmax(gen, 0.5, 32), block_with_absmax(gen, 0.5, 32), block_with_absmax(gen, 0.5, 29)])
    cases.append(("flat_odd_b32", fl.reshape(3, 31), 32, ("plain", "dq"), "-"))

    cases.append(("odd_1x1_b64", torch.tensor([[-3.0]]), 64, ("plain", "dq"), "-"))
    cases.append(("odd_5x7_b32", weights(gen, 5, 7), 32, ("plain", "dq"), "-"))

    nb = 47
    a = crafted_native_scales(gen, code8, nb)
    blocks = [block_with_absmax(gen, float(a[j]), 32) for j in range(nb - 1)] + [block_with_absmax(gen, float(a[-1]), 31)]
    cases.append(("dq_native_b32", torch.cat(blocks).reshape(3, 501), 32, ("plain", "dq"), "-"))

    lines = [l for l in (ADV_FORMAT % (bitsandbytes.__version__, torch.__version__.split("+")[0])).splitlines()]
    for name, A, bs, variants, note in cases:
        A = A.contiguous().float()
        cols = {"plain": "0", "dq": "0", "api_plain": "-", "api_dq": "-", "q8_diffs": "-"}
        notes = [] if note == "-" else [note]
        write(name, "in.f32", A, np.float32, out)
        packed = None
        for variant in variants:
            dq = variant == "dq"
            ref = reference(A, bs, dq, code8 if dq else None)
            api = public_api(A, bs, dq)
            assert bits(ref["packed"]) == bits(api["packed"]), f"{name}: public API 4-bit codes differ"
            if packed is None:
                packed = ref["packed"]
                write(name, "packed.u8", packed, np.uint8, out)
            assert bits(packed) == bits(ref["packed"])
            prefix = "dq." if dq else ""
            keys = ["q8", "absmax2", "out"] if dq else ["absmax", "out"]
            dtype = {"q8": np.uint8, "absmax2": np.float32, "absmax": np.float32, "out": np.float32}
            ext = {"q8": "u8"}
            for k in keys:
                write(name, f"{prefix}{k}.{ext.get(k, 'f32')}", ref[k], dtype[k], out)
            if dq:
                write(name, "dq.offset.f32", ref["offset"], np.float32, out)
                assert bits(ref["offset"]) == bits(api["offset"])
            differ = [k for k in keys if bits(ref[k]) != bits(api[k])]
            for k in differ:
                write(name, f"api.{prefix}{k}.{ext.get(k, 'f32')}", api[k], dtype[k], out)
            cols[variant] = "1"
            cols["api_" + variant] = ",".join(differ) if differ else "same"
            if dq:
                # The documented rules, checked here on bitsandbytes' own absmax.
                _, absmax = REF["quantize_4bit"](A, bs, "nf4", torch.uint8)
                s = (absmax - ref["offset"]).numpy()
                qe, ae = native_blockwise(s, code8.numpy())
                if note != "sum_overflow":
                    assert bits(qe) == bits(api["q8"]) and bits(ae) == bits(api["absmax2"]), f"{name}: native rule"
                ql, al = lora_nearest_blockwise(s, code8.numpy())
                flat = flat_groups(al)
                mask = np.ones(ql.size, bool)
                for g in flat:
                    mask[g * 256:(g + 1) * 256] = False
                if note != "sum_overflow":
                    assert np.array_equal(ql[mask], ref["q8"].numpy()[mask]), f"{name}: nearest rule"
                qr = ref["q8"].numpy()
                diffs = [int(i) for i in np.nonzero((qr != api["q8"].numpy()) & mask)[0]]
                cols["q8_diffs"] = ",".join(map(str, diffs)) if diffs else "none"
                if flat:
                    notes.append("flat_groups=" + ",".join(map(str, flat)))
        lines.append(f"{name} {A.shape[0]} {A.shape[1]} {bs} {cols['plain']} {cols['dq']} {cols['api_plain']} "
                     f"{cols['api_dq']} {cols['q8_diffs']} {';'.join(notes) if notes else '-'}")
    with open(os.path.join(out, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(l for l in lines if not l.startswith("#")))


def bits(t):
    """Raw bytes, so NaN compares equal to the same NaN and -0.0 differs from +0.0."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a).reshape(-1).tobytes()


def main():
    global OUT
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--measure" in sys.argv[1:]:
        measure()
        return
    OUT = args[0] if args else OUT
    legacy(OUT)
    adversarial(os.path.join(OUT, "adv"))


if __name__ == "__main__":
    main()
