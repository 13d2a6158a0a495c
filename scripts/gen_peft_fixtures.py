#!/usr/bin/env python3
"""Generate the PEFT adapter fixtures in tests/fixtures/peft/ with torch + peft.

A tiny seeded model (no transformers PreTrainedModel, so PEFT treats it as a
custom model) with PEFT-style nested module paths:

    model.embed_tokens            nn.Embedding(17, 5)
    model.in_proj                 nn.Linear(5, 13)
    model.layers.{0,1}.self_attn.q_proj   nn.Linear(13, 7)
    model.layers.{0,1}.attn.c_attn        transformers Conv1D(7, 13): weight [in, out] = [13, 7]
    model.layers.{0,1}.mlp.up_proj        nn.Linear(7, 11)
    model.layers.{0,1}.mlp.down_proj      nn.Linear(11, 13, bias=False)
    score                         nn.Linear(13, 3)

    forward(ids): h = in_proj(embed_tokens(ids))
                  per layer: a = q_proj(h) + c_attn(h); u = up_proj(tanh(a)); h = h + down_proj(tanh(u))
                  return score(h)

fan_in_fan_out: PEFT forces it to False on a plain nn.Linear (with a warning) and
to True on transformers' Conv1D, so the fan_in_fan_out case targets the Conv1D
layers (c_attn). LoRA's A [r, in] and B [out, r] are the same either way; only
the base weight is stored [in, out].

Every adapter is created with init_lora_weights=False (B nonzero), saved with
PeftModel.save_pretrained, then loaded back with PeftModel.from_pretrained onto
a fresh copy of the base model: the reference outputs are that reloaded model's
(eval mode), i.e. PEFT's forward of exactly the bytes on disk.

Files (all safetensors, float32 unless the adapter says otherwise):
    base.safetensors         the base model's state_dict (PyTorch key names)
    inputs.safetensors       x.<module path> [5, in] per Linear / Conv1D module,
                             ids [7] (int64) for the embedding and the model
    <case>/                  adapter dirs as PEFT writes them (adapter_config.json,
                             adapter_model.safetensors; README.md removed)
    ref/<case>.safetensors   y.<module path> [5, out] (each adapted module on x.<path>),
                             y.model.embed_tokens [7, 5] (embedding on ids),
                             model [7, 3] (whole model on ids); fp16/bf16 cases
                             also y16.<path>: the same forward with the adapter
                             kept in its 16-bit dtype (PEFT by default upcasts
                             16-bit adapters to the fp32 base's dtype on load)

patterns.json: PEFT's get_pattern_key and check_target_module_exists on small
cases (pattern keys in order, module path, PEFT's answer).

Cases: plain (r=4, alpha=8), rslora, patterns (rank_pattern + alpha_pattern),
lora_bias, modules_to_save (score), fp16, bf16, named (adapter "alt", saved by
PEFT under named/alt/), named_keys (plain's tensors renamed to carry the adapter
name, "lora_A.default.weight"; PEFT loads that as adapter "default"), embedding,
fan_in_fan_out, alpha0 (lora_alpha=0: scale 0), dora (use_dora=True: refused by
the C++ loader).

Generated with torch 2.15.0, peft 0.21.2, safetensors 0.8.0, transformers 5.24.0.

Usage:
    TORCHDYNAMO_DISABLE=1 /tmp/torchenv/bin/python scripts/gen_peft_fixtures.py [outdir]
    ... gen_peft_fixtures.py --check-export DIR
        DIR holds adapter dirs written by lora::io::save_peft (one per case name,
        see tests/test_io_peft.cpp with LORA_PEFT_EXPORT_DIR set): each is loaded
        with PeftModel.from_pretrained and its outputs compared with ref/<case>.
"""
import json
import os
import shutil
import sys
import warnings

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# PEFT keeps target_modules in a set and writes it as a list: fix string hashing
# so adapter_config.json comes out the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "peft")

