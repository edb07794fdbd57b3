"""4/8-bit quantization: converter layout and size, loading, accuracy, precision plans, CLI.

Tiny transformer whose widths are multiples of the group size (2 heads x head_dim 32 = 64,
FFN 256, modulation 384) with 6 blocks, so the 4-bit plan's 8-bit edge blocks (first and last)
are a third of the model, as converted by the real converter.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err
from tiny_transformer import build_transformer, save_checkpoint
from typer.testing import CliRunner

from qwen_mlx.cli import app
from qwen_mlx.convert import ConvertOptions
from qwen_mlx.convert.text_encoder import convert_config as te_config
from qwen_mlx.convert.text_encoder import convert_weights as te_weights
from qwen_mlx.io import load_folder, read_json
from qwen_mlx.models.text_encoder import QwenTextEncoder
from qwen_mlx.models.transformer import QwenImageTransformer
from qwen_mlx.quantize import quantized_layers, transformer_plan

LAYERS = 6
SHAPES = [[(1, 3, 5)]] * 2
# Relative error (max |diff| / max |ref|) of the whole tiny transformer against float32.
# One affine quantization step is range/(2^bits - 1); its rounding error is uniform, RMS
# step/sqrt(12): for Gaussian weights (range over 64 ~ 4.8 sigma) 0.54 % of the weights' RMS at
# 8 bits and 9.1 % at 4 bits (measured on a 3072x3072 matrix). Through 6 blocks the errors add
# roughly in quadrature and the max over outputs is ~3x the RMS, so ~1-3 % (8-bit) and ~10-30 %
# (4-bit, but with the 8-bit edge blocks and modulation) are expected; a wrong layout, bit width
# or group order gives O(1) errors.
TOL = {8: 3e-2, 4: 0.3}


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = mx.array(torch.randn(2, 15, 16, generator=g).numpy())
    enc = mx.array(torch.randn(2, 7, 64, generator=g).numpy())
    mask = np.ones((2, 7), dtype=np.int32)
    mask[1, 5:] = 0
    return x, enc, mx.array(mask), mx.array([0.8, 0.35])


def run(model: QwenImageTransformer) -> mx.array:
    out = model(*inputs(), SHAPES)
    mx.eval(out)
    return out


def folder_bytes(root) -> int:
    return sum(p.stat().st_size for p in (root / "transformer").glob("*.safetensors"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    ref = build_transformer(
        "quantizable",
        std=0.1,
        num_layers=LAYERS,
        joint_attention_dim=64,
    )
    src = save_checkpoint(ref, root / "src")
    out = {"src": src, "f32": convert_tiny(src, root / "f32")}
    for bits in (4, 8):
        out[bits] = convert_tiny(src, root / f"q{bits}", dtype="bfloat16", quantize=bits)
        out[f"{bits}f32"] = convert_tiny(src, root / f"q{bits}f32", quantize=bits)
    out["bf16"] = convert_tiny(src, root / "bf16", dtype="bfloat16")
    return out


@pytest.mark.parametrize("bits,limit", [(8, 0.35), (4, 0.25)])
def test_quantized_checkpoint_layout_and_size(ckpt, bits, limit):
    weights = load_folder(ckpt[bits] / "transformer")
    # Every block linear is quantized; the kept layers are not.
    for name in ("blocks.2.attn.to_q", "blocks.2.img_mlp.down", "blocks.0.txt_mod"):
        assert weights[f"{name}.weight"].dtype == mx.uint32
        assert weights[f"{name}.scales"].dtype == mx.bfloat16
        assert f"{name}.biases" in weights and f"{name}.bias" in weights
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_embed.linear_1"):
        assert f"{name}.scales" not in weights
        assert weights[f"{name}.weight"].dtype == mx.bfloat16
    config = read_json(ckpt[bits] / "transformer" / "config.json")
    q = config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (bits, 64, "affine")
    assert {"img_in", "txt_in", "proj_out", "norm_out.linear"} <= set(q["unquantized"])
    ratio = folder_bytes(ckpt[bits]) / folder_bytes(ckpt["f32"])
    assert ratio <= limit, f"{bits}-bit checkpoint is {ratio:.3f}x the float32 one"
    index = read_json(ckpt[bits] / "model_index.json")
    assert index["qwen_mlx"]["quantize"] == {"bits": bits, "group_size": 64}


def test_4bit_plan_keeps_edges_and_modulation_at_8_bits(ckpt):
    layers = quantized_layers(load_folder(ckpt[4] / "transformer"), 64)
    bits = {path: v["bits"] for path, v in layers.items()}
    assert bits["blocks.0.attn.to_q"] == bits[f"blocks.{LAYERS - 1}.img_mlp.up"] == 8
    assert bits["blocks.2.attn.to_q"] == bits["blocks.3.txt_mlp.down"] == 4
    assert bits["blocks.2.img_mod"] == bits["blocks.3.txt_mod"] == 8
    config = read_json(ckpt[4] / "transformer" / "config.json")["quantization"]
    assert config["blocks.0.attn.to_q"] == {"bits": 8, "group_size": 64}
    assert "blocks.2.attn.to_q" not in config  # default bits are not repeated
    plan = transformer_plan(4)
    assert plan.bits_for("blocks.2.attn.to_q", (64, 64), LAYERS) == 4
    assert plan.bits_for("blocks.2.attn.to_q", (64, 48), LAYERS) is None  # not a group multiple
    assert plan.bits_for("txt_in", (64, 64), LAYERS) is None


def test_quantized_model_is_the_dequantized_model(ckpt):
    """The mechanism exactly: nn.QuantizedLinear == a float model with dequantized weights."""
    folder = ckpt["4f32"] / "transformer"
    config, weights = read_json(folder / "config.json"), load_folder(folder)
    quant = QwenImageTransformer.from_weights(config, weights)
    assert isinstance(quant.blocks[1].attn.to_q, nn.QuantizedLinear)
    layers = quantized_layers(weights, 64)
    dense = {k: v for k, v in weights.items() if not k.endswith((".scales", ".biases"))}
    for path, spec in layers.items():
        w = mx.dequantize(
            weights[f"{path}.weight"],
            weights[f"{path}.scales"],
            weights[f"{path}.biases"],
            group_size=64,
            bits=spec["bits"],
        )
        dense[f"{path}.weight"] = w
    plain = dict(config)
    plain.pop("quantization")
    ref = QwenImageTransformer.from_weights(plain, dense)
    # float32 both ways; only the accumulation order of the matmuls differs
    assert rel_err(run(quant), run(ref)) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_output_close_to_float(ckpt, bits):
    base = run(QwenImageTransformer.from_pretrained(ckpt["f32"] / "transformer"))
    err = rel_err(
        run(QwenImageTransformer.from_pretrained(ckpt[f"{bits}f32"] / "transformer")), base
    )
    assert 1e-4 < err < TOL[bits], err  # really quantized, and within the expected error
    if bits == 4:
        err8 = rel_err(
            run(QwenImageTransformer.from_pretrained(ckpt["8f32"] / "transformer")), base
        )
        assert err8 < err / 3


def test_plans_cast_floats_only(ckpt):
    model = QwenImageTransformer.from_pretrained(ckpt[8] / "transformer", plan="float32")
    to_q = model.blocks[1].attn.to_q
    assert to_q.weight.dtype == mx.uint32 and to_q.scales.dtype == mx.float32
    bf16 = run(QwenImageTransformer.from_pretrained(ckpt[8] / "transformer"))
    f32 = run(model)
    # The same weights computed in float32 vs bfloat16: bfloat16's 8-bit mantissa (0.4 % per
    # rounding) over 6 blocks of chained matmuls, norms and residual adds.
    assert 1e-4 < rel_err(f32, bf16) < 5e-2


def test_fp16_plan_folds_before_quantizing(ckpt, tmp_path):
    # Folding needs the float weights: a quantized checkpoint cannot be refolded at load...
    with pytest.raises(ValueError, match="quantized weights cannot be folded"):
        QwenImageTransformer.from_pretrained(ckpt["8f32"] / "transformer", plan="fp16")
    # ...so the converter folds (in float32) first, then quantizes.
    dst = convert_tiny(
        ckpt["src"], tmp_path / "fp16q8", dtype="float16", precision="fp16", quantize=8
    )
    weights = load_folder(dst / "transformer")
    assert weights["blocks.1.attn.to_v.scales"].dtype == mx.float16
    folded = run(QwenImageTransformer.from_pretrained(dst / "transformer"))
    base = run(QwenImageTransformer.from_pretrained(ckpt["f32"] / "transformer"))
    assert rel_err(folded, base) < TOL[8]


def test_cli_convert_quantize(ckpt, tmp_path):
    runner = CliRunner()
    dst = tmp_path / "cli"
    res = runner.invoke(app, ["convert", str(ckpt["src"]), str(dst), "--quantize", "4"])
    assert res.exit_code == 0, res.output
    assert "transformer 4-bit" in res.output
    assert read_json(dst / "transformer" / "config.json")["quantization"]["bits"] == 4
    res = runner.invoke(app, ["convert", str(ckpt["src"]), str(tmp_path / "x"), "--quantize", "3"])
    assert res.exit_code == 2 and "4 or 8" in res.output
    res = runner.invoke(
        app,
        ["convert", str(ckpt["src"]), str(tmp_path / "y"), "--quantize", "8", "--group-size", "48"],
    )
    assert res.exit_code == 2 and "group size" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- text encoder


def tiny_text_encoder_weights():
    """A Qwen2.5-VL language model 64 wide (2 heads of 32 on 1 KV head), as converted weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=152064,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=64,
                           intermediate_size=16, fullatt_block_indexes=[0]),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    state = {k: mx.array(v.numpy()) for k, v in model.state_dict().items()}
    return json.loads(cfg.to_json_string()), state


