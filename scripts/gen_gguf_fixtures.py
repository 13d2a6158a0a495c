#!/usr/bin/env python3
"""Generate the GGUF fixtures in tests/fixtures/gguf/ with gguf-py (llama.cpp's gguf package).

Every file is written by gguf.GGUFWriter itself (header, KVs, tensor infos, padding) and every
non-F32 tensor is encoded by gguf.quants.quantize, the functions convert_lora_to_gguf.py calls,
so the C++ reader is checked against gguf-py's bytes and the C++ writer must reproduce them.

  general.gguf        one KV of every GGUF value type (nested arrays included), general.alignment
                      = 64, and tensors of each decodable type: F32 2-D / 3-D / zero-element,
                      F16 and BF16 edge values (ties, subnormals, overflow, NaN), Q8_0 with a zero
                      block and rounding ties.
  lora_mixed.gguf     a LoRA adapter laid out as convert_lora_to_gguf.py lays one out for a llama
                      base: KVs general.architecture, general.type = "adapter", adapter.type =
                      "lora", general.name, adapter.lora.alpha (f32), general.quantization_version;
                      tensors <base>.lora_a ([r, in], ggml ne [in, r]) and <base>.lora_b
                      ([out, r]); attn_q / attn_k B rows permuted by LlamaModel.permute (the
                      converter applies it to the LoRA product, which moves B's rows only);
                      token_embd.lora_a stored transposed (the converter's A.T); a mergekit norm
                      vector (F32, 1-D). Two layers, ranks 4 and 8, odd in/out. The tensor types
                      are mixed (F32, F16, BF16, Q8_0) to cover every decoder in one file.
  lora_f16.gguf       the same adapter as `--outtype f16` writes it (norm vector F32).
  lora_q8_0.gguf      the same adapter as `--outtype q8_0` writes it: Q8_0 where the row length
                      is a multiple of 32, else F16 (the converter's QuantError fallback).
  expected.json       the values: each KV (type and value), each tensor's source float32 bits,
                      its decoded float32 bits, shape and type; per LoRA file the alpha, and per
                      base tensor A [r, in], B [out, r] (decoded, PEFT orientation), the rank and
                      llama.cpp's scale; B before the RoPE permutation for attn_q / attn_k; the
                      llama name map from gguf.TensorNameMap.

The tensor order is sorted by base name (lora_a then lora_b), the norm vectors last: the order
lora::io::save_gguf_lora writes, so lora_f16.gguf and lora_q8_0.gguf are also byte-for-byte
references for it. (The converter's own order follows the safetensors file; llama.cpp does not
depend on it.)

Usage: TORCHDYNAMO_DISABLE=1 python scripts/gen_gguf_fixtures.py [outdir]
Generated with gguf 0.19.0 and numpy 2.4.6.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

TYPE_NAMES = {V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32",
              V.INT32: "i32", V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "str", V.ARRAY: "arr",
              V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64"}


def bits(a: np.ndarray) -> list[int]:
    return [int(x) for x in np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint32)]


def from_bits(b: list[int], shape) -> np.ndarray:
    return np.array(b, dtype=np.uint32).view(np.float32).reshape(shape)


def write(writer: gguf.GGUFWriter) -> bytes:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = Path(writer.path).read_bytes()
    Path(writer.path).unlink()
    return data


def encode_value(value, vtype: V, sub_type: V | None = None) -> dict:
    """A KV value as JSON: {"type": name, "value": v} or, for arrays, element_type + items."""
    if vtype == V.ARRAY:
        if sub_type is None:
            sub_type = V.get_type(value[0])
        return {"type": "arr", "element_type": TYPE_NAMES[sub_type],
                "items": [encode_value(v, sub_type) for v in value]}
    if vtype == V.FLOAT32:
        value = float(np.float32(value))
    return {"type": TYPE_NAMES[vtype], "value": value}


def stored(data: np.ndarray, qtype: Q) -> np.ndarray:
    """What the converter hands GGUFWriter.add_tensor for this type (gguf.quants.quantize)."""
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def decoded(raw: np.ndarray, qtype: Q, shape) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(shape)


def tensor_record(name: str, src: np.ndarray, qtype: Q, raw: np.ndarray) -> dict:
    return {"name": name, "type": qtype.name, "shape": list(src.shape),
            "ne": list(reversed(src.shape)), "source_bits": bits(src),
            "decoded_bits": bits(decoded(raw, qtype, src.shape))}


# ---------------------------------------------------------------- general.gguf
def general(tmp: Path) -> tuple[bytes, dict]:
    w = gguf.GGUFWriter(tmp / "general.gguf", arch="")  # "" : GGUFWriter adds no architecture
    kvs: list[dict] = []

    def kv(key, value, vtype, sub_type=None):
        w.add_key_value(key, value, vtype, sub_type=sub_type)
        kvs.append({"key": key, **encode_value(value, vtype, sub_type)})

    kv("test.u8", 200, V.UINT8)
    kv("test.i8", -100, V.INT8)
    kv("test.u16", 60000, V.UINT16)
    kv("test.i16", -30000, V.INT16)
    kv("test.u32", 4000000000, V.UINT32)
    kv("test.i32", -2000000000, V.INT32)
    kv("test.f32", 0.1, V.FLOAT32)
    kv("test.bool", True, V.BOOL)
    kv("test.str", "h\u00e9llo, GGUF \u2713", V.STRING)
    w.add_custom_alignment(64)
    kvs.append({"key": "general.alignment", **encode_value(64, V.UINT32)})
    kv("test.arr_u8", [1, 2, 255], V.ARRAY, V.UINT8)
    kv("test.arr_i32", [1, -2, 3], V.ARRAY)
    kv("test.arr_f32", [0.5, -1.25, 1e-3], V.ARRAY)
    kv("test.arr_str", ["a", "", "ccc"], V.ARRAY)
    kv("test.arr_bool", [True, False, True], V.ARRAY)
    kv("test.arr_u64", [2**64 - 1, 0], V.ARRAY, V.UINT64)
    kv("test.arr_f64", [0.25, -1e300], V.ARRAY, V.FLOAT64)
    kv("test.nested", [[1, 2], [3], ["x", "y"]], V.ARRAY)
    kv("test.nested2", [[[1]], [[2, 3], [4]]], V.ARRAY)
    kv("test.u64", 2**64 - 1, V.UINT64)
    kv("test.i64", -2**63, V.INT64)
    kv("test.f64", 1.0 / 3.0, V.FLOAT64)
    kv("test.empty_str", "", V.STRING)

    rng = np.random.default_rng(7)
    tensors = []

    def tensor(name, src, qtype):
        raw = stored(src, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
        tensors.append(tensor_record(name, src, qtype, raw))

    tensor("f32.matrix", rng.standard_normal((3, 5)).astype(np.float32), Q.F32)
    # F16 edges: max, ties to even, overflow to inf, subnormals, the smallest tie, NaN, -0.
    f16_edges = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9,
                 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 1e-8,
                 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-20, np.inf, -np.inf,
                 0.1, -2.5e-6, 3.14159, 1e-40]
    src = np.array(f16_edges, dtype=np.float32)
    src = np.concatenate([src, from_bits([0x7fc00000, 0xffc00001], (2,))])
    tensor("f16.vector", src, Q.F16)
    bf16_edges = from_bits([0x00000000, 0x80000000, 0x3f800000, 0x3f808000, 0x3f818000,
                            0x3f808001, 0x7f7fffff, 0x0000a000, 0x7fc00001, 0xff800000,
                            0x7f7f7fff, 0x3dcccccd, 0xbf7fffff, 0x00800000, 0x7f800000,
                            0x4049fdb0, 0xc2f6e979, 0x3eaaaaab], (2, 9))
    tensor("bf16.matrix", bf16_edges, Q.BF16)
    q8 = rng.uniform(-0.5, 0.5, (2, 64)).astype(np.float32)
    q8[0, 32:] = 0.0                                   # an all-zero block: d = 0
    q8[1, :32] = np.arange(32, dtype=np.float32) - 15.5  # 15.5 -> 127: d rounds in f16
    q8[1, 32:] = np.linspace(-127, 127, 32).astype(np.float32)
    q8[1, 33] = 2.5                                    # d = 1: a tie, rounds away from 0
    q8[1, 34] = -2.5
    tensor("q8_0.matrix", q8, Q.Q8_0)
    tensor("f32.cube", rng.standard_normal((2, 3, 4)).astype(np.float32), Q.F32)
    tensor("f32.empty", np.zeros((0, 4), dtype=np.float32), Q.F32)
    tensor("f32.after_empty", rng.standard_normal((1, 3)).astype(np.float32), Q.F32)
    return write(w), {"kvs": kvs, "alignment": 64, "tensors": tensors}


# ---------------------------------------------------------------- the LoRA adapter
ARCH = "llama"
N_HEAD, N_KV_HEAD = 2, 1
ALPHA = 16.0


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, on a numpy array."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def peft_adapter() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PEFT module path -> (A [r, in], B [out, r]) float32; embeddings as PEFT stores them
    (lora_embedding_A [r, vocab], lora_embedding_B [dim, r])."""
    rng = np.random.default_rng(2024)

    def pair(r, n_in, n_out):
        a = rng.uniform(-0.3, 0.3, (r, n_in)).astype(np.float32)
        b = rng.uniform(-0.2, 0.2, (n_out, r)).astype(np.float32)
        return a, b

    return {
        "model.embed_tokens": pair(4, 11, 13),           # vocab 11, dim 13
        "model.layers.0.self_attn.q_proj": pair(4, 13, 12),
        "model.layers.0.self_attn.k_proj": pair(4, 13, 6),
        "model.layers.0.self_attn.v_proj": pair(4, 13, 5),
        "model.layers.1.mlp.up_proj": pair(8, 13, 9),
        "model.layers.1.mlp.down_proj": pair(8, 32, 13),
    }