LINEAR_TARGETS = ["q_proj", "up_proj", "down_proj"]
N_TOKENS = 5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(13, 7)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(7, 13)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(7, 11)
        self.mlp.down_proj = nn.Linear(11, 13, bias=False)

    def forward(self, h):
        a = self.self_attn.q_proj(h) + self.attn.c_attn(h)
        u = self.mlp.up_proj(torch.tanh(a))
        return h + self.mlp.down_proj(torch.tanh(u))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(17, 5)
        self.in_proj = nn.Linear(5, 13)
        self.layers = nn.ModuleList([Block(), Block()])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.score = nn.Linear(13, 3)

    def forward(self, ids):
        h = self.model.in_proj(self.model.embed_tokens(ids))
        for layer in self.model.layers:
            h = layer(h)
        return self.score(h)


def base_model():
    torch.manual_seed(1234)
    m = Tiny()
    with torch.no_grad():
        # Conv1D initialises its weight with std 0.02 and a zero bias: make it as
        # large as the Linear layers' so its adapter matters as much.
        for blk in m.model.layers:
            blk.attn.c_attn.weight.normal_(0.0, 0.3)
            blk.attn.c_attn.bias.uniform_(-0.3, 0.3)
    return m.eval()


def module_paths(model):
    """Every Linear / Conv1D / Embedding of the base model, in module order."""
    return [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, Conv1D, nn.Embedding))]


def make_inputs(model):
    g = torch.Generator().manual_seed(99)
    inputs = {}
    for path in module_paths(model):
        mod = model.get_submodule(path)
        if isinstance(mod, nn.Embedding):
            continue
        n_in = mod.in_features if isinstance(mod, nn.Linear) else mod.nx
        inputs["x." + path] = torch.randn(N_TOKENS, n_in, generator=g)
    inputs["ids"] = torch.tensor([3, 0, 16, 7, 3, 11, 5], dtype=torch.int64)
    return inputs


# name -> (LoraConfig kwargs, extra) ; extra: adapter_name, dtype, perturb_saved
CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=LINEAR_TARGETS),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=LINEAR_TARGETS,
        # PEFT's get_pattern_key: the first key (in dict order) for which
        # re.match(rf"(.*\.)?({key})$", module_path) matches.
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "up_proj": 3, r"layers\.1\..*down_proj": 6},
        alpha_pattern={"q_proj": 3, "model.layers.1.mlp.up_proj": 16},
    ),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=LINEAR_TARGETS),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["score"]),
    "fp16": dict(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS),
    "bf16": dict(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS),
    "named": dict(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS),
    "embedding": dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj"]),
    "fan_in_fan_out": dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"]),
    "alpha0": dict(r=4, lora_alpha=0, target_modules=LINEAR_TARGETS),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
}
EXTRA = {
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16),
    "named": dict(adapter_name="alt"),
    "modules_to_save": dict(perturb_saved=True),
}


def adapted_paths(peft_model):
    from peft.tuners.lora import LoraLayer

    return [
        n.removeprefix("base_model.model.")
        for n, mod in peft_model.named_modules()
        if isinstance(mod, LoraLayer)
    ]


def module_outputs(model, inputs, paths, prefix="y."):
    """Each module's forward on its fixed input (model: a PeftModel or a plain Tiny)."""
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    out = {}
    with torch.no_grad():
        for path in paths:
            mod = inner.get_submodule(path)
            if path.endswith("embed_tokens"):
                out[prefix + path] = mod(inputs["ids"]).float().contiguous()
            else:
                out[prefix + path] = mod(inputs["x." + path]).float().contiguous()
    return out