def test_text_encoder_quantized(tmp_path):
    from tiny_tokenizer import build_tokenizer

    config, state = tiny_text_encoder_weights()
    tok = build_tokenizer(tmp_path / "tokenizer", real=False)
    ids = mx.array(np.random.default_rng(0).integers(0, 150000, size=(2, 20)))

    def encoder(bits):
        options = ConvertOptions(dtype="float32", quantize_text_encoder=bits)
        weights = te_weights(dict(state), config, options)
        return QwenTextEncoder.from_weights(te_config(dict(config), options), weights, tok), weights

    ref, _ = encoder(None)
    base = ref(ids)
    errs = {}
    for bits in (8, 4):
        enc, weights = encoder(bits)
        assert weights["language_model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32
        assert weights["language_model.embed_tokens.weight"].dtype == mx.uint32
        assert not any(k.endswith(".scales") for k in weights if k.startswith("visual."))
        assert enc.dtype == mx.float32
        errs[bits] = rel_err(enc(ids), base)
    # As for TOL above, over 3 layers plus the quantized embedding table; the max over 2560
    # outputs of the random model is ~3x the RMS error (1.4 % / 23 % RMS measured on the
    # full-width 28-layer model, scripts/bench_memory.py).
    assert 1e-4 < errs[8] < 6e-2 and 3 * errs[8] < errs[4] < 0.6, errs
