"""LoRAs, Lightning and img2img/inpaint through the pipeline and the CLI (tiny checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import convert_tiny
from PIL import Image
from tiny_lora import MODULES, TOP_LEVEL, layout_tensors, random_factors, save
from tiny_pipeline import TEXT_HIDDEN, build_checkpoint
from tiny_transformer import build_transformer
from typer.testing import CliRunner

from qwen_mlx.cli import app
from qwen_mlx.lora import LoraError
from qwen_mlx.pipelines.sampler import LIGHTNING_SCHEDULER
from qwen_mlx.pipelines.txt2img import QwenImagePipeline

# float32 end to end, image in [0, 1]: half a uint8 level, as the other pipeline parity tests.
IMAGE_TOL = 2e-3
TWO_BLOCKS = tuple(m for m in MODULES if not m.startswith("transformer_blocks.2."))
SMALL = ["--width", "32", "--height", "48"]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, ref = build_checkpoint(tmp_path_factory.mktemp("hf") / "qwen-image-tiny")
    dst = convert_tiny(root, tmp_path_factory.mktemp("mlx") / "qwen-image-tiny")
    return dst, ref


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Two LoRAs for the tiny pipeline's transformer: Lightning-style and kohya, with alphas."""
    folder = tmp_path_factory.mktemp("loras")
    model = build_transformer("diffusers", std=0.2, joint_attention_dim=TEXT_HIDDEN)
    a, _ = layout_tensors("diffusion_model", random_factors(model, TWO_BLOCKS, 4, 1), 2.0)
    b, _ = layout_tensors(
        "kohya", random_factors(model, TWO_BLOCKS[3:] + TOP_LEVEL, 2, 2, std=0.3), 1.0
    )
    return save(folder / "lightning.safetensors", a), save(folder / "style.safetensors", b)


