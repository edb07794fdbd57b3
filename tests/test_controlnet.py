"""ControlNet parity with diffusers' QwenImageControlNetModel (and the transformer's residual
hook) on tiny random models whose zero-initialised projections are randomised."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err
from tiny_controlnet import build_controlnet, save_controlnet
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.convert import ConversionError, ConvertOptions, convert_checkpoint
from qwen_mlx.errors import CheckpointError
from qwen_mlx.models.controlnet import QwenImageControlNet, check_compatible, modulation_table
from qwen_mlx.models.transformer import QwenImageTransformer
from qwen_mlx.precision import PrecisionPlan

FP32_TOL = 1e-4  # float32 vs float32: summation order only
# fp16 weights and branches vs the float32 reference: 11-bit mantissa (2^-12 ~ 2.4e-4 relative
# rounding per op) over a 2-block ControlNet's ~10 chained matmuls and norms.
FP16_TOL = 1e-2
Q8_TOL = 3e-2  # 8-bit weights (~0.7 % relative weight error per layer, README "Quantization")


def tensors(B, h, w, T, cond_channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, 16, generator=g)
    cond = torch.randn(B, h * w, cond_channels, generator=g)
    enc = torch.randn(B, T, 16, generator=g)
    mask = torch.ones(B, T)
    mask[-1, T // 2 :] = 0  # the last prompt is padded
    return x, cond, enc, mask


def ref_residuals(ref, x, cond, enc, mask, t, shapes, scale):
    with torch.no_grad():
        return ref(
            hidden_states=x, controlnet_cond=cond, conditioning_scale=scale,
            encoder_hidden_states=enc, encoder_hidden_states_mask=mask, timestep=t,
            img_shapes=shapes, return_dict=False,
        )  # fmt: skip


def our_residuals(ours, x, cond, enc, mask, t, shapes, scale):
    m = lambda a: None if a is None else mx.array(a.numpy())  # noqa: E731
    return ours(m(x), m(cond), scale, m(enc), m(mask), m(t), shapes)


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    """A 3-block transformer and a 2-block Union ControlNet (blocks 0, 1 take residual 0 and
    block 2 residual 1: diffusers' interval rule), both through the real converter."""
    ref_tr = build_transformer("deeper")
    ref_cn = build_controlnet("deeper", num_layers=2)
    root = save_checkpoint(ref_tr, tmp_path_factory.mktemp("src"))
    tr = QwenImageTransformer.from_pretrained(
        convert_tiny(root, tmp_path_factory.mktemp("conv") / "out") / "transformer"
    )
    src = save_controlnet(ref_cn, tmp_path_factory.mktemp("cn") / "Qwen-Image-ControlNet-Union")
    dst = convert_tiny(src, tmp_path_factory.mktemp("cnconv") / "union")
    return ref_tr, ref_cn, tr, QwenImageControlNet.from_pretrained(dst), src, dst


@pytest.mark.parametrize("sigma,scale", [(0.9, 1.0), (0.3, 0.55)])
def test_union_residuals_match_diffusers(union, sigma, scale):
    _, ref_cn, _, cn, _, _ = union
    x, cond, enc, mask = tensors(2, 3, 4, T=6, cond_channels=64)
    x, cond = x[..., :16], cond[..., :16]
    t = torch.full((2,), sigma)
    shapes = [[(1, 3, 4)]] * 2
    expected = ref_residuals(ref_cn, x, cond, enc, mask, t, shapes, scale)
    got = our_residuals(cn, x, cond, enc, mask, t, shapes, scale)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == mx.float32 and rel_err(a, b) < FP32_TOL


def test_transformer_adds_residuals_as_diffusers(union):
    ref_tr, ref_cn, tr, cn, _, _ = union
    x, cond, enc, mask = tensors(2, 4, 3, T=5, cond_channels=16, seed=3)
    t = torch.full((2,), 0.6)
    shapes = [[(1, 4, 3)]] * 2
    samples = ref_residuals(ref_cn, x, cond, enc, mask, t, shapes, 0.8)
    with torch.no_grad():
        expected = ref_tr(x, enc, mask, t, shapes, controlnet_block_samples=samples).sample
        plain = ref_tr(x, enc, mask, t, shapes).sample
    m = lambda a: mx.array(a.numpy())  # noqa: E731
    ours_samples = our_residuals(cn, x, cond, enc, mask, t, shapes, 0.8)
    got = tr(m(x), m(enc), m(mask), m(t), shapes, controlnet_block_samples=ours_samples)
    assert rel_err(got, expected) < FP32_TOL
    assert rel_err(plain, expected) > 0.05  # the ControlNet really changes the prediction
    without = tr(m(x), m(enc), m(mask), m(t), shapes)
    assert rel_err(without, plain) < FP32_TOL  # and no residuals is the plain model


def test_inpainting_controlnet(tmp_path):
    """extra_condition_channels: the packed mask after the latents (one block: every
    transformer block of three takes its single residual)."""
    ref_cn = build_controlnet("deeper", num_layers=1, extra_condition_channels=4, seed=5)
    dst = convert_tiny(save_controlnet(ref_cn, tmp_path / "inpaint"), tmp_path / "out")
    cn = QwenImageControlNet.from_pretrained(dst)
    assert cn.config.inpainting and cn.config.condition_channels == 20
    x, cond, enc, mask = tensors(1, 2, 5, T=4, cond_channels=20, seed=4)
    t = torch.tensor([0.5])
    shapes = [[(1, 2, 5)]]
    expected = ref_residuals(ref_cn, x, cond, enc, None, t, shapes, 1.0)
    got = our_residuals(cn, x, cond, enc, None, t, shapes, 1.0)
    assert len(got) == 1 and rel_err(got[0], expected[0]) < FP32_TOL
    with pytest.raises(ValueError, match="controlnet_cond must be"):
        our_residuals(cn, x, cond[..., :16], enc, None, t, shapes, 1.0)


def test_fp16_folding_is_exact(union, tmp_path):
    """Converted for the fp16 plan but kept in float32: the folded constants (the blocks' and
    the residual projections' 1/c) must cancel exactly, so the residuals are the reference's."""
    _, ref_cn, _, _, src, _ = union
    dst = convert_checkpoint(src, tmp_path / "f", ConvertOptions(dtype="float32", precision="fp16"))
    config = json.loads((dst / "config.json").read_text())
    assert any("controlnet_blocks bias" in line for line in config["qwen_mlx"]["folded"])
    cn = QwenImageControlNet.from_pretrained(dst, plan="fp16")
    assert cn.controlnet_blocks[0].weight.dtype == mx.float16
    stored = PrecisionPlan.from_config(config, 2)  # the fp16 plan's constants, in float32
    folded = QwenImageControlNet.from_pretrained(dst, plan=stored.with_dtype("float32"))
    assert folded.controlnet_blocks[0].weight.dtype == mx.float32
    x, cond, enc, mask = tensors(2, 3, 3, T=4, cond_channels=16)
    t = torch.full((2,), 0.7)
    shapes = [[(1, 3, 3)]] * 2
    expected = ref_residuals(ref_cn, x, cond, enc, mask, t, shapes, 0.9)
    for a, b in zip(
        our_residuals(folded, x, cond, enc, mask, t, shapes, 0.9), expected, strict=True
    ):
        assert rel_err(a, b) < FP32_TOL  # powers of two: exact up to float32 summation order
    for a, b in zip(our_residuals(cn, x, cond, enc, mask, t, shapes, 0.9), expected, strict=True):
        assert rel_err(a, b) < FP16_TOL


def test_fp16_residuals_past_float16_range(tmp_path):
    """A stream past float16's 65504 (as the real models' grows): the fp16 plan computes the
    residual projections on x / c and scales back in float32, so they stay at the reference's
    scale; plain float16 overflows on the same weights."""
    ref_cn = build_controlnet("deeper", num_layers=2, seed=7)
    with torch.no_grad():  # blow up the last block's FFN outputs
        ref_cn.transformer_blocks[-1].img_mlp.net[2].weight.mul_(300.0)
    dst = convert_tiny(save_controlnet(ref_cn, tmp_path / "big"), tmp_path / "out")
    x, cond, enc, _ = tensors(1, 3, 3, T=4, cond_channels=16)
    t = torch.tensor([0.8])
    shapes = [[(1, 3, 3)]]
    stream = []
    hook = ref_cn.transformer_blocks[-1].register_forward_hook(lambda m, i, o: stream.append(o[1]))
    expected = ref_residuals(ref_cn, x, cond, enc, None, t, shapes, 1.0)
    hook.remove()
    peak = float(stream[0].abs().max())
    assert 65504 * 4 < peak < 65504 * 64, peak
    fp16 = QwenImageControlNet.from_pretrained(dst, plan="fp16")
    got = our_residuals(fp16, x, cond, enc, None, t, shapes, 1.0)
    assert rel_err(got[-1], expected[-1]) < FP16_TOL
    plain = QwenImageControlNet.from_pretrained(dst, plan="float16")
    bad = our_residuals(plain, x, cond, enc, None, t, shapes, 1.0)[-1]
    assert not np.isfinite(np.array(bad)).all()


def test_convert_quantized(union, tmp_path):
    _, ref_cn, _, _, src, _ = union
    dst = convert_checkpoint(src, tmp_path / "q8", ConvertOptions(dtype="float32", quantize=8))
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    assert "controlnet_blocks.0" in config["quantization"]["unquantized"]
    assert "controlnet_x_embedder" in config["quantization"]["unquantized"]
    cn = QwenImageControlNet.from_pretrained(dst)
    assert isinstance(cn.blocks[0].attn.to_q, nn.QuantizedLinear)
    assert isinstance(cn.controlnet_blocks[0], nn.Linear)
    x, cond, enc, mask = tensors(1, 4, 4, T=4, cond_channels=16)
    t = torch.tensor([0.4])
    shapes = [[(1, 4, 4)]]
    expected = ref_residuals(ref_cn, x, cond, enc, None, t, shapes, 1.0)
    for a, b in zip(our_residuals(cn, x, cond, enc, None, t, shapes, 1.0), expected, strict=True):
        assert rel_err(a, b) < Q8_TOL


def test_convert_refuses_what_it_cannot_convert(union, tmp_path):
    _, _, _, _, src, dst = union
    with pytest.raises(ConversionError, match="already a qwen-mlx"):
        convert_checkpoint(dst, tmp_path / "again")
    cfg = json.loads((src / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ConversionError, match="num_layers is 3 but the weights have 2"):
        convert_checkpoint(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_widths_must_match_the_transformer(union):
    ref_tr, _, _, _, _, dst = union
    cn_config = json.loads((dst / "config.json").read_text())
    check_compatible(cn_config, dict(ref_tr.config))
    other = dict(build_transformer("diffusers").config)
    with pytest.raises(CheckpointError, match="inner width"):
        check_compatible(cn_config, other)


@pytest.mark.parametrize("plan", ["fp16"])
def test_adaln_table_equals_live_modulation(union, plan):
    """The ControlNet's sigma-only vectors from the adaLN cache are bit-identical to the live
    ones, and a ControlNet loaded without its modulation weights runs from them."""
    _, ref_cn, _, _, src, dst = union
    sigmas = mx.array([0.9, 0.5, 0.1])
    for folder in (dst, src):  # converted, and a diffusers folder converted in memory
        live = QwenImageControlNet.from_pretrained(folder, plan=plan)
        table = modulation_table(folder, live.plan, sigmas)
        assert len(table) == 3
        lean = QwenImageControlNet.from_pretrained(folder, plan=plan)
        lean.drop_modulation()
        x, cond, enc, _ = tensors(1, 2, 4, T=3, cond_channels=16)
        m = lambda a: mx.array(a.numpy())  # noqa: E731
        for i in range(3):
            want = live.modulation(sigmas[i : i + 1])
            got = table[i].blocks
            for (a, b), (c, d) in zip(got, want, strict=True):
                assert mx.array_equal(a, c) and mx.array_equal(b, d)
            args = (m(x), m(cond), 0.5, m(enc), None, None, [[(1, 2, 4)]])
            r_live = live(*args[:5], sigmas[i : i + 1], args[6])
            r_lean = lean(*args, modulation=got)
            for a, b in zip(r_lean, r_live, strict=True):
                assert mx.array_equal(a, b)


def test_cli_convert_standalone_controlnet(union, tmp_path):
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    _, _, _, _, src, _ = union
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "q4"), "--quantize", "4"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["_class_name"] == "QwenImageControlNetModel"
    assert config["quantization"]["bits"] == 4 and config["qwen_mlx"]["dtype"] == "bfloat16"
    assert not (tmp_path / "q4" / "model_index.json").exists()
    QwenImageControlNet.from_pretrained(tmp_path / "q4")  # loads


def test_quantize_at_load_is_the_converted_checkpoint(union, tmp_path):
    """pipeline(quantize=8) quantizes a float ControlNet as it loads: the very weights
    ``convert --quantize 8`` writes; its adaLN table matches its live modulation."""
    from qwen_mlx.loading import load_component

    _, _, _, _, src, dst = union
    conv = QwenImageControlNet.from_pretrained(
        convert_checkpoint(src, tmp_path / "q8", ConvertOptions(dtype="float32", quantize=8))
    )
    config, weights = load_component(dst)
    at_load = QwenImageControlNet.from_weights(config, weights, quantize=8)
    assert isinstance(at_load.blocks[0].img_mlp.up, nn.QuantizedLinear)
    x, cond, enc, _ = tensors(1, 2, 3, T=3, cond_channels=16)
    m = lambda a: mx.array(a.numpy())  # noqa: E731
    args = (m(x), m(cond), 1.0, m(enc), None, mx.array([0.3]), [[(1, 2, 3)]])
    for a, b in zip(at_load(*args), conv(*args), strict=True):
        assert mx.array_equal(a, b)
    table = modulation_table(dst, at_load.plan, mx.array([0.3]), quantize=8)
    for (a, b), (c, d) in zip(table[0].blocks, at_load.modulation(mx.array([0.3])), strict=True):
        assert mx.array_equal(a, c) and mx.array_equal(b, d)
