"""The 2D VAE against diffusers' causal 3D AutoencoderKLQwenImage, on tiny random models."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from helpers import convert_tiny, randomize_vae, rel_err, write_model_index

from qwen_mlx.convert import ConvertOptions
from qwen_mlx.convert.vae import convert_weights
from qwen_mlx.models import vae as vae_mod
from qwen_mlx.models.vae import QwenImageVAE, VAEConfig, run_tiled, tile_spans

TOL = 1e-4  # float32 against float32: only accumulation order differs

CONFIGS = {
    # diffusers' own tiny test config (spatial scale 4: two downsamples)
    "tiny": dict(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                 temperal_downsample=[False, True]),
    # released layout in miniature: scale 8, two temporal resamplers, shortcut-free stages
    "deep": dict(base_dim=32, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2,
                 temperal_downsample=[False, True, True]),
}  # fmt: skip


def build(name: str, tmp_path_factory) -> tuple[AutoencoderKLQwenImage, QwenImageVAE, object]:
    cfg = CONFIGS[name]
    z = cfg["z_dim"]
    ref = AutoencoderKLQwenImage(
        **cfg, latents_mean=[0.1 * i for i in range(z)], latents_std=[1 + 0.1 * i for i in range(z)]
    )
    randomize_vae(ref, seed=len(name))
    ref.eval()
    root = tmp_path_factory.mktemp(name)
    ref.save_pretrained(root / "src" / "vae")
    write_model_index(root / "src", ["vae"])
    dst = convert_tiny(root / "src", root / "mlx")
    return ref, QwenImageVAE.from_pretrained(dst / "vae"), root


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("tiny", tmp_path_factory)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- conversion


def test_folded_kernel_is_causal_conv3d_on_one_frame():
    torch.manual_seed(0)
    conv = QwenImageCausalConv3d(5, 7, 3, padding=1)  # diffusers' own causal conv
    x = torch.randn(2, 5, 1, 6, 9)
    with torch.no_grad():
        ref = conv(x)[:, :, 0]  # pads two zero frames in front
    w = {"decoder.conv_in.weight": mx.array(conv.weight.detach().numpy()),
         "decoder.conv_in.bias": mx.array(conv.bias.detach().numpy())}  # fmt: skip
    w = convert_weights(w, {}, ConvertOptions(dtype="float32"))
    assert w["decoder.conv_in.weight"].shape == (7, 3, 3, 5)
    ours = mx.conv2d(mx.array(nhwc(x[:, :, 0]).numpy()), w["decoder.conv_in.weight"], padding=1)
    ours = ours + w["decoder.conv_in.bias"]
    assert rel_err(ours, nhwc(ref)) < 1e-5
    # and the other temporal taps matter in 3D: the last slice alone is not a trivial choice
    other = mx.conv2d(mx.array(nhwc(x[:, :, 0]).numpy()),
                      mx.array(conv.weight.detach()[:, :, 1].permute(0, 2, 3, 1).numpy()),
                      padding=1)  # fmt: skip
    assert rel_err(other + w["decoder.conv_in.bias"], nhwc(ref)) > 0.1


def test_converted_layout(tiny):
    _, ours, root = tiny
    from qwen_mlx.io import load_folder

    weights = load_folder(root / "mlx" / "vae")
    assert not [k for k in weights if "time_conv" in k]
    assert all(v.ndim in (1, 4) for v in weights.values())
    assert all(v.ndim == 1 for k, v in weights.items() if k.endswith("gamma"))
    assert all(v.dtype == mx.float32 for v in weights.values())
    config = json.loads((root / "mlx" / "vae" / "config.json").read_text())
    assert config["qwen_mlx"]["folded"]
    assert ours.latents_mean == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert ours.latents_std == pytest.approx([1.0, 1.1, 1.2, 1.3])


# ----------------------------------------------------------------------------- parity


def latent(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_decode_matches_diffusers(pair):
    ref, ours, _ = pair
    z = latent((2, 3, 5, ours.config.z_dim), 1)  # non-square, batch 2
    with torch.no_grad():
        want = ref.decode(nchw(z)[:, :, None]).sample[:, :, 0]
    want = nhwc(want.clamp(-1, 1))
    got = ours.decode(mx.array(z))
    s = ours.scale_factor
    assert got.shape == (2, 3 * s, 5 * s, 3)
    # not a trivially saturated image: most pixels are inside (-1, 1)
    assert (want.abs() < 0.999).float().mean() > 0.5
    err = rel_err(got, want)
    print(f"decode rel err {err:.2e}")
    assert err < TOL


def test_decode_other_size(pair):
    ref, ours, _ = pair
    z = latent((1, 4, 6, ours.config.z_dim), 2)
    with torch.no_grad():
        want = nhwc(ref.decode(nchw(z)[:, :, None]).sample[:, :, 0].clamp(-1, 1))
    assert rel_err(ours.decode(mx.array(z)), want) < TOL


def test_encode_matches_diffusers(pair):
    ref, ours, _ = pair
    s = ours.scale_factor
    x = np.tanh(latent((2, 3 * s, 5 * s, 3), 3))  # in [-1, 1], non-square, batch 2
    with torch.no_grad():
        want = nhwc(ref.encode(nchw(x)[:, :, None]).latent_dist.mode()[:, :, 0])
    got = ours.encode(mx.array(x))
    assert got.shape == (2, 3, 5, ours.config.z_dim)
    err = rel_err(got, want)
    print(f"encode rel err {err:.2e}")
    assert err < TOL
    x = np.tanh(latent((1, 4 * s, 6 * s, 3), 4))
    with torch.no_grad():
        want = nhwc(ref.encode(nchw(x)[:, :, None]).latent_dist.mode()[:, :, 0])
    assert rel_err(ours.encode(mx.array(x)), want) < TOL


def test_loads_unconverted_folder(tiny):
    _, ours, root = tiny
    direct = QwenImageVAE.from_pretrained(root / "src" / "vae")
    z = mx.array(latent((1, 3, 4, 4), 5))
    assert rel_err(direct.decode(z), ours.decode(z)) == 0.0


def test_chunked_attention_is_exact(tiny, monkeypatch):
    _, ours, _ = tiny
    attn = ours.decoder.mid_block.attentions[0]
    x = mx.array(latent((2, 5, 7, 96), 8))
    whole = attn(x)
    monkeypatch.setattr(vae_mod, "ATTN_MAX_SCORES", 2 * 35 * 8)  # 8 queries per chunk
    assert rel_err(attn(x), whole) < 1e-6


def test_bfloat16(tiny):
    _, ours, root = tiny
    half = QwenImageVAE.from_pretrained(root / "mlx" / "vae", dtype=mx.bfloat16)
    z = mx.array(latent((1, 3, 5, 4), 9))
    got = half.decode(z)
    assert got.dtype == mx.bfloat16
    assert rel_err(got, ours.decode(z)) < 0.05
    x = mx.array(np.tanh(latent((1, 12, 20, 3), 10)))
    assert rel_err(half.encode(x), ours.encode(x)) < 0.05


# ----------------------------------------------------------------------------- tiling


def test_released_defaults_tile_exactly():
    vae = QwenImageVAE(VAEConfig())  # released config; weights never evaluated
    assert (vae.decoder.margin(), vae.encoder.margin()) == (Fraction(23, 4), Fraction(43, 8))
    assert vae_mod.DEFAULT_TILE_OVERLAP > 2 * 6
    assert not vae._tiles((1, 128, 128, 16), vae_mod.DEFAULT_TILE_SIZE, 16)  # 1024 x 1024
    assert vae._tiles((1, 166, 166, 16), vae_mod.DEFAULT_TILE_SIZE, 16)  # 1328 x 1328
    assert vae._tiles((1, 116, 208, 16), vae_mod.DEFAULT_TILE_SIZE, 16)  # 1664 x 928


def test_tile_spans_cover_with_overlap():
    for length, tile, overlap in [(166, 128, 32), (208, 128, 32), (44, 28, 18), (129, 128, 32)]:
        spans = tile_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(e - s <= tile for s, e in spans)
        assert all(a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:], strict=False))
    assert tile_spans(128, 128, 32) == [(0, 128)]  # 1024x1024 decodes untiled by default


def test_tiled_decode_matches_untiled(tiny):
    """Tiles overlap by 10 latent px, more than twice the tiled part's receptive-field margin
    (4 latent px for this config), so every kept pixel is computed exactly as untiled; what
    remains is float32 rounding from different conv shapes (tolerance 1e-5)."""
    _, ours, _ = tiny
    assert math.ceil(ours.decoder.margin()) == 4
    z = mx.array(latent((1, 36, 52, 4), 6))
    full = ours.decode(z, tile_size=None)
    tiled = ours.decode(z, tile_size=32, tile_overlap=10)  # 2 x 3 tiles of 23 x 25
    err = rel_err(tiled, full)
    print(f"tiled decode rel err {err:.2e}")
    assert err < 1e-5
    # a too-small overlap still blends smoothly, just not exactly
    rough = ours.decode(z, tile_size=32, tile_overlap=3)
    assert 0 < rel_err(rough, full) < 0.5


def test_tiling_bounds_memory(tiny):
    """The full-resolution part's peak memory follows the tile, not the image."""
    _, ours, _ = tiny
    x = ours.decoder.head(mx.array(latent((1, 36, 52, 4), 6)))
    mx.eval(x)

    def peak(fn) -> int:
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    full = peak(lambda: ours.decoder.local(x))
    tiled = peak(lambda: run_tiled(ours.decoder.local, x, 2, 4, 32, 10, 4))
    print(f"decoder peak {tiled / 2**20:.1f} MiB tiled vs {full / 2**20:.1f} MiB untiled")
    assert tiled < 0.5 * full  # each tile is 31% of the latent


