"""`generate` and `info` never write a black image, never clobber an output, check everything
before loading, and never show a traceback (issue 10). CLI-level, on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import convert_tiny
from PIL import Image
from tiny_pipeline import build_checkpoint
from typer.testing import CliRunner

from qwen_mlx import memory
from qwen_mlx.cli import app
from qwen_mlx.io import list_shards
from qwen_mlx.pipelines.txt2img import QwenImagePipeline

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL = ["--width", "32", "--height", "48", "--steps", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")[0]


@pytest.fixture(scope="module")
def model(source, tmp_path_factory):
    return convert_tiny(source, tmp_path_factory.mktemp("mlx") / "tiny")


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
def nothing_loads(monkeypatch):
    """Fail the test if any model is loaded or any weight is read."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded although the input was refused")

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", refuse)


def copy_with(model: Path, dst: Path, component: str, key: str, value: float) -> Path:
    """A copy of ``model`` whose tensor ``component/key`` is filled with ``value``."""
    shutil.copytree(model, dst)
    for shard in list_shards(dst / component):
        weights = dict(mx.load(str(shard)))
        if key in weights:
            weights[key] = mx.full(weights[key].shape, value, dtype=weights[key].dtype)
            mx.save_safetensors(str(shard), weights, metadata={"format": "mlx"})
            return dst
    raise KeyError(key)


# ----------------------------------------------------------------------------- never a black PNG


def test_vae_overflowing_to_minus_inf_is_an_error_not_a_black_png(model, tmp_path):
    """-inf out of the decoder used to be clipped to 0 (black) before the finiteness check."""
    bad = copy_with(model, tmp_path / "m", "vae", "decoder.conv_out.bias", -float("inf"))
    out = tmp_path / "img.png"
    line = one_line_error(generate(bad, *SMALL, "--seed", "1", "-o", out), "decoded image")
    assert "non-finite" in line and "precision" not in line  # float32: not the plan's fault
    assert not out.exists()


def test_nan_weights_name_the_step_without_blaming_the_precision_plan(model, tmp_path):
    bad = copy_with(model, tmp_path / "m", "transformer", "img_in.bias", float("nan"))
    out = tmp_path / "img.png"
    line = one_line_error(generate(bad, *SMALL, "-o", out), "non-finite (NaN/inf) at step 1/2")
    assert "the weights or the inputs hold NaN/inf or values too large" in line
    assert "'float32' precision plan, whose range does not overflow here" in line
    assert "try precision" not in line
    assert not out.exists()


def test_non_finite_prompt_embeddings_stop_before_denoising(model, tmp_path, monkeypatch):
    bad = copy_with(
        model, tmp_path / "m", "text_encoder", "language_model.norm.weight", float("nan")
    )
    built = []
    monkeypatch.setattr(QwenImagePipeline, "transformer", property(lambda s: built.append(1)))
    one_line_error(generate(bad, *SMALL, "-o", tmp_path / "x.png"), "text encoder's output")
    assert built == []


# ----------------------------------------------------------------------------- outputs


def test_existing_output_is_refused_before_loading(model, tmp_path, nothing_loads):
    out = tmp_path / "img.png"
    out.write_bytes(b"precious")
    one_line_error(generate(model, *SMALL, "-o", out), "already exists; pass --overwrite")
    assert out.read_bytes() == b"precious"