def build_case(name, base_sd, inputs, out):
    kwargs = CASES[name]
    extra = EXTRA.get(name, {})
    adapter_name = extra.get("adapter_name", "default")
    model = base_model()
    model.load_state_dict(base_sd)
    torch.manual_seed(4321 + sum(map(ord, name)))
    config = LoraConfig(init_lora_weights=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config, adapter_name=adapter_name)
    pm.eval()
    dtype = extra.get("dtype")
    if dtype is not None:
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)
    if extra.get("perturb_saved"):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.5 * torch.randn_like(p))
    paths = adapted_paths(pm)
    case_dir = os.path.join(out, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(case_dir)
    # PEFT writes a model card next to the adapter: not needed to load, not committed.
    for root, _, files in os.walk(case_dir):
        if "README.md" in files:
            os.remove(os.path.join(root, "README.md"))
    load_dir = case_dir if adapter_name == "default" else os.path.join(case_dir, adapter_name)

    ref = {}
    if dtype is not None:
        # The forward with the adapter in its 16-bit dtype (x is cast to it inside PEFT's Linear).
        ref.update(module_outputs(pm, inputs, paths, prefix="y16."))
    training_out = pm(inputs["ids"]).detach()

    reloaded = load_with_peft(load_dir, base_sd, adapter_name)
    ref.update(module_outputs(reloaded, inputs, paths))
    with torch.no_grad():
        ref["model"] = reloaded(inputs["ids"]).float().contiguous()
    if dtype is None:
        # Sanity: the reloaded adapter is the one that was saved.
        assert torch.allclose(training_out, ref["model"], rtol=0, atol=1e-6), name
    if name == "modules_to_save":
        ref["y.score"] = module_outputs(reloaded, inputs, ["score"])["y.score"]
    os.makedirs(os.path.join(out, "ref"), exist_ok=True)
    save_file(ref, os.path.join(out, "ref", name + ".safetensors"))
    return paths


def load_with_peft(directory, base_sd, adapter_name="default"):
    model = base_model()
    model.load_state_dict(base_sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, directory, adapter_name=adapter_name)
    return pm.eval()


def build_named_keys(out, base_sd, inputs):
    """plain's tensors with the adapter name kept in the keys ("lora_A.default.weight")."""
    src = os.path.join(out, "plain")
    dst = os.path.join(out, "named_keys")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "adapter_config.json"), dst)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        for part in ("lora_A", "lora_B"):
            k = k.replace(f".{part}.weight", f".{part}.default.weight")
        renamed[k] = v
    save_file(renamed, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    # PEFT loads these keys as they are for the adapter named "default".
    reloaded = load_with_peft(dst, base_sd)
    plain_ref = load_file(os.path.join(out, "ref", "plain.safetensors"))
    with torch.no_grad():
        got = reloaded(inputs["ids"])
    assert torch.equal(got, plain_ref["model"]), "named_keys: PEFT did not load the renamed keys"


# PEFT's matching rules on small cases, answered by PEFT itself (patterns.json):
# get_pattern_key (rank_pattern / alpha_pattern) and check_target_module_exists.
PATTERN_CASES = [
    (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj", "q_proj", "q_proj.x"]),
    (["layers.0.self_attn.q_proj", "q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (["q_proj", "layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]),
    (["^model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj", "base.model.layers.0.self_attn.q_proj"]),
    ([r"layers\.1\..*down_proj"], ["model.layers.1.mlp.down_proj", "model.layers.10.mlp.down_proj", "layers.1.down_proj"]),
    (["proj", ".*proj"], ["model.q_proj", "proj"]),
    (["a+b"], ["a+b", "aab", "x.aaab"]),
    (["q_proj|v_proj", "(k|o)_proj"], ["x.v_proj", "x.o_proj", "x.u_proj"]),
    (["mlp", "up_proj$"], ["model.layers.0.mlp.up_proj", "model.layers.0.mlp"]),
    ([r"\d\.mlp\.up_proj"], ["model.layers.0.mlp.up_proj", "mlp.up_proj"]),
    ([")|(x"], ["anything.at.all", "x"]),
    (["layers.[01].self_attn.q_proj"], ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]),
]
TARGET_CASES = [
    ({"target_modules": ["q_proj", "up_proj"]},
     ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj", "q_proj", "model.layers.0.mlp.down_proj"]),
    ({"target_modules": r".*\.(q|v)_proj"}, ["model.layers.0.self_attn.q_proj", "q_proj", "model.layers.0.self_attn.k_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": [1]},
     ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj", "q_proj", "model.layers.1.experts.0.q_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
     ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.h.0.q_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0, 2], "layers_pattern": ["h", "blocks"]},
     ["model.h.0.q_proj", "model.blocks.2.q_proj", "model.layers.0.q_proj", "model.h.1.q_proj"]),
    ({"target_modules": ["q_proj", "score"], "modules_to_save": ["score"]}, ["score", "model.score", "model.q_proj"]),
    ({"target_modules": ["q_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
     ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj"]),
    ({"target_modules": ["q_proj"], "exclude_modules": r".*layers\.0.*"},
     ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj"]),
    ({"target_modules": ["proj"]}, ["model.q_proj", "model.proj", "proj"]),
]


def write_pattern_table(out):
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    rows = {"get_pattern_key": [], "check_target_module_exists": []}
    for keys, paths in PATTERN_CASES:
        for path in paths:
            got = get_pattern_key(keys, path)
            # get_pattern_key returns the path itself when nothing matched; the
            # dict lookup then finds it only if it is literally a key.
            rows["get_pattern_key"].append({"patterns": keys, "path": path, "key": got if got in keys else None})
    for cfg, paths in TARGET_CASES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = LoraConfig(**cfg)
        for path in paths:
            found = check_target_module_exists(config, path)
            rows["check_target_module_exists"].append(
                {"config": dict(cfg, peft_type="LORA"), "path": path, "targets": bool(found)}
            )
    with open(os.path.join(out, "patterns.json"), "w") as f:
        json.dump(rows, f, indent=1)


def generate(out):
    os.makedirs(out, exist_ok=True)
    base = base_model()
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    save_file(base_sd, os.path.join(out, "base.safetensors"))
    inputs = make_inputs(base)
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    with torch.no_grad():
        base_ref = module_outputs(base, inputs, [p for p in module_paths(base)])
        base_ref["model"] = base(inputs["ids"])
    os.makedirs(os.path.join(out, "ref"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in base_ref.items()}, os.path.join(out, "ref", "base.safetensors"))
    for name in CASES:
        paths = build_case(name, base_sd, inputs, out)
        print(f"{name}: {len(paths)} adapted modules")
    build_named_keys(out, base_sd, inputs)
    write_pattern_table(out)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"total fixture size: {total} bytes")


def check_export(directory, fixtures=DEFAULT_OUT):
    """Load every adapter dir lora::io::save_peft wrote under `directory` with
    PeftModel.from_pretrained and compare its outputs with the fixture's."""
    base_sd = load_file(os.path.join(fixtures, "base.safetensors"))
    inputs = load_file(os.path.join(fixtures, "inputs.safetensors"))
    worst, failures, checked = 0.0, [], 0
    for case in sorted(os.listdir(directory)):
        d = os.path.join(directory, case)
        # named_keys holds plain's tensors (under other key names): plain's outputs;
        # <case>_rebuilt: <case>'s modules under a config make_peft_adapter wrote.
        ref_name = {"named_keys": "plain"}.get(case, case.removesuffix("_rebuilt"))
        ref_file = os.path.join(fixtures, "ref", ref_name + ".safetensors")
        if not os.path.isfile(os.path.join(d, "adapter_config.json")) or not os.path.isfile(ref_file):
            continue
        ref = load_file(ref_file)
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        pm = load_with_peft(d, base_sd)
        paths = [k[2:] for k in ref if k.startswith("y.")]
        got = module_outputs(pm, inputs, paths)
        with torch.no_grad():
            got["model"] = pm(inputs["ids"]).float()
        case_worst = 0.0
        for k in ["model"] + ["y." + p for p in paths]:
            # fp16 / bf16 exports hold the 16-bit values PEFT's own file holds, so
            # the fp32 forward after PEFT's upcast matches as tightly.
            err = (got[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-30)
            worst = max(worst, err)
            case_worst = max(case_worst, err)
            if err > 1e-6:
                failures.append(f"{case}/{k}: relative error {err:.3g}")
        checked += 1
        # Not 0: torch's CPU kernels round differently with the input's alignment
        # (here read from a file, there made in memory).
        print(f"{case}: loaded by PeftModel.from_pretrained (r={cfg.get('r')}), {len(paths)} modules + model, "
              f"worst relative error {case_worst:.3g}")
    print(f"check-export: {checked} adapters, worst relative error {worst:.3g}")
    if failures or checked == 0:
        print("\n".join(failures) or "no adapter dirs found")
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check-export":
        check_export(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else DEFAULT_OUT)
    else:
        generate(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
