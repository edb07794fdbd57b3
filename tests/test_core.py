"""The core every mode shares: Components (Edit included, through its hook), the denoising
generator with cancellation, one GenerationRequest, and the CLI's exit codes and dry runs."""

from __future__ import annotations

import json

import mlx.nn as nn
import numpy as np
import pytest
from helpers import convert_tiny
from PIL import Image
from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA, build_edit_checkpoint
from tiny_pipeline import build_checkpoint
from typer.testing import CliRunner

from qwen_mlx import CancelToken, GenerationRequest, ImageResult, StepEvent
from qwen_mlx.cli import app
from qwen_mlx.errors import Cancelled, RequestError
from qwen_mlx.pipelines import components as components_module
from qwen_mlx.pipelines.edit import QwenImageEditPipeline
from qwen_mlx.pipelines.txt2img import QwenImagePipeline
from qwen_mlx.quantize import text_encoder_plan

runner = CliRunner()
SMALL = dict(width=32, height=48, steps=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    src, _ = build_checkpoint(root / "src")
    return convert_tiny(src, root / "mlx")


@pytest.fixture(scope="module")
def edit_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("core-edit")
    src, _ = build_edit_checkpoint(root / "src", "plus")
    return convert_tiny(src, root / "mlx")


@pytest.fixture
def small_edit_areas(monkeypatch):
    monkeypatch.setattr(QwenImageEditPipeline, "vae_image_area", TEST_VAE_AREA)
    monkeypatch.setattr(QwenImageEditPipeline, "condition_image_area", TEST_CONDITION_AREA)


def picture(w: int = 60, h: int = 40, seed: int = 0) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(data)


# -- Components: one owner, Edit through a hook


def test_edit_text_encoder_quantized_by_components(edit_model, monkeypatch, small_edit_areas):
    # The tiny language model is 32 wide: group size 32 (a real MLX group size) is the largest
    # that divides it, so the 8-bit plan has layers to quantize.
    monkeypatch.setattr(components_module, "text_encoder_plan", lambda b: text_encoder_plan(b, 32))
    pipe = QwenImageEditPipeline.from_pretrained(edit_model, quantize_text_encoder=8)
    encoder = pipe.text_encoder
    layers = [m for _, m in encoder.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(m.bits == 8 for m in layers)
    assert encoder.vision is not None  # the vision tower came with it (the Edit hook)
    conditions, _ = pipe.prepare_images([picture()])
    embeds, _ = pipe.encode_prompt(["add a hat"], conditions)
    assert np.isfinite(np.array(embeds)).all() and embeds.shape[-1] == 32


def test_edit_new_prompt_frees_the_transformer_first(edit_model, monkeypatch, small_edit_areas):
    pipe = QwenImageEditPipeline.from_pretrained(edit_model)
    assert pipe.transformer is not None  # loaded, as after a first edit
    held = []
    build = pipe.components.text_encoder_builder

    def spy(*args):
        held.append(pipe.components.loaded())
        return build(*args)

    monkeypatch.setattr(pipe.components, "text_encoder_builder", spy)
    conditions, _ = pipe.prepare_images([picture()])
    pipe.encode_prompt(["a new prompt"], conditions)
    assert held == [[]]  # nothing else was held while the text encoder loaded
    assert pipe.transformer is not None
    assert pipe.components.loaded() == ["transformer"]  # the text encoder went in turn


# -- the denoising generator


def test_generate_yields_steps_then_images_equal_to_the_call(model):
    pipe = QwenImagePipeline.from_pretrained(model)
    req = GenerationRequest("a cube", seeds=(3, 4), **SMALL)
    events = list(pipe.generate(req))
    kinds = [(type(e).__name__, e.seed) for e in events]
    assert kinds == [
        ("StepEvent", 3), ("StepEvent", 3), ("ImageResult", 3),
        ("StepEvent", 4), ("StepEvent", 4), ("ImageResult", 4),
    ]  # fmt: skip
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [(e.index, e.total) for e in steps] == [(1, 2), (2, 2)] * 2
    assert all(e.seconds > 0 and e.elapsed >= e.seconds for e in steps)
    result = events[2]
    assert isinstance(result, ImageResult) and result.image.size == (32, 48)
    assert result.metadata["seed"] == 3 and result.metadata["steps"] == 2
    assert result.metadata["cfg"] == 4.0 and result.metadata["precision"] == "float32"
    direct = pipe("a cube", negative_prompt=" ", width=32, height=48, num_inference_steps=2, seed=3)
    np.testing.assert_array_equal(np.array(result.image), np.array(direct[0]))


def test_cancel_stops_between_steps_and_returns_nothing(model):
    pipe = QwenImagePipeline.from_pretrained(model)
    token = CancelToken()
    seen = []
    with pytest.raises(Cancelled):
        for event in pipe.generate(GenerationRequest("a cube", seeds=(1,), **SMALL), token):
            seen.append(event)
            token.cancel()  # e.g. a server's interrupt, from another thread
    assert [type(e) for e in seen] == [StepEvent]  # one step, no image


def test_low_memory_samples_every_seed_before_decoding(model):
    pipe = QwenImagePipeline.from_pretrained(model)
    req = GenerationRequest("a cube", seeds=(1, 2), low_memory=True, **SMALL)
    kinds = [type(e).__name__ for e in pipe.generate(req)]
    assert kinds == ["StepEvent"] * 4 + ["ImageResult"] * 2


# -- one request


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(steps=0), "--steps must be at least 1"),
        (dict(seeds=(1, 1)), "each --seed may be given once"),
        (dict(width=40), "width 40 is not a multiple of 16"),
        (dict(cfg=float("inf")), "finite number"),
        (dict(mask="m.png"), "a mask needs an image"),
        (dict(strength=0.5), "strength needs an input image"),
        (dict(images=("x.png",), strength=1.5), "--strength must be in [0, 1]"),
        (dict(max_sequence_length=2000), "max_sequence_length must be at most 1024"),
    ],
)
def test_request_validated_once_with_the_callers_names(changes, message):
    req = GenerationRequest("a cube", **changes)
    with pytest.raises(RequestError) as e:
        req.validate({"steps": "--steps", "seeds": "--seed", "strength": "--strength"})
    assert message in str(e.value)


