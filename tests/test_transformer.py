"""Transformer parity with diffusers' QwenImageTransformer2DModel on tiny random models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.models.transformer import QwenImageTransformer, rope_tables

FP32_TOL = 1e-4  # float32 vs float32: only summation order differs
# bf16 weights and branch compute vs the float32 reference: bf16 keeps 8 mantissa bits
# (rel. rounding 2^-9 ~ 2e-3 per op); a 2-3 layer model chains ~15 rounded matmuls, norms and
# attention, so a few 1e-2 of the output's max is the expected error, not a bug.
BF16_TOL = 4e-2


def inputs(B, h, w, T, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, 16, generator=g)
    enc = torch.randn(B, T, 16, generator=g)
    mask = None
    if masked:
        mask = torch.ones(B, T)
        mask[-1, T // 2 :] = 0  # the last prompt is padded
    return x, enc, mask


def run_both(ref, ours, x, enc, mask, t, shapes):
    with torch.no_grad():
        expected = ref(x, enc, mask, t, shapes).sample
    got = ours(
        mx.array(x.numpy()),
        mx.array(enc.numpy()),
        None if mask is None else mx.array(mask.numpy()),
        mx.array(t.numpy()),
        shapes,
    )
    return got, expected


@pytest.fixture(scope="module", params=["diffusers", "odd_heads", "deeper"])
def pair(request, tmp_path_factory):
    ref = build_transformer(request.param)
    root = save_checkpoint(ref, tmp_path_factory.mktemp("src"))
    dst = convert_tiny(root, tmp_path_factory.mktemp("conv") / "out")
    return ref, QwenImageTransformer.from_pretrained(dst / "transformer")


@pytest.mark.parametrize("h,w,B,masked", [(3, 5, 2, True), (4, 4, 1, False), (5, 2, 2, False)])
@pytest.mark.parametrize("sigma", [1.0, 0.37, 0.02])
def test_float32_parity(pair, h, w, B, masked, sigma):
    ref, ours = pair
    x, enc, mask = inputs(B, h, w, T=7, masked=masked)
    t = torch.full((B,), sigma)
    got, expected = run_both(ref, ours, x, enc, mask, t, [[(1, h, w)]] * B)
    assert got.dtype == mx.float32 and tuple(got.shape) == tuple(expected.shape)
    assert rel_err(got, expected) < FP32_TOL


def test_padding_is_masked(pair):
    """With a mask, padded text tokens must not change the image output."""
    _, ours = pair
    x, enc, _ = inputs(1, 3, 5, T=6, masked=False)
    shapes = [[(1, 3, 5)]]
    mask = mx.array([[1, 1, 1, 1, 0, 0]])
    a = ours(mx.array(x.numpy()), mx.array(enc.numpy()), mask, mx.array([0.5]), shapes)
    noisy = enc.clone()
    noisy[:, 4:] = 100.0
    b = ours(mx.array(x.numpy()), mx.array(noisy.numpy()), mask, mx.array([0.5]), shapes)
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-5
    c = ours(mx.array(x.numpy()), mx.array(noisy.numpy()), None, mx.array([0.5]), shapes)
    assert np.abs(np.array(a) - np.array(c)).max() > 1e-2  # and without it they do


def test_per_item_timesteps(pair):
    ref, ours = pair
    x, enc, mask = inputs(2, 3, 5, T=7)
    got, expected = run_both(ref, ours, x, enc, mask, torch.tensor([0.9, 0.1]), [[(1, 3, 5)]] * 2)
    assert rel_err(got, expected) < FP32_TOL


def test_bfloat16_parity(tmp_path):
    ref = build_transformer("diffusers")
    root = save_checkpoint(ref, tmp_path / "src")
    dst = convert_tiny(root, tmp_path / "bf16", dtype="bfloat16")
    ours = QwenImageTransformer.from_pretrained(dst / "transformer")
    assert ours.blocks[0].attn.to_q.weight.dtype == mx.bfloat16
    x, enc, mask = inputs(2, 3, 5, T=7)
    got, expected = run_both(ref, ours, x, enc, mask, torch.tensor([0.6, 0.6]), [[(1, 3, 5)]] * 2)
    assert got.dtype == mx.float32  # the residual path stays float32
    err = rel_err(got, expected)
    assert 1e-4 < err < BF16_TOL  # really ran in bf16, and within bf16's accuracy


def test_runtime_plan_override(tmp_path):
    """A float32 checkpoint can run under a bf16 plan without re-converting."""
    ref = build_transformer("diffusers")
    dst = convert_tiny(save_checkpoint(ref, tmp_path / "src"), tmp_path / "out")
    ours = QwenImageTransformer.from_pretrained(dst / "transformer", plan="bfloat16")
    assert ours.blocks[1].txt_mlp.down.weight.dtype == mx.bfloat16
    x, enc, mask = inputs(1, 4, 4, T=5, masked=False)
    got, expected = run_both(ref, ours, x, enc, mask, torch.tensor([0.5]), [[(1, 4, 4)]])
    assert rel_err(got, expected) < BF16_TOL


def test_rope_positions_match_diffusers():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    ref = QwenEmbedRope(theta=10000, axes_dim=[8, 4, 4], scale_rope=True)
    img, txt = ref([(1, 3, 5)], max_txt_seq_len=4, device=torch.device("cpu"))
    cos, sin = rope_tables(((1, 3, 5),), 4, (8, 4, 4), 10000.0)
    expected = torch.cat([txt, img]).numpy()
    np.testing.assert_allclose(np.array(cos)[:, 0], expected.real, atol=1e-6)
    np.testing.assert_allclose(np.array(sin)[:, 0], expected.imag, atol=1e-6)


def test_bad_inputs_are_named(pair):
    _, ours = pair
    x = mx.zeros((1, 15, 16))
    enc = mx.zeros((1, 4, 16))
    with pytest.raises(ValueError, match="hidden_states must be"):
        ours(mx.zeros((1, 15, 8)), enc, None, mx.array([0.5]), [(1, 3, 5)])
    with pytest.raises(ValueError, match="different token count"):
        ours(x, enc, None, mx.array([0.5]), [(1, 4, 4)])
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        ours(x, enc, mx.ones((1, 3)), mx.array([0.5]), [(1, 3, 5)])


def test_compiled_blocks_match(pair):
    """mx.compile'd blocks give the uncompiled output (float32: fusion may reorder rounding,
    so 1e-5 of the output's max), with and without a mask, and follow replaced weights."""
    _, ours = pair
    x, enc, mask = inputs(2, 3, 5, T=7)
    args = (mx.array(x.numpy()), mx.array(enc.numpy()), mx.array(mask.numpy()), mx.array([0.4]))
    shapes = [[(1, 3, 5)]] * 2
    try:
        plain = ours(*args, shapes)
        ours.compile()
        assert rel_err(ours(*args, shapes), plain) < 1e-5
        nomask = ours(args[0], args[1], None, args[3], shapes)
        ours.compile(False)
        assert rel_err(nomask, ours(args[0], args[1], None, args[3], shapes)) < 1e-5
        ours.compile()
        w = ours.blocks[0].img_mlp.down.weight
        ours.blocks[0].img_mlp.down.weight = w * 0.5  # a replaced weight must be seen
        changed = ours(*args, shapes)
        ours.blocks[0].img_mlp.down.weight = w
        assert rel_err(changed, plain) > 1e-3
    finally:
        ours.compile(False)
