"""Memory advice (qwen_mlx.memory.advise) on the released checkpoint's full-size layout.

The checkpoint is header-only (tests/fullsize.py: the released shapes and dtypes, the data a
hole), so the estimates are the real model's. ``_on_gpu`` is pinned to True: the advice is for a
Mac (on a CPU the estimate adds materialised attention scores)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from qwen_mlx import memory
from qwen_mlx.io import parameter_counts
from qwen_mlx.loading import resolve
from qwen_mlx.memory import GiB, MemoryLimitError, Request


@pytest.fixture
def released(fullsize_checkpoint, monkeypatch):
    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    return memory.source_inputs(resolve(fullsize_checkpoint))


def test_fullsize_fixture_is_the_released_checkpoint(fullsize_checkpoint):
    """20.43 B transformer parameters in 9 shards, 8.29 B in the text encoder, 127 M in the VAE,
    all bf16, and (nearly) no disk used."""
    counts = {c: parameter_counts(fullsize_checkpoint / c) for c in memory.COMPONENTS}
    assert counts["transformer"][0] == 20_430_401_088
    assert counts["text_encoder"][0] == 8_292_166_656
    assert 126e6 < counts["vae"][0] < 128e6
    assert all(dtypes == {"BF16": n} for n, _, dtypes in counts.values())
    assert len(list((fullsize_checkpoint / "transformer").glob("*.safetensors"))) == 9
    used = sum(os.stat(p).st_blocks * 512 for p in fullsize_checkpoint.rglob("*.safetensors"))
    assert used < 64 * 2**20, used


def test_16gib_names_quantize_8_and_4(released, monkeypatch):
    """Full-size bf16 under a 16 GiB budget: --quantize 8 and --quantize 4 fit (8-bit language
    model, small decode tiles: what the pipeline does with --quantize); --low-memory and a
    smaller size do not (the 25 GiB of weights without modulation stay)."""
    monkeypatch.setenv(memory.MEMORY_ENV, "16GiB")
    tensors, configs, load_dtype = released
    request = Request(adaln_cache=True)
    result = memory.check(tensors, request, configs, load_dtype)
    assert not result.fits and result.limit == 16 * GiB
    assert [a.label for a in result.advice] == ["--quantize 8", "--quantize 4"]
    assert [a.flags for a in result.advice] == [("--quantize", "8"), ("--quantize", "4")]
    for advice, bits in zip(result.advice, (8, 4), strict=True):
        lean = replace(request, quant_bits=bits, text_encoder_bits=8, vae_tile=64)
        assert advice.request == lean
        assert advice.peak == memory.estimate(tensors, lean, configs, load_dtype).peak
        assert advice.peak <= 16 * GiB
    assert 15 * GiB < result.advice[0].peak and result.advice[1].peak < 10 * GiB
    with pytest.raises(MemoryLimitError) as e:
        memory.check_fits(tensors, request, configs, load_dtype)
    msg = str(e.value)
    assert "nothing smaller fits" not in msg and "\n" not in msg
    assert "would fit: --quantize 8 (~15.4 GiB); --quantize 4 (~9.3 GiB)" in msg
    assert e.value.check.advice == result.advice
    assert result.to_dict()["advice"][1]["flags"] == ["--quantize", "4"]
    lines = result.lines()  # what info and --dry-run print
    assert lines[3].endswith("this machine: 16.0 GiB ($QWEN_MLX_MEMORY_LIMIT): does NOT fit")
    assert lines[4:] == [
        "would fit:",
        "  --quantize 8  ~15.4 GiB while denoising",
        "  --quantize 4  ~9.3 GiB while denoising",
    ]


def test_advice_order_quantize_low_memory_size(released, monkeypatch):
    """Under 30 GiB every kind fits, named in this order: --quantize 8, --quantize 4,
    --low-memory, the largest smaller square."""
    monkeypatch.setenv(memory.MEMORY_ENV, "30GiB")
    tensors, configs, load_dtype = released
    request = Request(adaln_cache=True)
    advice = memory.check(tensors, request, configs, load_dtype).advice
    labels = [a.label for a in advice]
    assert labels[:3] == ["--quantize 8", "--quantize 4", "--low-memory"]
    assert len(labels) == 4 and labels[3].startswith("--width ")
    side = int(advice[3].flags[1])
    assert advice[3].flags == ("--width", str(side), "--height", str(side))
    assert all(a.peak <= 30 * GiB for a in advice)
    bigger = replace(request, width=side + 16, height=side + 16)
    assert memory.estimate(tensors, bigger, configs, load_dtype).peak > 30 * GiB
    low = replace(request, low_memory=True)
    assert advice[2].peak == memory.estimate(tensors, low, configs, load_dtype).peak


def test_together_when_no_single_change_fits(released, monkeypatch):
    """1328x1328 without the adaLN cache under 16 GiB: no one change fits; the advice is
    --quantize 4 --low-memory at the largest square that fits with them."""
    monkeypatch.setenv(memory.MEMORY_ENV, "16GiB")
    tensors, configs, load_dtype = released
    request = Request(width=1328, height=1328)
    advice = memory.check(tensors, request, configs, load_dtype).advice
    assert len(advice) == 1
    flags = advice[0].flags
    assert flags[:3] == ("--quantize", "4", "--low-memory") and flags[3] == "--width"
    assert 16 <= int(flags[4]) < 1328 and advice[0].peak <= 16 * GiB


def test_quantized_checkpoint_needs_a_conversion(released, monkeypatch):
    """An 8-bit checkpoint cannot be quantized again at load: the 4-bit advice is to convert."""
    changes = memory._changes(Request(), 8, True)
    assert [c[0] for c in changes] == ["a checkpoint converted with --quantize 4", "--low-memory"]
    assert changes[0][1] == ()
    assert [c[0] for c in memory._changes(Request(quant_bits=4), None, True)] == ["--low-memory"]


# ----------------------------------------------------------------------------- the CLI


def test_dry_run_and_info_name_what_would_fit(fullsize_checkpoint, monkeypatch, tmp_path):
    """``generate --dry-run`` of the full-size bf16 checkpoint under 16 GiB exits 2 and lists
    --quantize 8 and 4 with their estimates; ``info`` says the same; a plan that fits is 0."""
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    monkeypatch.setenv(memory.MEMORY_ENV, "16GiB")
    runner = CliRunner()
    out = tmp_path / "fox.png"
    args = ["generate", "--model", str(fullsize_checkpoint), "-p", "a fox", "-o", str(out)]
    res = runner.invoke(app, [*args, "--dry-run"])
    assert res.exit_code == 2, res.output
    advice = ["would fit:", "  --quantize 8  ~15.4 GiB while denoising",
              "  --quantize 4  ~9.3 GiB while denoising"]  # fmt: skip
    lines = res.output.splitlines()
    i = lines.index("would fit:")
    assert lines[i : i + 3] == advice and "does NOT fit" in lines[i - 1]
    assert not out.exists()
    res = runner.invoke(app, [*args, "--dry-run", "--quantize", "4"])
    assert res.exit_code == 0, res.output
    assert ": fits" in res.output and "would fit" not in res.output
    res = runner.invoke(app, ["info", str(fullsize_checkpoint)])
    assert res.exit_code == 0, res.output
    assert "20.430 B params" in res.output
    lines = res.output.splitlines()
    i = lines.index("does not fit; would fit:")
    assert lines[i + 1 : i + 3] == advice[1:]


def test_one_process_of_an_mlx_launch_job(released, fullsize_checkpoint, monkeypatch):
    """The per-process plan of a job on the released checkpoint (1024², bf16, modulation
    loaded). Tensor over 2 holds 0.501 of the transformer's weights and over 4 0.252: the
    split is priced from the headers by ``distributed.weight_axis`` on the converter's names,
    and matches the share of a sharded model's own parameters (scripts/bench_distributed.py:
    0.501, 0.252). cfg halves the denoising activations and keeps every weight. Under 30 GiB
    one process does not fit; ``info --processes 2 --parallel tensor`` says each of two
    does."""
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    tensors, configs, load_dtype = released

    def est(**kw):
        return memory.estimate(tensors, Request(**kw), configs, load_dtype)

    one = est()
    for n, share in ((2, 0.501), (4, 0.252)):
        part = est(split="tensor", processes=n)
        ratio = part.weights["transformer"] / one.weights["transformer"]
        assert abs(ratio - share) < 0.001, (n, ratio)
        assert part.weights["text_encoder"] == one.weights["text_encoder"]
        assert part.activations == one.activations  # counted whole: an upper bound
    cfg = est(split="cfg", processes=2)
    assert cfg.weights == one.weights
    assert cfg.activations["denoise"] * 2 == one.activations["denoise"]
    assert est(split="seeds", processes=2).stages == one.stages

    monkeypatch.setenv(memory.MEMORY_ENV, "30GiB")
    runner = CliRunner()
    base = ["info", str(fullsize_checkpoint), "--no-adaln-cache"]
    res = runner.invoke(app, base)
    assert res.exit_code == 0 and "does not fit" in res.output, res.output
    res = runner.invoke(app, [*base, "--processes", "2", "--parallel", "tensor"])
    assert res.exit_code == 0, res.output
    assert "per process (--parallel tensor, 2 processes)" in res.output
    assert "does not fit" not in res.output
    res = runner.invoke(app, [*base, "--processes", "5"])
    assert res.exit_code == 2 and "5 processes do not divide them" in res.output, res.output


def test_references_and_encoding_are_priced(released):
    """Edit's references join the denoising sequence (1024² result + one 1024² reference:
    8192 image tokens + 512 text instead of 4096 + 512, activations linear in tokens on a
    Mac); the VAE encodes untiled, so a lean-tiled decode does not hide an input's encode."""
    tensors, configs, load_dtype = released

    def act(**kw):
        return memory.estimate(tensors, Request(**kw), configs, load_dtype).activations

    plain, edit = act(), act(reference_tokens=4096, encode_sizes=((1024, 1024),))
    assert edit["denoise"] * (4096 + 512) == plain["denoise"] * (8192 + 512)
    lean = act(vae_tile=64, encode_sizes=((1024, 1024),))
    assert lean["decode"] == act(vae_tile=None)["decode"] > act(vae_tile=64)["decode"]
