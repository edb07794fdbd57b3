"""Inputs are sacred (issue 21), at the command line on the tiny checkpoint: an output naming an
input is refused however it is spelled (even with --overwrite), LoRA spec typos and NaN LoRAs
are one line, warnings are one line, an unusable cache folder still generates."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qwen_mlx.cli import app

runner = CliRunner()
SMALL = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def model(tiny_qwen_image):
    return tiny_qwen_image[1]


def generate(model, *args, env=None):
    args = ["generate", "--model", str(model), "--prompt", "a cube", *map(str, args)]
    return runner.invoke(app, args, env=env)


def one_line_error(res, *needles: str, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], res.output
    return errors[0]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save("photo.png")
    m = np.zeros((32, 32), np.uint8)
    m[:, :16] = 255
    Image.fromarray(m).save("m.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "photo.png")
    (tmp_path / "mlink.png").symlink_to(tmp_path / "m.png")
    return {p: (tmp_path / p).read_bytes() for p in ("photo.png", "m.png")}


@pytest.mark.parametrize("out", ["photo.png", "./photo.png", "link.png", "sub/../photo.png"])
def test_generate_refuses_to_overwrite_its_image(model, inputs, tmp_path, out):
    (tmp_path / "sub").mkdir(exist_ok=True)
    res = generate(model, *SMALL, "--image", "photo.png", "-o", out, "--overwrite")
    one_line_error(res, "would overwrite an input image", "--image photo.png")
    assert (tmp_path / "photo.png").read_bytes() == inputs["photo.png"]


@pytest.mark.parametrize("out", ["m.png", "./m.png", "mlink.png"])
def test_generate_refuses_to_overwrite_its_mask(model, inputs, tmp_path, out):
    res = generate(model, *SMALL, "--image", "photo.png", "--mask", "m.png", "-o", out,
                   "--overwrite")  # fmt: skip
    one_line_error(res, "would overwrite an input image", "--mask m.png")
    assert (tmp_path / "m.png").read_bytes() == inputs["m.png"]


def test_input_given_through_a_link_is_still_protected(model, inputs, tmp_path):
    res = generate(model, *SMALL, "--image", "link.png", "-o", "photo.png", "--overwrite")
    one_line_error(res, "would overwrite an input image", "--image link.png")
    assert (tmp_path / "photo.png").read_bytes() == inputs["photo.png"]


def test_edit_still_refuses(model, inputs, tmp_path):
    res = runner.invoke(
        app,
        ["edit", "--model", str(model), "-p", "x", "--image", "photo.png", "-o", "./link.png",
         "--overwrite"],
    )  # fmt: skip
    one_line_error(res, "would overwrite an input image")
    assert (tmp_path / "photo.png").read_bytes() == inputs["photo.png"]


def test_generate_from_a_16_bit_image_is_not_white(model, inputs, tmp_path):
    """The issue's second finding at the CLI: a 16-bit grey photo and its 8-bit twin give the
    same PNG."""
    eight = np.asarray(Image.open("photo.png").convert("L"))
    Image.fromarray(eight).save("g8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save("g16.png")
    assert Image.open("g16.png").mode == "I;16"
    for name in ("g8", "g16"):
        res = generate(model, *SMALL, "--image", f"{name}.png", "-o", f"out-{name}.png")
        assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(
        np.asarray(Image.open("out-g8.png")), np.asarray(Image.open("out-g16.png"))
    )


def lora_file(path, value: float = 0.01):
    mx.save_safetensors(
        str(path),
        {
            "transformer_blocks.0.attn.to_q.lora_A.weight": mx.full((2, 64), value),
            "transformer_blocks.0.attn.to_q.lora_B.weight": mx.full((64, 2), 0.01),
        },
    )
    return path


def test_lora_scale_typos_and_nan_loras_are_one_line(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora_file(tmp_path / "style.safetensors")
    lora_file(tmp_path / "nan.safetensors", float("nan"))
    line = one_line_error(generate(model, *SMALL, "--lora", "style.safetensors:abc"))
    assert line.startswith("error: LoRA scale 'abc' is not a number")
    one_line_error(generate(model, *SMALL, "--lora", "style.safetensors:1_0"), "'1_0' is not")
    one_line_error(generate(model, *SMALL, "--lora", "gone.safetensors:0.5"),
                   "LoRA file not found: gone.safetensors")  # fmt: skip
    line = one_line_error(generate(model, *SMALL, "--lora", "nan.safetensors", "-o", "x.png"))
    assert "nan.safetensors: 1 LoRA tensor(s) hold NaN or inf values" in line
    assert not (tmp_path / "x.png").exists()


def test_warnings_are_one_line(model, tmp_path, monkeypatch):
    """A prompt longer than --max-sequence-length warns; the line carries no source location."""
    monkeypatch.chdir(tmp_path)
    res = generate(model, *SMALL, "--max-sequence-length", "4", "-o", "x.png")
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.splitlines() if "warning" in line.lower()]
    assert warned and all(line.startswith("warning: ") for line in warned), res.output
    assert "UserWarning" not in res.output and ".py:" not in res.output


def test_cache_that_is_a_file_warns_once_and_generates(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    res = generate(model, *SMALL, "-o", "x.png", env={"QWEN_MLX_CACHE": str(tmp_path / "file")})
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert warned == [
        f"warning: adaLN cache: cannot write in {tmp_path / 'file' / 'adaln'} "
        f"({tmp_path / 'file'} is a file, not a folder; QWEN_MLX_CACHE={tmp_path / 'file'}); "
        "running without the cache"
    ], res.output
    assert (tmp_path / "x.png").exists()
