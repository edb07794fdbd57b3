"""img2img and inpaint against diffusers' QwenImageImg2ImgPipeline / QwenImageInpaintPipeline.

Both sides get the same noise (diffusers' randn_tensor is patched to return it) and encode the
image to the VAE posterior mean (its retrieve_latents patched to sample_mode="argmax").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_img2img, pipeline_qwenimage_inpaint
from helpers import convert_tiny
from PIL import Image
from tiny_pipeline import build_checkpoint

from qwen_mlx.pipelines.txt2img import QwenImagePipeline

# float32 end to end, image in [0, 1]: as the text-to-image parity test (half a uint8 level).
IMAGE_TOL = 2e-3
SCALE = 4  # the tiny VAE's spatial factor (2 x 2 patches on top: sizes are multiples of 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, ref = build_checkpoint(tmp_path_factory.mktemp("hf") / "qwen-image-tiny")
    dst = convert_tiny(root, tmp_path_factory.mktemp("mlx") / "qwen-image-tiny")
    return dst, ref


@pytest.fixture(scope="module")
def pipe(tiny):
    return QwenImagePipeline.from_pretrained(tiny[0])


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour image with some texture (so resizing and encoding matter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.4 + 0.5
    rgb += 0.1 * rng.standard_normal(rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def mask(width: int, height: int) -> Image.Image:
    """White (repaint) ellipse on black, edges off the latent grid; an RGB image, as users give."""
    y, x = np.mgrid[0:height, 0:width]
    inside = ((x - 0.55 * width) / (0.3 * width)) ** 2 + ((y - 0.4 * height) / (0.3 * height)) ** 2
    m = (inside < 1).astype(np.uint8) * 255
    return Image.fromarray(np.stack([m, m, m], axis=-1))


def noise(batch: int, width: int, height: int, seed: int = 0) -> torch.Tensor:
    """diffusers' unpacked layout (B, 1, C, h, w)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 4, height // SCALE, width // SCALE, generator=g)


def packed(n: torch.Tensor) -> np.ndarray:
    from diffusers import QwenImagePipeline as Ref

    B, _, C, h, w = n.shape
    return Ref._pack_latents(n, B, C, h, w).numpy()


def reference(cls, module, ref, n: torch.Tensor, monkeypatch, **kw) -> np.ndarray:
    pipe = cls(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: n.reshape(shape).clone())
    monkeypatch.setattr(
        module,
        "retrieve_latents",
        lambda out, generator=None, sample_mode=None: out.latent_dist.mode(),
    )
    with torch.no_grad():
        return pipe(output_type="np", **kw).images


@pytest.mark.parametrize(
    "prompts,negative,cfg,steps,strength",
    [
        (["a red cube"], None, 1.0, 5, 0.6),
        (["a red cube on a table", "a cat"], "blurry", 3.0, 4, 0.75),
        (["a red cube"], " ", 2.0, 3, 1.0),  # strength 1: the image only sets the size
    ],
)
def test_img2img_matches_diffusers(
    tiny, pipe, monkeypatch, prompts, negative, cfg, steps, strength
):
    _, ref = tiny
    image = photo(45, 58)  # not a multiple of 8: both sides work at 40 x 56
    width, height = 40, 56
    n = noise(len(prompts), width, height)
    kw = dict(num_inference_steps=steps, true_cfg_scale=cfg, strength=strength)
    expected = reference(
        QwenImageImg2ImgPipeline,
        pipeline_qwenimage_img2img,
        ref,
        n,
        monkeypatch,
        prompt=prompts,
        negative_prompt=negative,
        image=image,
        width=width,
        height=height,
        **kw,
    )
    got = pipe(
        prompts, negative_prompt=negative, image=image, latents=packed(n), output_type="np", **kw
    )
    assert got.shape == expected.shape == (len(prompts), height, width, 3)
    assert np.abs(got - expected).max() <= IMAGE_TOL


@pytest.mark.parametrize("cfg,steps,strength", [(1.0, 5, 0.8), (2.5, 4, 0.5)])
def test_inpaint_matches_diffusers(tiny, pipe, monkeypatch, cfg, steps, strength):
    _, ref = tiny
    width, height = 48, 32
    image, m = photo(width, height, seed=1), mask(width, height)
    n = noise(1, width, height, seed=3)
    kw = dict(num_inference_steps=steps, true_cfg_scale=cfg, strength=strength)
    expected = reference(
        QwenImageInpaintPipeline,
        pipeline_qwenimage_inpaint,
        ref,
        n,
        monkeypatch,
        prompt="a red cube",
        negative_prompt="blurry",
        image=image,
        mask_image=m,
        width=width,
        height=height,
        **kw,
    )
    got = pipe(
        "a red cube",
        negative_prompt="blurry",
        image=image,
        mask_image=m,
        latents=packed(n),
        output_type="np",
        **kw,
    )
    assert np.abs(got - expected).max() <= IMAGE_TOL
    # Outside the mask the result is the image's own reconstruction, inside it is repainted.
    plain = pipe("a red cube", image=image, latents=packed(n), output_type="np", **kw)
    assert np.abs(got - plain).max() > 0.05


def test_latents_is_the_noise_and_seed_draws_it(pipe):
    image = photo(32, 32)
    a = pipe("x", image=image, seed=7, num_inference_steps=3, output_type="np")
    noise_7 = np.array(pipe.prepare_latents(1, 32, 32, seed=7))
    b = pipe("x", image=image, latents=noise_7, num_inference_steps=3, output_type="np")
    np.testing.assert_array_equal(a, b)


def test_bad_inputs(pipe):
    image = photo(32, 32)
    with pytest.raises(ValueError, match="keeps no step"):
        pipe("x", image=image, strength=0.0, num_inference_steps=5)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        pipe("x", image=image, strength=1.5)
    with pytest.raises(ValueError, match="needs an image"):
        pipe("x", mask_image=mask(32, 32))
    with pytest.raises(ValueError, match="no white"):
        pipe("x", image=image, mask_image=Image.new("L", (32, 32)))
    with pytest.raises(ValueError, match="image is 4x40: its width 4 is below the minimum of 8 "):
        pipe("x", image=photo(4, 40))
    with pytest.raises(ValueError, match="cannot read image"):
        pipe("x", image="/nonexistent.png")