def noise(height=32, width=48, seed=0) -> torch.Tensor:
    return torch.randn(
        1, (height // 8) * (width // 8), 16, generator=torch.Generator().manual_seed(seed)
    )


def test_pipeline_loras_match_diffusers(tiny, lora_files):
    dst, ref = tiny
    a, b = lora_files
    lat = noise()
    kw = dict(
        prompt="a red cube",
        negative_prompt=" ",
        true_cfg_scale=3.0,
        height=32,
        width=48,
        num_inference_steps=3,
        output_type="np",
    )

    def reference():
        with torch.no_grad():
            return ref(latents=lat, **kw).images

    base = reference()
    pipe = QwenImagePipeline.from_pretrained(dst)
    assert pipe.lora_key() == ""
    pipe.load_lora(a, 0.8)  # before the transformer loads: fused as it loads
    key_a = pipe.lora_key()
    got_a = pipe(latents=lat.numpy(), **kw)
    pipe.load_lora(b, -0.5)  # on the loaded transformer: fused in place
    got_ab = pipe(latents=lat.numpy(), **kw)
    assert len({"", key_a, pipe.lora_key()}) == 3
    assert [s for _, s in pipe.loras] == [0.8, -0.5]

    try:
        ref.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
        ref.set_adapters(["a"], [0.8])
        exp_a = reference()
        ref.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
        ref.set_adapters(["a", "b"], [0.8, -0.5])
        exp_ab = reference()
    finally:
        ref.unload_lora_weights()
    assert np.abs(exp_a - base).max() > 0.05 and np.abs(exp_ab - exp_a).max() > 0.05
    assert np.abs(got_a - exp_a).max() <= IMAGE_TOL
    assert np.abs(got_ab - exp_ab).max() <= IMAGE_TOL

    pipe.unload_loras()
    assert pipe.lora_key() == "" and pipe.loras == []
    assert np.abs(pipe(latents=lat.numpy(), **kw) - base).max() <= IMAGE_TOL


def test_load_lora_checks_before_loading_the_transformer(tiny, tmp_path):
    pipe = QwenImagePipeline.from_pretrained(tiny[0])
    bad = {
        "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(2, 48),
        "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.zeros(48, 2),
    }
    with pytest.raises(LoraError, match="transformer_blocks.5.attn.to_q"):
        pipe.load_lora(save(tmp_path / "bad.safetensors", bad))
    assert pipe.loras == [] and "transformer" not in pipe.components.loaded()
    with pytest.raises(ValueError, match="finite"):
        pipe.load_lora(tmp_path / "bad.safetensors", float("nan"))


# ----------------------------------------------------------------------------- CLI


def generate(model, *args):
    return runner.invoke(app, ["generate", "--model", str(model), "--prompt", "a cube", *args])


def png(path):
    im = Image.open(path)
    return np.array(im), json.loads(im.text["qwen_mlx"]), im.text["parameters"]


def test_cli_loras(tiny, lora_files, tmp_path):
    dst, _ = tiny
    a, b = lora_files
    out = tmp_path / "l.png"
    args = [*SMALL, "--steps", "2", "--seed", "4", "-o", str(out)]
    res = generate(dst, *args, "--lora", f"{a}:0.8", "--lora", str(b))
    assert res.exit_code == 0, res.output
    pixels, meta, text = png(out)
    assert [(x["name"], x["scale"]) for x in meta["loras"]] == [
        ("lightning.safetensors", 0.8),
        ("style.safetensors", 1.0),
    ]
    assert all(len(x["sha256"]) == 64 for x in meta["loras"])
    assert "LoRAs: lightning.safetensors:0.8 style.safetensors:1" in text

    pipe = QwenImagePipeline.from_pretrained(dst)
    pipe.load_lora(a, 0.8)
    pipe.load_lora(b)
    kw = dict(width=32, height=48, num_inference_steps=2, seed=4, negative_prompt=" ")
    assert np.array_equal(pixels, np.array(pipe("a cube", **kw)[0]))
    plain = tmp_path / "p.png"
    assert generate(dst, *args[:-1], str(plain)).exit_code == 0
    assert not np.array_equal(pixels, png(plain)[0])

    for spec, message in ((f"{tmp_path}/none.safetensors", "not found"), ("x.pt:0.5", "not found")):
        res = generate(dst, *args, "--lora", spec)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    flux = save(
        tmp_path / "flux.safetensors",
        {"transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.zeros(2, 8)}
        | {"transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.zeros(8, 2)},
    )
    res = generate(dst, *SMALL, "-o", str(tmp_path / "f.png"), "--lora", str(flux))
    assert res.exit_code == 2 and "Flux" in res.output and not (tmp_path / "f.png").exists()


def test_cli_lightning(tiny, tmp_path):
    dst, _ = tiny
    out = tmp_path / "fast.png"
    res = generate(dst, *SMALL, "--lightning", "4", "--seed", "2", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "4/4" in res.output
    pixels, meta, text = png(out)
    assert meta["lightning"] == 4 and meta["steps"] == 4 and meta["cfg"] == 1.0
    assert "Lightning: 4 steps" in text
    pipe = QwenImagePipeline.from_pretrained(dst, scheduler_overrides=LIGHTNING_SCHEDULER)
    expected = pipe(
        "a cube", width=32, height=48, num_inference_steps=4, true_cfg_scale=1.0, seed=2
    )
    assert np.array_equal(pixels, np.array(expected[0]))
    default = QwenImagePipeline.from_pretrained(dst)
    other = default(
        "a cube", width=32, height=48, num_inference_steps=4, true_cfg_scale=1.0, seed=2
    )
    assert not np.array_equal(pixels, np.array(other[0]))  # the scheduler really changed

    for args, message in (
        (["--lightning", "4", "--steps", "8"], "drop --steps/--cfg"),
        (["--lightning", "4", "--cfg", "2"], "drop --steps/--cfg"),
        (["--lightning", "6"], "must be 4 or 8"),
    ):
        res = generate(dst, *SMALL, *args, "-o", str(tmp_path / "x.png"))
        assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "x.png").exists()


def test_cli_img2img_and_inpaint(tiny, tmp_path):
    dst, _ = tiny
    rng = np.random.default_rng(0)
    source = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (43, 37, 3), dtype=np.uint8)).save(source)
    mask = tmp_path / "mask.png"
    m = np.zeros((43, 37), np.uint8)
    m[10:30, 5:25] = 255
    Image.fromarray(m).save(mask)

    out = tmp_path / "i2i.png"
    base = ["--steps", "3", "--seed", "1", "--image", str(source)]
    res = generate(dst, *base, "--strength", "0.7", "-o", str(out))
    assert res.exit_code == 0, res.output
    pixels, meta, text = png(out)
    assert pixels.shape == (40, 32, 3)  # the image's size rounded down to multiples of 8 here
    assert meta["image"] == str(source) and meta["strength"] == 0.7 and meta["mask"] is None
    assert meta["width"] == 32 and meta["height"] == 40
    assert "Denoising strength: 0.7" in text and "Mode: img2img" in text
    pipe = QwenImagePipeline.from_pretrained(dst)
    kw = dict(num_inference_steps=3, seed=1, negative_prompt=" ", image=Image.open(source))
    assert np.array_equal(pixels, np.array(pipe("a cube", strength=0.7, **kw)[0]))

    out = tmp_path / "inpaint.png"
    res = generate(dst, *base, "--mask", str(mask), "-o", str(out))
    assert res.exit_code == 0, res.output
    pixels, meta, text = png(out)
    assert meta["mask"] == str(mask) and meta["strength"] == 0.6 and "Mode: inpaint" in text
    expected = pipe("a cube", strength=0.6, mask_image=Image.open(mask), **kw)
    assert np.array_equal(pixels, np.array(expected[0]))

    for args, message in (
        (["--strength", "0.5"], "need --image"),
        (["--mask", str(mask)], "need --image"),
        (["--image", str(source), "--strength", "2"], "must be in [0, 1]"),
        (["--image", str(tmp_path / "missing.png")], "cannot read image"),
    ):
        res = generate(dst, *args, "-o", str(tmp_path / "x.png"))
        assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "x.png").exists()
