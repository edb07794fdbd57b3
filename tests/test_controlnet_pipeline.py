"""ControlNet pipelines end to end against diffusers' QwenImageControlNetPipeline and
QwenImageControlNetInpaintPipeline on the tiny checkpoint, with tiny random ControlNets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImageControlNetInpaintPipeline, QwenImageControlNetPipeline
from diffusers.models.autoencoders import vae as diffusers_vae
from helpers import convert_tiny
from PIL import Image
from tiny_controlnet import build_controlnet, save_controlnet
from tiny_pipeline import build_checkpoint

from qwen_mlx import QwenImagePipeline
from qwen_mlx.control import canny
from qwen_mlx.errors import CheckpointError

# float32 end to end, image in [0, 1]: as the plain pipeline's parity (half a uint8 level).
IMAGE_TOL = 2e-3


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    """diffusers draws the control latents from the VAE posterior (``latent_dist.sample``);
    qwen-mlx takes its mean. The reference is made deterministic the same way."""
    monkeypatch.setattr(
        diffusers_vae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, ref = build_checkpoint(tmp_path_factory.mktemp("hf") / "qwen-image-tiny")
    dst = convert_tiny(root, tmp_path_factory.mktemp("mlx") / "qwen-image-tiny")
    cn_dir = tmp_path_factory.mktemp("cn")
    union = build_controlnet("diffusers", num_layers=1, seed=11, std=0.2)
    inpaint = build_controlnet(
        "diffusers", num_layers=2, extra_condition_channels=4, seed=12, std=0.2
    )
    save_controlnet(union, cn_dir / "union")
    save_controlnet(inpaint, cn_dir / "inpaint")
    return dst, ref, {"union": union, "inpaint": inpaint}, cn_dir


@pytest.fixture(scope="module")
def pipe(tiny):
    return QwenImagePipeline.from_pretrained(tiny[0])


def control_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def noise(h: int, w: int, seed: int = 0) -> torch.Tensor:
    L = (h // 8) * (w // 8)
    return torch.randn(1, L, 16, generator=torch.Generator().manual_seed(seed))


def reference(cls, ref, controlnet, **kw) -> np.ndarray:
    p = cls(
        scheduler=ref.scheduler, vae=ref.vae, text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer, transformer=ref.transformer, controlnet=controlnet,
    )  # fmt: skip
    p.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return p(output_type="np", **kw).images


@pytest.mark.parametrize(
    "cfg,scale,start,end,steps",
    [
        (1.0, 1.0, 0.0, 1.0, 2),  # union, no CFG
        (4.0, 0.7, 0.0, 1.0, 2),  # true CFG: the residuals of the positive prompt in both
        (4.0, 1.3, 0.0, 0.5, 3),  # guidance window: the ControlNet only in the first half
        (1.0, 0.9, 0.34, 1.0, 3),  # and only after the first step
    ],
)
def test_union_matches_diffusers(tiny, pipe, cfg, scale, start, end, steps):
    dst, ref, nets, cn_dir = tiny
    pipe.load_controlnet(cn_dir / "union")
    h, w = 32, 48
    image = control_image(h, w)
    latents = noise(h, w)
    kw = dict(
        prompt="a red cube", negative_prompt=" ", true_cfg_scale=cfg, height=h, width=w,
        num_inference_steps=steps, control_image=image, controlnet_conditioning_scale=scale,
        control_guidance_start=start, control_guidance_end=end,
    )  # fmt: skip
    expected = reference(QwenImageControlNetPipeline, ref, nets["union"], latents=latents, **kw)
    got = pipe(latents=latents.numpy(), output_type="np", **kw)
    assert got.shape == expected.shape == (1, h, w, 3)
    diff = np.abs(got - expected).max()
    print(f"union cfg={cfg} window=({start}, {end}): max |ours - diffusers| {diff:.2e}")
    assert np.abs(got - expected).max() <= IMAGE_TOL
    plain = pipe(
        "a red cube", negative_prompt=" ", true_cfg_scale=cfg, height=h, width=w,
        num_inference_steps=steps, latents=latents.numpy(), output_type="np",
    )  # fmt: skip
    assert np.abs(plain - got).max() > 0.02  # the ControlNet changes the image


def test_several_conditions_match_diffusers(tiny, pipe):
    """Two control images with one Union ControlNet: diffusers' QwenImageMultiControlNetModel
    over a single ControlNet sums their residuals, each with its own scale and window."""
    from diffusers import QwenImageMultiControlNetModel

    dst, ref, nets, cn_dir = tiny
    pipe.load_controlnet(cn_dir / "union")
    h, w = 32, 32
    kw = dict(
        prompt="a red cube", negative_prompt=" ", true_cfg_scale=2.5, height=h, width=w,
        num_inference_steps=3, control_image=[control_image(h, w, 2), control_image(h, w, 3)],
        controlnet_conditioning_scale=[0.6, 0.9], control_guidance_end=[1.0, 0.5],
    )  # fmt: skip
    latents = noise(h, w, 2)
    multi = QwenImageMultiControlNetModel([nets["union"]])
    expected = reference(QwenImageControlNetPipeline, ref, multi, latents=latents, **kw)
    got = pipe(latents=latents.numpy(), output_type="np", **kw)
    diff = np.abs(got - expected).max()
    print(f"two conditions: max |ours - diffusers| {diff:.2e}")
    assert diff <= IMAGE_TOL
    with pytest.raises(ValueError, match="3 controlnet_conditioning_scale values for 2"):
        pipe(**{**kw, "controlnet_conditioning_scale": [1, 1, 1]})


def test_inpainting_matches_diffusers(tiny, pipe):
    dst, ref, nets, cn_dir = tiny
    pipe.load_controlnet(cn_dir / "inpaint")
    h = w = 32
    mask = np.zeros((h, w), np.uint8)
    mask[8:24, 4:20] = 255
    kw = dict(
        prompt="a red cube", negative_prompt=" ", true_cfg_scale=3.0, height=h, width=w,
        num_inference_steps=2, control_image=control_image(h, w, 1),
        control_mask=Image.fromarray(mask), controlnet_conditioning_scale=0.8,
    )  # fmt: skip
    latents = noise(h, w, 1)
    expected = reference(
        QwenImageControlNetInpaintPipeline, ref, nets["inpaint"], latents=latents, **kw
    )
    got = pipe(latents=latents.numpy(), output_type="np", **kw)
    print(f"inpainting: max |ours - diffusers| {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= IMAGE_TOL


def test_bad_input_is_one_line_before_anything_loads(tiny, tmp_path):
    dst, _, _, cn_dir = tiny
    pipe = QwenImagePipeline.from_pretrained(dst)  # fresh: nothing loaded
    other = save_controlnet(build_controlnet("deeper"), tmp_path / "other-widths")
    with pytest.raises(CheckpointError, match="inner width .* is 64, the transformer's is 48"):
        pipe.load_controlnet(other)
    with pytest.raises(ValueError, match="several ControlNets"):
        pipe.load_controlnet([cn_dir / "union", cn_dir / "union"])
    with pytest.raises(ValueError, match="needs a ControlNet"):
        pipe("x", control_image=control_image(32, 32), height=32, width=32)
    pipe.load_controlnet(cn_dir / "union")
    kw = dict(height=32, width=32, num_inference_steps=2)
    image = control_image(32, 32)
    with pytest.raises(ValueError, match="cannot read control image"):
        pipe("x", control_image=tmp_path / "missing.png", **kw)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read control image"):
        pipe("x", control_image=tmp_path / "junk.png", **kw)
    with pytest.raises(ValueError, match="control_mask goes with the Inpainting ControlNet"):
        pipe("x", control_image=image, control_mask=image, **kw)
    with pytest.raises(ValueError, match="control_guidance_start"):
        pipe("x", control_image=image, control_guidance_start=0.6, control_guidance_end=0.5, **kw)
    assert not pipe.components.loaded()  # nothing was loaded for any of these
    pipe.load_controlnet(cn_dir / "inpaint")
    with pytest.raises(ValueError, match="needs control_mask"):
        pipe("x", control_image=image, **kw)
    pipe.unload_controlnet()
    with pytest.raises(ValueError, match="needs a ControlNet"):
        pipe("x", control_image=image, **kw)
    assert not pipe.components.loaded()


# ----------------------------------------------------------------------------- command line


def cli(*args):
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_canny_then_generate(tiny, pipe, tmp_path):
    pytest.importorskip("cv2")
    dst, _, _, cn_dir = tiny
    photo = np.zeros((32, 48, 3), np.uint8)
    photo[8:24, 12:36] = 255
    Image.fromarray(photo).save(tmp_path / "photo.png")
    res = cli("control", "canny", tmp_path / "photo.png", "-o", tmp_path / "edges.png", "--low", 50)
    assert res.exit_code == 0, res.output
    edges = np.array(Image.open(tmp_path / "edges.png"))
    assert edges.shape == (32, 48, 3) and edges.max() == 255 and edges[16, 24].max() == 0

    out = tmp_path / "cn.png"
    common = ["generate", "--model", dst, "-p", "a cube", "--width", 48, "--height", 32]
    common += ["--steps", 2, "--seed", 3, "--cfg", 2.0]
    res = cli(
        *common, "--controlnet", cn_dir / "union", "--control-image", tmp_path / "photo.png",
        "--control-preprocess", "canny", "--control-scale", 0.8, "--control-end", 0.5, "-o", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    im = Image.open(out)
    meta = json.loads(im.text["qwen_mlx"])["control"]
    assert meta["controlnet"] == str(cn_dir / "union") and meta["preprocess"] == "canny"
    assert (meta["scale"], meta["start"], meta["end"]) == (0.8, 0.0, 0.5)
    assert meta["images"] == ["photo.png"] and meta["mask"] is None
    assert "Control scale: 0.8" in im.text["parameters"]
    # the same run through Python (--control-preprocess canny: the default thresholds)
    pipe.load_controlnet(cn_dir / "union")
    want = pipe(
        "a cube", negative_prompt=" ", width=48, height=32, num_inference_steps=2, seed=3,
        true_cfg_scale=2.0,
        control_image=canny(Image.fromarray(photo)), controlnet_conditioning_scale=0.8,
        control_guidance_end=0.5,
    )[0]  # fmt: skip
    assert np.array_equal(np.array(im.convert("RGB")), np.array(want))


def test_cli_control_errors_are_one_line(tiny, tmp_path):
    dst, _, _, cn_dir = tiny
    base = ["generate", "--model", dst, "-p", "x", "--width", 32, "--height", 32, "--steps", 2]
    image = tmp_path / "c.png"
    control_image(32, 32).save(image)
    cases = [
        (["--control-image", image], "need --controlnet"),
        (["--controlnet", cn_dir / "union", "--control-image", tmp_path / "no.png"],
         "cannot read control image"),
        (["--controlnet", cn_dir / "union", "--control-image", image, "--control-mask", image],
         "control_mask goes with the Inpainting ControlNet"),
        (["--controlnet", cn_dir / "union", "--control-image", image, "--control-start", 0.9,
          "--control-end", 0.1], "control_guidance_start"),
        (["--controlnet", tmp_path / "nowhere", "--control-image", image], "no such ControlNet"),
    ]  # fmt: skip
    res = cli(*base, "--controlnet", cn_dir / "union", "--control-image", image, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "; ControlNet " in res.output and "transformer + controlnet weights" in res.output
    for args, message in cases:
        res = cli(*base, *args, "-o", tmp_path / "out.png")
        assert res.exit_code == 2, res.output
        assert res.output.startswith("error:") and message in res.output
        assert res.output.count("\n") == 1  # one line
    assert not (tmp_path / "out.png").exists()


def test_memory_plan_prices_the_controlnet(tiny, pipe):
    """The estimate holds the ControlNet's weights as loaded (no modulation under the adaLN
    cache) and its residuals while denoising; a request without control images, neither."""
    from mlx.utils import tree_flatten

    from qwen_mlx import GenerationRequest

    _, _, _, cn_dir = tiny
    pipe.load_controlnet(cn_dir / "union")
    req = GenerationRequest(
        prompt="x",
        width=32,
        height=48,
        steps=2,
        seeds=(1,),
        control_images=(control_image(48, 32),),
    )
    req = pipe.prepare(req)
    est = pipe.memory_estimate(req)
    loaded = sum(v.nbytes for _, v in tree_flatten(pipe.controlnet.parameters()))
    assert est.weights["controlnet"] == loaded
    plain = pipe.memory_estimate(req.replace(control_images=()))
    assert "controlnet" not in plain.weights
    residuals = 1 * 3 * (32 // 8) * (48 // 8) * 48 * 4  # 1 block, cond + CFG copy + own, f32
    assert est.stages["denoise"] - plain.stages["denoise"] == loaded + residuals


def test_beside_img2img(tiny, pipe):
    """img2img keeps the last steps; the guidance window counts the steps that run."""
    _, _, _, cn_dir = tiny
    pipe.load_controlnet(cn_dir / "union")
    kw = dict(
        height=32, width=32, num_inference_steps=4, strength=0.5, seed=2, output_type="np",
        image=control_image(32, 32, 7),
    )  # fmt: skip
    plain = pipe("a cube", **kw)
    cn = pipe("a cube", control_image=control_image(32, 32, 8), **kw)
    late = pipe("a cube", control_image=control_image(32, 32, 8), control_guidance_start=0.5, **kw)
    assert np.abs(cn - plain).max() > 0.02
    assert np.abs(late - plain).max() > 0.02 and np.abs(late - cn).max() > 0.005
