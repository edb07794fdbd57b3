"""Edit pipelines end to end against diffusers' QwenImageEditPipeline and
QwenImageEditPlusPipeline (and a ``zero_cond_t`` transformer = Edit-2511).

Tiny random checkpoints (tests/tiny_edit.py) in the released layout, converted by our converter,
float32. Both sides get the same packed noise, prompt, negative prompt, steps and CFG; the image
areas are shrunk the same way on both sides (diffusers' through ``shrink_reference_areas``).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny
from PIL import Image
from tiny_edit import (
    TEST_CONDITION_AREA,
    TEST_VAE_AREA,
    build_edit_checkpoint,
    shrink_reference_areas,
)

from qwen_mlx import QwenImageEditPipeline
from qwen_mlx.errors import CheckpointError

# float32 on both sides; the output is an 8-bit-scale image in [0, 1], so 2e-3 (half an 8-bit
# level) means the same picture; accumulation-order differences are ~1e-5 here.
TOL = 2e-3
PROMPT = "Turn the red square blue and add a small hat"
STEPS = 3


def _image(w: int, h: int, seed: int) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(data)


def _ours(root, tmp_path):
    pipe = QwenImageEditPipeline.from_pretrained(convert_tiny(root, tmp_path / "converted"))
    pipe.vae_image_area, pipe.condition_image_area = TEST_VAE_AREA, TEST_CONDITION_AREA
    return pipe


def _run_both(ref, ours, images, height=None, width=None, negative=" ", seed=0, **kw):
    h, w = ours.edit_size(images, height, width)
    L = (h // ours.vae_scale // 2) * (w // ours.vae_scale // 2)
    noise = torch.randn(1, L, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(
            image=images, prompt=PROMPT, negative_prompt=negative, true_cfg_scale=4.0,
            num_inference_steps=STEPS, latents=noise, height=height, width=width,
            output_type="np", **kw,
        ).images  # fmt: skip
    got = ours(
        images, PROMPT, negative_prompt=negative, num_inference_steps=STEPS, true_cfg_scale=4.0,
        latents=mx.array(noise.numpy()), height=height, width=width, output_type="np",
    )  # fmt: skip
    assert got.shape == expected.shape == (1, h, w, 3)
    return got, expected


@pytest.fixture
def shrunk(monkeypatch):
    shrink_reference_areas(monkeypatch)


@pytest.fixture(scope="module")
def edit_pair(tmp_path_factory):
    """(source root, diffusers QwenImageEditPipeline, our pipeline) on one tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("edit")
    root, ref = build_edit_checkpoint(tmp / "src", "edit")
    return root, ref, _ours(root, tmp)


@pytest.fixture(scope="module")
def plus_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plus")
    root, ref = build_edit_checkpoint(tmp / "src", "plus")
    return root, ref, _ours(root, tmp)


def test_edit_matches_diffusers(edit_pair, shrunk):
    _, ref, ours = edit_pair
    assert (ours.plus, ours.flavour, ours.default_steps) == (False, "edit", 50)
    image = _image(150, 100, 0)  # 3:2 -> 160x96 at the test area
    got, expected = _run_both(ref, ours, image)
    assert got.shape[1:3] == (96, 160)
    assert np.abs(got - expected).max() < TOL
    # An output size other than the input's (noisy and reference grids differ), no CFG.
    got, expected = _run_both(ref, ours, image, height=64, width=128, negative=None, seed=1)
    assert np.abs(got - expected).max() < TOL


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
def test_edit_plus_two_images_matches_diffusers(plus_pair, tmp_path, shrunk, zero_cond_t):
    """Two images of different sizes and aspects, each sized on its own; the output takes the
    last one's aspect."""
    if zero_cond_t:
        root, ref = build_edit_checkpoint(tmp_path / "src", "plus", zero_cond_t=True)
        ours = _ours(root, tmp_path)
    else:
        _, ref, ours = plus_pair
    assert ours.flavour == ("edit-2511" if zero_cond_t else "edit-2509")
    assert ours.default_steps == 40
    images = [_image(200, 90, 1), _image(70, 120, 2)]
    got, expected = _run_both(ref, ours, images)
    assert got.shape[1:3] == (160, 96)  # the last image's aspect at the test area
    assert np.abs(got - expected).max() < TOL
    if zero_cond_t:
        # The adaLN cache (on by default) holds the t = 0 row too: no modulation weights are
        # loaded, and the image equals the one computed from the weights every step.
        assert ours.adaln_cache and not ours.transformer.has_modulation
        live = QwenImageEditPipeline.from_pretrained(ours.source.root, adaln_cache=False)
        live.vae_image_area, live.condition_image_area = TEST_VAE_AREA, TEST_CONDITION_AREA
        again, _ = _run_both(ref, live, images)
        assert live.transformer.has_modulation
        assert np.abs(again - got).max() < 1e-6  # float32: the same vectors, the same image


def test_reference_latents_and_sizes(plus_pair, shrunk):
    """Sizes and the references (VAE means, normalised, packed) on their own."""
    _, ref, ours = plus_pair
    images = [_image(200, 90, 1), _image(64, 64, 2)]
    conditions, vae_images = ours.prepare_images(images)
    assert [im.size for im in conditions] == [(64, 32), (64, 64)]
    assert [im.size for im in vae_images] == [(192, 96), (128, 128)]
    refs, shapes = ours.encode_references(vae_images)
    assert shapes == [(1, 12, 24), (1, 16, 16)] and refs.shape == (1, 12 * 24 + 256, 16)
    with torch.no_grad():
        expected = [
            ref.prepare_latents(
                [ref.image_processor.preprocess(im, im.height, im.width).unsqueeze(2)],
                1, 4, 64, 64, torch.float32, "cpu", None,
            )[1]
            for im in vae_images
        ]  # fmt: skip
    got = np.array(refs)
    np.testing.assert_allclose(got[:, :288], expected[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[:, 288:], expected[1].numpy(), atol=1e-4, rtol=0)


def test_rejects_wrong_inputs_and_checkpoints(edit_pair, tmp_path, shrunk):
    src, _, ours = edit_pair
    with pytest.raises(ValueError, match="takes one image"):
        ours([_image(64, 64, 0)] * 2, PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs an input image"):
        ours([], PROMPT)
    with pytest.raises(ValueError, match="PIL image"):
        ours(np.zeros((8, 8, 3)), PROMPT)
    with pytest.raises(ValueError, match="too elongated"):
        ours(_image(600, 4, 0), PROMPT)
    with pytest.raises(ValueError, match="height 100 is not a multiple of 8"):
        ours(_image(64, 64, 0), PROMPT, height=100, num_inference_steps=1)  # tiny VAE: 4 x 2
    # A text-to-image checkpoint is not an Edit one.
    root = shutil.copytree(src, tmp_path / "t2i")
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "QwenImagePipeline"
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a Qwen-Image-Edit checkpoint"):
        QwenImageEditPipeline.from_pretrained(root)


def test_rgba_input_is_composited_on_white(edit_pair, shrunk):
    _, _, ours = edit_pair
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    conditions, _ = ours.prepare_images(rgba)
    assert conditions[0].mode == "RGB" and conditions[0].getpixel((5, 5)) == (255, 255, 255)