def test_prepare_fills_the_models_defaults(model):
    pipe = QwenImagePipeline.from_pretrained(model)
    req = pipe.prepare(GenerationRequest("a cube"))
    assert (req.width, req.height, req.steps, req.cfg) == (1024, 1024, 50, 4.0)
    assert len(req.seeds) == 1 and req.cfg_on
    lightning = QwenImagePipeline.from_pretrained(model, lightning=4)
    req = lightning.prepare(GenerationRequest("a cube", width=64, height=64))
    assert (req.steps, req.cfg, req.cfg_on) == (4, 1.0, False)
    assert pipe.memory_request(req).cfg is False


# -- the CLI on the same path


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def test_edit_takes_generates_options(edit_model, tmp_path, small_edit_areas):
    src = tmp_path / "in.png"
    picture().save(src)
    base = ["edit", "--model", edit_model, "-i", src, "-p", "add a hat", "--steps", "2"]
    res = cli(*base, "--quantize", "8", "--quantize-text-encoder", "8", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "transformer 8-bit" in res.output and "text encoder 8-bit" in res.output
    assert "dry run" in res.output and not list(tmp_path.glob("*-*.png"))
    out = tmp_path / "out.png"
    res = cli(*base, "--no-adaln-cache", "--seed", "5", "-o", out)
    assert res.exit_code == 0, res.output
    meta = json.loads(Image.open(out).text["qwen_mlx"])
    assert meta["adaln_cache"] is False and meta["flavour"] == "edit-2509"


def test_dry_run_that_does_not_fit_exits_2_with_advice(model, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_MEMORY_LIMIT", "1MiB")
    res = cli("generate", "--model", model, "-p", "a cube", "--width", "64", "--height", "64",
              "--dry-run")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "does NOT fit" in res.output and "dry run" in res.output


def test_an_internal_bug_is_exit_1_in_one_line(model, monkeypatch, tmp_path):
    def bug(self, request, cancel=None):
        raise ValueError("an internal inconsistency")
        yield

    monkeypatch.setattr(QwenImagePipeline, "generate", bug)
    res = cli("generate", "--model", model, "-p", "a cube", "--width", "32", "--height", "32",
              "-o", tmp_path / "x.png")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "error: unexpected ValueError: an internal inconsistency" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.png").exists()


def test_a_request_travels_to_another_process_unchanged(tmp_path):
    """``to_wire`` / ``from_wire`` (how a server's rank 0 hands a job to the other ranks):
    JSON only, and an equal request back: PIL images of every mode pixel for pixel, paths as
    paths, tuples as tuples, the input names kept."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (5, 6, 4), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8))
    req = GenerationRequest(
        prompt="a fox", negative_prompt=None, width=32, height=48, steps=3, cfg=2.5,
        seeds=(1, 2), images=(rgb, rgba, tmp_path / "cat.png"), mask=mask, strength=0.5,
        sigmas=(1.0, 0.5, 0.2), image_names=("a.png", "b.png", "cat.png"), mask_name="m.png",
        control_scale=(0.5, 1.0),
    )  # fmt: skip
    wire = json.loads(json.dumps(req.to_wire()))
    back = GenerationRequest.from_wire(wire)
    assert back.metadata() == req.metadata()
    for field in ("seeds", "sigmas", "control_scale", "image_names", "mask_name", "strength"):
        assert getattr(back, field) == getattr(req, field), field
    for got, want in zip(back.images[:2], req.images[:2], strict=True):
        assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want))
    assert back.images[2] == str(tmp_path / "cat.png")
    assert np.array_equal(np.asarray(back.mask), np.asarray(mask)) and back.mask.mode == "L"
    with pytest.raises(RequestError, match="unknown request fields"):
        GenerationRequest.from_wire({**wire, "bogus": 1})


def test_shared_cancel_in_a_group_of_one():
    """``SharedCancel`` (rank 0's token as every rank sees it) in a group of one: raises
    ``Cancelled`` with rank 0's reason once cancelled, marked as raised in step."""
    from qwen_mlx.distributed import SharedCancel, World, in_step
    from qwen_mlx.server.engine import CancelToken as ServerToken

    local = ServerToken()
    shared = SharedCancel(World(None), local)
    shared.check()  # not cancelled: nothing
    local.cancel("interrupted")
    with pytest.raises(Cancelled, match="interrupted") as e:
        shared.check()
    assert in_step(e.value)


def test_memory_request_prices_what_the_vae_encodes_and_edit_references(
    model, edit_model, small_edit_areas
):
    """The memory request names what the run really does: Edit-2509/2511's two references are
    as many tokens beside the noisy latents as ``encode_references`` packs, and the VAE encodes
    each at its own size; img2img encodes its input at the output size; txt2img nothing."""
    edit = QwenImageEditPipeline.from_pretrained(edit_model)
    req = edit.prepare(GenerationRequest(prompt="a hat", images=(picture(60, 40), picture(24, 36))))
    mem = edit.memory_request(req)
    refs, _ = edit.encode_references(edit.prepare_images(list(req.images))[1])
    assert mem.reference_tokens == refs.shape[1] > 0
    assert len(mem.encode_sizes) == 2
    assert (
        edit.memory_estimate(req).activations["denoise"]
        > edit.memory_estimate(req.replace(images=req.images[:1])).activations["denoise"]
    )

    pipe = QwenImagePipeline.from_pretrained(model)
    plain = pipe.prepare(GenerationRequest(prompt="a fox", **SMALL))
    assert pipe.memory_request(plain).encode_sizes == ()
    img2img = pipe.prepare(GenerationRequest(prompt="a fox", images=(picture(),), **SMALL))
    assert pipe.memory_request(img2img).encode_sizes == ((32, 48),)
    assert pipe.memory_request(img2img).reference_tokens == 0
