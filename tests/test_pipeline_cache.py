"""Step caches through the pipeline: parity with diffusers' pipeline + hooks, calibration stored
and reused, the CLI, and the other paths (img2img, inpaint, Edit, CFG off) with a cache on."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig as RefFBC
from diffusers.hooks import MagCacheConfig as RefMag
from diffusers.hooks import TaylorSeerCacheConfig as RefTaylor
from helpers import convert_tiny
from PIL import Image
from tiny_pipeline import build_checkpoint

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.pipelines.txt2img import QwenImagePipeline
from qwen_mlx.request import GenerationRequest, ImageResult
from qwen_mlx.step_cache import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

# float32 end to end. The issue asks for 5e-6, but on this fixture the *uncached* pipeline is
# already 1e-5 (CFG off) to 2.6e-5 (CFG on) from diffusers at 8 steps (summation order through
# text encoder, transformer and VAE; measured), so the bar is that floor with margin: 5e-5.
# Skipping moves this random model's image by 0.5-1.0 (checked below), and one wrong decision
# by > 1e-2, so 5e-5 still tells the same decisions from any other.
IMAGE_TOL = 5e-5
H = W = 32
STEPS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, ref = build_checkpoint(tmp_path_factory.mktemp("hf") / "qwen-image-tiny")
    dst = convert_tiny(root, tmp_path_factory.mktemp("mlx") / "qwen-image-tiny")
    return dst, ref


@pytest.fixture(scope="module")
def pipe(tiny):
    return QwenImagePipeline.from_pretrained(tiny[0])


def noise(seed: int = 0) -> torch.Tensor:
    L = (H // 8) * (W // 8)
    return torch.randn(1, L, 16, generator=torch.Generator().manual_seed(seed))


def reference(ref, config, cfg: float, latents):
    """diffusers' image and its full passes (the last block's attention runs only in those)."""
    count = [0]
    probe = ref.transformer.transformer_blocks[-1].attn.to_q
    handle = probe.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    if config is not None:
        ref.transformer.enable_cache(config)
    try:
        with torch.no_grad():
            image = ref(
                prompt="a red cube", negative_prompt=" ", true_cfg_scale=cfg, height=H, width=W,
                num_inference_steps=STEPS, latents=latents, output_type="np",
            ).images  # fmt: skip
    finally:
        if config is not None:
            ref.transformer.disable_cache()
        handle.remove()
    return image, count[0]


def kwargs(cfg: float = 4.0, steps: int = STEPS) -> dict:
    return dict(negative_prompt=" ", true_cfg_scale=cfg, height=H, width=W,
                num_inference_steps=steps, output_type="np")  # fmt: skip


def ours(pipe, config, cfg: float, latents):
    if config is not None:
        pipe.enable_cache(config)
    try:
        image = pipe("a red cube", latents=latents.numpy(), **kwargs(cfg))
    finally:
        pipe.disable_cache()
    return image, pipe.last_cache


RATIOS = [1.0, 1.02, 0.98, 1.01, 1.0, 0.99, 0.97, 0.95]
CASES = {
    "fbcache": (FirstBlockCacheConfig(1.1), RefFBC(1.1)),
    "taylorseer": (
        TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=2,
            max_order=2,
            taylor_factors_dtype=mx.float32,
        ),
        RefTaylor(
            cache_interval=2,
            disable_cache_before_step=2,
            max_order=2,
            taylor_factors_dtype=torch.float32,
        ),
    ),  # fmt: skip
    "taylorseer-lite": (
        TaylorSeerCacheConfig(
            cache_interval=3, taylor_factors_dtype=mx.float32, use_lite_mode=True
        ),
        RefTaylor(cache_interval=3, taylor_factors_dtype=torch.float32, use_lite_mode=True),
    ),
    "magcache": (
        MagCacheConfig(threshold=0.05, mag_ratios=RATIOS),
        RefMag(threshold=0.05, mag_ratios=RATIOS, num_inference_steps=STEPS),
    ),
}


@pytest.mark.parametrize("name,cfg", [(n, 4.0) for n in CASES] + [("fbcache", 1.0)])
def test_matches_diffusers(tiny, pipe, name, cfg):
    ours_cfg, ref_cfg = CASES[name]
    latents = noise()
    expected, ref_passes = reference(tiny[1], ref_cfg, cfg, latents)
    got, run = ours(pipe, ours_cfg, cfg, latents)
    branches = 2 if cfg > 1 else 1
    assert run.passes == STEPS * branches
    assert run.total_full_passes == ref_passes, (run.full_passes, ref_passes)
    assert 0 < ref_passes < STEPS * branches  # some, not all, passes skipped
    assert np.abs(got - expected).max() <= IMAGE_TOL
    uncached, _ = reference(tiny[1], None, cfg, latents)
    assert np.abs(expected - uncached).max() > 1e-2  # the skips matter at this tolerance


def test_magcache_calibration_stored_and_reused(pipe):
    pipe.enable_cache(MagCacheConfig(threshold=0.5))
    try:
        with pytest.raises(QwenMLXError, match="--cache-calibrate"):
            pipe("a red cube", seed=0, **kwargs())  # no ratios for this checkpoint yet
        pipe.enable_cache(MagCacheConfig(calibrate=True))
        uncached = pipe("a red cube", seed=0, **kwargs())
        assert pipe.last_cache.total_full_passes == 2 * STEPS  # calibration skips nothing
        stored = json.loads(pipe.last_calibration.read_text())["ratios"]
        assert set(stored) == {"cond", "uncond"} and len(stored["cond"]) == STEPS
        assert stored["cond"][0] == 1.0 and stored["cond"] != stored["uncond"]

        pipe.enable_cache(MagCacheConfig(threshold=0.5))  # finds the stored ratios
        cached = pipe("a red cube", seed=0, **kwargs())
        assert 0 < pipe.last_cache.total_full_passes < 2 * STEPS
        assert np.abs(cached - uncached).max() > 1e-3
        pipe.enable_cache(MagCacheConfig(threshold=0.5, mag_ratios=stored))
        np.testing.assert_array_equal(pipe("a red cube", seed=0, **kwargs()), cached)
        pipe.enable_cache(MagCacheConfig(threshold=0.5))
        with pytest.raises(QwenMLXError, match="7 steps"):  # another schedule: calibrate again
            pipe("a red cube", seed=0, **kwargs(steps=7))
    finally:
        pipe.disable_cache()


def test_img2img_inpaint_metadata(pipe):
    """img2img and inpaint run with a cache through ``generate``; the metadata says which ran
    and how many full passes it took."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (0, 0, W // 2, H))
    req = dict(prompt="a red cube", negative_prompt=" ", steps=STEPS, cfg=4.0, seeds=(1, 2),
               images=(image,), strength=0.8)  # fmt: skip
    pipe.enable_cache(FirstBlockCacheConfig(1.5))
    try:
        for extra in ({}, {"mask": mask}):
            results = [
                e for e in pipe.generate(GenerationRequest(**req, **extra))
                if isinstance(e, ImageResult)
            ]  # fmt: skip
            for r in results:
                meta = r.metadata
                assert meta["cache"] == "fbcache:1.5"
                assert meta["cache_passes"] == 2 * 7  # strength 0.8 keeps 7 of 8 steps
                assert 0 < meta["cache_full_passes"] < meta["cache_passes"]
                assert np.asarray(r.image).std() > 1
    finally:
        pipe.disable_cache()
    plain = next(e for e in pipe.generate(GenerationRequest(**req)) if isinstance(e, ImageResult))
    assert plain.metadata["cache"] is None


