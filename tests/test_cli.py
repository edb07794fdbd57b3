"""`qwen-mlx generate` and `qwen-mlx info`: PNG metadata, seeds, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import convert_tiny
from PIL import Image
from tiny_pipeline import build_checkpoint
from typer.testing import CliRunner

from qwen_mlx.cli import app
from qwen_mlx.io import load_folder
from qwen_mlx.precision import COMPONENT_DTYPES

runner = CliRunner()
SMALL = ["--width", "32", "--height", "48", "--steps", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny checkpoint in the released (diffusers) layout."""
    return build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")[0]


@pytest.fixture(scope="module")
def model(source, tmp_path_factory):
    return convert_tiny(source, tmp_path_factory.mktemp("mlx") / "tiny")


def generate(model, *args):
    return runner.invoke(app, ["generate", "--model", str(model), "--prompt", "a cube", *args])


def test_png_carries_its_parameters(model, tmp_path):
    out = tmp_path / "img.png"
    res = generate(model, *SMALL, "--seed", "5", "--cfg", "3.5", "--output", str(out))
    assert res.exit_code == 0, res.output
    assert "peak memory" in res.output and "2/2" in res.output
    im = Image.open(out)
    assert im.size == (32, 48)
    meta = json.loads(im.text["qwen_mlx"])
    assert meta["seed"] == 5 and meta["steps"] == 2 and meta["cfg"] == 3.5
    assert meta["prompt"] == "a cube" and meta["negative_prompt"] == " "
    assert meta["width"] == 32 and meta["height"] == 48 and meta["precision"] == "float32"
    assert "Seed: 5" in im.text["parameters"] and "Steps: 2" in im.text["parameters"]
    assert list(tmp_path.iterdir()) == [out]  # no temp file left


def test_seeds_are_reproducible(model, tmp_path):
    res = generate(model, *SMALL, "--seed", "1", "--seed", "2", "-o", str(tmp_path / "a.png"))
    assert res.exit_code == 0, res.output
    again = generate(model, *SMALL, "--seed", "1", "-o", str(tmp_path / "b.png"))
    assert again.exit_code == 0, again.output
    a1 = np.array(Image.open(tmp_path / "a-1.png"))
    a2 = np.array(Image.open(tmp_path / "a-2.png"))
    b = np.array(Image.open(tmp_path / "b.png"))
    assert np.array_equal(a1, b) and not np.array_equal(a1, a2)