def test_tiled_encode_matches_untiled(tiny):
    _, ours, _ = tiny
    assert math.ceil(ours.encoder.margin()) == 4
    x = mx.array(np.tanh(latent((1, 30 * 4, 44 * 4, 3), 7)))
    full = ours.encode(x, tile_size=None)
    tiled = ours.encode(x, tile_size=24, tile_overlap=10)  # 2 x 3 tiles
    err = rel_err(tiled, full)
    print(f"tiled encode rel err {err:.2e}")
    assert err < 1e-5


# ----------------------------------------------------------------------------- bad input


def test_bad_input(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 5\) \(looks channels-first\)"):
        ours.decode(mx.zeros((2, 4, 3, 5)))
    with pytest.raises(ValueError, match=r"got shape \(3, 5, 4\)"):
        ours.decode(mx.zeros((3, 5, 4)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\).*\(1, 8, 8, 4\)"):
        ours.encode(mx.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"looks channels-first"):
        ours.encode(mx.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"multiples of 4, got shape \(1, 8, 10, 3\)"):
        ours.encode(mx.zeros((1, 8, 10, 3)))
    with pytest.raises(ValueError, match="tile_overlap"):
        ours.decode(mx.zeros((1, 8, 8, 4)), tile_size=4, tile_overlap=4)


def test_config_errors():
    with pytest.raises(ValueError, match="attn_scales"):
        VAEConfig.from_dict({"attn_scales": [0.5]})
    with pytest.raises(ValueError, match="temperal_downsample"):
        VAEConfig.from_dict({"dim_mult": [1, 2], "temperal_downsample": [False, True]})
    cfg = VAEConfig.from_dict({"_class_name": "AutoencoderKLQwenImage", "z_dim": 16})
    assert cfg.scale_factor == 8 and len(cfg.latents_mean) == 16
