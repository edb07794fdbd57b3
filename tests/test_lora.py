"""LoRA reading, fusing and side paths against diffusers' LoRA loading (tiny random models)."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err
from tiny_lora import (
    LAYOUTS,
    MODULES,
    TOP_LEVEL,
    apply_reference,
    diff_tensors,
    layout_tensors,
    random_diffs,
    random_factors,
    save,
)
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.convert.rules import rename
from qwen_mlx.convert.transformer import RULES
from qwen_mlx.io import load_folder, read_json
from qwen_mlx.lora import (
    LoraError,
    LoraLinear,
    LoraStack,
    diffusers_module,
    fuse_weights,
    lora_key,
    mlx_module,
    read_lora,
)
from qwen_mlx.models.transformer import QwenImageTransformer
from qwen_mlx.precision import PrecisionPlan, make_plan

# float32 against float32: fused (W + BA)x and diffusers' unfused Wx + B(Ax) differ only in
# summation order, as the plain transformer parity test (same tolerance).
FP32_TOL = 1e-4
# A LoRA must move the output by far more than the tolerance, or the parity would prove nothing.
EFFECT = 5e-2
LAYERS = 3
ALPHA, RANK = 2.0, 4  # alpha/rank = 0.5: a wrong or missing alpha is visible


def build(name="diffusers", **kw):
    return build_transformer(name, num_layers=LAYERS, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = save_checkpoint(build(), tmp_path_factory.mktemp("src"))
    return convert_tiny(root, tmp_path_factory.mktemp("conv") / "out") / "transformer"


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 15, 16, generator=g)
    enc = torch.randn(2, 7, 16, generator=g)
    mask = torch.ones(2, 7)
    mask[-1, 4:] = 0
    return x, enc, mask, torch.tensor([0.8, 0.3]), [[(1, 3, 5)]] * 2


def run_ref(model):
    x, enc, mask, t, shapes = inputs()
    with torch.no_grad():
        return model(x, enc, mask, t, shapes).sample


def run_ours(model):
    x, enc, mask, t, shapes = inputs()
    args = (mx.array(x.numpy()), mx.array(enc.numpy()), mx.array(mask.numpy()))
    return model(*args, mx.array(t.numpy()), shapes)


def lora_file(tmp_path, layout, seed, modules=MODULES, alpha=ALPHA, config="diffusers"):
    ref = build(config)
    if layout == "diff":
        diffs = random_diffs(ref, modules, seed)
        return save(tmp_path / f"{layout}{seed}.safetensors", diff_tensors(diffs)), diffs
    sd, meta = layout_tensors(layout, random_factors(ref, modules, RANK, seed), alpha)
    return save(tmp_path / f"{layout}{seed}.safetensors", sd, meta), None


def reference(files):
    """files: [(path, scale, diffs or None)] -> diffusers' output with them applied."""
    loras = [(p, s) for p, s, d in files if d is None]
    diffs = [(d, s) for _, s, d in files if d is not None]
    return run_ref(apply_reference(build(), loras, diffs))


def fused_at_load(model_dir, loras, plan=None):
    config, weights = read_json(model_dir / "config.json"), load_folder(model_dir)
    stored = PrecisionPlan.from_config(config, LAYERS)
    return QwenImageTransformer.from_weights(config, fuse_weights(weights, loras, stored), plan)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_diffusers(tmp_path, model_dir, layout):
    modules = MODULES + TOP_LEVEL if layout in ("kohya", "diff") else MODULES
    path, diffs = lora_file(tmp_path, layout, seed=1, modules=modules)
    expected = reference([(path, 0.7, diffs)])
    assert rel_err(expected, run_ref(build())) > EFFECT  # the LoRA really changes the output
    lora = read_lora(path)
    assert len(lora.updates) == len(modules) * (2 if layout == "diff" else 1)

    # (a) fused into the weight dict before the model is built
    got = run_ours(fused_at_load(model_dir, [(lora, 0.7)]))
    assert rel_err(got, expected) < FP32_TOL
    # (b) fused into a loaded model
    model = QwenImageTransformer.from_pretrained(model_dir)
    LoraStack(model).add(lora, 0.7)
    assert rel_err(run_ours(model), expected) < FP32_TOL


def test_alpha_is_applied(tmp_path):
    """kohya and diffusion_model. alphas (2512-Lightning: rank 64, alpha 8) give alpha/rank."""
    path, _ = lora_file(tmp_path, "kohya", seed=2, modules=MODULES[:1])
    (update,) = read_lora(path).updates.values()
    assert update.scale == pytest.approx(ALPHA / RANK)
    path, _ = lora_file(tmp_path, "diffusion_model", seed=2, modules=MODULES[:1], alpha=None)
    (update,) = read_lora(path).updates.values()
    assert update.scale == 1.0