def test_random_seed_is_reported(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = generate(model, *SMALL)
    assert res.exit_code == 0, res.output
    (png,) = list(tmp_path.glob("qwen-image-*.png"))
    seed = json.loads(Image.open(png).text["qwen_mlx"])["seed"]
    assert f"seed {seed}" in res.output


def test_info(model):
    res = runner.invoke(app, ["info", str(model)])
    assert res.exit_code == 0, res.output
    assert "transformer" in res.output and "B params" in res.output
    assert "precision plan: float32" in res.output and "auto precision" in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--width", "1000", "--height", "64"],
            "width 1000 is not a multiple of 16; use 992 or 1008",
        ),
        (["--steps", "0"], "steps must be at least 1"),
        (["--aspect", "5:4"], "unknown aspect '5:4'"),
        (["--aspect", "1:1", "--width", "64"], "either --aspect or --width"),
        (["--output", "x.jpg"], "must end in .png"),
    ],
)
def test_bad_arguments(model, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = generate(model, *args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_bad_models(model, tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "missing"), "-p", "x"])
    assert res.exit_code == 2 and f"no such folder: {tmp_path / 'missing'}" in res.output
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shutil.rmtree(broken / "vae")
    res = runner.invoke(app, ["generate", "--model", str(broken), "-p", "x", *SMALL])
    assert res.exit_code == 2 and "no vae/ component" in res.output
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model, corrupt)
    shard = sorted((corrupt / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(b"garbage")
    out = tmp_path / "never.png"
    res = runner.invoke(
        app, ["generate", "--model", str(corrupt), "-p", "x", *SMALL, "-o", str(out)]
    )
    assert res.exit_code == 2 and shard.name in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("plan", ["fp16", "mixed", "bf16"])
def test_precision_plans_convert_and_generate(source, model, tmp_path, plan):
    """Each plan converts, loads and generates end to end, close to the float32 image."""
    dst = tmp_path / plan
    res = runner.invoke(app, ["convert", str(source), str(dst), "--precision", plan])
    assert res.exit_code == 0, res.output
    out = tmp_path / f"{plan}.png"
    res = generate(dst, *SMALL, "--seed", "3", "--cfg", "1", "-o", str(out))
    assert res.exit_code == 0, res.output
    ref = tmp_path / "f32.png"
    assert generate(model, *SMALL, "--seed", "3", "--cfg", "1", "-o", str(ref)).exit_code == 0
    meta = json.loads(Image.open(out).text["qwen_mlx"])
    assert meta["precision"] == plan
    # the plan also decides the other components: the VAE keeps float32 under fp16/mixed
    vae, te = COMPONENT_DTYPES[plan]["vae"], COMPONENT_DTYPES[plan]["text_encoder"]
    assert json.loads((dst / "vae" / "config.json").read_text())["qwen_mlx"]["dtype"] == vae
    te_weights = load_folder(dst / "text_encoder")
    assert {str(v.dtype) for v in te_weights.values()} == {f"mlx.core.{te}"}
    a = np.array(Image.open(out)).astype(float)
    b = np.array(Image.open(ref)).astype(float)
    # half-precision weights in a 3-model chain: within a few uint8 levels of float32
    assert np.abs(a - b).mean() < 4.0 and b.std() > 2.0


def test_generate_precision_override(model, tmp_path):
    out = tmp_path / "o.png"
    res = generate(model, *SMALL, "--seed", "3", "--precision", "fp16", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert json.loads(Image.open(out).text["qwen_mlx"])["precision"] == "fp16"
    res = generate(model, *SMALL, "--precision", "int4", "-o", str(tmp_path / "x.png"))
    assert res.exit_code == 2 and "int4" in res.output and not (tmp_path / "x.png").exists()


def test_pipeline_precision_sets_component_dtypes(model):
    import mlx.core as mx

    from qwen_mlx.pipelines.txt2img import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(model, precision="fp16")
    assert pipe.vae.dtype == mx.float32
    assert pipe.text_encoder.dtype == mx.bfloat16
    assert pipe.transformer.plan.name == "fp16"
    with pytest.raises(ValueError, match="unknown precision"):
        QwenImagePipeline.from_pretrained(model, precision="int4")


@pytest.mark.parametrize("low_memory", [False, True])
def test_three_seeds_load_each_component_once(model, tmp_path, monkeypatch, low_memory):
    """One CLI call: the text encoder loads once and runs one forward for the prompt and the
    negative; the transformer and VAE load once, also with --low-memory (whose metadata read
    must not rebuild the freed transformer)."""
    from qwen_mlx.models.text_encoder import QwenTextEncoder
    from qwen_mlx.models.transformer import QwenImageTransformer
    from qwen_mlx.models.vae import QwenImageVAE

    counts = {"text_encoder": 0, "forward": 0, "transformer": 0, "vae": 0}

    def counting(cls, key):
        real = cls.from_weights.__func__

        def wrapped(klass, *a, **k):
            counts[key] += 1
            return real(klass, *a, **k)

        monkeypatch.setattr(cls, "from_weights", classmethod(wrapped))

    counting(QwenTextEncoder, "text_encoder")
    counting(QwenImageTransformer, "transformer")
    counting(QwenImageVAE, "vae")
    real_call = QwenTextEncoder.__call__

    def forward(self, *a, **k):
        counts["forward"] += 1
        return real_call(self, *a, **k)

    monkeypatch.setattr(QwenTextEncoder, "__call__", forward)
    flags = ["--low-memory"] if low_memory else []
    seeds = ["--seed", "1", "--seed", "2", "--seed", "3"]
    res = generate(model, *SMALL, *seeds, *flags, "-o", str(tmp_path / "s.png"))
    assert res.exit_code == 0, res.output
    assert counts == {"text_encoder": 1, "forward": 1, "transformer": 1, "vae": 1}
    for s in (1, 2, 3):
        meta = json.loads(Image.open(tmp_path / f"s-{s}.png").text["qwen_mlx"])
        assert meta["seed"] == s and meta["precision"] == "float32"