def gguf_name(name_map, module: str) -> str:
    return name_map.get_name(module + ".weight", try_suffixes=(".weight",))


def lora_file(tmp: Path, fname: str, types: dict[str, tuple[Q, Q]] | Q) -> tuple[bytes, dict]:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    w = gguf.GGUFWriter(tmp / fname, arch=ARCH)          # general.architecture
    w.add_type(gguf.GGUFType.ADAPTER)                     # the converter's set_type()
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_name("Tiny Llama LoRA")                         # metadata.set_gguf_meta_model
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)    # set_gguf_parameters()
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    pairs = {}
    for module, (a, b) in peft_adapter().items():
        base = gguf_name(name_map, module)
        b_hf = b
        if module.endswith("q_proj"):
            b = llama_permute(b, N_HEAD, N_HEAD)
        elif module.endswith("k_proj"):
            b = llama_permute(b, N_HEAD, N_KV_HEAD)
        a_file = a.T.copy() if base == "token_embd.weight" else a   # the converter's lora_a.T
        pairs[base] = (module, a, a_file, b, b_hf)

    out_tensors = {}
    for base in sorted(pairs):
        module, a, a_file, b, b_hf = pairs[base]
        rec = {"module": module, "rank": int(a.shape[0]), "scale": ALPHA / a.shape[0]}
        for suffix, data, key in ((".lora_a", a_file, "A"), (".lora_b", b, "B")):
            if isinstance(types, dict):
                qtype = types[base][0 if suffix == ".lora_a" else 1]
            else:
                qtype = types
                if qtype == Q.Q8_0 and data.shape[-1] % 32 != 0:
                    qtype = Q.F16    # QuantError -> "falling back to F16"
            raw = stored(data, qtype)
            w.add_tensor(base + suffix, raw, raw_dtype=qtype)
            dec = decoded(raw, qtype, data.shape)
            if base == "token_embd.weight" and key == "A":
                dec = dec.T.copy()   # back to PEFT's [r, vocab]
            rec[key + "_type"] = qtype.name
            rec[key + "_shape"] = list(dec.shape)
            rec[key + "_bits"] = bits(dec)
        if module.endswith(("q_proj", "k_proj")):
            rec["n_head"] = N_HEAD if module.endswith("q_proj") else N_KV_HEAD
            rec["B_hf_bits"] = bits(b_hf)
            rec["B_permuted_bits"] = bits(b)
        out_tensors[base] = rec

    # mergekit-extract-lora's layer norm: kept by the converter, F32 (1-D), ignored by llama.cpp.
    norm = np.random.default_rng(5).uniform(0.5, 1.5, (13,)).astype(np.float32)
    w.add_tensor("blk.1.ffn_norm.weight", norm)
    extra = {"blk.1.ffn_norm.weight": bits(norm)}
    return write(w), {"architecture": ARCH, "alpha": ALPHA, "name": "Tiny Llama LoRA",
                      "tensors": out_tensors, "extra": extra}