def test_stacked_loras_and_unload(tmp_path, model_dir):
    a, _ = lora_file(tmp_path, "peft_metadata", seed=3)
    b, _ = lora_file(tmp_path, "kohya", seed=4, modules=MODULES[2:] + TOP_LEVEL)
    c, diffs = lora_file(tmp_path, "diff", seed=5, modules=MODULES[:4])
    expected = reference([(a, 1.3, None), (b, -0.6, None), (c, 0.5, diffs)])
    loras = [(read_lora(a), 1.3), (read_lora(b), -0.6), (read_lora(c), 0.5)]

    assert rel_err(run_ours(fused_at_load(model_dir, loras)), expected) < FP32_TOL

    model = QwenImageTransformer.from_pretrained(model_dir)
    base = np.array(run_ours(model))
    stack = LoraStack(model)
    for lora, scale in loras:
        stack.add(lora, scale)
    assert rel_err(run_ours(model), expected) < FP32_TOL
    assert stack.touches(r"_mod\.")
    stack.clear()
    assert np.array_equal(np.array(run_ours(model)), base)  # originals restored exactly

    # Unloading by re-reading the checkpoint gives the same originals.
    reload_stack = LoraStack(model, reload=lambda names: load_folder(model_dir))
    reload_stack.add(loras[0][0], 1.3)
    assert not np.array_equal(np.array(run_ours(model)), base)
    reload_stack.clear()
    assert np.array_equal(np.array(run_ours(model)), base)


def test_fused_under_the_fp16_plan_is_exact(tmp_path, model_dir):
    """The fp16 plan's folds (kept in float32 here) commute with fusing: fused before folding at
    load and fused into an already folded model both match diffusers."""
    a, _ = lora_file(tmp_path, "diffusion_model", seed=6)
    c, diffs = lora_file(tmp_path, "diff", seed=7, modules=MODULES)
    expected = reference([(a, 0.9, None), (c, 1.0, diffs)])
    loras = [(read_lora(a), 0.9), (read_lora(c), 1.0)]
    plan = make_plan("fp16", "qwen-image-2512", LAYERS).with_dtype("float32")
    assert plan.folded

    assert rel_err(run_ours(fused_at_load(model_dir, loras, plan)), expected) < FP32_TOL
    model = QwenImageTransformer.from_pretrained(model_dir, plan=plan)
    stack = LoraStack(model)
    for lora, scale in loras:
        stack.add(lora, scale)
    assert rel_err(run_ours(model), expected) < FP32_TOL


# ----------------------------------------------------------------------------- errors


def test_unmatched_keys_are_an_error_listing_them(tmp_path, model_dir):
    ref = build()
    sd, _ = layout_tensors("peft", random_factors(ref, MODULES[:2], RANK, 0), None)
    sd["transformer.transformer_blocks.0.attn.to_zz.lora_A.weight"] = torch.zeros(RANK, 48)
    sd["transformer.transformer_blocks.0.attn.to_zz.lora_B.weight"] = torch.zeros(48, RANK)
    sd["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 48)
    sd["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(48, RANK)
    lora = read_lora(save(tmp_path / "bad.safetensors", sd))
    model = QwenImageTransformer.from_pretrained(model_dir)
    with pytest.raises(LoraError, match=r"4 LoRA key\(s\) match no Qwen-Image") as e:
        LoraStack(model).add(lora)
    assert "attn.to_zz.lora_A.weight" in str(e.value)
    assert "transformer_blocks.7.attn.to_q.lora_B.weight" in str(e.value)
    with pytest.raises(LoraError, match="match no Qwen-Image"):
        fuse_weights(load_folder(model_dir), [(lora, 1.0)])


def test_foreign_and_malformed_files(tmp_path, model_dir):
    model = QwenImageTransformer.from_pretrained(model_dir)
    flux = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 48),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 2),
    }
    with pytest.raises(LoraError, match="looks like a LoRA for Flux"):
        LoraStack(model).add(read_lora(save(tmp_path / "flux.safetensors", flux)))
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8)}
    sdxl["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(LoraError, match="Stable Diffusion UNet"):
        LoraStack(model).add(read_lora(save(tmp_path / "sdxl.safetensors", sdxl)))
    lokr = {"lora_unet_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(4, 4)}
    with pytest.raises(LoraError, match="unknown key form"):
        read_lora(save(tmp_path / "lokr.safetensors", lokr))
    half = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 48)}
    with pytest.raises(LoraError, match="only its down"):
        read_lora(save(tmp_path / "half.safetensors", half))
    wrong = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 2),
    }
    with pytest.raises(LoraError, match="do not fit the model's shapes"):
        LoraStack(model).add(read_lora(save(tmp_path / "wrong.safetensors", wrong)))
    with pytest.raises(LoraError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "x.pt").write_bytes(b"\0")
    with pytest.raises(LoraError, match="only .safetensors"):
        read_lora(tmp_path / "x.pt")


def test_names_follow_the_converter():
    """The module rules are the converter's; kohya names come back to diffusers' exactly."""
    ref = build()
    for name, _ in ref.named_parameters():
        module, param = name.rsplit(".", 1)
        assert f"{mlx_module(module)}.{param}" == rename(name, RULES), name
        if re.search(r"(linear|proj|to_\w+|mod\.1|net\.2|_in|_out)$", module):
            kohya = "lora_unet_" + module.replace(".", "_")
            assert diffusers_module(kohya) == module
            assert diffusers_module(f"diffusion_model.{module}") == module


