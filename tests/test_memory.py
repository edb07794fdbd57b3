"""The memory estimate (qwen_mlx.memory): weight bytes from headers, stages, the refusal."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qwen_mlx import memory
from qwen_mlx.io import TensorInfo
from qwen_mlx.memory import GiB, MemoryLimitError, Request, check_fits, estimate, weight_bytes


def sparse_shard(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file with a real header and a sparse (unwritten) data section, so that a
    full-size model costs no disk space."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = TensorInfo(dtype, shape).nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def released_like(root: Path, dtype: str = "BF16") -> tuple[dict, dict[str, dict]]:
    """A converted checkpoint with the released model's shapes (sparse files) and configs."""
    inner, layers, joint = 3072, 60, 3584
    block = {
        **{f"attn.{p}.weight": (inner, inner) for p in ("to_q", "to_k", "to_v", "to_out")},
        **{f"attn.{p}.weight": (inner, inner) for p in ("add_q_proj", "add_k_proj", "add_v_proj")},
        "attn.to_add_out.weight": (inner, inner),
        "img_mod.weight": (6 * inner, inner),
        "txt_mod.weight": (6 * inner, inner),
        "img_mlp.up.weight": (4 * inner, inner),
        "img_mlp.down.weight": (inner, 4 * inner),
        "txt_mlp.up.weight": (4 * inner, inner),
        "txt_mlp.down.weight": (inner, 4 * inner),
    }
    for i in range(layers):  # one shard per block
        sparse_shard(
            root / "transformer" / f"model-{i:05d}.safetensors",
            {f"blocks.{i}.{k}": (dtype, s) for k, s in block.items()},
        )
    sparse_shard(
        root / "text_encoder" / "model-00001.safetensors",
        {
            "language_model.embed_tokens.weight": ("BF16", (152064, 3584)),
            "language_model.layers.0.mlp.up_proj.weight": ("BF16", (18944 * 28 * 3, 3584)),
            "visual.blocks.0.mlp.weight": ("BF16", (600_000_000,)),  # never loaded
        },
    )
    sparse_shard(root / "vae" / "model-00001.safetensors", {"decoder.w": ("F32", (73_000_000,))})
    configs = {
        "transformer": {"num_layers": layers, "attention_head_dim": 128, "num_attention_heads": 24,
                        "joint_attention_dim": joint, "qwen_mlx": {"dtype": "bfloat16"}},
        "vae": {"base_dim": 96, "temperal_downsample": [False, True, True]},
        "text_encoder": {"hidden_size": 3584},
    }  # fmt: skip
    return memory.local_tensors(root), configs


def test_weight_bytes_stored_cast_and_quantized():
    t = {"a.weight": TensorInfo("BF16", (128, 256)), "a.bias": TensorInfo("F32", (128,))}
    assert weight_bytes(t) == 128 * 256 * 2 + 128 * 4
    assert weight_bytes(t, lambda _n: 4) == (128 * 256 + 128) * 4
    # 4 bits per weight plus a 2-byte scale and a 2-byte bias per group of 64; biases as stored
    assert weight_bytes(t, None, 4, 64) == 128 * 256 // 2 + 128 * 256 // 64 * 4 + 128 * 4
    packed = {"a.weight": TensorInfo("U32", (128, 32)), "a.scales": TensorInfo("BF16", (128, 4))}
    assert weight_bytes(packed, lambda _n: 4) == 128 * 32 * 4 + 128 * 4 * 4  # scales are floats