def name_map_pairs() -> list[list[str]]:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 124)
    modules = ["model.embed_tokens", "lm_head", "model.norm"]
    for bid in (0, 3, 31, 123):
        for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                  "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"):
            modules.append(f"model.layers.{bid}.{m}")
    return [[m, gguf_name(name_map, m)] for m in modules]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/fixtures/gguf"
    out.mkdir(parents=True, exist_ok=True)
    expected: dict = {"gguf_version": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0"}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        data, expected["general.gguf"] = general(tmp)
        (out / "general.gguf").write_bytes(data)

        mixed = {"token_embd.weight": (Q.F32, Q.F32),
                 "blk.0.attn_q.weight": (Q.F32, Q.F32),
                 "blk.0.attn_k.weight": (Q.F16, Q.F32),
                 "blk.0.attn_v.weight": (Q.F16, Q.F16),
                 "blk.1.ffn_up.weight": (Q.BF16, Q.BF16),
                 "blk.1.ffn_down.weight": (Q.Q8_0, Q.F16)}
        for fname, types in (("lora_mixed.gguf", mixed), ("lora_f16.gguf", Q.F16),
                             ("lora_q8_0.gguf", Q.Q8_0)):
            data, expected[fname] = lora_file(tmp, fname, types)
            (out / fname).write_bytes(data)
    expected["name_map"] = name_map_pairs()
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for f in sorted(out.iterdir()):
        print(f"{f.name}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
