"""Quantize-at-load and the adaLN cache through the pipeline, on a tiny checkpoint whose
transformer widths are multiples of the group size (2 heads x 32 = 64, FFN 256)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import convert_tiny, write_model_index
from mlx.utils import tree_flatten
from tiny_pipeline import SCHEDULER, TEXT_HIDDEN, build_text_encoder, build_vae
from tiny_tokenizer import build_tokenizer
from tiny_transformer import build_transformer

from qwen_mlx import adaln
from qwen_mlx.pipelines.txt2img import QwenImagePipeline
from qwen_mlx.quantize import quantize_stream, transformer_plan

RUN = dict(negative_prompt=" ", true_cfg_scale=4.0, height=32, width=48, num_inference_steps=3)
# The tiny pipeline's image (in [0, 1]) against the float32 one: see tests/test_quantize.py
# for the per-layer error (0.5 % at 8 bits, 9 % at 4 bits). Three blocks, three Euler steps and
# the VAE keep it near that; a broken quantization gives O(1) differences.
IMAGE_TOL = {8: 0.02, 4: 0.15}  # measured: 0.0064 and 0.051 (8-bit includes bf16 storage)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "qwen-image-q"
    transformer = build_transformer(
        "quantizable",
        std=0.1,
        num_layers=3,
        joint_attention_dim=TEXT_HIDDEN,
    )
    transformer.save_pretrained(root / "transformer", max_shard_size="40KB")
    build_text_encoder().save_pretrained(root / "text_encoder", max_shard_size="200KB")
    build_vae().save_pretrained(root / "vae")
    build_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    write_model_index(root, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
    out = tmp_path_factory.mktemp("mlx")
    return {
        "src": root,
        "f32": convert_tiny(root, out / "f32"),
        4: convert_tiny(root, out / "q4", quantize=4),
        8: convert_tiny(root, out / "q8", quantize=8),
    }


def image(pipe: QwenImagePipeline, **kw) -> np.ndarray:
    return pipe("a red cube", seed=0, output_type="np", **{**RUN, **kw})


def params(pipe: QwenImagePipeline) -> dict:
    return dict(tree_flatten(pipe.transformer.parameters()))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_at_load_equals_converting(ckpt, bits):
    converted = QwenImagePipeline.from_pretrained(ckpt[bits], adaln_cache=False)
    expected = params(converted)
    assert expected["blocks.1.attn.to_q.weight"].dtype == mx.uint32
    # from the diffusers folder (converted in memory) and from a float32 converted folder
    for src in (ckpt["src"], ckpt["f32"]):
        pipe = QwenImagePipeline.from_pretrained(
            src, dtype="float32", quantize=bits, adaln_cache=False
        )
        got = params(pipe)
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k].dtype == v.dtype, k
            np.testing.assert_array_equal(np.array(got[k]), np.array(v), err_msg=k)
    np.testing.assert_array_equal(image(pipe), image(converted))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_image_close_to_float(ckpt, bits):
    base = image(QwenImagePipeline.from_pretrained(ckpt["f32"]))
    err = np.abs(image(QwenImagePipeline.from_pretrained(ckpt[bits])) - base).max()
    assert 1e-4 < err < IMAGE_TOL[bits], err


def test_adaln_cache_same_image_no_modulation_params(ckpt):
    cached = QwenImagePipeline.from_pretrained(ckpt[4])
    plain = QwenImagePipeline.from_pretrained(ckpt[4], adaln_cache=False)
    np.testing.assert_array_equal(image(cached), image(plain))
    keys = list(params(cached))
    assert keys and not [k for k in keys if "img_mod" in k or "txt_mod" in k]
    assert any("img_mod" in k for k in params(plain))
    # float32 and quantize-at-load too
    for src, kw in ((ckpt["f32"], {}), (ckpt["src"], {"dtype": "float32", "quantize": 8})):
        a = image(QwenImagePipeline.from_pretrained(src, **kw))
        b = image(QwenImagePipeline.from_pretrained(src, adaln_cache=False, **kw))
        np.testing.assert_array_equal(a, b)


def test_adaln_cache_reused_and_invalidated(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(ckpt[8], folder)
    calls = []
    original = adaln.compute_modulation

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(adaln, "compute_modulation", counting)
    first = image(QwenImagePipeline.from_pretrained(folder))
    files = sorted((tmp_path / "cache" / "adaln").glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    # a new pipeline object reads the same file
    np.testing.assert_array_equal(image(QwenImagePipeline.from_pretrained(folder)), first)
    assert len(calls) == 1
    # another schedule is another table
    image(QwenImagePipeline.from_pretrained(folder), num_inference_steps=4)
    assert len(calls) == 2
    # other weights (a shard rewritten) are another table, and another image
    index = json.loads((folder / "transformer" / "model.safetensors.index.json").read_text())
    shard = folder / "transformer" / index["weight_map"]["blocks.0.img_mod.scales"]
    tensors = dict(mx.load(str(shard)))
    tensors["blocks.0.img_mod.scales"] = tensors["blocks.0.img_mod.scales"] * 1.5
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    changed = image(QwenImagePipeline.from_pretrained(folder))
    assert len(calls) == 3 and not np.array_equal(changed, first)


def test_cfg_modulation_once_per_step(ckpt, monkeypatch):
    pipe = QwenImagePipeline.from_pretrained(ckpt["f32"], adaln_cache=False)
    model = pipe.transformer
    seen = []
    original = type(model).modulation

    def spy(self, timestep):
        seen.append(tuple(timestep.shape))
        return original(self, timestep)

    monkeypatch.setattr(type(model), "modulation", spy)
    image(pipe)
    assert seen == [(1,)] * RUN["num_inference_steps"]  # not (2,): the doubled CFG batch


def test_quantize_stream_holds_one_block(tmp_path):
    """Quantizing lazily loaded float32 weights at load never holds them all: the peak stays
    near the quantized model plus one block, far below the float weights' size."""
    from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig

    cfg = TransformerConfig.from_dict(
        dict(num_layers=6, attention_head_dim=64, num_attention_heads=6, joint_attention_dim=64,
             axes_dims_rope=(16, 24, 24), in_channels=64)
    )  # fmt: skip
    weights = dict(tree_flatten(QwenImageTransformer(cfg).parameters()))
    mx.eval(weights)
    total = sum(v.nbytes for v in weights.values())
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), weights)
    del weights
    mx.clear_cache()
    lazy = mx.load(str(path))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    plan = transformer_plan(4)
    out = quantize_stream(lazy, lambda p, s: plan.bits_for(p, s, 6), 64)
    quantized = sum(v.nbytes for v in out.values())
    peak = mx.get_peak_memory() - base
    assert not lazy  # every float tensor was popped as it was used
    assert quantized < total / 3
    assert peak < quantized + 2.5 * total / 6, (peak / 2**20, quantized / 2**20, total / 2**20)