def test_cli(tiny, tmp_path):
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    def generate(*args):
        return CliRunner().invoke(
            app, ["generate", "--model", str(tiny[0]), "-p", "a cube", "--width", "32",
                  "--height", "32", "--steps", "6", "--cfg", "4", "--seed", "3", *args],
        )  # fmt: skip

    out = tmp_path / "ts.png"
    res = generate("--cache", "taylorseer:2", "-o", str(out))
    assert res.exit_code == 0, res.output
    # full passes at steps 0, 1, 2 (disable_cache_before_step=3) and 4, per branch
    assert "cache taylorseer:2: 8/12 full passes" in res.output
    meta = json.loads(Image.open(out).text["qwen_mlx"])
    assert meta["cache"] == "taylorseer:2" and meta["cache_full_passes"] == 8
    assert meta["cache_passes"] == 12

    res = generate("--cache", "magcache", "-o", str(tmp_path / "m.png"))
    assert (
        res.exit_code == 2 and "--cache-calibrate" in res.output and "Traceback" not in res.output
    )
    res = generate("--cache-calibrate", "-o", str(tmp_path / "c.png"))
    assert res.exit_code == 0 and "MagCache ratios stored in" in res.output, res.output
    res = generate("--cache", "magcache:0.5", "-o", str(tmp_path / "m.png"))
    assert res.exit_code == 0, res.output
    assert json.loads(Image.open(tmp_path / "m.png").text["qwen_mlx"])["cache"] == "magcache:0.5"

    for bad, message in [
        (["--cache", "teacache"], "unknown cache"),
        (["--cache", "fbcache:x"], "must be a number"),
        (["--cache", "fbcache", "--cache-calibrate"], "--cache-calibrate is for"),
    ]:
        res = generate(*bad, "-o", str(tmp_path / "bad.png"))
        assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "bad.png").exists()


