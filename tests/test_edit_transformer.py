"""The transformer as Edit calls it: reference-image tokens after the noisy ones (frames 1..n),
with and without ``zero_cond_t`` (Edit-2511), against diffusers' QwenImageTransformer2DModel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.models.transformer import QwenImageTransformer

TOL = 1e-4  # float32 vs float32: only summation order differs

# Noisy latent 3x4 patches, then two references of other sizes and aspects.
SHAPES = [(1, 3, 4), (1, 2, 5), (1, 4, 2)]


@pytest.fixture(scope="module", params=[False, True], ids=["edit", "zero_cond_t"])
def pair(request, tmp_path_factory):
    ref = build_transformer("diffusers", zero_cond_t=request.param)
    assert ref.config.zero_cond_t is request.param
    root = save_checkpoint(ref, tmp_path_factory.mktemp("src"))
    dst = convert_tiny(root, tmp_path_factory.mktemp("conv") / "out")
    return ref, QwenImageTransformer.from_pretrained(dst / "transformer")


@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("sigma", [0.91, 0.3])
def test_reference_tokens_match_diffusers(pair, n_refs, sigma):
    ref, ours = pair
    shapes = SHAPES[: 1 + n_refs]
    L = sum(f * h * w for f, h, w in shapes)
    g = torch.Generator().manual_seed(n_refs)
    x, enc = torch.randn(2, L, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    t = torch.full((2,), sigma)
    with torch.no_grad():
        expected = ref(x, enc, mask, t, [shapes] * 2).sample
    inputs = [mx.array(a.numpy()) for a in (x, enc, mask, t)]
    for compiled in (False, True):
        got = ours.compile(compiled)(*inputs, [shapes] * 2)
        assert rel_err(got, expected) < TOL


def test_zero_cond_t_changes_only_through_references(tmp_path):
    """zero_cond_t with no reference tokens is the plain model; with references it differs."""
    plain = build_transformer("diffusers")
    zero = build_transformer("diffusers", zero_cond_t=True)
    a = convert_tiny(save_checkpoint(plain, tmp_path / "a"), tmp_path / "ca")
    b = convert_tiny(save_checkpoint(zero, tmp_path / "b"), tmp_path / "cb")
    ours_a = QwenImageTransformer.from_pretrained(a / "transformer")
    ours_b = QwenImageTransformer.from_pretrained(b / "transformer")
    rng = np.random.default_rng(0)
    enc = mx.array(rng.standard_normal((1, 5, 16)).astype(np.float32))
    t = mx.array([0.6])
    x = mx.array(rng.standard_normal((1, 12, 16)).astype(np.float32))
    only_noisy = [SHAPES[:1]]
    np.testing.assert_allclose(
        np.array(ours_a(x, enc, None, t, only_noisy)),
        np.array(ours_b(x, enc, None, t, only_noisy)),
        rtol=0,
        atol=1e-6,
    )
    xr = mx.array(rng.standard_normal((1, 22, 16)).astype(np.float32))
    with_ref = [SHAPES[:2]]
    a_out, b_out = (np.array(m(xr, enc, None, t, with_ref)) for m in (ours_a, ours_b))
    assert np.abs(a_out - b_out).max() > 1e-2