def test_adaln_cache_with_loras(ckpt, tmp_path):
    """A LoRA touching the modulation (and the time embedding, the output norm, attention):
    the table carries it, fused into float weights or beside quantized ones, exactly as the
    uncached model applies it; its identity is part of the cache key."""
    from tiny_lora import layout_tensors, random_factors, save

    model = build_transformer("quantizable", joint_attention_dim=TEXT_HIDDEN)
    modules = (
        "transformer_blocks.0.img_mod.1",
        "transformer_blocks.1.txt_mod.1",
        "transformer_blocks.1.attn.to_q",
        "norm_out.linear",
        "time_text_embed.timestep_embedder.linear_1",
    )
    tensors, _ = layout_tensors("diffusion_model", random_factors(model, modules, 4, 3), 2.0)
    path = save(tmp_path / "mod.safetensors", tensors)
    for which in ("f32", 8):
        images = []
        for cache in (True, False):
            pipe = QwenImagePipeline.from_pretrained(ckpt[which], adaln_cache=cache)
            plain = image(pipe) if cache else None
            pipe.load_lora(path, 0.8)
            images.append(image(pipe))
            if cache:
                assert not np.array_equal(images[0], plain)  # the LoRA changed the image
        np.testing.assert_array_equal(images[0], images[1])