def test_released_model_estimate(tmp_path, monkeypatch):
    """Full-size shapes: bf16 transformer weights of 20.4 B-parameter blocks, text encoder
    without its vision tower, and the stage that peaks."""
    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    tensors, configs = released_like(tmp_path)
    est = estimate(tensors, Request(width=1328, height=1328), configs)
    params = 60 * (8 * 3072**2 + 2 * 6 * 3072**2 + 4 * 4 * 3072**2)
    assert est.weights["transformer"] == params * 2
    assert est.weights["text_encoder"] == (152064 + 18944 * 84) * 3584 * 2
    tokens = 2 * ((1328 // 16) ** 2 + 512)
    assert est.activations["denoise"] == tokens * 3072 * 72
    assert est.peak_stage == "decode" and est.peak == est.stages["decode"]
    assert est.stages["decode"] == params * 2 + 73_000_000 * 4 + est.activations["decode"]
    low = estimate(tensors, Request(width=1328, height=1328, low_memory=True), configs)
    assert low.peak < est.peak and low.peak_stage == "denoise"
    fp32 = estimate(tensors, Request(width=1328, height=1328, precision="fp32"), configs)
    assert fp32.weights["transformer"] == params * 4
    # quantized on load by the 4-bit plan (qwen_mlx.quantize): modulation and the first and
    # last blocks at 8 bits, the rest at 4; a 2-byte scale and bias per 64 weights
    q4 = estimate(tensors, Request(width=1328, height=1328, quant_bits=4), configs)
    d2 = 3072**2
    per_block4 = 24 * d2 * (4 / 8 + 4 / 64) + 12 * d2 * (8 / 8 + 4 / 64)
    per_block8 = 36 * d2 * (8 / 8 + 4 / 64)
    assert q4.weights["transformer"] == pytest.approx(58 * per_block4 + 2 * per_block8, rel=1e-9)


def test_refusal_names_the_estimate_and_what_would_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    tensors, configs = released_like(tmp_path)
    request = Request(width=1328, height=1328, precision="fp32")
    monkeypatch.setattr(memory, "machine_memory", lambda: (64 * GiB, "mocked"))
    with pytest.raises(MemoryLimitError) as e:
        check_fits(tensors, request, configs)
    msg = str(e.value)
    est = estimate(tensors, request, configs)
    assert f"this needs about {memory.gib(est.peak)} while decoding" in msg
    assert "more than the 64.0 GiB available (mocked)" in msg
    # in order: a 16-bit plan, quantized on load at 8 then 4 bits
    assert msg.index("--precision bf16") < msg.index("--quantize 8") < msg.index("--quantize 4")
    assert "--ignore-memory-limit" in msg
    assert "\n" not in msg
    monkeypatch.setattr(memory, "machine_memory", lambda: (128 * GiB, "mocked"))
    assert check_fits(tensors, request, configs).peak == est.peak


def test_a_smaller_size_is_offered_when_only_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    tensors, configs = released_like(tmp_path)
    request = Request(width=2048, height=2048, precision="bf16", low_memory=True, vae_tile=None)
    limit = estimate(tensors, Request(width=1024, height=1024, precision="bf16",
                                       low_memory=True, vae_tile=None), configs).peak  # fmt: skip
    fits = memory.alternatives(tensors, request, configs, limit)
    # quantizing on load fits too (named first); the size comes last
    assert [f.label for f in fits] == ["--quantize 8", "--quantize 4", "--width 1024 --height 1024"]


def test_memory_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv(memory.MEMORY_ENV, "24GiB")
    assert memory.machine_memory() == (24 * GiB, "$QWEN_MLX_MEMORY_LIMIT")
    assert memory.parse_bytes("512m") == 512 * 2**20 and memory.parse_bytes("8e9") == 8e9
    with pytest.raises(ValueError, match="cannot read a memory size"):
        memory.parse_bytes("lots")
    monkeypatch.delenv(memory.MEMORY_ENV)
    size, where = memory.machine_memory()
    assert size > 2**28 and where  # this machine's own figure


def test_adaln_cache_and_text_encoder_bits(tmp_path, monkeypatch):
    """The adaLN cache leaves the 6.8 B modulation parameters on disk; the language model
    quantized on load prices at its bits; the 16 GB-Mac configuration stays under 10 GiB."""
    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    tensors, configs = released_like(tmp_path)
    base = estimate(tensors, Request(), configs)
    cached = estimate(tensors, Request(adaln_cache=True), configs)
    modulation = 60 * 2 * 6 * 3072**2
    assert modulation == pytest.approx(6.8e9, rel=0.01)
    assert base.weights["transformer"] - cached.weights["transformer"] == modulation * 2
    te8 = estimate(tensors, Request(text_encoder_bits=8), configs)
    lm = (152064 + 18944 * 84) * 3584
    assert te8.weights["text_encoder"] == lm + lm // 64 * 4
    lean = Request(
        quant_bits=4, adaln_cache=True, text_encoder_bits=8, vae_tile=memory.LEAN_DECODE_TILE
    )
    est = estimate(tensors, lean, configs)
    assert 7.2 * GiB < est.weights["transformer"] < 7.6 * GiB
    assert est.peak < 10 * GiB, est.describe()


def test_cache_limit():
    assert memory.cache_limit(16 * GiB) == GiB and memory.cache_limit(512 * GiB) == 2 * GiB
    assert memory.cache_limit(2 * GiB) == 256 * 2**20


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers import convert_tiny
    from tiny_pipeline import build_checkpoint

    src = build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")[0]
    return convert_tiny(src, tmp_path_factory.mktemp("mlx") / "tiny")


def test_info_and_dry_run_print_the_stages(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["info", str(tiny_model), "--quantize", "4", "--width", "512"])
    assert res.exit_code == 0, res.output
    assert "denoise" in res.output and "estimated peak memory at 512x1024" in res.output
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(tiny_model), "-p", "a cube", "--dry-run", "-o", str(out)]
    res = runner.invoke(app, [*args, "--quantize", "8", "--no-adaln-cache"])
    assert res.exit_code == 0, res.output
    assert "transformer 8-bit" in res.output and "text encoder 8-bit" in res.output
    assert "expected peak" in res.output and "nothing loaded or written" in res.output
    assert not out.exists()
    res = runner.invoke(app, [*args, "--quantize", "3"])
    assert res.exit_code == 2 and "4 or 8" in res.output
    res = runner.invoke(app, [*args, "--quantize-text-encoder", "5"])
    assert res.exit_code == 2 and "4, 8, none or auto" in res.output


def test_generate_quantized_png(tiny_model, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    out = tmp_path / "q.png"
    res = CliRunner().invoke(
        app,
        ["generate", "--model", str(tiny_model), "-p", "a cube", "--width", "32", "--height",
         "32", "--steps", "2", "--seed", "1", "--quantize", "8", "--no-adaln-cache",
         "-o", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    params = json.loads(Image.open(out).text["qwen_mlx"])
    assert params["quantize"] == 8 and params["adaln_cache"] is False