def test_edit_matches_diffusers(tmp_path, monkeypatch):
    """Edit (reference tokens after the noisy ones) with TaylorSeer, against diffusers'."""
    from tiny_edit import (
        TEST_CONDITION_AREA,
        TEST_VAE_AREA,
        build_edit_checkpoint,
        shrink_reference_areas,
    )

    from qwen_mlx import QwenImageEditPipeline

    shrink_reference_areas(monkeypatch)
    root, ref = build_edit_checkpoint(tmp_path / "src", "edit")
    pipe = QwenImageEditPipeline.from_pretrained(convert_tiny(root, tmp_path / "mlx"))
    pipe.vae_image_area, pipe.condition_image_area = TEST_VAE_AREA, TEST_CONDITION_AREA
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    h, w = pipe.edit_size(image, None, None)
    L = (h // pipe.vae_scale // 2) * (w // pipe.vae_scale // 2)
    latents = torch.randn(1, L, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(image=image, prompt="add a hat", negative_prompt=" ", true_cfg_scale=4.0,
              num_inference_steps=4, output_type="np")  # fmt: skip
    ts = dict(cache_interval=2, disable_cache_before_step=1, max_order=1)
    count = [0]
    probe = ref.transformer.transformer_blocks[-1].attn.to_q
    handle = probe.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    ref.transformer.enable_cache(RefTaylor(**ts, taylor_factors_dtype=torch.float32))
    with torch.no_grad():
        expected = ref(latents=latents, **kw).images
    ref.transformer.disable_cache()
    handle.remove()
    pipe.enable_cache(TaylorSeerCacheConfig(**ts, taylor_factors_dtype=mx.float32))
    got = pipe(latents=mx.array(latents.numpy()), **kw)
    assert pipe.last_cache.total_full_passes == count[0] == 4  # steps 0 and 2, per branch
    assert np.abs(got - expected).max() <= IMAGE_TOL


def test_quantized_with_lora(tmp_path):
    """A 4-bit checkpoint with a LoRA: a cache that skips nothing gives the uncached image, one
    that skips gives fewer passes, and MagCache's stored ratios belong to the LoRA set."""
    from helpers import write_model_index
    from tiny_lora import MODULES, layout_tensors, random_factors, save
    from tiny_pipeline import SCHEDULER, TEXT_HIDDEN, build_text_encoder, build_vae
    from tiny_tokenizer import build_tokenizer
    from tiny_transformer import build_transformer

    root = tmp_path / "hf"
    model = build_transformer("quantizable", std=0.1, num_layers=3, joint_attention_dim=TEXT_HIDDEN)
    model.save_pretrained(root / "transformer")
    build_text_encoder().save_pretrained(root / "text_encoder")
    build_vae().save_pretrained(root / "vae")
    build_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    write_model_index(root, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
    lora = save(
        tmp_path / "l.safetensors",
        *layout_tensors("peft", random_factors(model, MODULES, 2, 1), None),
    )
    pipe = QwenImagePipeline.from_pretrained(convert_tiny(root, tmp_path / "q4", quantize=4))
    pipe.load_lora(lora, 0.8)
    run = dict(seed=0, **kwargs(steps=6))
    uncached = pipe("a red cube", **run)
    try:
        pipe.enable_cache(FirstBlockCacheConfig(0.0))  # every pass runs
        np.testing.assert_allclose(pipe("a red cube", **run), uncached, atol=1e-6)
        assert pipe.last_cache.total_full_passes == 12
        pipe.enable_cache(TaylorSeerCacheConfig(cache_interval=2, use_lite_mode=True))
        assert np.isfinite(pipe("a red cube", **run)).all()
        assert pipe.last_cache.total_full_passes == 8  # steps 0-2 and 4
        pipe.enable_cache(MagCacheConfig(calibrate=True))
        pipe("a red cube", **run)
        pipe.enable_cache(MagCacheConfig(threshold=10.0))
        pipe("a red cube", **run)
        assert pipe.last_cache.total_full_passes < 12
        pipe.unload_loras()
        with pytest.raises(QwenMLXError, match="--cache-calibrate"):  # other weights
            pipe("a red cube", **run)
    finally:
        pipe.disable_cache()