def test_output_that_is_a_folder_or_unwritable_is_refused_before_loading(
    model, tmp_path, nothing_loads, monkeypatch
):
    (tmp_path / "dir.png").mkdir()
    one_line_error(generate(model, *SMALL, "-o", tmp_path / "dir.png"), "is a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = Path.write_bytes

    def denied(self, data):  # a read-only folder, even for root
        if self.parent == ro:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", denied)
    one_line_error(generate(model, *SMALL, "-o", ro / "a.png"), f"cannot write in {ro}")


def test_overwrite_replaces_an_existing_png(model, tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"old")
    res = generate(model, *SMALL, "--seed", "4", "-o", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads(Image.open(out).text["qwen_mlx"])["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_write_failing_at_the_end_saves_under_a_fallback_name(model, tmp_path, monkeypatch):
    out = tmp_path / "sub" / "img.png"
    real_link = os.link

    def link(src, dst, *a, **k):  # the folder turned read-only during sampling
        if Path(dst) == out:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    res = generate(model, *SMALL, "--seed", "2", "-o", out)
    fallback = out.with_name("img.1.png")
    assert res.exit_code == 1, res.output
    assert f"cannot write {out}: Permission denied; saved the image as {fallback}" in res.output
    assert json.loads(Image.open(fallback).text["qwen_mlx"])["seed"] == 2


def test_parallel_runs_to_one_output_never_clobber_each_other(model, tmp_path):
    out = tmp_path / "same.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c"]
    script = "from qwen_mlx.cli import app; app()"
    procs = [
        subprocess.Popen(
            [
                *cmd,
                script,
                "generate",
                "--model",
                str(model),
                "-p",
                "x",
                *SMALL,
                "--seed",
                str(s),
                "-o",
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for s in (1, 2, 3)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    # One run gets the name. A run that found it taken at the end saved elsewhere and said so
    # (exit 1); one that started after the first had finished was refused up front (exit 2).
    assert sorted(code for code, _, _ in results)[0] == 0, results
    assert sum(code == 0 for code, _, _ in results) == 1, results
    written = []
    for seed, (code, _, stderr) in zip((1, 2, 3), results, strict=True):
        assert code in (0, 1, 2), stderr
        if code == 1:
            assert "created by someone else meanwhile; saved the image as" in stderr
        if code == 2:
            assert "already exists; pass --overwrite" in stderr
        else:
            written.append(seed)
    pngs = sorted(tmp_path.glob("*.png"))
    seeds = sorted(json.loads(Image.open(p).text["qwen_mlx"])["seed"] for p in pngs)
    assert seeds == written  # every image that ran was kept, none overwritten


# ----------------------------------------------------------------------------- up-front checks


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "0"], "width 0 is too small; the minimum is 16"),
        (["--height", "0"], "height 0 is too small"),
        (["--width", "100000"], "width 100000 is too large; the largest supported is 8192"),
        (["--steps", "1000000"], "--steps must be at most 1000, got 1000000"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--cfg", "nan"], "CFG scale must be a finite number, got nan"),
        (["--cfg", "inf"], "CFG scale must be a finite number, got inf"),
        (["--seed", "-1"], "seed -1 is out of range"),
        (["--seed", str(2**64)], f"seed {2**64} is out of range"),
        (["--seed", str(2**70)], "is out of range; seeds go from 0 to 18446744073709551615"),
        (["--seed", "3", "--seed", "3"], "each --seed may be given once"),
        (["--max-sequence-length", "0"], "--max-sequence-length must be at least 1"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(
    model, tmp_path, monkeypatch, nothing_loads, args, message
):
    monkeypatch.chdir(tmp_path)
    one_line_error(generate(model, *args), message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=[]), "non-empty list of strings"),
        (dict(width=64.0), "width must be an integer"),
        (dict(height="64"), "height must be an integer"),
        (dict(seed=1.5), "a seed must be an integer"),
        (dict(seed=-1), "seed -1 is out of range"),
        (dict(seed=[1, 2]), "2 seeds for 1 images"),
        (dict(sigmas=[1.0, 0.5]), "one value per step (3)"),
        (dict(sigmas=[1.0, 0.5, 0.0]), "must lie in (0, 1]"),
        (dict(sigmas=[1.0, 2.0, 0.5]), "must lie in (0, 1]"),
        (dict(true_cfg_scale=float("nan")), "finite number"),
        (dict(num_inference_steps=10**9), "at most 1000"),
        (dict(num_images_per_prompt=0), "at least 1"),
    ],
)
def test_python_api_rejects_bad_arguments_before_loading(model, kwargs, message):
    pipe = QwenImagePipeline.from_pretrained(model)
    args = dict(prompt="x", width=32, height=32, num_inference_steps=3) | kwargs
    with pytest.raises(ValueError) as e:
        pipe(**args)
    assert message in str(e.value)
    assert pipe.components.loaded() == []  # nothing loaded


@pytest.mark.parametrize("converted", [True, False])
def test_component_shapes_are_checked_before_the_text_encoder_runs(
    source, model, tmp_path, monkeypatch, converted
):
    folder = shutil.copytree(model if converted else source, tmp_path / "m")
    config = folder / "transformer" / "config.json"
    data = json.loads(config.read_text())
    data["num_layers"] = 5
    config.write_text(json.dumps(data))
    loaded = []
    from qwen_mlx.models.text_encoder import QwenTextEncoder

    monkeypatch.setattr(QwenTextEncoder, "from_weights", lambda *a, **k: loaded.append(1))
    line = one_line_error(generate(folder, *SMALL), "num_layers is 5 but the weights have 2")
    assert str(config) in line and loaded == []


# ----------------------------------------------------------------------------- true messages


def test_missing_local_folder_is_no_such_folder_and_never_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked about a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    for name in ("./models/qwen", "/nowhere/qwen", "qwen", "~/nope/qwen", "a/b/c"):
        one_line_error(generate(name, *SMALL), f"no such folder: {name}")


def test_hub_id_that_is_not_found_says_both(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    one_line_error(generate("org/name", *SMALL), "org/name: no such folder, and cannot get it")


def test_corrupt_model_index_of_a_converted_folder_is_an_error(model, tmp_path):
    folder = shutil.copytree(model, tmp_path / "m")
    (folder / "model_index.json").write_text('{"_class_name": "QwenImagePipeline", ')
    one_line_error(generate(folder, *SMALL), "model_index.json is not valid JSON")
    (folder / "model_index.json").write_text("[]")
    one_line_error(generate(folder, *SMALL), "model_index.json must hold a JSON object")


def test_info_with_an_absurd_shard_header_is_one_line(model, tmp_path):
    folder = shutil.copytree(model, tmp_path / "m")
    shard = list_shards(folder / "vae")[0]
    data = shard.read_bytes()
    shard.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    line = one_line_error(runner.invoke(app, ["info", str(folder)]), "header claims")
    assert str(shard) in line


def test_info_hub_id_reads_headers_only(source, tmp_path, monkeypatch):
    """Served from the tiny checkpoint: listing, configs and headers, never weights."""
    import huggingface_hub

    from qwen_mlx.io import safetensors_header

    class Meta:
        def __init__(self, path):
            self.tensors = {
                k: huggingface_hub.utils.TensorInfo(v["dtype"], v["shape"], v["data_offsets"])
                for k, v in safetensors_header(path).items()
            }

    files = [str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, r, **k: files)
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "parse_safetensors_file_metadata",
        lambda self, r, f, **k: Meta(source / f),
    )

    def download(repo, filename, **k):
        assert filename.endswith(".json"), f"downloaded {filename}"
        return str(source / filename)

    def forbidden(*a, **k):
        raise AssertionError("info must not download or convert the model")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)
    monkeypatch.setattr("qwen_mlx.convert.convert_checkpoint", forbidden)
    monkeypatch.setattr("qwen_mlx.hub.unreachable", lambda *a, **k: None)  # the hub "answers"
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["info", "org/tiny"])
    assert res.exit_code == 0, res.output
    assert "headers only: nothing downloaded or converted" in res.output
    assert "transformer" in res.output and "B params" in res.output
    assert "estimated peak memory at 1024x1024" in res.output