def test_lora_key(tmp_path):
    a, _ = lora_file(tmp_path, "peft", seed=8)
    b, _ = lora_file(tmp_path, "kohya", seed=9)
    la, lb = read_lora(a), read_lora(b)
    assert lora_key([]) == ""
    assert lora_key([(la, 1.0)]) == lora_key([(read_lora(a), 1.0)])  # contents, not objects
    keys = {lora_key(s) for s in ([(la, 1.0)], [(la, 0.5)], [(lb, 1.0)], [(la, 1), (lb, 1)])}
    assert len(keys) == 4


# ----------------------------------------------------------------------------- quantized

# 8-bit affine quantization, groups of 32. On these tiny random models (std 0.3 weights, so
# large activations) the quantized model without any LoRA is already 3e-2 (relative) off the
# float one (measured), so the quantized results get that bound with some margin; the side path
# itself is checked exactly against float weights equal to the dequantized ones.
Q_BITS, Q_GROUP, Q_TOL = 8, 32, 5e-2


def quantizable(path, m) -> bool:
    return isinstance(m, nn.Linear) and m.weight.shape[1] % Q_GROUP == 0


def quantize(model):
    nn.quantize(model, group_size=Q_GROUP, bits=Q_BITS, class_predicate=quantizable)
    return model


def dequantized_weights(model_dir):
    """The float weights a quantized model computes with (each quantizable weight rounded)."""
    model = QwenImageTransformer.from_pretrained(model_dir)
    out = {}
    for path, m in model.named_modules():
        for key, v in m.items() if isinstance(m, nn.Linear) else ():
            name = f"{path}.{key}"
            if key == "weight" and quantizable(path, m):
                v = mx.dequantize(*mx.quantize(v, Q_GROUP, Q_BITS), group_size=Q_GROUP, bits=Q_BITS)
            out[name] = v
    out.update({k: v for k, v in load_folder(model_dir).items() if k not in out})
    return out


def test_quantized_side_path_and_fuse_before_quantize(tmp_path):
    ref = build("deeper")  # inner dim 64: every block linear quantizes in groups of 32
    model_dir = convert_tiny(save_checkpoint(ref, tmp_path / "src"), tmp_path / "out")
    model_dir = model_dir / "transformer"
    config = read_json(model_dir / "config.json")
    path, _ = lora_file(tmp_path, "kohya", seed=10, modules=MODULES + TOP_LEVEL, config="deeper")
    c, diffs = lora_file(tmp_path, "diff", seed=11, modules=MODULES[:3], config="deeper")
    loras = [(read_lora(path), 0.8), (read_lora(c), 1.0)]

    # LoRA + diff delta beside the quantized linears (the diff on to_q runs as a dense delta)
    model = quantize(QwenImageTransformer.from_pretrained(model_dir)).compile(True)
    base_q = np.array(run_ours(model))  # traced once without the side paths
    stack = LoraStack(model)
    for lora, scale in loras:
        stack.add(lora, scale)
    assert isinstance(model.blocks[0].attn.to_q, LoraLinear)
    assert isinstance(model.blocks[0].attn.to_q.linear, nn.QuantizedLinear)
    assert not isinstance(model.img_in, LoraLinear)  # in-dim 16: left float, fused
    side = run_ours(model)

    # The side path is exact: float weights = dequantized ones, with the LoRAs fused.
    exact = QwenImageTransformer.from_weights(
        config, fuse_weights(dequantized_weights(model_dir), loras)
    )
    assert rel_err(side, run_ours(exact)) < FP32_TOL

    # Fused into the float weights, then quantized (quantizing at load).
    fused_q = quantize(
        QwenImageTransformer.from_weights(config, fuse_weights(load_folder(model_dir), loras))
    )
    fused_then_quantized = run_ours(fused_q)

    expected = reference_for(ref, [(path, 0.8, None), (c, 1.0, diffs)])
    assert rel_err(expected, run_ref(ref)) > 4 * Q_TOL  # the LoRAs dwarf the quantization error
    assert rel_err(side, expected) < Q_TOL
    assert rel_err(fused_then_quantized, expected) < Q_TOL

    stack.clear()
    assert isinstance(model.blocks[0].attn.to_q, nn.QuantizedLinear)
    assert np.array_equal(np.array(run_ours(model)), base_q)


def reference_for(ref_template, files):
    """diffusers' output for a fresh copy of ``ref_template``'s config (same random weights)."""
    model = build_transformer("deeper", num_layers=LAYERS)
    assert all(
        torch.equal(p, q)
        for p, q in zip(model.parameters(), ref_template.parameters(), strict=True)
    )
    loras = [(p, s) for p, s, d in files if d is None]
    diffs = [(d, s) for _, s, d in files if d is not None]
    return run_ref(apply_reference(model, loras, diffs))
