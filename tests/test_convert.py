"""The converter: sharded and bf16 input, atomic failure, refusing to overwrite, the CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny
from tiny_transformer import build_transformer, save_checkpoint
from typer.testing import CliRunner

from qwen_mlx.cli import app
from qwen_mlx.convert import ConversionError, ConvertOptions, convert_checkpoint, is_converted
from qwen_mlx.io import load_folder


@pytest.fixture
def checkpoint(tmp_path):
    ref = build_transformer("diffusers")
    return ref, save_checkpoint(ref, tmp_path / "src")


def test_sharded_input_converts_every_tensor(checkpoint, tmp_path):
    ref, src = checkpoint
    shards = list((src / "transformer").glob("*.safetensors"))
    assert len(shards) > 5  # the tiny model really is sharded
    dst = convert_tiny(src, tmp_path / "out")
    out = load_folder(dst / "transformer")
    assert len(out) == len(ref.state_dict())
    w = ref.state_dict()["transformer_blocks.1.img_mlp.net.2.weight"].numpy()
    np.testing.assert_array_equal(np.array(out["blocks.1.img_mlp.down.weight"]), w)
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert config["qwen_mlx"]["format_version"] == 1
    assert config["qwen_mlx"]["dtype"] == "float32"
    assert config["num_layers"] == 2
    assert is_converted(dst) and not is_converted(src)
    index = json.loads((dst / "transformer" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)


def test_bf16_input_is_read_without_numpy(tmp_path):
    ref = build_transformer("diffusers").to(torch.bfloat16)
    src = save_checkpoint(ref, tmp_path / "src")
    dst = convert_checkpoint(src, tmp_path / "out", ConvertOptions(dtype="bfloat16"))
    out = load_folder(dst / "transformer")
    got = out["blocks.0.attn.to_q.weight"]
    assert got.dtype == mx.bfloat16
    expected = ref.state_dict()["transformer_blocks.0.attn.to_q.weight"].float().numpy()
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), expected)


def test_corrupt_shard_fails_cleanly(checkpoint, tmp_path):
    _, src = checkpoint
    shard = sorted((src / "transformer").glob("*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ConversionError, match=shard.name):
        convert_tiny(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp folder left either


def test_missing_shard_is_named(checkpoint, tmp_path):
    _, src = checkpoint
    shard = sorted((src / "transformer").glob("*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"missing shard.*{shard.name}"):
        convert_tiny(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_unless_forced(checkpoint, tmp_path):
    _, src = checkpoint
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_tiny(src, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    # --force replaces only an empty folder or a converted checkpoint (tests/test_convert_safety)
    (dst / "keep.txt").unlink()
    convert_checkpoint(src, dst, ConvertOptions(dtype="float32"), force=True)
    assert (dst / "transformer" / "config.json").exists()


def test_copies_unconverted_components(checkpoint, tmp_path):
    _, src = checkpoint
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text('{"shift": 1.0}')
    dst = convert_tiny(src, tmp_path / "out")
    assert json.loads((dst / "scheduler" / "scheduler_config.json").read_text()) == {"shift": 1.0}


def test_missing_component_folder(checkpoint, tmp_path):
    _, src = checkpoint
    index = json.loads((src / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKLQwenImage"]
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="missing component folder.*vae"):
        convert_tiny(src, tmp_path / "out")


def test_cli_convert(checkpoint, tmp_path):
    _, src = checkpoint
    runner = CliRunner()
    dst = tmp_path / "cli"
    res = runner.invoke(app, ["convert", str(src), str(dst), "--dtype", "float16"])
    assert res.exit_code == 0, res.output
    assert load_folder(dst / "transformer")["img_in.weight"].dtype == mx.float16
    res = runner.invoke(app, ["convert", str(src), str(dst)])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "nope"), str(tmp_path / "x")])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "y"), "--dtype", "int3"])
    assert res.exit_code == 2 and "unsupported dtype" in res.output


def test_parameter_counts_see_through_quantization(tmp_path):
    """info counts a packed 4-bit weight as the parameters it stands for; scales and biases are
    bytes, not parameters; casts leave the packed weight and its dtype alone."""
    import json

    import mlx.core as mx

    from qwen_mlx.dtypes import cast_floats
    from qwen_mlx.io import parameter_counts

    w = mx.random.normal((128, 256))
    packed, scales, biases = mx.quantize(w, group_size=64, bits=4)
    weights = {"a.weight": packed, "a.scales": scales, "a.biases": biases, "b.bias": mx.zeros(128)}
    cast = cast_floats(weights, "bfloat16")
    assert cast["a.weight"].dtype == mx.uint32 and cast["a.scales"].dtype == mx.bfloat16
    mx.save_safetensors(str(tmp_path / "model.safetensors"), cast)
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"bits": 4}}))
    params, nbytes, kinds = parameter_counts(tmp_path)
    assert params == 128 * 256 + 128
    assert kinds == {"Q4": 128 * 256, "BF16": 128}
    assert nbytes == packed.nbytes + 2 * (scales.size + biases.size) + 2 * 128