# ----------------------------------------------------------------------------- tracebacks


UNEXPECTED = """
from qwen_mlx.pipelines.txt2img import QwenImagePipeline
def boom(*a, **k):
    raise RuntimeError("something nobody expected")
QwenImagePipeline.from_pretrained = boom
from qwen_mlx.cli import app
app()
"""


@pytest.mark.parametrize("debug", ["", "1"])
def test_unexpected_errors_are_one_line_unless_debugging(model, tmp_path, debug):
    env = dict(os.environ, PYTHONPATH=str(ROOT), QWEN_MLX_DEBUG=debug)
    proc = subprocess.run(
        [sys.executable, "-c", UNEXPECTED, "generate", "--model", str(model), "-p", "x", *SMALL],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    if debug:
        assert "Traceback" in proc.stderr and "something nobody expected" in proc.stderr
    else:
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip() == (
            "error: unexpected RuntimeError: something nobody expected "
            "(QWEN_MLX_DEBUG=1 shows the traceback)"
        )


# ----------------------------------------------------------------------------- memory


def test_generation_that_cannot_fit_is_refused_with_the_estimate(model, tmp_path, monkeypatch):
    monkeypatch.setenv(memory.MEMORY_ENV, "1MiB")
    out = tmp_path / "img.png"
    loaded = []
    monkeypatch.setattr(QwenImagePipeline, "transformer", property(lambda s: loaded.append(1)))
    line = one_line_error(generate(model, *SMALL, "-o", out), "this needs about")
    assert "more than the 0.0 GiB available ($QWEN_MLX_MEMORY_LIMIT)" in line
    assert "--ignore-memory-limit" in line and not out.exists() and loaded == []


def test_ignore_memory_limit_goes_ahead(model, tmp_path, monkeypatch):
    monkeypatch.setenv(memory.MEMORY_ENV, "1MiB")
    out = tmp_path / "img.png"
    res = generate(model, *SMALL, "-o", out, "--ignore-memory-limit")
    assert res.exit_code == 0, res.output
    assert "warning: this needs about" in res.output and out.exists()


def test_info_prints_the_same_estimate(model, monkeypatch):
    monkeypatch.setenv(memory.MEMORY_ENV, "1MiB")
    res = runner.invoke(app, ["info", str(model), "--width", "32", "--height", "48"])
    assert res.exit_code == 0, res.output
    source = QwenImagePipeline.from_pretrained(model).source
    est = memory.source_estimate(source, memory.Request(32, 48))
    assert f"estimated peak memory at 32x48: {est.describe()}" in res.output
    assert "does not fit" in res.output
