"""Inputs are sacred (issue 21), through the pipelines' public calls on tiny checkpoints: every
high-bit-depth input gives exactly what its 8-bit twin gives (img2img image, inpaint mask, Edit
image); an unusable cache folder still generates; a LoRA with a bad scale or NaN is refused
when it loads; a cached hub snapshot is described when the hub cannot be reached."""

from __future__ import annotations

import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from helpers import convert_tiny
from PIL import Image
from test_inputs import write_png16
from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA, build_edit_checkpoint

from qwen_mlx import QwenImageEditPipeline, cache
from qwen_mlx.lora import LoraError
from qwen_mlx.pipelines.txt2img import QwenImagePipeline

W, H = 32, 24
RUN = dict(width=W, height=H, num_inference_steps=3, seed=3, output_type="np")


@pytest.fixture(scope="module")
def source(tiny_qwen_image):
    return tiny_qwen_image[0]


@pytest.fixture(scope="module")
def pipe(tiny_qwen_image):
    return QwenImagePipeline.from_pretrained(tiny_qwen_image[1])


def photo(channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (H, W, channels) if channels > 1 else (H, W)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def twins(tmp_path, eight: np.ndarray) -> dict:
    """The same picture at 8 bits and in every deeper form a user may hand over."""
    sixteen = eight.astype(np.uint16) * 257
    out = {
        "16-bit PNG": write_png16(tmp_path / f"{eight.ndim}-16.png", sixteen),
        "uint16 array": sixteen,
        "float array": eight / 255.0,
    }
    if eight.ndim == 2:
        out["I;16 image"] = Image.fromarray(sixteen)
        out["I (32-bit) image"] = Image.fromarray(
            np.round(eight / 255 * (2**31 - 1)).astype(np.int32)
        )
        out["F image"] = Image.fromarray((eight / 255).astype(np.float32))
    return out


@pytest.mark.parametrize("channels", [3, 1])
def test_img2img_deep_images_match_their_8_bit_twin(pipe, tmp_path, channels):
    eight = photo(channels)
    expected = pipe("a cube", image=Image.fromarray(eight), strength=0.6, **RUN)
    white = pipe("a cube", image=Image.new("RGB", (W, H), "white"), strength=0.6, **RUN)
    assert np.abs(expected - white).max() > 0.05  # the image matters: clipping would show
    for name, image in twins(tmp_path, eight).items():
        got = pipe("a cube", image=image, strength=0.6, **RUN)
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_inpaint_16_bit_mask_repaints_only_its_white_half(pipe, tmp_path):
    """The issue's mask: left half 40000/65535 (repaint), right half 20000 (keep). Read as 8 bits
    that is 156 / 78; clipped (the bug) it was white everywhere and repainted all of it."""
    image = Image.fromarray(photo())
    eight = np.zeros((H, W), np.uint8)
    eight[:, : W // 2], eight[:, W // 2 :] = 156, 78
    sixteen = np.zeros((H, W), np.uint16)
    sixteen[:, : W // 2], sixteen[:, W // 2 :] = 40000, 20000
    m = np.array(pipe.encode_mask(write_png16(tmp_path / "m16.png", sixteen), H, W))
    left = np.array(pipe.encode_mask(Image.fromarray(eight), H, W))
    np.testing.assert_array_equal(m, left)
    assert 0 < m.mean() < 1  # half of it, not all of it
    expected = pipe("a cube", image=image, mask_image=Image.fromarray(eight), strength=0.9, **RUN)
    for name, mask in twins(tmp_path, eight).items():
        got = pipe("a cube", image=image, mask_image=mask, strength=0.9, **RUN)
        np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.fixture(scope="module")
def edit_pipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    root, _ = build_edit_checkpoint(tmp / "src", "edit")
    pipe = QwenImageEditPipeline.from_pretrained(convert_tiny(root, tmp / "converted"))
    pipe.vae_image_area, pipe.condition_image_area = TEST_VAE_AREA, TEST_CONDITION_AREA
    return pipe


def test_edit_deep_images_match_their_8_bit_twin(edit_pipe, tmp_path):
    """Every form through ``prepare_images`` (what the vision tower and the VAE get); one full
    Edit call (the 16-bit PNG) against the 8-bit one."""

    def prepared(image):
        return [np.asarray(im) for part in edit_pipe.prepare_images(image) for im in part]

    eight = photo(1, seed=5)
    forms = {k: v for k, v in twins(tmp_path, eight).items() if not isinstance(v, np.ndarray)}
    rgb = photo(seed=6)
    rgb16 = write_png16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    for name, image, twin in [(k, v, eight) for k, v in forms.items()] + [("RGB", rgb16, rgb)]:
        image = image if isinstance(image, Image.Image) else Image.open(image)
        for got, want in zip(prepared(image), prepared(Image.fromarray(twin)), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)
    kw = dict(num_inference_steps=2, seed=1, output_type="np")
    np.testing.assert_array_equal(
        edit_pipe(Image.open(forms["16-bit PNG"]), "make it blue", **kw),
        edit_pipe(Image.fromarray(eight), "make it blue", **kw),
    )


def test_cache_that_is_a_file_generates_the_same_image_and_warns_once(
    tiny_qwen_image, tmp_path, monkeypatch
):
    model = tiny_qwen_image[1]
    expected = QwenImagePipeline.from_pretrained(model)("a cube", **RUN)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cache.ENV, str(tmp_path / "file"))
    pipe = QwenImagePipeline.from_pretrained(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = pipe("a cube", **RUN)
        again = pipe("a cube", **RUN)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(again, expected)
    lines = [str(w.message) for w in caught if "adaLN cache" in str(w.message)]
    assert lines == [
        f"adaLN cache: cannot write in {tmp_path / 'file' / 'adaln'} ({tmp_path / 'file'} is a "
        f"file, not a folder; QWEN_MLX_CACHE={tmp_path / 'file'}); running without the cache"
    ]


def test_load_lora_checks_scale_and_values_when_it_loads(pipe, tmp_path):
    a, b = mx.ones((2, 64)), mx.ones((64, 2))  # the tiny transformer's width is 64
    good = {
        "transformer_blocks.0.attn.to_q.lora_A.weight": a,
        "transformer_blocks.0.attn.to_q.lora_B.weight": b,
    }
    bad = dict(good)
    bad["transformer_blocks.0.attn.to_q.lora_A.weight"] = mx.full((2, 64), float("nan"))
    mx.save_safetensors(str(tmp_path / "nan.safetensors"), bad)
    with pytest.raises(LoraError, match=r"nan.safetensors: 1 LoRA tensor\(s\) hold NaN or inf"):
        pipe.load_lora(tmp_path / "nan.safetensors")
    mx.save_safetensors(str(tmp_path / "good.safetensors"), good)
    with pytest.raises(
        LoraError, match="^LoRA scale for good.safetensors must be a number, got 'abc'"
    ):
        pipe.load_lora(tmp_path / "good.safetensors", "abc")
    with pytest.raises(LoraError, match="must be finite, got inf"):
        pipe.load_lora(tmp_path / "good.safetensors", float("inf"))
    assert pipe.loras == []


def test_info_describes_a_cached_snapshot_when_the_hub_cannot_be_reached(
    source, tmp_path, monkeypatch
):
    """huggingface_hub's cache layout: refs/main names the snapshot folder."""
    import huggingface_hub
    from typer.testing import CliRunner

    from qwen_mlx import hub
    from qwen_mlx.cli import app

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(source, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "unreachable", lambda *a, **k: "refused")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["info", "org/tiny"])
    assert res.exit_code == 0, res.output
    assert "transformer" in res.output and "B params" in res.output
    res = CliRunner().invoke(app, ["info", "org/other"])
    assert res.exit_code == 2 and "HF_HUB_OFFLINE=1 uses the Hugging Face cache" in res.output
