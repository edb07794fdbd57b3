"""The adaLN cache: precomputed modulation gives the very same outputs, with no modulation
weights in memory; the cache file is keyed, reused, invalidated and repaired.

float32 throughout (exact equality is the claim), plus a quantized and a bf16-plan model to show
the table is computed from the weights exactly as the model would use them.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny
from mlx.utils import tree_flatten
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx import adaln
from qwen_mlx.adaln import AdaLNCache, compute_modulation
from qwen_mlx.io import load_folder, read_json
from qwen_mlx.loading import ModelSource
from qwen_mlx.models.transformer import MODULATION_WEIGHTS, QwenImageTransformer, TransformerConfig
from qwen_mlx.pipelines.components import Components
from qwen_mlx.precision import PrecisionPlan

SIGMAS = [1.0, 0.8125, 0.55, 0.2, 0.02]
SHAPES = [[(1, 3, 5)]] * 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaln")
    ref = build_transformer(
        "quantizable",
        std=0.1,
        num_layers=3,
        joint_attention_dim=64,
    )
    src = save_checkpoint(ref, root / "src")
    return {
        "f32": convert_tiny(src, root / "f32") / "transformer",
        "q8": convert_tiny(src, root / "q8", quantize=8) / "transformer",
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    return AdaLNCache()


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = mx.array(torch.randn(batch, 15, 16, generator=g).numpy())
    enc = mx.array(torch.randn(batch, 7, 64, generator=g).numpy())
    mask = np.ones((batch, 7), dtype=np.int32)
    mask[-1, 4:] = 0
    return x, enc, mx.array(mask)


def transformer_table(folder, plan, sigmas):
    """The table the pipelines build: ``Components.modulation_table`` of the checkpoint that
    holds ``folder`` (the sigmas the transformer receives, one per step)."""
    source = ModelSource(folder.parent, converted=True, name=str(folder.parent))
    components = Components(source, plan, adaln_cache=True)
    return components.modulation_table(mx.array([float(s) for s in sigmas], dtype=mx.float32))


def lean(folder, plan=None) -> QwenImageTransformer:
    config = read_json(folder / "config.json")
    return QwenImageTransformer.from_weights(config, load_folder(folder), plan, modulation=False)


@pytest.mark.parametrize("which,plan", [("f32", None), ("q8", None), ("f32", "bfloat16")])
def test_cached_equals_uncached(ckpt, cache, which, plan):
    folder = ckpt[which]
    full = QwenImageTransformer.from_pretrained(folder, plan)
    model = lean(folder, plan)
    table = transformer_table(folder, model.plan, SIGMAS)
    assert len(table) == len(SIGMAS)
    x, enc, mask = inputs()
    for step, sigma in enumerate(SIGMAS):
        # True CFG shares one sigma across the doubled batch: the table holds batch 1.
        mod = table[step]
        assert mod.blocks[0][0].shape == (1, 6 * 64) and mod.out.shape == (1, 2 * 64)
        expected = full(x, enc, mask, mx.array([sigma, sigma]), SHAPES)
        got = model(x, enc, mask, None, SHAPES, modulation=mod)
        np.testing.assert_array_equal(np.array(got), np.array(expected))
        # ... and the uncached path computing it once for the batch gives the same.
        once = full(x, enc, mask, None, SHAPES, modulation=full.modulation(mx.array([sigma])))
        np.testing.assert_array_equal(np.array(once), np.array(expected))


def test_no_modulation_parameters_remain(ckpt):
    model = lean(ckpt["q8"])
    keys = [k for k, _ in tree_flatten(model.parameters())]
    assert keys and not [k for k in keys if "img_mod" in k or "txt_mod" in k]
    assert not [k for k in keys if k.startswith(("time_embed.", "norm_out."))]
    with pytest.raises(ValueError, match="without its modulation weights"):
        model(*inputs(), mx.array([0.5, 0.5]), SHAPES)


def test_streaming_releases_each_layer(ckpt):
    """compute_modulation pops each layer's weights as it goes (nothing keeps them)."""
    folder = ckpt["f32"]
    config = read_json(folder / "config.json")
    weights = load_folder(folder)
    n_mod = sum(1 for k in weights if MODULATION_WEIGHTS.match(k))
    before = len(weights)
    stored = PrecisionPlan.from_config(config, 3)
    compute_modulation(TransformerConfig.from_dict(config), weights, stored, stored, SIGMAS[:2])
    assert n_mod == 3 * 2 * 2 + 2 + 4 and len(weights) == before - n_mod


def test_cache_file_reused_by_a_new_object(ckpt, cache, monkeypatch):
    folder = ckpt["f32"]
    plan = QwenImageTransformer.from_pretrained(folder).plan
    table = transformer_table(folder, plan, SIGMAS)
    assert table.path.parent == cache.root and str(cache.root).endswith(
        os.path.join("cache", "adaln")
    )
    stamp = table.path.stat().st_mtime_ns
    builds = []
    monkeypatch.setattr(adaln, "compute_modulation", lambda *a, **k: builds.append(1) or [])
    again = transformer_table(folder, plan, SIGMAS)  # a new Components, the same run
    assert not builds and again.path == table.path and again.path.stat().st_mtime_ns == stamp


def test_cache_invalidated_by_sigmas_and_weights(ckpt, cache, tmp_path):
    folder = ckpt["f32"]
    plan = QwenImageTransformer.from_pretrained(folder).plan
    a = transformer_table(folder, plan, SIGMAS)
    shifted = SIGMAS[:2] + [np.nextafter(np.float32(0.55), np.float32(1))] + SIGMAS[3:]
    b = transformer_table(folder, plan, shifted)
    assert a.path != b.path  # one float32 ulp of one sigma is another schedule
    assert not np.array_equal(np.array(a[2].out), np.array(b[2].out))
    bf16 = QwenImageTransformer.from_pretrained(folder, "bfloat16").plan
    assert transformer_table(folder, bf16, SIGMAS).path != a.path

    # Changing the weights (here: one shard rewritten with a modulation weight doubled).
    import shutil

    copy = tmp_path / "copy" / "transformer"
    shutil.copytree(folder, copy)
    old = transformer_table(copy, plan, SIGMAS)
    index = read_json(copy / "model.safetensors.index.json")["weight_map"]
    shard = copy / index["blocks.1.img_mod.weight"]
    tensors = dict(mx.load(str(shard)))
    tensors["blocks.1.img_mod.weight"] = tensors["blocks.1.img_mod.weight"] * 2
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    new = transformer_table(copy, plan, SIGMAS)
    assert new.path != old.path
    assert not np.array_equal(np.array(new[0].blocks[1][0]), np.array(old[0].blocks[1][0]))
    np.testing.assert_array_equal(np.array(new[0].blocks[0][0]), np.array(old[0].blocks[0][0]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_file_is_rebuilt(ckpt, cache, damage):
    folder = ckpt["f32"]
    plan = QwenImageTransformer.from_pretrained(folder).plan
    good = transformer_table(folder, plan, SIGMAS)
    expected = np.array(good[3].blocks[2][1])
    data = bytearray(good.path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0x10  # one bit of one stored value
    else:
        data = bytearray(b"not a safetensors file")
    good.path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="adaLN cache.*rebuilding"):
        table = transformer_table(folder, plan, SIGMAS)
    np.testing.assert_array_equal(np.array(table[3].blocks[2][1]), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transformer_table(folder, plan, SIGMAS)  # repaired: no warning the next time
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]  # no temp files
