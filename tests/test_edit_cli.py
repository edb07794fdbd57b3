"""`qwen-mlx edit`: the same image as the API, PNG metadata with the input images, seeds,
each component loaded once, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import convert_tiny
from PIL import Image
from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA, build_edit_checkpoint
from typer.testing import CliRunner

from qwen_mlx.cli import app
from qwen_mlx.pipelines.edit import QwenImageEditPipeline

runner = CliRunner()


@pytest.fixture(autouse=True)
def small_areas(monkeypatch):
    """The tiny models at diffusers' 1024^2 would be slow: shrink the sizing areas."""
    monkeypatch.setattr(QwenImageEditPipeline, "vae_image_area", TEST_VAE_AREA)
    monkeypatch.setattr(QwenImageEditPipeline, "condition_image_area", TEST_CONDITION_AREA)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for flavour, zero in (("edit", False), ("plus", True)):
        root = tmp_path_factory.mktemp(flavour)
        src, _ = build_edit_checkpoint(root / "src", flavour, zero_cond_t=zero)
        out[flavour] = convert_tiny(src, root / "mlx")
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h) in (("cat.png", (150, 100)), ("hat.jpg", (60, 90))):
        data = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(data).save(folder / name)
        paths.append(folder / name)
    return paths


def edit(model, images, *args):
    flags = [a for im in images for a in ("--image", str(im))]
    return runner.invoke(
        app, ["edit", "--model", str(model), *flags, "--prompt", "give it a hat", *args]
    )


def test_edit_plus_png_matches_the_api(models, inputs, tmp_path):
    out = tmp_path / "out.png"
    res = edit(
        models["plus"], inputs, "--steps", "2", "--seed", "3", "--cfg", "2.5", "-o", str(out)
    )
    assert res.exit_code == 0, res.output
    assert "2/2" in res.output and "peak memory" in res.output
    png = Image.open(out)
    meta = json.loads(png.text["qwen_mlx"])
    assert meta["images"] == [
        {"file": "cat.png", "width": 150, "height": 100},
        {"file": "hat.jpg", "width": 60, "height": 90},
    ]
    assert meta["flavour"] == "edit-2511" and meta["seed"] == 3 and meta["steps"] == 2
    assert (meta["width"], meta["height"]) == png.size == (96, 160)  # the last image's aspect
    assert "Edit images: cat.png (150x100); hat.jpg (60x90)" in png.text["parameters"]

    pipe = QwenImageEditPipeline.from_pretrained(models["plus"])
    images = [Image.open(p) for p in inputs]
    api = pipe(images, "give it a hat", num_inference_steps=2, true_cfg_scale=2.5, seed=3)[0]
    assert np.array_equal(np.array(api), np.array(png.convert("RGB")))


def test_edit_defaults_and_seeds(models, inputs, tmp_path, monkeypatch):
    """Edit (one image): 50 steps by default (2 here via --steps), several seeds; the text
    encoder, transformer and VAE load once and the prompts run through one forward."""
    from qwen_mlx.models.edit_prompt import QwenEditTextEncoder

    counts = {"loads": 0, "encodes": 0}
    real_from_weights = QwenEditTextEncoder.from_weights.__func__
    real_encode = QwenEditTextEncoder.encode

    def from_weights(cls, *a, **k):
        counts["loads"] += 1
        return real_from_weights(cls, *a, **k)

    def encode(self, *a, **k):
        counts["encodes"] += 1
        return real_encode(self, *a, **k)

    monkeypatch.setattr(QwenEditTextEncoder, "from_weights", classmethod(from_weights))
    monkeypatch.setattr(QwenEditTextEncoder, "encode", encode)
    res = edit(
        models["edit"], inputs[:1], "--steps", "2", "--seed", "1", "--seed", "2",
        "--low-memory", "-o", str(tmp_path / "e.png"),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert counts == {"loads": 1, "encodes": 1}
    a = np.array(Image.open(tmp_path / "e-1.png"))
    b = np.array(Image.open(tmp_path / "e-2.png"))
    assert a.shape == (96, 160, 3) and not np.array_equal(a, b)
    assert json.loads(Image.open(tmp_path / "e-1.png").text["qwen_mlx"])["flavour"] == "edit"


@pytest.mark.parametrize(
    "case,message",
    [
        ("two_images_on_edit", "takes one image"),
        ("missing", "cannot read image"),
        ("not_an_image", "cannot read image"),
        ("overwrite_input", "would overwrite an input image"),
        ("steps", "--steps must be at least 1"),
        ("width", "is not a multiple of"),
    ],
)
def test_bad_arguments(models, inputs, tmp_path, monkeypatch, case, message):
    monkeypatch.chdir(tmp_path)
    model, images, args = models["edit"], inputs[:1], []
    if case == "two_images_on_edit":
        images = inputs
    elif case == "missing":
        images = [tmp_path / "nope.png"]
    elif case == "not_an_image":
        (tmp_path / "text.png").write_text("hello")
        images = [tmp_path / "text.png"]
    elif case == "overwrite_input":
        args = ["-o", str(inputs[0])]
    elif case == "steps":
        args = ["--steps", "0"]
    elif case == "width":
        args = ["--width", "100"]
    before = sorted(tmp_path.iterdir())
    res = edit(model, images, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_edit_rejects_a_text_to_image_checkpoint(tmp_path):
    from tiny_pipeline import build_checkpoint

    t2i = convert_tiny(build_checkpoint(tmp_path / "t2i")[0], tmp_path / "t2i-mlx")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    res = edit(t2i, [tmp_path / "x.png"])
    assert res.exit_code == 2 and "not a Qwen-Image-Edit checkpoint" in res.output
